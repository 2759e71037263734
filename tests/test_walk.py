"""model.inference.walk: every stage's numbers equal what the hooks, the analyses and the
sampler compute on their own, for learned and rotary positions, LayerNorm and RMSNorm, tied
and untied heads, gated and plain MLPs, a head wider than its tokenizer; bad input is one error."""

from __future__ import annotations

import math

import pytest
import torch

from model.data.tokenizer import CharTokenizer
from model.errors import ConfigError, SamplingError, TokenizerError
from model.gpt import GPT, GPTConfig
from model.inference.analysis import attention, logit_lens, neighbors, to_jsonable
from model.inference.sampling import distribution, generate
from model.inference.tally import parameter_tally
from model.inference.walk import walk

CHARS = " .abcdefghijklmnopqrstuvwxyz"
PROMPT = "the cat sat on"
SHAPES = {
    "learned": dict(),
    "rotary": dict(pos_emb="rope", norm="rmsnorm", tie_embeddings=False, bias=False),
    "gated": dict(pos_emb="rope", activation="swiglu", n_kv_head=1, qk_norm=True,
                  tie_embeddings=False),
    "padded": dict(activation="relu2"),  # the head has 3 ids past the tokenizer's vocabulary
}


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer(CHARS)


def make(tok: CharTokenizer, shape: str) -> GPT:
    torch.manual_seed(0)
    vocab = tok.vocab_size + (3 if shape == "padded" else 0)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, n_embd=32, block_size=24,
                          **SHAPES[shape]))
    with torch.no_grad():  # larger weights than GPT-2's init: distinct, confident numbers;
        for p in model.parameters():  # norms' weights off 1 and biases off 0, as after training
            p.mul_(8) if p.dim() > 1 else p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tok):
    model = make(tok, request.param)
    return request.param, model, walk(model, tok, PROMPT, temperature=0.7, seed=3, k=4)


def by_stage(result, name: str) -> list:
    return [s for s in result.stages if s.stage == name]


def test_the_stages_come_in_the_order_the_network_computes_them(case):
    _, model, result = case
    names = [s.stage for s in result.stages]
    layers = ["attention", "mlp"] * model.config.n_layer
    assert names == ["tokens", "embedding", "position", *layers, "unembedding", "softmax",
                     "sample"]
    assert [s.layer for s in by_stage(result, "attention")] == [0, 1]
    assert all(s.caption and s.caption[-1] == "." for s in result.stages)


def test_tokens_embedding_and_position_are_the_lookups(case, tok):
    shape, model, result = case
    tokens, emb, pos = result.stages[:3]
    ids = tok.encode(PROMPT)
    assert [t.id for t in tokens.tokens] == ids and tokens.text == PROMPT
    assert emb.token.id == ids[-1] and emb.one_hot_equals_row
    assert torch.equal(torch.tensor(emb.row), model.W_E[ids[-1]])
    found = neighbors(model, tok, PROMPT[-1], k=4).neighbors  # the same nearest rows
    assert [s.id for s in emb.nearest] == [s.id for s in found]
    T = len(ids)
    assert pos.position == T - 1
    if model.config.pos_emb == "learned":
        assert pos.kind == "learned" and pos.rotations == []
        assert torch.equal(torch.tensor(pos.row), model.W_pos[T - 1])
        assert torch.allclose(torch.tensor(pos.entering), model.W_E[ids[-1]] + model.W_pos[T - 1])
    else:
        assert pos.kind == "rope" and pos.row is None and pos.params[0].count == 0
        assert torch.equal(torch.tensor(pos.entering), model.W_E[ids[-1]])
        _, cache = model.run_with_cache(torch.tensor([ids]))
        head = by_stage(result, "attention")[0].head
        q = cache["blocks.0.attn.hook_rot_q"][0, -1, head]
        half = model.config.head_dim // 2
        for r in pos.rotations:
            assert r.after == pytest.approx([q[r.pair].item(), q[r.pair + half].item()], abs=1e-5)
            assert r.angle == pytest.approx((T - 1) * model.config.rope_base
                                            ** (-2 * r.pair / model.config.head_dim), rel=1e-5)
            assert math.hypot(*r.before) == pytest.approx(math.hypot(*r.after), rel=1e-5)
            if not model.config.qk_norm:  # before: the query as W_Q computed it
                unrotated = cache["blocks.0.attn.hook_q"][0, -1, head]
                assert r.before == pytest.approx(
                    [unrotated[r.pair].item(), unrotated[r.pair + half].item()], abs=1e-4)


