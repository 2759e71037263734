"""One name for a model: GPT-2 from the hub cache or a directory, smallgpt checkpoints, and
fine-tuning from any of them (train.init_from). Offline: a small random GPT-2 written by
transformers, with the real 50257-token vocabulary, stands in for OpenAI's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.batches import BatchSampler
from model.checkpoint import load_checkpoint
from model.config import config_from_dict
from model.errors import CheckpointError, ConfigError
from model.gpt import GPT
from model.prepare import prepare_data
from model.pretrained import is_hf_directory, load_model
from model.sampling import generate
from model.training import train

transformers = pytest.importorskip("transformers")
TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"


@pytest.fixture(autouse=True)
def offline_gpt2_vocabulary(monkeypatch):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip("needs ../shared/tiktoken_cache for the GPT-2 vocabulary offline")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A GPT-2-shaped Hugging Face directory: 2 layers, 32 wide, 64 positions, 50257 tokens."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    directory = tmp_path_factory.mktemp("gpt2-small-random")
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return directory


def hf_model(directory: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    lines = [f"Line {i}: to be or not to be, that is question number {i % 17}." for i in range(600)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def finetune_raw(tmp_path: Path, init_from: str, model: dict | None = None,
                 data: dict | None = None, **train_overrides) -> dict:
    train_cfg = dict(out_dir=str(tmp_path / "ft"), max_steps=3, batch_size=2, lr=1e-3,
                     min_lr=1e-4, warmup_steps=1, eval_interval=3, eval_steps=1, log_interval=1,
                     seed=3, device="cpu", threads=1, init_from=init_from)
    train_cfg.update(train_overrides)
    return {"model": {"block_size": 32, **(model or {})},
            "data": {"source": str(corpus(tmp_path)), "cache_dir": str(tmp_path / "cache"),
                     "num_proc": 1, **(data or {})},
            "train": train_cfg}


# -- loading by name ------------------------------------------------------------------------

def test_gpt2_directory_samples_like_transformers(gpt2_dir):
    loaded = load_model(str(gpt2_dir))
    assert loaded.kind == "gpt2" and loaded.tokenizer.name == "gpt2"
    assert is_hf_directory(gpt2_dir) and str(gpt2_dir) in loaded.description
    prompt = "Hello world, this is"
    ours = [s.token for s in generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=20,
                                      temperature=0, ignore_eot=True)]
    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    theirs = hf_model(gpt2_dir).generate(ids, max_new_tokens=20, do_sample=False,
                                         pad_token_id=50256)[0, ids.size(1):].tolist()
    assert ours == theirs


def test_from_pretrained_names_the_same_models(gpt2_dir, tmp_path):
    model = GPT.from_pretrained(str(gpt2_dir))
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf_model(gpt2_dir)(idx).logits,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        load_model(None, root=tmp_path / "nothing")


def fill_hub_cache(cache: Path, source: Path, name: str = "gpt2") -> Path:
    """The Hugging Face cache layout: models--<org>--<name>/snapshots/<commit>/ + refs/main."""
    repo = cache / f"models--openai-community--{name}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copy(source / file, snapshot / file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_name_reads_a_cached_copy_without_network(gpt2_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as err:
        load_model("gpt2")
    message = str(err.value)
    assert "gpt2: not in the Hugging Face cache" in message and "local GPT-2" in message
    assert "\n" not in message
    snapshot = fill_hub_cache(tmp_path / "hub", gpt2_dir)
    loaded = load_model("gpt2")
    assert loaded.path == snapshot and loaded.model.config.vocab_size == 50257
    assert "openai-community/gpt2" in loaded.description


# -- fine-tuning ----------------------------------------------------------------------------

def test_finetuning_gpt2_starts_from_its_weights(gpt2_dir, tmp_path):
    cfg = config_from_dict(finetune_raw(tmp_path, str(gpt2_dir)))
    result = train(cfg, progress=False)
    saved = load_checkpoint(result.run_dir)
    assert saved.tokenizer.name == "gpt2" and saved.config.model.n_layer == 2
    assert saved.config.model.block_size == 32  # cropped from 64
    assert saved.config.train.init_from == str(gpt2_dir)
    # The first step's loss is the pretrained model's loss on that batch, as transformers has it.
    data = prepare_data(saved.config.data, 32, progress=False)
    x, y = BatchSampler(data.train_path, 32, 2, seed=3).next_batch()
    with torch.no_grad():
        logits = hf_model(gpt2_dir)(x).logits
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    assert result.losses[0] == pytest.approx(expected.item(), rel=1e-4)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert any(r.get("step") == 0 and "val_loss" in r for r in records)  # logged before step 1


def test_contradicting_keys_and_tokenizers_are_errors(gpt2_dir, tmp_path):
    cases = [({"model": {"n_layer": 3}}, "model.n_layer: 3 contradicts"),
             ({"model": {"block_size": 128}}, "model.block_size: 128 is larger than the 64"),
             ({"data": {"tokenizer": "char"}}, "data.tokenizer: 'char' cannot be used")]
    for overrides, message in cases:
        raw = finetune_raw(tmp_path, str(gpt2_dir), **overrides)
        with pytest.raises(ConfigError, match=message) as err:
            train(config_from_dict(raw), progress=False)
        assert "\n" not in str(err.value)


def test_finetuning_a_smallgpt_checkpoint_keeps_its_tokenizer(tmp_path):
    first = finetune_raw(tmp_path, "scratch", model={"n_layer": 1, "n_head": 2, "n_embd": 16},
                         data={"tokenizer": "char"}, out_dir=str(tmp_path / "base"))
    base = train(config_from_dict(first), progress=False)
    other = tmp_path / "other.txt"
    other.write_text("to be or not to be " * 300, encoding="utf-8")
    raw = finetune_raw(tmp_path, str(base.run_dir), data={"source": str(other)})
    result = train(config_from_dict(raw), progress=False)
    source, tuned = load_checkpoint(base.run_dir), load_checkpoint(result.run_dir)
    assert tuned.tokenizer.spec() == source.tokenizer.spec()  # never a newly trained one
    assert tuned.config.model.n_embd == 16 and result.steps == 3  # its shape, a fresh count
    with pytest.raises(ConfigError, match="train.out_dir"):
        train(config_from_dict(finetune_raw(tmp_path, str(base.run_dir),
                                            out_dir=str(base.run_dir))), progress=False)
