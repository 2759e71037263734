"""The model's behaviour on tiny, seeded networks: causality, loss at init, learning, weight tying,
parameter counts, shape errors, the KV cache, the device a model is built on and mixed precision
(hook points: tests/test_hooks.py; weight views: tests/test_views.py)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from model import GPT, ConfigError, GPTConfig
from model.gpt import PRESETS
from model.inference.tally import parameter_tally

# A tiny shape that still has several heads and layers; fields overridden per test.
TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
ROPE_GQA = dict(pos_emb="rope", n_kv_head=2)  # rotary positions with grouped-query attention


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def random_tokens(shape, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# -- causality -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, ROPE_GQA], ids=["learned", "rope-gqa"])
def test_future_tokens_do_not_change_earlier_logits(overrides):
    model = tiny_model(**overrides)
    idx = random_tokens((2, 16), 64)
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    # ...while the changed position and those after it do see the change
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-4


# -- loss ------------------------------------------------------------------------------------------

def test_loss_at_init_is_log_vocab():
    # Small initial weights give near-uniform predictions: cross-entropy ~ ln(vocab_size).
    vocab = 2048
    model = tiny_model(vocab_size=vocab, block_size=64)
    idx = random_tokens((8, 64), vocab, seed=1)
    targets = random_tokens((8, 64), vocab, seed=2)
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(vocab)) < 0.1


def test_loss_ignores_minus_one_targets():
    model = tiny_model()
    idx = random_tokens((2, 8), 64)
    targets = random_tokens((2, 8), 64, seed=2)
    masked = targets.clone()
    masked[:, 4:] = -1
    with torch.no_grad():
        _, full = model(idx, targets)
        _, part = model(idx, masked)
        logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 64),
                                                 targets[:, :4].reshape(-1))
    torch.testing.assert_close(part, expected)
    assert not torch.isclose(part, full)


def test_overfits_one_batch():
    model = tiny_model().train()
    idx = random_tokens((4, 16), 64, seed=1)
    targets = random_tokens((4, 16), 64, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # From ln(64) = 4.16 nats to memorising 64 random targets.
    assert loss.item() < 0.3


# -- weight tying and parameter counts -------------------------------------------------------------

def test_tied_embeddings_share_one_tensor():
    model = tiny_model()
    assert model.lm_head.weight is model.tok_emb.weight
    assert len(list(model.parameters())) == len(model.state_dict()) - 1  # listed once
    with torch.no_grad():
        model.tok_emb.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0].item() == 123.0


def test_untied_embeddings_are_separate():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 64 * 32


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": False},
    {"pos_emb": "rope"},
    {"n_kv_head": 1},
    {"activation": "swiglu", "mlp_ratio": 8 / 3},
    {"qk_norm": True},
    {"norm": "rmsnorm", "bias": False},
    {"pos_emb": "rope", "n_kv_head": 2, "activation": "relu2", "qk_norm": True,
     "norm": "rmsnorm", "tie_embeddings": False},
], ids=["default", "untied", "rope", "gqa", "swiglu", "qk_norm", "rmsnorm", "modern"])
def test_tally_sums_to_numel(overrides):
    model = tiny_model(**overrides)
    unique = sum(p.numel() for p in model.parameters())  # parameters() lists a tied tensor once
    assert sum(row.count for row in parameter_tally(model)) == unique == model.num_params()
    # the config path (meta device) counts the same
    assert sum(row.count for row in parameter_tally(model.config)) == unique


# Reference counts, positions included, W_U tied to W_E (they match Hugging Face's GPT-2 sizes).
PRESET_TOTALS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_tallies_on_meta(name):
    config = GPTConfig.from_preset(name)
    rows = {row.component: row for row in parameter_tally(config)}
    total = sum(row.count for row in rows.values())
    emb = rows["token embedding (W_E)"]
    assert emb.count == config.vocab_size * config.n_embd
    assert rows["unembedding (W_U)"].shared_with == "token embedding (W_E)"
    if name == "gpt3":
        assert emb.count == 617_558_016
        assert abs(total - 175e9) / 175e9 < 0.01
    else:
        assert total == PRESET_TOTALS[name]


# -- errors ----------------------------------------------------------------------------------------

def test_n_embd_not_divisible_by_n_head():
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig(**{**TINY, "n_embd": 30})


@pytest.mark.parametrize("n_kv_head", [0, 3])
def test_bad_n_kv_head(n_kv_head):
    with pytest.raises(ConfigError, match="n_kv_head"):
        GPTConfig(**TINY, n_kv_head=n_kv_head)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="gpt5") as info:
        GPT.from_preset("gpt5")
    assert "gpt2-medium" in str(info.value)  # lists the valid names


@pytest.mark.parametrize("overrides", [{}, ROPE_GQA], ids=["learned", "rope-gqa"])
def test_input_longer_than_block_size(overrides):
    model = tiny_model(**overrides)
    with pytest.raises(ConfigError, match="block_size=16"):
        model(random_tokens((1, 17), 64))
    cache = model.new_cache(1)
    model(random_tokens((1, 16), 64), cache=cache)
    with pytest.raises(ConfigError, match="block_size"):  # one more token than the cache holds
        model(random_tokens((1, 1), 64), cache=cache)


# -- KV cache --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, ROPE_GQA], ids=["learned", "rope-gqa"])
def test_kv_cache_matches_full_forward(overrides):
    model = tiny_model(**overrides)
    idx = random_tokens((2, 16), 64)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2)
        # a 5-token prefill, a 3-token chunk (needs a mask over the past), then one at a time
        pieces = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:8], cache=cache)[0]]
        pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 16)]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    cache.reset()
    with torch.no_grad():
        again, _ = model(idx[:, :4], cache=cache)
    torch.testing.assert_close(again, full[:, :4], rtol=0, atol=1e-5)


def test_init_scales_residual_projections_by_depth():
    """N(0, 0.02) weights, but the projections that write into the residual stream (attn.proj,
    mlp.proj) get 0.02 / sqrt(2 * n_layer), so the stream's variance does not grow with depth."""
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(GPTConfig(vocab_size=256, n_layer=n_layer, n_head=4, n_embd=256, block_size=64))
    residual = 0.02 / math.sqrt(2 * n_layer)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            assert proj.weight.std().item() == pytest.approx(residual, rel=0.05)
            assert torch.all(proj.bias == 0)
        for other in (block.attn.qkv, block.mlp.fc):
            assert other.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