def test_the_attention_pattern_is_hook_pattern_and_the_sources_add_up(case, tok):
    _, model, result = case
    idx = torch.tensor([tok.encode(PROMPT)])
    patterns = model.run_with_cache(idx, names_filter=lambda name: "pattern" in name)[1]
    _, cache = model.run_with_cache(idx)
    for stage in by_stage(result, "attention"):
        layer = stage.layer
        pattern = patterns["pattern", layer][0, :, -1]  # (H, T): every head, the last token
        assert torch.equal(torch.tensor(stage.pattern), pattern)
        # One layer's row of analysis.attention (the page's heatmap) is the same row.
        shown = attention(model, tok, PROMPT, layer, stage.head).weights[-1]
        assert stage.pattern[stage.head] == pytest.approx(shown, abs=1e-6)
        # What each source wrote: pattern * v @ W_O, heads and sources summed, plus the output
        # bias, is the layer's output at the last position.
        v = cache["v", layer][0]
        v = v.repeat_interleave(model.config.n_head // v.size(1), dim=1)  # (T, H, D)
        wrote = torch.einsum("hj,jhd,hdc->jhc", pattern, v, model.W_O[layer])  # (T, H, C)
        bias = model.b_O[layer] if model.b_O is not None else 0
        assert torch.allclose(wrote.sum((0, 1)) + bias, cache["attn_out", layer][0, -1],
                              atol=1e-4)
        assert torch.allclose(torch.tensor(stage.written), wrote.norm(dim=-1).T, atol=1e-4)
        sizes = wrote.sum(1).norm(dim=-1)
        assert [s.position for s in stage.sources] == sizes.topk(4).indices.tolist()
        heads = wrote.sum(0).norm(dim=-1)
        assert stage.head == heads.argmax().item()  # none asked for: the largest write


def test_a_chosen_head_is_shown_in_every_layer(tok):
    model = make(tok, "learned")
    result = walk(model, tok, PROMPT, head=2)
    assert [s.head for s in by_stage(result, "attention")] == [2, 2]


def test_the_lens_is_the_logit_lens_and_ends_at_the_output(case, tok):
    _, model, result = case
    lens = logit_lens(model, tok, PROMPT, k=4)
    for stage in by_stage(result, "mlp"):
        row = lens.top[stage.layer + 1][-1]  # after block `layer`, at the last position
        assert [s.id for s in stage.lens] == [s.id for s in row]
        assert [s.score for s in stage.lens] == pytest.approx([s.score for s in row], abs=1e-5)
    final = by_stage(result, "mlp")[-1].lens
    dist = distribution(model, tok, tok.encode(PROMPT), temperatures=[1.0], k=4)
    assert [s.id for s in final] == [c.id for c in dist.tokens]
    assert [s.score for s in final] == pytest.approx(dist.probs[0], abs=1e-5)


def test_neurons_and_the_tokens_they_promote(case, tok):
    _, model, result = case
    idx = torch.tensor([tok.encode(PROMPT)])
    _, cache = model.run_with_cache(idx)
    every = torch.arange(tok.vocab_size)
    # The direct effect on the logits, by hand: centred (LayerNorm), divided by the final
    # norm's scale, times the final norm's weight, then W_U.
    gain = model.norm_f.weight / cache["ln_final.hook_scale"][0, -1]
    for stage in by_stage(result, "mlp"):
        post = cache["post", stage.layer][0, -1]
        assert stage.width == post.numel()
        assert [n.index for n in stage.neurons] == post.abs().topk(4).indices.tolist()
        for n in stage.neurons:
            assert n.activation == pytest.approx(post[n.index].item(), rel=1e-5, abs=1e-5)
            u = post[n.index] * model.W_out[stage.layer, n.index]
            if model.config.norm == "layernorm":
                u = u - u.mean()
            effect = (u * gain) @ model.W_U[:, every]
            assert [p.id for p in n.promotes] == effect.topk(4).indices.tolist()
            assert [p.score for p in n.promotes] == pytest.approx(
                effect.topk(4).values.tolist(), rel=1e-4, abs=1e-5)


def test_unembedding_logits_are_dot_products_with_rows_of_w_u(case, tok):
    _, model, result = case
    (stage,) = by_stage(result, "unembedding")
    ids = tok.encode(PROMPT)
    logits = model(torch.tensor([ids]))[0][0, -1, :tok.vocab_size]
    assert [t.id for t in stage.top] == logits.topk(4).indices.tolist()
    resid = model.run_with_cache(torch.tensor([ids]))[1]["resid_post", -1][0, -1]
    normed = model.norm_f(resid)  # the vector W_U's rows are dotted with
    for t in stage.top:
        assert t.logit == pytest.approx(logits[t.id].item(), abs=1e-4)
        assert t.dot + t.bias == pytest.approx(t.logit, abs=1e-5)
        assert t.logit == pytest.approx((normed @ model.W_U[:, t.id]).item(), abs=1e-4)
        norm_bias = getattr(model.norm_f, "bias", None)
        expected = 0.0 if norm_bias is None else (norm_bias @ model.W_U[:, t.id]).item()
        assert t.bias == pytest.approx(expected, abs=1e-4)
    assert torch.allclose(torch.tensor(stage.final) * stage.scale,
                          resid - (resid.mean() if model.config.norm == "layernorm" else 0),
                          atol=1e-4)


def test_softmax_is_the_distribution_and_the_sample_is_generates_first_token(case, tok):
    _, model, result = case
    (soft,) = by_stage(result, "softmax")
    ids = tok.encode(PROMPT)
    expected = distribution(model, tok, ids, temperatures=[0.7, 1.0], k=4)
    assert soft.distribution.temperatures == [0.7, 1.0]
    assert [c.id for c in soft.distribution.tokens] == [c.id for c in expected.tokens]
    for got, want in zip(soft.distribution.probs, expected.probs):
        assert got == pytest.approx(want, rel=1e-4)
    (sample,) = by_stage(result, "sample")
    first = next(generate(model, tok, PROMPT, max_new_tokens=1, temperature=0.7, seed=3))
    assert (sample.token.id, sample.temperature, sample.seed) == (first.token, 0.7, 3)
    assert sample.prob == pytest.approx(first.prob, rel=1e-4)


def test_temperature_zero_takes_the_likeliest_and_ids_are_a_prompt(tok):
    model = make(tok, "rotary")
    ids = tok.encode(PROMPT)
    result = walk(model, tok, ids, temperature=0, temperatures=[0, 0.5, 2])
    (soft,) = by_stage(result, "softmax")
    (sample,) = by_stage(result, "sample")
    assert sample.token.id == soft.distribution.tokens[0].id and "likeliest" in sample.caption
    assert soft.distribution.temperatures == [0, 0.5, 2]
    assert [t.id for t in result.stages[0].tokens] == ids
    empty = walk(model, tok, "")  # an empty prompt starts a document, as generation does
    assert [t.id for t in empty.stages[0].tokens] == [tok.eot_id] and empty.stages[0].text == ""
    then = walk(model, tok, [tok.eot_id, *ids])
    assert then.stages[0].text == PROMPT  # the text a prompt box holds: the start left out


def test_a_bfloat16_model_is_walked(tok):
    import json

    model = make(tok, "gated")
    expected = walk(model, tok, PROMPT, seed=1)
    result = walk(model.to(torch.bfloat16), tok, PROMPT, seed=1)
    assert [s.stage for s in result.stages] == [s.stage for s in expected.stages]
    assert result.stages[-3].top[0].id == expected.stages[-3].top[0].id
    json.dumps(to_jsonable(result), allow_nan=False)


def test_parameters_beside_gpt3(case):
    shape, model, result = case
    rows = {r.component: r for r in parameter_tally(model)}
    assert result.n_params == sum(r.count for r in rows.values()) == model.num_params()
    assert 174e9 < result.gpt3_params < 175e9
    attn = by_stage(result, "attention")[0].params[0]
    assert attn.count * model.config.n_layer == rows["attention"].count
    assert attn.gpt3_count * attn.gpt3_layers == 57_986_777_088 and attn.gpt3_layers == 96
    emb = by_stage(result, "embedding")[0].params[0]
    assert emb.name == "W_E" and emb.gpt3_count == 50257 * 12288
    assert emb.shapes == [[model.config.vocab_size, model.config.n_embd]]
    unembed = by_stage(result, "unembedding")[0].params[0]
    assert unembed.gpt3_tied_to == "token embedding (W_E)"
    if model.config.tie_embeddings:
        assert unembed.count == 0 and unembed.tied_to == "token embedding (W_E)"
    else:
        assert unembed.count == model.config.vocab_size * model.config.n_embd


def test_the_walk_is_json_and_takes_one_forward_pass(tok, monkeypatch):
    model = make(tok, "learned")
    calls = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **kw: calls.append(1) or
                        forward(self, *a, **kw))
    data = to_jsonable(walk(model, tok, PROMPT))
    assert len(calls) == 1
    import json

    assert json.loads(json.dumps(data, allow_nan=False))["stages"][0]["stage"] == "tokens"


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_byte_level_tokenizers(name, request):
    """BPE tokens can be pieces of a UTF-8 character: the walk shows them as token_text does."""
    from model.data.tokenizer import train_tokenizer

    if name == "gpt2":
        request.getfixturevalue("gpt2_vocabulary")
    text = "café ☕ and tea, the cat sat on the mat. " * 20
    tokenizer = train_tokenizer(name, [text], vocab_size=300 if name == "bpe" else None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                          block_size=32)).eval()
    result = walk(model, tokenizer, "café ☕", seed=0)
    ids = tokenizer.encode("café ☕")
    assert [t.id for t in result.stages[0].tokens] == ids and result.stages[0].text == "café ☕"
    assert [t.text for t in result.stages[0].tokens] == [tokenizer.token_text(i) for i in ids]
    import json

    json.dumps(to_jsonable(result), allow_nan=False)


