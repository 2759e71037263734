"""LoRA adapters: zero at start, exact merge, only adapters train, small resumable checkpoints."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import config_from_dict
from model.errors import CheckpointError, ConfigError
from model.gpt import GPT, GPTConfig, count_parameters
from model.network import lora
from model.training.loop import train
from model.weights.loading import load_checkpoint, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.cli import sample  # noqa: E402

SHAPES = {
    "gpt2": dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32,
                 activation="gelu_tanh"),
    "gqa_swiglu_rope": dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2,
                            n_embd=32, activation="swiglu", pos_emb="rope", norm="rmsnorm",
                            bias=False),
}


def tiny(shape: str = "gpt2") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SHAPES[shape])).eval()


def randomize_adapters(model: GPT) -> None:
    """B is zero after apply; give it values so the adapters change the function."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("targets", ["all", "q,v", "k", "mlp_in,attn_out"])
def test_adapters_start_as_the_base_and_merge_exactly(shape, targets):
    model = tiny(shape)
    base_logits = model(IDX)[0]
    lora.apply(model, lora.LoRAConfig(rank=4, targets=targets)).eval()
    assert torch.equal(model(IDX)[0], base_logits)  # B = 0: not one bit differs
    randomize_adapters(model)
    adapted = model(IDX)[0]
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters now do something
    merged = lora.merge(model)
    assert not lora.has_adapters(merged)
    assert set(merged.state_dict()) == set(tiny(shape).state_dict())  # a plain GPT again
    assert torch.allclose(merged(IDX)[0], adapted, atol=1e-5, rtol=0)


def test_targets_choose_the_slices_of_the_fused_qkv():
    model = lora.apply(tiny(), lora.LoRAConfig(rank=2, targets="q, v"))
    names = set(lora.adapter_state_dict(model))
    assert names == {f"blocks.{i}.attn.qkv.lora_{m}.{t}" for i in range(2) for m in "AB"
                     for t in "qv"}
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_B["q"].shape == (32, 2) and qkv.lora_A["v"].shape == (2, 32)
    # Only the v slice of the output moves when only v's adapter is non-zero.
    x = torch.randn(1, 3, 32)
    before = qkv(x)
    with torch.no_grad():
        qkv.lora_B["v"].fill_(0.1)
    delta = (qkv(x) - before).abs().amax(dim=(0, 1))
    assert delta[:64].max() == 0 and delta[64:].min() > 0


def test_qkv_slices_follow_the_attention_split_with_grouped_query_heads():
    """4 query heads and 2 key/value heads of 8: 32 query rows, then 16 key and 16 value rows."""
    model = lora.apply(tiny("gqa_swiglu_rope"), lora.LoRAConfig(rank=2, targets="k"))
    qkv = model.blocks[0].attn.qkv
    assert qkv.slices == {"k": (32, 48)}
    x = torch.randn(1, 3, 32)
    before = qkv(x)
    with torch.no_grad():
        qkv.lora_B["k"].fill_(0.1)
    delta = (qkv(x) - before).abs().amax(dim=(0, 1))
    assert delta[:32].max() == 0 and delta[32:48].min() > 0 and delta[48:].max() == 0


def test_only_adapters_train_and_the_optimizer_holds_them_alone():
    from model.training.optim import build_optimizer

    model = lora.apply(tiny(), lora.LoRAConfig(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_state_dict(model))
    cfg = config_from_dict({"train": dict(init_from="gpt2", lora_rank=4)}).train
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    trained, total = count_parameters(model, trainable_only=True), count_parameters(model)
    # rank 4 on q,k,v,attn_out (32 in, 32 out), mlp_in (32 -> 128) and mlp_out (128 -> 32)
    assert trained == 2 * 4 * (4 * (32 + 32) + 2 * (32 + 128)) and total > trained


def test_base_in_bfloat16_runs_under_autocast_and_merges_to_float32():
    model = tiny()
    randomize = lora.apply(model, lora.LoRAConfig(rank=4), base_dtype=torch.bfloat16)
    randomize_adapters(randomize)
    assert model.blocks[0].attn.qkv.base.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.qkv.lora_A["q"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(IDX, IDX)
    loss.backward()
    assert model.blocks[0].attn.qkv.lora_B["q"].grad.abs().sum() > 0
    merged = lora.merge(model)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # bfloat16 keeps 8 bits of mantissa: the logits (up to ~0.4 here) agree to about 1%.
    assert (merged(IDX)[0] - logits.float()).abs().max() < 0.01


@pytest.mark.parametrize("key, value, message", [
    ("lora_rank", 0, "train.lora_rank: must be an integer >= 1"),
    ("lora_rank", -3, "train.lora_rank: must be an integer >= 1"),
    ("lora_targets", "q,vv", "train.lora_targets: unknown target 'vv'"),
    ("lora_targets", " , ", "train.lora_targets: names no target"),
    ("lora_alpha", 0, "train.lora_alpha: must be > 0"),
    ("lora_dropout", 1.0, "train.lora_dropout: must be in [0, 1)"),
])
def test_bad_settings_name_their_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"init_from": "gpt2", "lora_rank": 4, key: value}})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_lora_needs_a_pretrained_base_and_adamw():
    with pytest.raises(ConfigError, match=r"^train.lora_rank: LoRA adapts pretrained weights"):
        config_from_dict({"train": {"lora_rank": 4}})
    with pytest.raises(ConfigError, match=r"^train.optimizer: muon does not train LoRA"):
        config_from_dict({"train": {"init_from": "gpt2", "lora_rank": 4, "optimizer": "muon"}})
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        lora.apply(lora.apply(tiny()))


