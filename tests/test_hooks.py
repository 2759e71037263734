"""Hook points and the activation cache: names and shapes, the fast path left alone, edits through
hooks equal to edits by hand, exact patching, the residual decomposition, gradients, cleanup."""

import pytest
import torch
import torch.nn.functional as F

from model import gpt as gpt_module
from model.gpt import GPT, GPTConfig

GPT2_SHAPED = dict(vocab_size=96, block_size=32, n_layer=3, n_head=4, n_embd=32,
                   activation="gelu_tanh")
ROTARY = dict(GPT2_SHAPED, pos_emb="rope", n_kv_head=2, norm="rmsnorm", activation="swiglu",
              bias=False, tie_embeddings=False)
MODELS = pytest.mark.parametrize("shape", [GPT2_SHAPED, ROTARY], ids=["gpt2", "rotary"])
B, T = 2, 10


def model_of(shape, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**shape)).eval()
    with torch.no_grad():  # biases and norm weights away from their 0/1 init, so they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(vocab=96, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def expected_shapes(c: GPTConfig) -> dict[str, tuple]:
    C, H, KV, D = c.n_embd, c.n_head, c.kv_heads, c.head_dim
    mlp_pre = 2 * c.mlp_hidden if c.activation == "swiglu" else c.mlp_hidden
    per_block = {
        "hook_resid_pre": (B, T, C), "hook_resid_mid": (B, T, C), "hook_resid_post": (B, T, C),
        "hook_attn_out": (B, T, C), "hook_mlp_out": (B, T, C),
        "ln1.hook_scale": (B, T, 1), "ln1.hook_normalized": (B, T, C),
        "ln2.hook_scale": (B, T, 1), "ln2.hook_normalized": (B, T, C),
        "attn.hook_q": (B, T, H, D), "attn.hook_k": (B, T, KV, D), "attn.hook_v": (B, T, KV, D),
        "attn.hook_z": (B, T, H, D), "attn.hook_result": (B, T, H, C),
        "attn.hook_attn_scores": (B, H, T, T), "attn.hook_pattern": (B, H, T, T),
        "mlp.hook_pre": (B, T, mlp_pre), "mlp.hook_post": (B, T, c.mlp_hidden),
    }
    if c.pos_emb == "rope":
        per_block.update({"attn.hook_rot_q": (B, T, H, D), "attn.hook_rot_k": (B, T, KV, D)})
    shapes = {"hook_embed": (B, T, C), "ln_final.hook_scale": (B, T, 1),
              "ln_final.hook_normalized": (B, T, C)}
    if c.pos_emb == "learned":
        shapes["hook_pos_embed"] = (B, T, C)
    for i in range(c.n_layer):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in per_block.items()})
    return shapes


@MODELS
def test_every_hook_name_exists_with_its_shape(shape):
    model = model_of(shape)
    logits, cache = model.run_with_cache(tokens(), names_filter=lambda name: True)
    shapes = {name: tuple(t.shape) for name, t in cache.items()}
    assert shapes == expected_shapes(model.config)
    assert set(model.hook_dict) == set(shapes)
    torch.testing.assert_close(logits, model(tokens())[0], rtol=0, atol=1e-5)


@MODELS
def test_default_cache_leaves_out_per_head_results(shape):
    model = model_of(shape)
    _, cache = model.run_with_cache(tokens())
    assert "blocks.0.attn.hook_result" not in cache and "blocks.0.hook_resid_post" in cache
    _, with_results = model.run_with_cache(tokens(), names_filter=lambda n: True)
    for layer in range(model.config.n_layer):  # computed from hook_z when not cached
        torch.testing.assert_close(cache.head_results(layer),
                                   with_results[f"blocks.{layer}.attn.hook_result"])


def test_state_dict_keys_unchanged():
    model = model_of(GPT2_SHAPED)
    keys = set(model.state_dict())
    assert "blocks.0.norm1.weight" in keys and "norm_f.weight" in keys
    assert not [k for k in keys if "hook" in k]