def test_a_model_in_training_mode_is_walked_as_it_predicts(tok):
    model = make(tok, "learned")
    model.config.dropout = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    expected = to_jsonable(walk(model, tok, PROMPT, seed=1))
    model.train()
    assert to_jsonable(walk(model, tok, PROMPT, seed=1)) == expected and model.training


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(head=4), ConfigError, "heads 0 to 3"),
    (dict(k=0), ConfigError, "k must be >= 1"),
    (dict(temperature=-1), SamplingError, "temperature"),
    (dict(temperatures=[1, -0.5]), SamplingError, "temperatures"),
    (dict(top_p=0), SamplingError, "top-p"),
    (dict(prompt="the cat " * 4), ConfigError, "context size"),
    (dict(prompt="THE"), TokenizerError, "vocabulary"),
])
def test_bad_input_is_one_error(tok, kwargs, error, message):
    model = make(tok, "learned")
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(error, match=message):
        walk(model, tok, prompt, **kwargs)


# -- python -m model.explore walk -----------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    from model.config import Config
    from model.weights.checkpoint import save_checkpoint

    model = make(tok, "rotary")
    run = tmp_path_factory.mktemp("walk") / "run"
    save_checkpoint(run / "latest", model, Config(model=model.config, name="w"), tok.spec())
    return run


