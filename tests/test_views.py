"""GPT describes itself: weight views by TransformerLens's names and shapes reproduce the forward
pass, and every parameter belongs to one component (against TransformerLens itself:
tests/test_hooks_transformer_lens.py)."""

import pytest
import torch

from model.errors import ConfigError
from model.gpt import GPT, GPTConfig, count_parameters

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
SHAPES = {
    "gpt2": dict(activation="gelu_tanh"),
    "gqa_swiglu_rope": dict(n_kv_head=2, pos_emb="rope", norm="rmsnorm", activation="swiglu",
                            mlp_ratio=3.0, bias=False, qk_norm=True),
    "gqa_swiglu_bias": dict(n_kv_head=1, activation="swiglu", tie_embeddings=False),
}


def model_of(shape: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **SHAPES[shape])).eval()
    with torch.no_grad():  # biases and norm weights away from 0 and 1, so that they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("shape", list(SHAPES))
def test_views_have_transformer_lens_shapes(shape):
    model = model_of(shape)
    c = model.config
    L, H, C, D, V, M = c.n_layer, c.n_head, c.n_embd, c.head_dim, c.vocab_size, c.mlp_hidden
    expected = {"W_E": (V, C), "W_U": (C, V), "W_Q": (L, H, C, D), "W_K": (L, H, C, D),
                "W_V": (L, H, C, D), "W_O": (L, H, D, C), "W_in": (L, C, M), "W_out": (L, M, C),
                "b_Q": (L, H, D), "b_K": (L, H, D), "b_V": (L, H, D), "b_O": (L, C),
                "b_in": (L, M), "b_out": (L, C)}
    if c.pos_emb == "learned":
        expected["W_pos"] = (c.block_size, C)
    if c.activation == "swiglu":
        expected |= {"W_gate": (L, C, M), "b_gate": (L, M)}
    for name, size in expected.items():
        view = getattr(model, name)
        if name.startswith("b_") and not c.bias:
            assert view is None, name
        else:
            assert tuple(view.shape) == size, name


@pytest.mark.parametrize("shape", list(SHAPES))
def test_views_reproduce_the_forward_pass(shape):
    model = model_of(shape)
    c = model.config
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(idx, names_filter=lambda name: True)
        for layer, block in enumerate(model.blocks):
            x = block.norm1(cache["resid_pre", layer])
            for name in ("q", "k", "v"):
                W, b = getattr(model, f"W_{name.upper()}"), getattr(model, f"b_{name.upper()}")
                ours = torch.einsum("btc,hcd->bthd", x, W[layer])
                ours = ours + (b[layer] if b is not None else 0)
                theirs = cache[name, layer]  # key/value heads repeated per query head
                theirs = theirs.repeat_interleave(c.n_head // theirs.size(2), dim=2)
                torch.testing.assert_close(ours, theirs, msg=name)
            result = torch.einsum("bthd,hdc->bthc", cache["z", layer], model.W_O[layer])
            torch.testing.assert_close(result, cache["result", layer])
            attn_out = result.sum(2) + (model.b_O[layer] if c.bias else 0)
            torch.testing.assert_close(attn_out, cache["attn_out", layer])
            x = block.norm2(cache["resid_mid", layer])
            pre = x @ model.W_in[layer] + (model.b_in[layer] if c.bias else 0)
            if c.activation == "swiglu":  # hook_pre holds gate and value side by side
                gate = x @ model.W_gate[layer] + (model.b_gate[layer] if c.bias else 0)
                pre = torch.cat((gate, pre), dim=-1)
            torch.testing.assert_close(pre, cache["pre", layer])
            mlp_out = cache["post", layer] @ model.W_out[layer]
            torch.testing.assert_close(mlp_out + (model.b_out[layer] if c.bias else 0),
                                       cache["mlp_out", layer])
        torch.testing.assert_close(model.W_E[idx], cache["embed"])
        if c.pos_emb == "learned":
            torch.testing.assert_close(model.W_pos[:10].expand(2, -1, -1), cache["pos_embed"])
        final = model.norm_f(cache["resid_post", -1])
        torch.testing.assert_close(final @ model.W_U, logits)
        # unembed is the forward pass's own last step: bit-equal
        last = f"blocks.{c.n_layer - 1}.hook_resid_post"
        logits, cache = model.run_with_cache(idx, names_filter=last)
        assert torch.equal(model.unembed(cache["resid_post", -1]), logits)


def test_a_view_the_model_does_not_have():
    rotary = model_of("gqa_swiglu_rope")
    with pytest.raises(ConfigError, match="rotary"):
        _ = rotary.W_pos
    assert rotary.b_Q is None and rotary.b_in is None and rotary.b_gate is None  # bias: false
    gpt2 = model_of("gpt2")
    assert gpt2.W_gate is None and gpt2.b_gate is None  # no SwiGLU gate


def test_tables_share_memory_and_stacked_views_are_copies():
    model = model_of("gpt2")
    assert model.W_E is model.tok_emb.weight
    assert model.W_U.data_ptr() == model.lm_head.weight.data_ptr()
    with torch.no_grad():
        model.W_Q[0, 0] += 1.0
    torch.testing.assert_close(model.W_Q, model_of("gpt2").W_Q)  # the model is unchanged


@pytest.mark.parametrize("shape", list(SHAPES))
def test_components_hold_every_parameter_once(shape):
    model = model_of(shape)
    placed = [p for modules in model.components().values() for m in modules
              for p in m.parameters()]
    unique = {id(p) for p in placed}
    assert unique == {id(p) for p in model.parameters()}
    tied = 1 if model.config.tie_embeddings else 0  # W_U is W_E's tensor: listed twice
    assert len(placed) == len(unique) + tied
    norms = {id(p) for m in model.components()["norm"] for p in m.parameters()}
    if model.config.qk_norm:
        assert id(model.blocks[0].attn.q_norm.weight) in norms


def test_count_parameters():
    model = model_of("gqa_swiglu_bias")
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == model.num_params() == total
    assert count_parameters(model, trainable_only=True) == total
    model.tok_emb.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - 64 * 32
    tied = model_of("gpt2")  # W_U is W_E: counted once
    assert count_parameters(tied) == sum({id(p): p.numel() for p in tied.parameters()}.values())