def count_fused_calls(model, monkeypatch, idx) -> int:
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(gpt_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    with torch.no_grad():
        model(idx)
    monkeypatch.setattr(gpt_module.F, "scaled_dot_product_attention", fused)
    return len(calls)


@MODELS
def test_unhooked_layers_keep_the_fused_kernel(shape, monkeypatch):
    model = model_of(shape)
    n = model.config.n_layer
    assert count_fused_calls(model, monkeypatch, tokens()) == n
    with model.hooks([("blocks.1.attn.hook_pattern", lambda x, hook: None)]):
        assert count_fused_calls(model, monkeypatch, tokens()) == n - 1  # only layer 1 explicit
    with model.hooks([("blocks.1.attn.hook_z", lambda x, hook: None)]):
        assert count_fused_calls(model, monkeypatch, tokens()) == n  # z needs no pattern
    assert count_fused_calls(model, monkeypatch, tokens()) == n


@MODELS
def test_explicit_attention_equals_fused(shape):
    model = model_of(shape)
    cache = model.new_cache(B)
    with torch.no_grad():  # with a KV cache too: a prompt, then two tokens, then one
        fused = [model(part, cache=cache)[0] for part in tokens().split([6, 3, 1], dim=1)]
        cache.reset()
        with model.hooks([(lambda name: name.endswith("hook_pattern"), lambda x, hook: None)]):
            explicit = [model(part, cache=cache)[0] for part in tokens().split([6, 3, 1], dim=1)]
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@MODELS
def test_zero_ablating_a_head_equals_zeroing_its_slice(shape):
    model = model_of(shape)
    layer, head, D = 1, 2, model.config.head_dim

    def ablate(z, hook):
        z[:, :, head] = 0.0  # (B, T, H, D)

    with torch.no_grad():
        hooked = model.run_with_hooks(tokens(), fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
        # By hand: head 2's input columns of the output projection set to zero.
        model.blocks[layer].attn.proj.weight[:, head * D:(head + 1) * D] = 0.0
        by_hand, _ = model(tokens())
    torch.testing.assert_close(hooked, by_hand, rtol=0, atol=1e-6)
    assert not torch.allclose(hooked, model_of(shape)(tokens())[0], atol=1e-3)


@MODELS
def test_patching_the_clean_residual_at_the_last_layer_restores_clean_logits(shape):
    model = model_of(shape)
    clean, corrupt = tokens(seed=1), tokens(seed=2)
    last = model.config.n_layer - 1
    with torch.no_grad():
        name = f"blocks.{last}.hook_resid_post"
        # Caching only what is patched keeps every kernel as in a plain pass: bit-exact.
        clean_logits, cache = model.run_with_cache(clean, names_filter=name)
        patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: cache[name])])
        corrupt_logits, _ = model(corrupt)
    assert torch.equal(patched, clean_logits)
    assert not torch.allclose(corrupt_logits, clean_logits, atol=1e-2)


@MODELS
def test_residual_decomposition_sums_to_the_final_residual(shape):
    model = model_of(shape)
    logits, cache = model.run_with_cache(tokens())
    parts, labels = cache.decompose_resid(return_labels=True)
    n = model.config.n_layer
    embeds = ["embed", "pos_embed"] if model.config.pos_emb == "learned" else ["embed"]
    assert labels == embeds + [f"{i}_{kind}" for i in range(n) for kind in ("attn_out", "mlp_out")]
    torch.testing.assert_close(parts.sum(0), cache["resid_post", -1], rtol=0, atol=1e-5)
    layer1 = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(layer1.sum(0), cache["resid_mid", 1], rtol=0, atol=1e-5)
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    # Per-head results plus the output biases add up to each attention output.
    for i in range(n):
        bias = model.blocks[i].attn.proj.bias
        heads = cache.head_results(i).sum(2) + (0 if bias is None else bias)
        torch.testing.assert_close(heads, cache["attn_out", i], rtol=0, atol=1e-5)


