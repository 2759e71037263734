"""One name for a model: GPT-2 from the hub cache or a directory, smallgpt checkpoints, and
fine-tuning from any of them (train.init_from). Offline: a small random GPT-2 written by
transformers, with the real 50257-token vocabulary, stands in for OpenAI's weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import model as smallgpt
from model.cli.explore import main as explore_main
from model.config import Config, config_from_dict, load_config
from model.data.batches import BatchSampler
from model.data.prepare import prepare_data
from model.data.tokenizer import GPT2Tokenizer, train_tokenizer
from model.errors import CheckpointError, ConfigError
from model.gpt import GPT, GPTConfig
from model.inference.sampling import generate
from model.training.finetune import adopt_source
from model.training.loop import train
from model.weights.checkpoint import load_weights, read_checkpoint_config, save_checkpoint
from model.weights.loading import (
    Pretrained,
    is_hf_directory,
    load_checkpoint,
    load_model,
    model_from_source,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def offline_gpt2_vocabulary(gpt2_vocabulary):
    """Every test here reads GPT-2's vocabulary (conftest: skipped where tiktoken cannot)."""


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
    assert loaded.kind == "huggingface" and loaded.tokenizer.name == "gpt2"
    assert is_hf_directory(gpt2_dir) and str(gpt2_dir) in loaded.description
    prompt = "Hello world, this is"
    ours = [s.token for s in generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=20,
                                      temperature=0, ignore_eot=True)]
    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    theirs = hf_model(gpt2_dir).generate(ids, max_new_tokens=20, do_sample=False,
                                         pad_token_id=50256)[0, ids.size(1):].tolist()
    assert ours == theirs


def test_load_model_names_the_same_models(gpt2_dir, tmp_path):
    model = smallgpt.load_model(str(gpt2_dir)).model  # the public API (no GPT.from_pretrained)
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf_model(gpt2_dir)(idx).logits,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        load_model(None, root=tmp_path / "nothing")


def test_load_checkpoint_takes_every_model_name(gpt2_dir):
    ckpt = smallgpt.load_checkpoint(gpt2_dir)  # the public API, the name sample.py takes
    assert ckpt.tokenizer.name == "gpt2" and ckpt.path == gpt2_dir and ckpt.state == {}
    assert ckpt.config.model == ckpt.model.config and ckpt.config.data.tokenizer == "gpt2"
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(idx)[0], hf_model(gpt2_dir)(idx).logits,
                                   rtol=1e-4, atol=1e-4)


def test_explore_commands_run_on_gpt2(gpt2_dir, tmp_path, capsys):
    def explore(*argv: str) -> str:
        assert explore_main([*argv, "--checkpoint", str(gpt2_dir)]) == 0
        captured = capsys.readouterr()
        assert captured.err.startswith("using GPT-2 weights")
        return captured.out

    assert "' king' is one token (id 5822)" in explore("neighbors", "king", "-k", "3")
    assert "' king' - ' man' + ' woman' is nearest to" in explore("analogy", "king", "man",
                                                                  "woman", "-k", "3")
    out = explore("direction", "cats", "cat", "--words", "dogs dog houses house")
    assert "direction ' cats' - ' cat'" in out and out.count("\n") == 6
    out = explore("next", "Hello world", "--temperatures", "0.5", "2", "-k", "3",
                  "--out", str(tmp_path / "next.png"))
    assert "prompt tokens: 'Hello' ' world'" in out and "p@T=2" in out
    out = explore("lens", "To be, or not", "-k", "2")
    assert "after ' not' (position 4)" in out and "block 1" in out
    out = explore("attention", "To be, or not", "--layer", "0", "--head", "1",
                  "--out", str(tmp_path / "attention.png"))
    assert "layer 0, head 1" in out and "' not'" in out
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"


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
    result = train(cfg)
    saved = load_checkpoint(result.run_dir)
    assert saved.tokenizer.name == "gpt2" and saved.config.model.n_layer == 2
    assert saved.config.model.block_size == 32  # cropped from 64
    assert saved.config.train.init_from == str(gpt2_dir)
    # The first step's loss is the pretrained model's loss on that batch, as transformers has it.
    data = prepare_data(saved.config.data, 32)
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
            train(config_from_dict(raw))
        assert "\n" not in str(err.value)


