"""model.patching: every sweep's shape, patching clean into clean changes nothing, a patched
piece equals the same patch by hand. (tests/test_hooks_transformer_lens.py compares the sweeps'
values with TransformerLens's own.)"""

import pytest
import torch

from model import patching
from model.errors import SmallGPTError
from model.gpt import GPT, GPTConfig

SHAPE = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
             pos_emb="rope", norm="rmsnorm", activation="swiglu")
T = 6


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE)).eval()
    clean = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 7) % 64
    _, cache = model.run_with_cache(clean)
    return model, clean, corrupted, cache


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


SWEEPS = {
    "get_act_patch_resid_pre": (2, T), "get_act_patch_resid_mid": (2, T),
    "get_act_patch_attn_out": (2, T), "get_act_patch_mlp_out": (2, T),
    "get_act_patch_attn_head_out_by_pos": (2, T, 4), "get_act_patch_attn_head_q_by_pos": (2, T, 4),
    "get_act_patch_attn_head_k_by_pos": (2, T, 2), "get_act_patch_attn_head_v_by_pos": (2, T, 2),
    "get_act_patch_attn_head_pattern_by_pos": (2, 4, T),
    "get_act_patch_attn_head_out_all_pos": (2, 4), "get_act_patch_attn_head_q_all_pos": (2, 4),
    "get_act_patch_attn_head_k_all_pos": (2, 2), "get_act_patch_attn_head_v_all_pos": (2, 2),
    "get_act_patch_attn_head_pattern_all_pos": (2, 4),
}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_every_sweep_has_its_shape_and_patching_clean_into_clean_changes_nothing(setup, name):
    model, clean, _, cache = setup
    result = getattr(patching, name)(model, clean, cache, metric)
    assert result.shape == SWEEPS[name]
    expected = metric(model(clean)[0]).item()
    torch.testing.assert_close(result, torch.full(SWEEPS[name], expected), rtol=0, atol=1e-5)


def test_a_patched_piece_equals_the_patch_by_hand(setup):
    model, _, corrupted, cache = setup
    by_pos = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    resid = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)

    def head_2(pos):
        def patch(z, hook):
            z[:, pos, 2] = cache[hook.name][:, pos, 2]
        return patch

    def resid_at_1(x, hook):
        x[:, 1] = cache["resid_pre", 1][:, 1]

    for layer, pos in ((0, 1), (1, T - 1)):
        hooked = model.run_with_hooks(corrupted, [(f"blocks.{layer}.attn.hook_z", head_2(pos))])
        assert by_pos[layer, pos, 2].item() == pytest.approx(metric(hooked).item(), abs=1e-6)
        assert by_pos[layer, pos, 2].item() != pytest.approx(by_pos[layer, pos, 1].item(), abs=1e-4)
    by_hand = metric(model.run_with_hooks(corrupted, [("blocks.1.hook_resid_pre", resid_at_1)]))
    assert resid[1, 1].item() == pytest.approx(by_hand.item(), abs=1e-6)
    # Before layer 0 only the corrupted position matters: elsewhere clean equals corrupted.
    unpatched = metric(model(corrupted)[0]).item()
    assert resid[0, [0, 2, 3, 4, 5]].tolist() == pytest.approx([unpatched] * 5, abs=1e-6)
    assert resid[0, 1].item() != pytest.approx(unpatched, abs=1e-3)


def test_patching_needs_evaluation_mode(setup):
    model, clean, _, cache = setup
    model.train()
    try:
        with pytest.raises(SmallGPTError, match="model.eval"):
            patching.get_act_patch_resid_pre(model, clean, cache, metric)
    finally:
        model.eval()