@MODELS
def test_direct_logit_attribution_adds_up_to_the_logits(shape):
    model = model_of(shape)
    logits, cache = model.run_with_cache(tokens())
    stack = cache.decompose_resid(pos_slice=-1)  # (components, B, C)
    right, wrong = torch.tensor([3, 5]), torch.tensor([7, 7])
    attrs = cache.logit_attrs(stack, right, wrong, pos_slice=-1)  # (components, B)
    expected = logits[:, -1].gather(1, right[:, None]) - logits[:, -1].gather(1, wrong[:, None])
    bias = model.norm_f.bias if getattr(model.norm_f, "bias", None) is not None else 0
    W_U = model.lm_head.weight
    bias_term = (W_U[right] * bias).sum(-1) - (W_U[wrong] * bias).sum(-1)  # not attributable
    torch.testing.assert_close(attrs.sum(0) + bias_term, expected.squeeze(1), atol=1e-4, rtol=0)


@MODELS
def test_gradients_reach_a_hooked_activation(shape):
    model = model_of(shape).train()
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad.clone()

    names = ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_mid", "blocks.2.mlp.hook_post"]
    with model.hooks(bwd_hooks=[(n, keep) for n in names]):
        logits, loss = model(tokens(), targets=tokens(seed=3))
        loss.backward()
    assert set(grads) == set(names) and all(g.abs().sum() > 0 for g in grads.values())
    # The gradient a backward hook sees is d loss / d activation: compare with autograd.
    out, cache = model.run_with_cache(tokens(), names_filter=names[1], detach=False)
    loss = F.cross_entropy(out.view(-1, out.size(-1)), tokens(seed=3).view(-1))
    (grad,) = torch.autograd.grad(loss, cache[names[1]])
    torch.testing.assert_close(grad, grads[names[1]], rtol=1e-5, atol=1e-7)


@MODELS
def test_a_hook_can_edit_the_pattern(shape):
    model = model_of(shape)

    def attend_to_first(pattern, hook):
        uniform = torch.zeros_like(pattern)
        uniform[..., 0] = 1.0
        return uniform

    _, cache = model.run_with_cache(tokens())
    with torch.no_grad():
        edited_logits = model.run_with_hooks(
            tokens(), fwd_hooks=[("blocks.0.attn.hook_pattern", attend_to_first)])
    with model.hooks([("blocks.0.attn.hook_pattern", attend_to_first)]):
        _, edited = model.run_with_cache(tokens())
    v = edited["blocks.0.attn.hook_v"].repeat_interleave(
        model.config.n_head // model.config.kv_heads, dim=2)
    torch.testing.assert_close(edited["blocks.0.attn.hook_z"], v[:, :1].expand_as(v))
    assert not torch.allclose(edited_logits, model(tokens())[0], atol=1e-3)


def test_no_hook_survives_an_exception():
    model = model_of(GPT2_SHAPED)
    permanent = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: permanent.append(1))

    def boom(x, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.hook_mlp_out", boom)])
    with pytest.raises(RuntimeError, match="inside a hook"):
        with model.hooks([(lambda n: n.endswith("hook_pattern"), boom)]):
            model(tokens())
    with pytest.raises(KeyError, match="no hook point named 'blocks.0.hook_typo'"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.attn.hook_q", boom),
                                                  ("blocks.0.hook_typo", boom)])
    active = [hp.name for hp in model.hook_dict.values() if hp.active]
    assert active == ["blocks.0.hook_resid_pre"]  # the one added with add_hook stays
    model.reset_hooks()
    assert not any(hp.active for hp in model.hook_dict.values())


def test_cache_short_names():
    model = model_of(GPT2_SHAPED)
    _, cache = model.run_with_cache(tokens())
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["scale", 1, "ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    with pytest.raises(KeyError, match="names_filter"):
        model.run_with_cache(tokens(), names_filter="hook_embed")[1]["hook_pos_embed"]


def test_compile_traces_through_unused_hook_points():
    model = model_of(GPT2_SHAPED)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: no breaks
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens())[0], model(tokens())[0])


class DoubledAttention(gpt_module.CausalSelfAttention):
    """A variant put in place after construction, as docs/library.md suggests."""

    def forward(self, x, rope=None, cache=None):
        return 2 * super().forward(x, rope, cache)