# -- the device a model is built on ----------------------------------------------------------------

def test_a_cpu_model_draws_what_it_always_drew():
    """GPT(config) and GPT(config, device="cpu") take the same random numbers, and as many."""
    torch.manual_seed(0)
    default = GPT(GPTConfig(**TINY)).state_dict()
    after_default = torch.rand(4)
    torch.manual_seed(0)
    cpu = GPT(GPTConfig(**TINY), device="cpu").state_dict()
    assert torch.equal(torch.rand(4), after_default)
    assert default.keys() == cpu.keys()
    assert all(torch.equal(default[name], cpu[name]) for name in default)


@pytest.mark.parametrize("overrides", [{}, ROPE_GQA], ids=["learned", "rope-gqa"])
def test_a_meta_model_has_shapes_only_and_draws_nothing(overrides):
    config = GPTConfig(**TINY, **overrides)
    torch.manual_seed(0)
    model = GPT(config, device="meta")
    next_draws = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(next_draws, torch.rand(4))  # building drew nothing
    assert all(p.is_meta for p in model.parameters())
    assert torch.get_default_device().type == "cpu"  # the global default is left alone
    if config.pos_emb == "rope":  # not in the state dict, so loading cannot fill it: real
        assert model.rope.device.type == "cpu"
        assert torch.equal(model.rope, GPT(config).rope)
    reference = GPT(config)
    assert {n: p.shape for n, p in model.named_parameters()} == {
        n: p.shape for n, p in reference.named_parameters()}
    with torch.device("meta"):  # a global default is not a request: the CPU, initialised
        torch.manual_seed(0)
        built = GPT(config)
    torch.manual_seed(0)
    expected = GPT(config)
    assert all(p.device.type == "cpu" for p in built.parameters())
    assert torch.equal(built.tok_emb.weight, expected.tok_emb.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_is_built_on_the_gpu_it_is_asked_for():
    model = GPT(GPTConfig(**TINY, **ROPE_GQA), device="cuda")
    assert all(p.is_cuda for p in model.parameters()) and model.rope.is_cuda
    logits, _ = model(random_tokens((1, 8), 64).cuda())
    assert logits.is_cuda


# -- precision -------------------------------------------------------------------------------------

def test_norms_under_bfloat16_autocast_take_the_fused_path_without_a_warning():
    """Under autocast, queries and keys reach qk_norm's RMSNorm in bfloat16 while its weight
    stays float32: torch warns "Mismatch dtype between input and weight" and falls back to a
    slow path unless the norm computes in one dtype."""
    model = tiny_model(norm="rmsnorm", qk_norm=True, bias=False, **ROPE_GQA).train()
    idx, targets = random_tokens((2, 16), 64), random_tokens((2, 16), 64, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
    norm = model.blocks[0].attn.q_norm
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        norm.weight.add_(torch.randn(8) * 0.1)
        # float32: torch's kernel as it is; bfloat16 input: computed in float32, rounded once
        assert torch.equal(norm(x), F.rms_norm(x, (8,), norm.weight, norm.eps))
        half = norm(x.bfloat16())
        assert half.dtype == torch.bfloat16
        assert torch.equal(half, F.rms_norm(x.bfloat16().float(), (8,), norm.weight,
                                            norm.eps).bfloat16())
