"""GPT-2 import and export against transformers' own GPT2LMHeadModel, on tiny random models."""

import dataclasses
import json

import pytest
import torch

from model import GPT, CheckpointError, ConfigError, GPTConfig
from model.weights.hf import gpt2_blockers, load_hf_gpt2, save_hf

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_model(**overrides) -> "transformers.GPT2LMHeadModel":
    """A random GPT-2 small enough to build in milliseconds; no dropout, eval mode."""
    torch.manual_seed(0)
    settings = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=101, n_positions=32,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = transformers.GPT2Config(**{**settings, **overrides})
    model = transformers.GPT2LMHeadModel(config).eval()
    # Random init leaves biases and norms at 0 and 1; perturb them so the mapping is really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(vocab: int = 101, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours: GPT, theirs, idx: torch.Tensor) -> None:
    ours.eval()
    with torch.no_grad():
        expected = theirs(idx).logits
        got, _ = ours(idx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


def test_load_directory_matches_transformers(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    ours = load_hf_gpt2(tmp_path)
    c = ours.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (101, 32, 2, 4, 64)
    assert (c.activation, c.pos_emb, c.norm, c.bias, c.tie_embeddings) == (
        "gelu_tanh", "learned", "layernorm", True, True)
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert_same_logits(ours, theirs, tokens())


def test_load_hf_gpt2_logits(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    assert_same_logits(load_hf_gpt2(tmp_path), theirs, tokens())


def weights_match_exactly(ours: GPT, theirs) -> None:
    """Every parameter bit for bit HF's (Conv1D weights transposed), real, contiguous, trainable."""
    hf = theirs.transformer
    assert torch.equal(ours.tok_emb.weight, hf.wte.weight)
    assert torch.equal(ours.pos_emb.weight, hf.wpe.weight)
    for block, h in zip(ours.blocks, hf.h):
        assert torch.equal(block.attn.qkv.weight, h.attn.c_attn.weight.t())
        assert torch.equal(block.mlp.proj.weight, h.mlp.c_proj.weight.t())
        assert torch.equal(block.norm2.bias, h.ln_2.bias)
    assert ours.lm_head.weight is ours.tok_emb.weight  # tied after assign-loading
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    for name, p in ours.named_parameters():
        assert not p.is_meta and p.is_contiguous() and p.requires_grad, name
    assert all(not b.is_meta for b in ours.buffers())


@pytest.mark.parametrize("from_dict", [False, True])
def test_loaded_weights_are_exact_and_trainable(tmp_path, from_dict):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    state = dict(theirs.state_dict())
    before = {k: v.clone() for k, v in state.items()}
    ours = load_hf_gpt2(state, n_head=4) if from_dict else load_hf_gpt2(tmp_path)
    weights_match_exactly(ours, theirs)
    _, loss = ours(tokens(), tokens())
    loss.backward()
    assert ours.tok_emb.weight.grad is not None
    with torch.no_grad():  # a caller's dict is neither emptied nor shared with the model
        for p in ours.parameters():
            p.zero_()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in state)


@pytest.mark.parametrize("prefixed", [True, False])
def test_load_state_dict_with_and_without_prefix(prefixed):
    theirs = hf_model()
    state = theirs.state_dict() if prefixed else theirs.transformer.state_dict()
    assert any(k.startswith("transformer.") for k in state) == prefixed
    assert_same_logits(load_hf_gpt2(state, n_head=4), theirs, tokens())


def test_old_mask_buffers_are_skipped():
    theirs = hf_model()
    state = dict(theirs.state_dict())
    # Older transformers versions saved the causal mask as buffers next to the weights.
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    assert_same_logits(load_hf_gpt2(state, n_head=4), theirs, tokens())


def test_bare_state_dict_needs_n_head():
    with pytest.raises(ConfigError, match="n_head"):
        load_hf_gpt2(hf_model().state_dict())


def test_load_pytorch_bin(tmp_path):
    theirs = hf_model()
    theirs.config.save_pretrained(tmp_path)
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_logits(load_hf_gpt2(tmp_path), theirs, tokens())


@pytest.mark.parametrize("hf_name, ours_name", [("gelu", "gelu"), ("gelu_new", "gelu_tanh")])
def test_activation_and_eps_and_n_inner(tmp_path, hf_name, ours_name):
    # n_embd=28, n_inner=61: 61/28*28 falls just short of 61 in floating point.
    theirs = hf_model(activation_function=hf_name, layer_norm_epsilon=1e-3, n_embd=28, n_inner=61)
    theirs.save_pretrained(tmp_path)
    ours = load_hf_gpt2(tmp_path)
    assert ours.config.activation == ours_name
    assert ours.config.norm_eps == 1e-3
    assert ours.config.mlp_hidden == 61
    assert_same_logits(ours, theirs, tokens())


def test_save_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64,
                       activation="gelu_tanh", mlp_ratio=1.5)
    ours = GPT(config)
    with torch.no_grad():  # non-trivial biases and norms, as above
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / "export"
    assert save_hf(ours, out) == "gpt2"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["n_inner"] == 96
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert_same_logits(ours, theirs, tokens())
    # and back again: the same model
    again = load_hf_gpt2(out)
    assert again.config == ours.config
    assert_same_logits(again, theirs, tokens())


def test_save_hf_gpt2_exact_gelu(tmp_path):
    ours = GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=1, n_head=2, n_embd=32,
                         activation="gelu"))
    save_hf(ours, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert theirs.config.activation_function == "gelu"
    assert_same_logits(ours, theirs, tokens())


@pytest.mark.parametrize("field, value", [
    ("pos_emb", "rope"),
    ("norm", "rmsnorm"),
    ("qk_norm", True),
    ("activation", "swiglu"),
    ("n_kv_head", 2),
])
def test_save_rejects_what_gpt2_cannot_express(tmp_path, field, value):
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=4, n_embd=16,
                       **{field: value})
    assert any(f"model.{field}=" in blocker for blocker in gpt2_blockers(config))
    # save_hf writes a rotary model as a Llama-family one instead; with LayerNorm none fits.
    match = field if config.pos_emb == "learned" else "model.norm"
    with pytest.raises(ConfigError, match=match) as info:
        save_hf(GPT(config), tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("field, value", [
    ("tie_embeddings", False),  # lm_head.weight of its own
    ("bias", False),  # every bias written as zeros
    ("activation", "relu2"),  # GPT2MLP takes any ACT2FN activation
])
def test_save_what_gpt2_computes_exactly(tmp_path, field, value):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64,
                         **{field: value}))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_hf(ours, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_logits(ours, theirs, tokens())
    again = load_hf_gpt2(tmp_path)
    assert again.config == dataclasses.replace(ours.config, bias=True)  # zero biases, kept
    assert_same_logits(again, theirs, tokens())


def one_line_error(exc_type, source, match):
    with pytest.raises(exc_type, match=match) as info:
        load_hf_gpt2(source)
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    one_line_error(CheckpointError, tmp_path / "nope", "does not exist")


def test_missing_weights(tmp_path):
    hf_model().config.save_pretrained(tmp_path)
    one_line_error(CheckpointError, tmp_path, "model.safetensors")


def test_missing_config(tmp_path):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    one_line_error(CheckpointError, tmp_path, "config.json")


def test_corrupt_safetensors(tmp_path):
    hf_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated mid-file
    one_line_error(CheckpointError, tmp_path, "corrupt")


def test_corrupt_bin(tmp_path):
    hf_model().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    one_line_error(CheckpointError, tmp_path, "corrupt")


def test_corrupt_config(tmp_path):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(CheckpointError, tmp_path, "JSON")


def test_unsupported_activation(tmp_path):
    hf_model(activation_function="relu").save_pretrained(tmp_path)
    one_line_error(ConfigError, tmp_path, "activation_function")


def test_foreign_tensor_is_named():
    state = dict(hf_model().state_dict())
    state["transformer.h.0.attn.q_attn.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match="q_attn"):
        load_hf_gpt2(state, n_head=4)


def test_missing_tensor_is_named():
    state = dict(hf_model().state_dict())
    del state["transformer.h.1.ln_2.bias"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.norm2\.bias"):
        load_hf_gpt2(state, n_head=4)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_weights_are_converted_as_they_are_read(tmp_path, weights):
    """load_model(dtype=bfloat16) reads a float32 directory into bfloat16 tensor by tensor (no
    float32 copy of the whole model is held: bench/load_memory.py --sample measures the peak);
    the result is the float32 model converted, exactly, and its parameters are counted from
    the files' headers alone, before anything is loaded."""
    from model.weights.loading import load_model, parameter_count

    theirs = hf_model()
    if weights == "safetensors":
        theirs.save_pretrained(tmp_path)
    else:
        theirs.config.save_pretrained(tmp_path)
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    from model.weights.hf import read_hf_weights

    read = read_hf_weights(tmp_path, dtype=torch.bfloat16)  # each tensor converted on reading
    assert read and {t.dtype for t in read.values() if t.is_floating_point()} == {torch.bfloat16}
    full = load_model(tmp_path).model
    half = load_model(tmp_path, dtype=torch.bfloat16).model
    assert {p.dtype for p in half.state_dict().values()} == {torch.bfloat16}
    assert all(torch.equal(h, f.to(torch.bfloat16))
               for h, f in zip(half.state_dict().values(), full.state_dict().values()))
    assert half.lm_head.weight is half.tok_emb.weight  # still tied
    with torch.no_grad():
        assert torch.equal(half(tokens())[0], full.to(torch.bfloat16)(tokens())[0])
    expected = sum(p.numel() for p in load_model(tmp_path).model.parameters())
    if weights == "safetensors":
        assert parameter_count(tmp_path) == expected
    else:  # a pickle has no header: its size, 4 bytes a float32 parameter, give or take
        assert abs(parameter_count(tmp_path) - expected) < 0.05 * expected
