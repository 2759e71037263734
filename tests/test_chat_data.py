"""Chat data and chat fine-tuning: records from files, directories and hf: data files, the loss
mask in the batches (a gradient test), clear errors for bad records, the demo set, a tiny
fine-tune that lowers the held-out reply loss, and resume bit for bit."""

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from model.config import DataConfig, config_from_dict
from model.data.chat_batches import ChatBatchSampler, conversation_rows, usable
from model.data.chat_data import prepare_chat
from model.data.chat_demo import demo_records
from model.data.tokenizer import train_tokenizer
from model.errors import ChatFormatError, DataError, TokenizerError
from model.training.loop import train
from model.weights.loading import load_model

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;?!'\n"
WORDS = ["apple", "river", "stone", "cloud", "ember", "frost", "grove", "harbor", "ivory",
         "jasper", "kettle", "lantern"]


def conversations(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: the reply repeats the word the user names, in capitals."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = rng.choice(WORDS)
        messages = [{"role": "user", "content": f"Shout {word}."},
                    {"role": "assistant", "content": f"{word.upper()}!"}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Be loud."}, *messages]
        if i % 4 == 0:
            out.append({"instruction": f"Shout {word}.", "input": "", "output": f"{word.upper()}!"})
        else:
            out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chars():
    return train_tokenizer("char", [ALPHABET + "System: User: Assistant: Shout Be loud!"])


def data_cfg(source: Path | str, cache: Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), format="chat", cache_dir=str(cache),
                      val_fraction=kw.pop("val_fraction", 0.2), **kw)


def test_jsonl_file_and_directory_prepare_tokens_and_mask(tmp_path, chars):
    records = conversations(60)
    file = write_jsonl(tmp_path / "d" / "a.jsonl", records[:30])
    write_jsonl(tmp_path / "d" / "sub" / "b.jsonl", records[30:])
    whole = prepare_chat(data_cfg(tmp_path / "d", tmp_path / "cache"), 64, tokenizer=chars)
    stats = whole.meta["splits"]
    assert stats["train"]["conversations"] + stats["val"]["conversations"] == 60
    assert 0 < stats["val"]["conversations"] < 30
    # Each conversation's mask marks exactly its reply and the end-of-text after it.
    tokens, mask, index = whole.tokens("train"), whole.mask("train"), whole.index("train")
    for start, length, first_end in index[:5]:
        ids, m = tokens[start:start + length], mask[start:start + length]
        assert chars.decode(ids[m == 1]).endswith("!<|endoftext|>")
        assert first_end == np.flatnonzero((m == 1) & (ids == chars.eot_id))[0]
        assert "Shout" in chars.decode(ids[m == 0])
    assert prepare_chat(data_cfg(tmp_path / "d", tmp_path / "cache"), 64, tokenizer=chars).reused
    single = prepare_chat(data_cfg(file, tmp_path / "cache"), 64, tokenizer=chars)
    assert single.dir != whole.dir


@pytest.mark.parametrize("damage", ["short mask", "missing index", "old version"])
def test_a_damaged_chat_cache_is_rebuilt_never_used(tmp_path, chars, damage):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(40))
    good = prepare_chat(data_cfg(path, tmp_path / "cache"), 64, tokenizer=chars)
    files = {p.name: p.read_bytes() for p in good.dir.iterdir()}
    if damage == "short mask":
        good.path("train", "mask").write_bytes(files["train.mask"][:-1])
    elif damage == "missing index":
        good.path("val", "index").unlink()
    else:
        meta = json.loads(files["meta.json"])
        (good.dir / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    seen = []

    @contextlib.contextmanager
    def progress(stage, total=None, unit="B"):
        yield seen.append

    rebuilt = prepare_chat(data_cfg(path, tmp_path / "cache"), 64, progress, chars)
    assert not rebuilt.reused and rebuilt.dir == good.dir and len(seen) == 40
    assert {p.name: p.read_bytes() for p in rebuilt.dir.iterdir()} == files


def test_hf_data_files_stream_through_datasets(tmp_path, chars):
    file = write_jsonl(tmp_path / "hub.jsonl", [{"messages": r["messages"]}
                                                for r in conversations(40) if "messages" in r])
    data = prepare_chat(data_cfg(f"hf:{file}", tmp_path / "cache"), 64, tokenizer=chars)
    counts = data.meta["splits"]
    local = prepare_chat(data_cfg(file, tmp_path / "cache2"), 64, tokenizer=chars)
    assert counts == local.meta["splits"]  # same records, same content-hash split


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
     r"bad\.jsonl:3: messages\[1\]\.role: 'bot' is not one of"),
    ('{"instruction": "hi"}', r"bad\.jsonl:3: output: missing"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}',
     r"bad\.jsonl:3: messages: has no assistant message"),
    ('{"messages": [{"role": "user", "content": "hi"}', r"bad\.jsonl:3: not valid JSON"),
    ('{"text": "plain"}', r"bad\.jsonl:3: record has neither 'messages' nor"),
])
def test_bad_records_name_file_line_and_field(tmp_path, chars, line, message):
    good = json.dumps(conversations(1)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        prepare_chat(data_cfg(path, tmp_path / "cache"), 64, tokenizer=chars)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").rglob("meta.json"))  # nothing half-written is kept
    if "role" in message:
        assert isinstance(err.value, ChatFormatError) and err.value.field == "messages[1].role"


def test_text_outside_a_char_vocabulary_names_the_record(tmp_path, chars):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "Shout 7.", "output": "7!"}])
    with pytest.raises(TokenizerError, match=r"x\.jsonl:1: text has 1 characters outside"):
        prepare_chat(data_cfg(path, tmp_path / "cache"), 64, tokenizer=chars)