class Unhooked(gpt_module.CausalSelfAttention):
    """Holds the hook points it inherits but computes attention without calling any of them."""

    def forward(self, x, rope=None, cache=None):
        q, k, v = (t.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)
                   for t in self.split_qkv(self.qkv(x)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


@MODELS
def test_a_replaced_module_brings_its_hook_points(shape):
    model = model_of(shape)
    old = model.blocks[0].attn
    model.blocks[0].attn = DoubledAttention(model.config, 0).eval()
    model.blocks[0].attn.load_state_dict(old.state_dict())
    new = model.blocks[0].attn
    assert model.hook_dict["blocks.0.attn.hook_z"] is new.hook_z
    assert not any(hp is old.hook_z for hp in model.hook_dict.values())
    _, cache = model.run_with_cache(tokens(), names_filter=lambda name: True)
    assert set(cache.keys()) == set(expected_shapes(model.config))  # nothing silently missing
    # Zeroing the new module's z leaves only proj's bias (doubled) as attention's output.
    def zero(z, hook):
        return torch.zeros_like(z)

    with model.hooks([("blocks.0.attn.hook_z", zero)]):
        _, cache = model.run_with_cache(tokens(), names_filter="blocks.0.hook_attn_out")
    bias = 0 if new.proj.bias is None else 2 * new.proj.bias
    torch.testing.assert_close(cache["attn_out", 0], torch.zeros(B, T, model.config.n_embd) + bias)
    zeroed = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_z", zero)])
    assert not torch.allclose(zeroed, model(tokens())[0], atol=1e-3)
    # A module whose forward never calls a point it holds: asking for that point is an error.
    model.blocks[1].attn = Unhooked(model.config, 1)
    with pytest.raises(KeyError, match="'blocks.1.attn.hook_z' did not fire"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.attn.hook_z", zero)])
    with pytest.raises(KeyError, match="did not fire"):
        model.run_with_cache(tokens(), names_filter=["blocks.1.attn.hook_q"])
    # A replaced norm without hook points takes its names with it.
    model.blocks[1].norm1 = torch.nn.Identity()
    with pytest.raises(KeyError, match="no hook point named 'blocks.1.ln1.hook_scale'"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.ln1.hook_scale", zero)])


@MODELS
@pytest.mark.parametrize("batch", [1, 3])
def test_pos_slice_selects_positions_for_every_helper(shape, batch):
    """Slicing positions first equals slicing the full result (also the normalised ones)."""
    model = model_of(shape)
    _, cache = model.run_with_cache(tokens()[:1].repeat(batch, 1))
    helpers = {
        "accumulated_resid": lambda **kw: cache.accumulated_resid(incl_mid=True, **kw),
        "accumulated_resid 1": lambda **kw: cache.accumulated_resid(1, mlp_input=True, **kw),
        "decompose_resid": lambda **kw: cache.decompose_resid(**kw),
        "decompose_resid 1": lambda **kw: cache.decompose_resid(1, mlp_input=True, **kw),
        "stack_head_results": lambda **kw: cache.stack_head_results(incl_remainder=True, **kw),
    }
    for name, helper in helpers.items():
        for apply_ln in (False, True):
            whole = helper(apply_ln=apply_ln)
            for pos_slice, index in ((-1, -1), (3, 3), ((2, 7), slice(2, 7)),
                                     (slice(1, None, 3), slice(1, None, 3)), ([0, 4], [0, 4])):
                part = helper(apply_ln=apply_ln, pos_slice=pos_slice)
                torch.testing.assert_close(part, whole[:, :, index], rtol=1e-5, atol=1e-6,
                                           msg=f"{name} {apply_ln} {pos_slice}")


@MODELS
def test_the_logit_lens_ends_at_the_logits(shape):
    model = model_of(shape)
    logits, cache = model.run_with_cache(tokens())
    lens, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True,
                                           return_labels=True)
    n = model.config.n_layer
    assert labels == [f"{i}_{kind}" for i in range(n) for kind in ("pre", "mid")] + ["final_post"]
    torch.testing.assert_close((lens @ model.W_U)[-1], logits[:, -1], rtol=0, atol=1e-5)
    # cache.logit_lens() computes the same, one entry at a time.
    result = cache.logit_lens(incl_mid=True)
    assert result.labels == labels
    torch.testing.assert_close(result.values, lens @ model.W_U, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.values[-1], logits[:, -1], rtol=0, atol=1e-5)
    top = cache.logit_lens(top_k=1, positions=None).top_ids[-1, ..., 0]
    assert torch.equal(top, logits.argmax(-1))
    from model.errors import SmallGPTError

    with pytest.raises(SmallGPTError, match="the stack has 4 entries"):
        cache.logit_lens(layers=[4])


def test_a_cache_saves_loads_moves_and_drops_its_batch_axis(tmp_path):
    from model.errors import SmallGPTError

    model = model_of(GPT2_SHAPED)
    logits, cache = model.run_with_cache(tokens()[:1])
    torch.save(cache, tmp_path / "cache.pt")
    loaded = torch.load(tmp_path / "cache.pt")  # the default: weights_only
    assert list(loaded.keys()) == list(cache.keys())
    assert all(torch.equal(loaded[name], cache[name]) for name in cache)
    torch.testing.assert_close(loaded.accumulated_resid(), cache.accumulated_resid())
    with pytest.raises(SmallGPTError, match="cache.model = model"):
        loaded.accumulated_resid(apply_ln=True)
    loaded.model = model
    torch.testing.assert_close(loaded.accumulated_resid(apply_ln=True),
                               cache.accumulated_resid(apply_ln=True))
    assert cache.to("meta")["resid_pre", 0].device.type == "meta"
    _, cache = model.run_with_cache(tokens()[:1], remove_batch_dim=True)
    assert cache["resid_pre", 0].shape == (T, model.config.n_embd)
    lens = cache.accumulated_resid(pos_slice=-1, apply_ln=True)
    torch.testing.assert_close((lens @ model.W_U)[-1], logits[0, -1], rtol=0, atol=1e-5)
    assert cache.stack_head_results(pos_slice=-1).shape == (3 * 4, model.config.n_embd)
    with pytest.raises(SmallGPTError, match="batch size 1"):
        model.run_with_cache(tokens(), remove_batch_dim=True)


def test_return_type():
    from model.errors import ConfigError

    model = model_of(GPT2_SHAPED)
    idx = tokens()
    logits = model(idx)[0]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 96), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(model.run_with_hooks(idx, return_type="loss"), loss)
    both, _ = model.run_with_cache(idx, return_type="both")
    torch.testing.assert_close(both[0], logits)
    torch.testing.assert_close(both[1], loss)
    assert model.run_with_hooks(idx, return_type=None) is None
    with pytest.raises(ConfigError, match="return_type"):
        model.run_with_hooks(idx, return_type="logprobs")


def test_text_wherever_token_ids_go():
    from model.data.tokenizer import CharTokenizer
    from model.errors import TokenizerError

    model = model_of(dict(GPT2_SHAPED, vocab_size=27))
    with pytest.raises(TokenizerError, match="no tokenizer"):
        model.to_tokens("abc")
    model.tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    ids = model.to_tokens("hello")
    assert ids.tolist() == [[7, 4, 11, 11, 14]]
    assert model.to_tokens(["ab", "cd"]).shape == (2, 2)
    assert model.to_str_tokens("hey") == ["h", "e", "y"]
    assert model.to_str_tokens(ids) == list("hello")
    assert model.to_string(ids) == ["hello"] and model.to_string(ids[0]) == "hello"
    assert model.to_single_token("q") == 16
    with pytest.raises(TokenizerError, match="2 tokens"):
        model.to_single_token("qq")
    torch.testing.assert_close(model("hello")[0], model(ids)[0])
    torch.testing.assert_close(model.run_with_hooks("hello"), model(ids)[0])
    assert torch.equal(model.run_with_cache("hello")[1]["hook_embed"],
                       model.run_with_cache(ids)[1]["hook_embed"])
    direction = model.tokens_to_residual_directions("q")
    torch.testing.assert_close(direction, model.W_U[:, 16] * model.ln_final.weight)