def test_given_keys_contradict_even_at_their_default(gpt2_dir, tmp_path):
    # GPT-2's activation is gelu_tanh and its n_layer 2; gelu and 6 are the defaults, asked for.
    raw = finetune_raw(tmp_path, str(gpt2_dir), model={"activation": "gelu"})
    with pytest.raises(ConfigError, match="model.activation: 'gelu' contradicts"):
        train(config_from_dict(raw))
    path = tmp_path / "ft.yaml"
    path.write_text(f"train:\n  init_from: {gpt2_dir}\n", encoding="utf-8")
    cfg = load_config(path, ["model.n_layer=6", "data.tokenizer=gpt2"])  # overrides count too
    assert cfg.given == {"train.init_from", "model.n_layer", "data.tokenizer"}
    with pytest.raises(ConfigError, match="model.n_layer: 6 contradicts"):
        adopt_source(cfg, load_model(str(gpt2_dir)))
    # Built in Python nothing is known to be given: a default takes the pretrained value.
    python_cfg = Config(train=cfg.train)
    assert python_cfg.given is None
    assert adopt_source(python_cfg, load_model(str(gpt2_dir))).model.n_layer == 2


def long_gpt2(block_size: int = 512) -> Pretrained:
    """A GPT-2-shaped source with more positions than the default block_size (256)."""
    shape = GPTConfig(vocab_size=50257, block_size=block_size, n_layer=1, n_head=2, n_embd=8,
                      activation="gelu_tanh")
    return Pretrained(model=GPT(shape), tokenizer=GPT2Tokenizer(), kind="huggingface",
                      path=Path("gpt2"), description="a long GPT-2")


def test_block_size_is_the_sources_unless_given(tmp_path):
    source = long_gpt2()
    raw = {"train": {"init_from": "gpt2", "out_dir": str(tmp_path / "ft")}}
    assert adopt_source(config_from_dict(raw), source).model.block_size == 512
    raw["model"] = {"block_size": 256}  # given: cropped, even to the default
    assert adopt_source(config_from_dict(raw), source).model.block_size == 256
    raw["model"] = {"block_size": 1024}
    with pytest.raises(ConfigError, match="model.block_size: 1024 is larger than the 512"):
        adopt_source(config_from_dict(raw), source)
    # A Config built in Python keeps the rule for unknown provenance: the default crops.
    assert adopt_source(Config(), source).model.block_size == 256


def test_the_model_takes_the_sources_tensors(gpt2_dir, tmp_path):
    source = load_model(str(gpt2_dir))
    cfg = adopt_source(config_from_dict(finetune_raw(tmp_path, str(gpt2_dir))), source)
    model, line = model_from_source(cfg.model, source)
    # 29 names in the state dict, W_U under lm_head being W_E itself: 28 tensors.
    assert len(model.state_dict()) == 29 and len(list(model.parameters())) == 28
    assert "28 tensors loaded" in line and "block_size cropped 64 -> 32" in line
    assert model.lm_head.weight is model.tok_emb.weight and model.training
    # Held once: the parameters are the source's tensors (but the cropped position table).
    assert model.blocks[0].attn.qkv.weight.data_ptr() == \
        source.model.blocks[0].attn.qkv.weight.data_ptr()
    assert not any(t.is_meta for t in model.state_dict().values())
    # Untied, rotary (its table is no tensor of the state dict, so rebuilt), no crop.
    torch.manual_seed(0)
    shape = GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8,
                      pos_emb="rope", tie_embeddings=False)
    other = Pretrained(model=GPT(shape), tokenizer=train_tokenizer("char", ["abcdefghij"]),
                       kind="smallgpt", path=tmp_path, description="a rotary model")
    model, line = model_from_source(shape, other)
    assert f"{len(model.state_dict())} tensors loaded" in line and "cropped" not in line
    idx = torch.randint(0, 11, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], other.model(idx)[0], rtol=0, atol=0)