def test_missing_source_and_untrained_tokenizer_are_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_chat(data_cfg(tmp_path / "nope.jsonl", tmp_path), 64,
                     tokenizer=train_tokenizer("char", ["ab"]))
    with pytest.raises(DataError, match="needs the tokenizer of the model it fine-tunes"):
        prepare_chat(data_cfg(tmp_path, tmp_path, tokenizer="char"), 64)


@pytest.fixture
def chat_data(tmp_path, chars):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(80))
    return prepare_chat(data_cfg(path, tmp_path / "cache"), 48, tokenizer=chars)


def test_batches_hold_whole_conversations_with_replies_as_the_only_targets(chat_data):
    sampler = ChatBatchSampler(chat_data, 48, 4, seed=3)
    x, y = sampler.next_batch()
    tokens, index = chat_data.tokens("train"), chat_data.index("train")
    starts = {tuple(tokens[s:s + n][:8]) for s, n, _ in index}
    for row in range(x.size(0)):
        assert tuple(x[row, :8].tolist()) in starts  # every row starts a conversation
        text = chat_data.tokenizer.decode([t for t in y[row].tolist() if t >= 0])
        assert text.count("<|endoftext|>") == 1 and "Shout" not in text
    # Resuming from the state continues the same sequence of batches.
    state = sampler.state_dict()
    after = sampler.next_batch()
    again = ChatBatchSampler(chat_data, 48, 4, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, again.next_batch()))


def test_a_long_conversation_is_cut_after_its_last_whole_reply(tmp_path, chars):
    long = {"messages": [{"role": "user", "content": "Shout apple."},
                         {"role": "assistant", "content": "APPLE!"},
                         {"role": "user", "content": "Shout river, " * 6},
                         {"role": "assistant", "content": "RIVER!"}]}
    too_long = {"messages": [{"role": "user", "content": "Shout stone, " * 8},
                             {"role": "assistant", "content": "STONE!"}]}
    path = write_jsonl(tmp_path / "long.jsonl", [long, too_long, *conversations(20)])
    data = prepare_chat(data_cfg(path, tmp_path / "cache"), 64, tokenizer=chars)
    found = []
    for split in ("train", "val"):
        index = data.index(split)
        for i in np.flatnonzero(index[:, 1] > 65):
            found.append((split, i, i in usable(data, split, 64)))
    assert sorted(ok for _, _, ok in found) == [False, True]  # too_long's reply ends too late
    split, i, _ = next(f for f in found if f[2])
    x, y = conversation_rows(data, split, np.array([i]), 64, torch.device("cpu"))
    assert x.size(1) == 40  # the first reply ends at token 33: a row of 34, 40 wide
    assert chars.decode([t for t in y[0].tolist() if t >= 0]) == " APPLE!<|endoftext|>"