def test_digest_identifies_the_weights():
    a, b = tiny(), tiny()
    assert lora.weights_digest(a) == lora.weights_digest(b)
    with torch.no_grad():
        b.blocks[1].mlp.proj.weight[0, 0] += 1e-6
    assert lora.weights_digest(a) != lora.weights_digest(b)


# -- in the training loop, in checkpoints and when loaded by name -----------------------------

def write_corpus(path: Path) -> Path:
    lines = [f"line {i}: to be or not to be, that is question {i % 13}." for i in range(800)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_raw(tmp_path: Path, init_from: str, **train_overrides) -> dict:
    train_cfg = dict(out_dir=str(tmp_path / "lora"), max_steps=6, batch_size=4, lr=1e-2,
                     min_lr=1e-3, warmup_steps=1, eval_interval=3, eval_steps=1, log_interval=1,
                     seed=5, device="cpu", dtype="float32", threads=1, init_from=init_from,
                     lora_rank=4,
                     lora_dropout=0.1)
    train_cfg.update(train_overrides)
    return {"model": {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32},
            "data": {"source": str(write_corpus(tmp_path / "corpus.txt")), "tokenizer": "char",
                     "cache_dir": str(tmp_path / "cache"), "num_proc": 1},
            "train": train_cfg}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny char-level smallgpt run trained from scratch: the base the LoRA runs adapt."""
    tmp = tmp_path_factory.mktemp("base")
    raw = run_raw(tmp, "scratch", out_dir=str(tmp / "base"), max_steps=4, lora_rank=None)
    return train(config_from_dict(raw)).run_dir


@pytest.fixture
def base_copy(base_run, tmp_path) -> Path:
    """A copy of the base's checkpoint that a test may change or remove."""
    return Path(shutil.copytree(base_run / "latest", tmp_path / "base"))


def test_training_changes_only_the_adapters(base_run, tmp_path):
    result = train(config_from_dict(run_raw(tmp_path, str(base_run), weight_decay=0.5)))
    base = load_checkpoint(base_run).model.state_dict()
    trained = result.model.state_dict()  # the run's own module: adapters not merged
    adapters = {name for name in trained if ".lora_" in name}
    assert adapters and all(torch.count_nonzero(trained[n]) for n in adapters)
    frozen = {name.replace(".base.", "."): name for name in trained if name not in adapters}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(trained[ours], base[name]) for name, ours in frozen.items())