def test_the_command_prints_every_stage(run_dir, capsys):
    import json

    from model.cli.explore import main

    argv = ["walk", PROMPT, "--checkpoint", str(run_dir), "--temperature", "0.7", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    headers = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[")]
    assert headers == ["tokens", "embedding", "position", "attention, layer 0", "mlp, layer 0",
                       "attention, layer 1", "mlp, layer 1", "unembedding", "softmax", "sample"]
    assert "GPT-3:      50257x12288 = 617,558,016" in out and "p@T=0.7" in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in data["stages"]][-1] == "sample"
    model = make(CharTokenizer(CHARS), "rotary")
    expected = walk(model, CharTokenizer(CHARS), PROMPT, temperature=0.7, seed=3)
    assert data["stages"][-1]["token"]["id"] == expected.stages[-1].token.id


@pytest.mark.parametrize("argv, message", [
    (["--head", "9"], "heads 0 to 3"),
    (["-k", "0"], "k must be >= 1"),
    (["--temperature", "-1"], "temperature"),
])
def test_the_command_says_what_is_wrong_in_one_line(run_dir, capsys, argv, message):
    from model.cli.explore import main

    assert main(["walk", PROMPT, "--checkpoint", str(run_dir), *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.partition("\n")[2] if captured.err.startswith("using ") else captured.err
    assert captured.out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert message in err