def test_masked_positions_carry_no_gradient(chat_data):
    """Changing what a user, system or header position would predict changes nothing: the
    gradient of the loss reaches the logits at reply positions only."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=chat_data.tokenizer.vocab_size, block_size=64, n_layer=1,
                          n_head=2, n_embd=16))
    x, y = conversation_rows(chat_data, "val", np.array([0, 1]), 64, torch.device("cpu"))
    index, mask = chat_data.index("val"), chat_data.mask("val")
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    grad = logits.grad.abs().sum(-1)  # (B, T)
    for row in range(2):
        start, length, _ = index[row]
        trained = torch.from_numpy(mask[start + 1:start + length].astype(bool))
        assert (grad[row, :length - 1][~trained] == 0).all()
        assert (grad[row, :length - 1][trained] > 0).all()
        assert (grad[row, length - 1:] == 0).all()  # padding


def test_demo_set_has_checkable_answers_and_a_disjoint_held_out_split():
    records = list(demo_records())
    train_set = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert len(val) > 500 and len(train_set) > 8 * len(val)
    tasks = {t for r in records for t in r["tasks"]}
    assert tasks == {"play", "speaker", "continue"}
    for r in records[:2000]:
        replies = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert len(replies) == len(r["tasks"]) == len(r["options"])
        for reply, options in zip(replies, r["options"]):
            assert not options or (reply in options and len(options) == 4)
    # Held-out passages are not in training (a few stock lines, "Ha, ha!", recur in any play).
    def passages(rs):
        return {next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rs}
    assert len(passages(train_set) & passages(val)) < 0.01 * len(val)
    assert any(len(r["tasks"]) == 2 for r in records)
    assert any(r["messages"][0]["role"] == "system" for r in records)


# -- fine-tuning ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny char model trained for a few steps on text with the chat data's characters."""
    root = tmp_path_factory.mktemp("chat_base")
    text = (ALPHABET + "System: Be loud. User: Shout apple. Assistant: APPLE!\n") * 200
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    cfg = config_from_dict({
        "model": dict(block_size=48, n_layer=1, n_head=2, n_embd=32, pos_emb="rope"),
        "data": dict(source=str(root / "corpus.txt"), tokenizer="char",
                     cache_dir=str(root / "cache"), num_proc=1),
        "train": dict(out_dir=str(root / "base"), max_steps=5, batch_size=4, eval_interval=5,
                      eval_steps=1, log_interval=1, device="cpu", threads=1, seed=1)}, name="b")
    train(cfg)
    return root


def chat_raw(root: Path, out: str, **train_kw) -> dict:
    source = root / "chat.jsonl"
    if not source.exists():
        write_jsonl(source, conversations(300, seed=5))
    return {"data": dict(source=str(source), format="chat", cache_dir=str(root / "cache"),
                         val_fraction=0.2),
            "train": {**dict(init_from=str(root / "base"), out_dir=str(root / out),
                             max_steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                             eval_interval=15, eval_steps=2, log_interval=1, device="cpu",
                             threads=1, seed=2), **train_kw}}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_chat_fine_tune_lowers_the_held_out_reply_loss(base_run):
    result = train(config_from_dict(chat_raw(base_run, "chat"), name="c"))
    vals = [r["val_loss"] for r in metrics(result.run_dir) if "val_loss" in r]
    assert vals[0] == pytest.approx(vals[0]) and len(vals) == 3  # step 0, 15 and 30
    assert vals[-1] < vals[0] - 0.5
    saved = load_model(str(result.run_dir))
    assert saved.config.data.format == "chat"


@pytest.mark.slow
def test_chat_fine_tune_resumes_bit_for_bit(base_run):
    full = train(config_from_dict(chat_raw(base_run, "full", max_steps=6, eval_interval=3),
                                  name="c"))
    cfg = config_from_dict(chat_raw(base_run, "part", max_steps=6, eval_interval=3), name="c")
    cfg.train.time_budget_s = 1e-9  # stops after its first step, with a checkpoint
    train(cfg)
    resumed = train(config_from_dict(chat_raw(base_run, "part", max_steps=6, eval_interval=3,
                                               resume=True), name="c"))
    assert resumed.losses == full.losses[1:]
    a, b = load_model(str(full.run_dir)).model, load_model(str(resumed.run_dir)).model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