def test_lora_run_saves_adapters_alone_and_loads_merged(base_copy, tmp_path, monkeypatch):
    result = train(config_from_dict(run_raw(tmp_path, str(base_copy))))
    latest = result.run_dir / "latest"
    adapters = load_file(latest / "model.safetensors")
    assert adapters and all(".lora_" in name for name in adapters)
    assert any(t.abs().sum() > 0 for n, t in adapters.items() if ".lora_B." in n)  # trained
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    # The weights file is the adapters' (plus a header); the optimizer holds two moments each.
    assert (latest / "model.safetensors").stat().st_size < adapter_bytes + 16_384
    assert (latest / "optimizer.pt").stat().st_size < 2 * adapter_bytes + 32_768
    opt = torch.load(latest / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(adapters)
    base_bytes = (base_copy / "model.safetensors").stat().st_size
    assert (latest / "model.safetensors").stat().st_size < base_bytes / 2
    meta = json.loads((latest / "config.json").read_text())
    assert meta["lora_base"]["path"] == str(base_copy.resolve())

    # By name: the base with the adapters merged in, a plain GPT, as sample.py gets it.
    loaded = load_model(str(result.run_dir))
    assert not lora.has_adapters(loaded.model)
    reference = lora.apply(load_checkpoint(base_copy).model, lora.LoRAConfig(rank=4)).eval()
    lora.load_adapter_state_dict(reference, adapters)
    idx = torch.randint(0, loaded.model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded.model(idx)[0], reference(idx)[0], atol=1e-5, rtol=0)
    assert loaded.tokenizer.spec() == load_checkpoint(base_copy).tokenizer.spec()
    assert load_checkpoint(result.run_dir).state["step"] == 6

    # The server serves the merged model.
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from model.inference.sampling import generate
    from model.serve import create_app

    with TestClient(create_app(loaded)) as client:  # its lifespan starts the engine
        name = client.get("/v1/models").json()["data"][0]["id"]
        reply = client.post("/v1/completions", json={"model": name, "prompt": "to be",
                                                      "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200
    expected = "".join(s.delta for s in generate(loaded.model, loaded.tokenizer, "to be",
                                                 max_new_tokens=8, temperature=0))
    assert reply.json()["choices"][0]["text"] == expected

    # sample.py from another directory: the base is found by its absolute path.
    monkeypatch.chdir(tmp_path.parent)
    out = io.StringIO()
    assert sample.main(["--checkpoint", str(result.run_dir), "--prompt", "to be",
                        "--max-new-tokens", "5", "--seed", "1"], stdout=out,
                       stderr=io.StringIO()) == 0
    assert out.getvalue().startswith("to be")


def test_lora_run_resumes_bit_for_bit(base_run, tmp_path):
    full = train(config_from_dict(run_raw(tmp_path / "a", str(base_run))))
    cfg = config_from_dict(run_raw(tmp_path / "b", str(base_run)))
    cfg.train.time_budget_s = 1e-9  # stops after its first step, with a checkpoint
    train(cfg)
    resumed = train(config_from_dict(run_raw(tmp_path / "b", str(base_run), resume=True)))
    assert resumed.losses == full.losses[1:]
    a = load_file(full.run_dir / "latest" / "model.safetensors")
    b = load_file(resumed.run_dir / "latest" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_changed_or_missing_base_is_one_line_naming_it(base_copy, tmp_path):
    result = train(config_from_dict(run_raw(tmp_path, str(base_copy), max_steps=2)))
    weights = base_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["norm_f.weight"] = tensors["norm_f.weight"] + 1e-3
    save_file(tensors, weights)
    for call in (lambda: load_model(str(result.run_dir)),
                 lambda: train(config_from_dict(run_raw(tmp_path, str(base_copy), max_steps=4,
                                                        resume=True)))):
        with pytest.raises(CheckpointError) as err:
            call()
        message = str(err.value)
        assert "has changed since it was trained" in message and str(base_copy) in message
        assert "\n" not in message
    shutil.rmtree(base_copy)
    with pytest.raises(CheckpointError) as err:
        load_model(str(result.run_dir))
    assert str(err.value).startswith(f"{base_copy.resolve()}: the base of LoRA run")
    assert "\n" not in str(err.value)


def test_merged_gpt2_lora_run_exports_and_loads_in_transformers(tmp_path, gpt2_vocabulary):
    transformers = pytest.importorskip("transformers")
    from model.weights.export import export

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    raw = run_raw(tmp_path, str(tmp_path / "gpt2"), max_steps=3, lora_targets="q,v,mlp_out")
    raw["model"], raw["data"]["tokenizer"] = {}, "gpt2"
    result = train(config_from_dict(raw))
    merged = load_model(str(result.run_dir)).model
    base = load_model(str(tmp_path / "gpt2")).model
    assert not torch.equal(merged.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)
    exported = export(str(result.run_dir), tmp_path / "export")  # python -m model.export
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported.directory).eval()
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, merged(idx)[0], atol=1e-4, rtol=0)


def test_hook_points_see_the_adapted_model():
    model = lora.apply(tiny(), lora.LoRAConfig(rank=4)).eval()
    randomize_adapters(model)
    logits, cache = model.run_with_cache(IDX, names_filter=lambda name: True)
    # Per-head results read attn.proj's weight: the effective one, so they sum to its output.
    heads = cache["blocks.0.attn.hook_result"].sum(dim=2) + model.blocks[0].attn.proj.bias
    assert torch.allclose(heads, cache["blocks.0.hook_attn_out"], atol=1e-5)
    merged_logits, merged_cache = lora.merge(model).run_with_cache(IDX)
    assert torch.allclose(merged_logits, logits, atol=1e-5)
    assert torch.allclose(merged_cache["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_q"],
                          atol=1e-5)


@pytest.mark.cuda
def test_adapters_train_on_a_gpu_beside_a_bfloat16_base():
    model = lora.apply(tiny().cuda().train(), lora.LoRAConfig(rank=4), base_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = IDX.cuda()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        adapted = model.eval()(idx)[0].float()
    merged = lora.merge(model)
    with torch.no_grad():
        assert (merged(idx)[0] - adapted).abs().max() < 0.05
    base = tiny().blocks[0].attn.qkv.weight.cuda()
    assert not torch.equal(merged.blocks[0].attn.qkv.weight, base)  # the adapters trained


def test_a_lora_layer_computes_the_base_plus_the_scaled_low_rank_update():
    """y = W x + b + (alpha / rank) B A x, written out by hand with B non-zero (merge and
    forward share the scale, so comparing them alone would not catch a wrong one)."""
    torch.manual_seed(3)
    base = torch.nn.Linear(8, 6)
    layer = lora.LoRALinear(base, {"all": (0, 6)}, rank=2, alpha=5.0, dropout=0.0).eval()
    with torch.no_grad():
        layer.lora_B["all"].copy_(torch.randn(6, 2))
    a, b = layer.lora_A["all"].detach(), layer.lora_B["all"].detach()
    x = torch.randn(3, 8)
    expected = x @ base.weight.T + base.bias + (5.0 / 2) * (x @ a.T @ b.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)