def test_finetuning_a_smallgpt_checkpoint_keeps_its_tokenizer(tmp_path):
    first = finetune_raw(tmp_path, "scratch", model={"n_layer": 1, "n_head": 2, "n_embd": 16},
                         data={"tokenizer": "char"}, out_dir=str(tmp_path / "base"))
    base = train(config_from_dict(first))
    other = tmp_path / "other.txt"
    other.write_text("to be or not to be " * 300, encoding="utf-8")
    raw = finetune_raw(tmp_path, str(base.run_dir), data={"source": str(other)})
    result = train(config_from_dict(raw))
    source, tuned = load_checkpoint(base.run_dir), load_checkpoint(result.run_dir)
    assert tuned.tokenizer.spec() == source.tokenizer.spec()  # never a newly trained one
    assert tuned.config.model.n_embd == 16 and result.steps == 3  # its shape, a fresh count
    with pytest.raises(ConfigError, match="train.out_dir"):
        train(config_from_dict(finetune_raw(tmp_path, str(base.run_dir),
                                            out_dir=str(base.run_dir))))
    # Asking for GPT-2's tokenizer (the default) is an error too, once it is written out.
    raw = finetune_raw(tmp_path, str(base.run_dir), data={"tokenizer": "gpt2"})
    with pytest.raises(ConfigError, match="data.tokenizer: 'gpt2' cannot be used"):
        train(config_from_dict(raw))
    # A config saved with a checkpoint reloads with every key given, and it agrees with its
    # own weights: fine-tuning from the run with its own saved config works.
    saved = source.config
    assert saved.given is not None and "model.n_layer" in saved.given
    assert "given" not in saved.to_dict()
    again = dataclasses.replace(saved, train=dataclasses.replace(
        saved.train, init_from=str(base.run_dir), out_dir=str(tmp_path / "again")))
    adopted = adopt_source(again, load_model(str(base.run_dir)))
    assert adopted.model == source.config.model and adopted.data.tokenizer == "char"


def saved_model(tmp_path: Path, **shape) -> tuple[GPT, Path]:
    """A random GPT of `shape` saved as a smallgpt checkpoint, and that checkpoint."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, **shape)
    model = GPT(config).eval()
    spec = train_tokenizer("char", ["abcdefghij klmnop"]).spec()
    return model, save_checkpoint(tmp_path / "ckpt", model, Config(model=config), spec)


@pytest.mark.parametrize("shape", [dict(pos_emb="rope", tie_embeddings=True),
                                   dict(pos_emb="learned", tie_embeddings=False)])
def test_a_checkpoint_is_loaded_without_the_random_init_it_replaces(tmp_path, monkeypatch,
                                                                   shape):
    model, ckpt = saved_model(tmp_path, **shape)

    def no_init(*args, **kwargs):
        raise AssertionError("random init ran for weights about to be loaded")

    monkeypatch.setattr(GPT, "reset_parameters", no_init)
    monkeypatch.setattr(torch.nn.init, "normal_", no_init)
    loaded = load_model(ckpt).model
    x = torch.arange(16)[None] % 50
    assert torch.equal(loaded(x)[0], model(x)[0])
    # Tied weights are one Parameter again; the rotary table is computed, not left on meta.
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == shape["tie_embeddings"]
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    half = load_model(ckpt, dtype=torch.bfloat16).model
    assert {t.dtype for t in (*half.parameters(), *half.buffers())} == {torch.bfloat16}
    assert (half.lm_head.weight is half.tok_emb.weight) == shape["tie_embeddings"]


class ScaledGPT(GPT):
    """A variant whose __init__ computes a buffer that no state dict holds."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.register_buffer("scale", torch.full((), 0.5), persistent=False)

    def forward(self, idx, targets=None, cache=None):
        logits, loss = super().forward(idx, targets, cache)
        return logits * self.scale, loss


def test_a_class_with_buffers_outside_its_state_dict_is_built_the_plain_way(tmp_path):
    model, ckpt = saved_model(tmp_path)
    loaded = load_model(ckpt, model_class=ScaledGPT).model
    assert float(loaded.scale) == 0.5
    x = torch.arange(16)[None] % 50
    assert torch.equal(loaded(x)[0], model(x)[0] * 0.5)


class OffsetGPT(GPT):
    """Keeps a plain tensor attribute, neither parameter nor buffer: on meta it stays meta."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.offset = torch.full((), 3.0)

    def forward(self, idx, targets=None, cache=None):
        logits, loss = super().forward(idx, targets, cache)
        return logits + self.offset, loss


class NumpyOffsetGPT(OffsetGPT):
    """Reads a tensor through numpy in __init__, which fails on meta."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.offset = torch.full((), float(torch.arange(3.0).numpy().sum()))  # 3.0


