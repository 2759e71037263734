"""Linear layers packed for oneDNN (model/network/packed.py): the same numbers as nn.Linear, for
generation, the hooks and sample.py; and nothing packed where the CPU cannot run it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.data.tokenizer import train_tokenizer
from model.gpt import GPT, GPTConfig
from model.inference.sampling import generate
from model.network.packed import PackedLinear, can_pack, pack_linears

TEXT = "the cat sat on the mat; the dog sat on the log."
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this PyTorch has no oneDNN")


def pair(dtype: torch.dtype = torch.float32, **shape) -> tuple[GPT, GPT]:
    """A random GPT and a copy of it with its linear layers packed."""
    tokenizer = train_tokenizer("char", [TEXT])
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2,
                       n_embd=32, **shape)
    torch.manual_seed(0)
    plain, packed = GPT(config).eval(), GPT(config).eval()
    with torch.no_grad():  # biases start at zero: give them values a dropped one would miss
        for name, p in plain.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    plain.to(dtype)
    packed.to(dtype).load_state_dict(plain.state_dict())
    assert pack_linears(packed) == 2 * 4 + 1  # qkv, attention out, MLP in and out; W_U
    return plain, packed


@needs_onednn
@pytest.mark.parametrize("shape", [dict(), dict(pos_emb="rope", bias=False,
                                                 tie_embeddings=False)])
def test_packed_layers_compute_what_nn_linear_computes(shape):
    plain, packed = pair(**shape)
    assert isinstance(packed.lm_head, PackedLinear) and type(plain.lm_head) is nn.Linear
    x = torch.randint(0, plain.config.vocab_size, (3, 20),
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed(x)[0], plain(x)[0], atol=1e-5, rtol=1e-5)
    # The dense weight is there for code that reads it (W_U, a head's W_O).
    assert torch.equal(packed.lm_head.weight, plain.lm_head.weight)
    assert torch.equal(packed.blocks[0].attn.proj.weight, plain.blocks[0].attn.proj.weight)


@needs_onednn
def test_generation_and_hooks_see_the_same_model():
    plain, packed = pair()
    tokenizer = train_tokenizer("char", [TEXT])

    def text(model: GPT) -> str:
        return "".join(s.delta for s in generate(model, tokenizer, "the ", max_new_tokens=40,
                                                 temperature=0.0))

    assert text(packed) == text(plain)
    x = torch.arange(12)[None] % plain.config.vocab_size
    _, ours = packed.run_with_cache(x, names_filter=lambda name: True)
    _, theirs = plain.run_with_cache(x, names_filter=lambda name: True)
    assert "blocks.1.attn.hook_result" in ours and ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5)


@needs_onednn
def test_bfloat16_is_packed_only_where_the_cpu_computes_it(monkeypatch):
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        plain, packed = pair(torch.bfloat16)
        x = torch.arange(16)[None] % plain.config.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(packed(x)[0], plain(x)[0], atol=2e-2, rtol=2e-2)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    assert can_pack(model) and not can_pack(model.to(torch.bfloat16))
    assert pack_linears(model) == 0 and type(model.lm_head) is nn.Linear


def test_nothing_is_packed_that_onednn_cannot_run(monkeypatch):
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    assert not can_pack(model.to(torch.float16))
    assert not can_pack(nn.Sequential(nn.ReLU()))  # nothing to pack
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert pack_linears(model.float()) == 0 and type(model.lm_head) is nn.Linear