@pytest.mark.parametrize("model_class", [OffsetGPT, NumpyOffsetGPT])
def test_a_class_that_cannot_be_built_on_meta_loads_the_plain_way(tmp_path, model_class):
    model, ckpt = saved_model(tmp_path)
    loaded = load_model(ckpt, model_class=model_class).model
    x = torch.arange(16)[None] % 50
    assert torch.equal(loaded(x)[0], model(x)[0] + 3.0)


def test_an_untied_checkpoint_does_not_fit_a_tied_model(tmp_path):
    _, ckpt = saved_model(tmp_path, tie_embeddings=False)
    config, spec = read_checkpoint_config(ckpt)
    tied = dataclasses.replace(config.model, tie_embeddings=True)
    for loading in (lambda: load_checkpoint(ckpt, model_class=lambda _: GPT(tied)),
                    lambda: load_weights(GPT(tied), ckpt)):
        with pytest.raises(CheckpointError, match=r"unexpected keys (lm_head|tok_emb)\.weight"):
            loading()


# -- the checkpoint's files ------------------------------------------------------------------

def test_a_checkpoint_of_a_newer_format_is_refused_and_an_unversioned_one_loads(tmp_path):
    model, ckpt = saved_model(tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["format"] == 1
    meta["format"] = 2
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"format 2, newer than the 1 .*update") as err:
        load_model(ckpt)
    assert "\n" not in str(err.value)
    del meta["format"]  # written before the format was recorded: read as the current one
    (ckpt / "config.json").write_text(json.dumps(meta))
    x = torch.arange(16)[None] % 50
    assert torch.equal(load_model(ckpt).model(x)[0], model(x)[0])


def test_a_save_that_fails_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from model.weights import checkpoint

    model, ckpt = saved_model(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert set(before) == {"model.safetensors", "config.json", "state.json"}
    write_json = checkpoint.write_json_atomic

    def disk_full_at_state(path, data):  # after the new weights and config.json are written
        if path.name == "state.json":
            raise OSError(28, "No space left on device")
        write_json(path, data)

    monkeypatch.setattr(checkpoint, "write_json_atomic", disk_full_at_state)
    other = GPT(dataclasses.replace(model.config, n_layer=1))
    with pytest.raises(OSError):
        save_checkpoint(ckpt, other, Config(model=other.config), {"name": "char"})
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left


def test_a_run_killed_between_the_swaps_loads_from_the_copy_it_kept(tmp_path):
    model, ckpt = saved_model(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    ckpt.rename(run / ".latest.old")  # latest/ moved aside, the new one not yet in its place
    loaded = load_model(run)
    assert loaded.path == run / ".latest.old"
    x = torch.arange(16)[None] % 50
    assert torch.equal(loaded.model(x)[0], model(x)[0])


# -- one resolution per load -----------------------------------------------------------------

def test_a_command_line_load_resolves_the_name_once(tmp_path, monkeypatch, capsys):
    from model.cli.common import load_named_model
    from model.weights import checkpoint, loading

    model, ckpt = saved_model(tmp_path)
    (tmp_path / "out" / "run").mkdir(parents=True)
    ckpt.rename(tmp_path / "out" / "run" / "latest")
    monkeypatch.chdir(tmp_path)
    calls = []

    def counting(name, real):
        def counted(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return counted

    for module, name in ((loading, "find_checkpoints"), (loading, "resolve_checkpoint"),
                         (loading, "read_checkpoint_config"), (checkpoint, "_check_format")):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    for name in (None, "out/run"):
        calls.clear()
        loaded = load_named_model(name, "cpu", dtype="auto")
        assert loaded.path == Path("out/run/latest")
        assert sorted(calls) == sorted(["resolve_checkpoint", "read_checkpoint_config",
                                        "_check_format"] + ([] if name else ["find_checkpoints"]))
    assert capsys.readouterr().err.startswith("using the newest checkpoint under out/: ")


def test_chat_trained_says_whether_the_run_trained_on_conversations(tmp_path):
    model, ckpt = saved_model(tmp_path)
    assert not load_model(ckpt).chat_trained
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["data"]["format"] = "chat"
    (ckpt / "config.json").write_text(json.dumps(meta))
    assert load_model(ckpt).chat_trained
    assert not Pretrained(model=model, tokenizer=GPT2Tokenizer(), kind="huggingface",
                          path=tmp_path, description="by hand").chat_trained
