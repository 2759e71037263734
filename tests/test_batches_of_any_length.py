"""Batches of texts of any lengths: the attention mask (left and right padding, learned and rotary
positions) against each text alone, logits and every activation; the KV cache across padded
steps; the unpadded path unchanged bit for bit; to_tokens' padding; generate with a list of
prompts against one prompt at a time (greedy past the context window, seeded samples, logits
processors, finished rows); and the server's list of prompts against one request per prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.gpt as gpt_module
from model import GPT, ConfigError, GPTConfig, TokenizerError, to_str_tokens, to_tokens
from model.data.tokenizer import train_tokenizer
from model.inference.sampling import generate, prompt_list, repetition_penalty

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n"
BLOCK = 16
PROMPTS = ["First", "Before we proc", "A", "All: Speak, speak. Be"]  # 5, 14, 1, 21 chars
SHAPES = {"learned": {}, "rope": {"n_kv_head": 2}}


@pytest.fixture(scope="module")
def chars():
    return train_tokenizer("char", [TEXT])


def sharp_model(vocab: int, pos_emb: str, seed: int = 0) -> GPT:
    """A float32 GPT with large random weights, so that its outputs depend on the context."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32,
                          pos_emb=pos_emb, **SHAPES[pos_emb]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


def padded(rows: list[list[int]], side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        idx[b, cols], mask[b, cols] = torch.tensor(row), 1
    return idx, mask


def close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal within float32 rounding: 1e-5 relative, or 1e-5 of the tensor's largest value (an
    element near zero in a large activation carries the rounding of its large neighbours)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def real_part(name: str, x: torch.Tensor, b: int, n: int, offset: int) -> torch.Tensor:
    """Row b's real positions of activation x: dim 1 is time, or query and key for patterns."""
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return x[b, :, offset:offset + n, offset:offset + n]
    return x[b, offset:offset + n]


# -- the forward pass -------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_padded_rows_equal_each_text_alone(chars, pos_emb, side):
    model = sharp_model(chars.vocab_size, pos_emb)
    rows = [chars.encode(p)[:BLOCK] for p in PROMPTS]
    idx, mask = padded(rows, side, pad=chars.eot_id)
    with torch.no_grad():
        logits, cache = model.run_with_cache(idx, attention_mask=mask)
        for b, row in enumerate(rows):
            alone_logits, alone = model.run_with_cache(torch.tensor([row]))
            offset = idx.size(1) - len(row) if side == "left" else 0
            close(logits[b, offset:offset + len(row)], alone_logits[0], "logits")
            assert len(alone.keys()) > 30
            for name in alone.keys():
                close(real_part(name, cache[name], b, len(row), offset),
                      real_part(name, alone[name], 0, len(row), 0), name)
    assert torch.isfinite(logits).all()  # padding computes something finite, never NaN


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_the_cache_carries_a_padded_batch_across_steps(chars, pos_emb, side):
    """Prefill a padded batch, then add tokens without a mask: each row goes on from its own
    last position, as its text alone does."""
    model = sharp_model(chars.vocab_size, pos_emb, seed=1)
    rows = [chars.encode(p)[:10] for p in PROMPTS]
    idx, mask = padded(rows, side)
    cache = model.new_cache(len(rows))
    with torch.no_grad():
        model(idx, cache=cache, attention_mask=mask)
        for step in range(3):
            new = torch.tensor([[3 + step + b] for b in range(len(rows))])
            logits = model(new, cache=cache)[0][:, -1]
            for b in range(len(rows)):
                rows[b].append(new[b, 0].item())
                alone = model(torch.tensor([rows[b]]))[0][0, -1]
                close(logits[b], alone)


def test_a_mask_of_ones_is_the_unpadded_path_bit_for_bit(chars, monkeypatch):
    model = sharp_model(chars.vocab_size, "rope")
    idx = torch.randint(0, chars.vocab_size, (3, BLOCK))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(gpt_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    plain, loss = model(idx, idx)
    masked, masked_loss = model(idx, idx, attention_mask=torch.ones_like(idx))
    assert torch.equal(plain, masked) and torch.equal(loss, masked_loss)
    assert all(kw.get("is_causal") and "attn_mask" not in kw for kw in calls)  # fused, causal


def test_a_padding_query_sees_only_itself_and_stays_finite(chars):
    model = sharp_model(chars.vocab_size, "learned")
    idx, mask = torch.tensor([[1, 2, 3], [4, 4, 4]]), torch.tensor([[1, 1, 1], [0, 0, 0]])
    logits, cache = model.run_with_cache(idx, attention_mask=mask)
    assert torch.isfinite(logits).all()
    assert torch.equal(cache["pattern", 0][1, 0], torch.eye(3))


def test_a_bad_mask_or_a_row_past_the_context_is_named(chars):
    model = sharp_model(chars.vocab_size, "learned")
    with pytest.raises(ConfigError, match="attention_mask has shape"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ConfigError, match="block_size"):
        model(torch.zeros(2, BLOCK + 2, dtype=torch.long),
              attention_mask=torch.ones(2, BLOCK + 2))
    # Padding does not count: a row of block_size tokens plus padding fits.
    mask = torch.ones(2, BLOCK + 2)
    mask[0, :2] = mask[1, -2:] = 0
    assert model(torch.zeros(2, BLOCK + 2, dtype=torch.long), attention_mask=mask)[0].shape[1] \
        == BLOCK + 2


def test_hooks_read_each_tokens_position_in_its_text(chars):
    model = sharp_model(chars.vocab_size, "rope")
    idx, mask = padded([[1, 2, 3], [4]], "left")
    seen = {}
    model.run_with_hooks(idx, attention_mask=mask, fwd_hooks=[
        ("blocks.1.hook_resid_post", lambda x, hook: seen.update(p=hook.positions.tolist()))])
    assert seen["p"] == [[0, 1, 2], [-1, -1, 0]]
    model.run_with_hooks(idx, fwd_hooks=[
        ("hook_embed", lambda x, hook: seen.update(p=hook.positions.tolist()))])
    assert seen["p"] == [[0, 1, 2], [0, 1, 2]]
    # Under the cache, counting what a window has moved past (window_start, a number or a row's)
    cache = model.new_cache(2)
    with model.hooks([("hook_embed", lambda x, hook: seen.update(p=hook.positions.tolist()))]):
        model(idx, cache=cache, attention_mask=mask, window_start=5)
        assert seen["p"] == [[5, 6, 7], [-1, -1, 5]]
        model(torch.tensor([[7], [8]]), cache=cache)
        assert seen["p"] == [[8], [6]]
        model(idx, window_start=torch.tensor([10, 20]))
        assert seen["p"] == [[10, 11, 12], [20, 21, 22]]


# -- to_tokens --------------------------------------------------------------------------------

def test_to_tokens_pads_unequal_texts_on_either_side(chars):
    eot = chars.eot_id
    a, bc = chars.encode("A"), chars.encode("Be")
    right, mask = chars.to_tokens(["A", "Be"], return_mask=True)
    assert right.tolist() == [a + [eot], bc] and mask.tolist() == [[1, 0], [1, 1]]
    left, mask = chars.to_tokens(["A", "Be"], padding_side="left", return_mask=True)
    assert left.tolist() == [[eot] + a, bc] and mask.tolist() == [[0, 1], [1, 1]]
    assert chars.to_tokens("Be", prepend_bos=True).tolist() == [[eot] + bc]
    assert torch.equal(to_tokens(chars, ["A", "Be"], padding_side="left"), left)
    assert to_str_tokens(chars, "Be") == chars.to_str_tokens("Be") == ["B", "e"]
    assert chars.to_str_tokens(torch.tensor([a])) == ["A"]
    with pytest.raises(TokenizerError, match="padding_side"):
        chars.to_tokens(["A"], padding_side="middle")


def test_to_tokens_batch_runs_each_text_as_alone(chars):
    model = sharp_model(chars.vocab_size, "learned")
    texts = ["First", "A", "All: Speak"]
    idx, mask = chars.to_tokens(texts, padding_side="left", return_mask=True)
    logits = model(idx, attention_mask=mask)[0][:, -1]
    for b, text in enumerate(texts):
        close(logits[b], model(chars.to_tokens(text))[0][0, -1])


# -- generate ---------------------------------------------------------------------------------

def one_by_one(model, tokenizer, prompts, **kwargs) -> list[list]:
    return [list(generate(model, tokenizer, p, **kwargs)) for p in prompts]


def of_prompt(steps, p: int, sample: int = 0) -> list:
    return [s for s in steps if s.prompt == p and s.sample == sample]


@pytest.mark.parametrize("window_shift", [None, 1, 5])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_batched_greedy_equals_one_prompt_at_a_time(chars, pos_emb, use_cache, window_shift):
    """Four prompts of different lengths (one longer than the context) and 3 * block_size new
    tokens: every window fills and moves on several times, at different steps per prompt."""
    model = sharp_model(chars.vocab_size, pos_emb)
    kwargs = dict(max_new_tokens=3 * BLOCK, temperature=0, ignore_eot=True, use_cache=use_cache,
                  window_shift=window_shift)
    with pytest.warns(UserWarning, match="using its last"):
        batch = list(generate(model, chars, PROMPTS, **kwargs))
        alone = one_by_one(model, chars, PROMPTS, **kwargs)
    assert len(batch) == len(PROMPTS) * 3 * BLOCK
    for p, steps in enumerate(alone):
        got = of_prompt(batch, p)
        assert [s.token for s in got] == [s.token for s in steps]
        assert [s.index for s in got] == list(range(3 * BLOCK))
        assert [s.prob for s in got] == pytest.approx([s.prob for s in steps], abs=1e-5)
    assert len({tuple(s.token for s in of_prompt(batch, p)) for p in range(4)}) == 4


def test_seeded_samples_of_several_prompts_are_each_prompts_own(chars):
    model = sharp_model(chars.vocab_size, "rope", seed=2)
    kwargs = dict(max_new_tokens=2 * BLOCK, temperature=1.0, top_k=8, seed=11, num_samples=2,
                  ignore_eot=True)
    batch = list(generate(model, chars, PROMPTS[:3], **kwargs))
    for p, steps in enumerate(one_by_one(model, chars, PROMPTS[:3], **kwargs)):
        for sample in (0, 1):
            assert [s.token for s in of_prompt(batch, p, sample)] == \
                [s.token for s in steps if s.sample == sample]
    first = [(s.prompt, s.sample) for s in batch[:6]]
    assert first == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]  # position by position


def test_processors_see_each_prompts_own_history(chars):
    model = sharp_model(chars.vocab_size, "learned", seed=3)
    kwargs = dict(max_new_tokens=2 * BLOCK, temperature=0, ignore_eot=True,
                  logits_processor=repetition_penalty(1.5), with_logits=True)
    with pytest.warns(UserWarning):
        batch = list(generate(model, chars, PROMPTS, **kwargs))
        alone = one_by_one(model, chars, PROMPTS, **kwargs)
    for p, steps in enumerate(alone):
        got = of_prompt(batch, p)
        assert [s.token for s in got] == [s.token for s in steps]
        close(torch.stack([s.logits for s in got]), torch.stack([s.logits for s in steps]))


def test_rows_finish_on_their_own(chars):
    """A stop string ends one prompt's sample while the others go on."""
    model = sharp_model(chars.vocab_size, "learned", seed=4)
    kwargs = dict(max_new_tokens=BLOCK, temperature=0, stop=["e"])
    batch = list(generate(model, chars, PROMPTS[:3], **kwargs))
    for p, steps in enumerate(one_by_one(model, chars, PROMPTS[:3], **kwargs)):
        got = of_prompt(batch, p)
        assert [(s.token, s.delta, s.finished) for s in got] == \
            [(s.token, s.delta, s.finished) for s in steps]


def test_which_arguments_are_several_prompts(chars):
    assert prompt_list("ab") is None and prompt_list([1, 2]) is None
    assert prompt_list([]) is None
    assert prompt_list(["a", "b"]) == ["a", "b"] and prompt_list([[1], [2, 3]]) == [[1], [2, 3]]
    assert len(prompt_list(torch.tensor([[1, 2], [3, 4]]))) == 2
    model = sharp_model(chars.vocab_size, "learned")
    one = list(generate(model, chars, "First", max_new_tokens=5, temperature=0))
    listed = list(generate(model, chars, ["First"], max_new_tokens=5, temperature=0))
    assert [(s.token, s.prompt) for s in one] == [(s.token, s.prompt) for s in listed]


# -- the server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from serve_server import load, train_tiny

    from model.serve import create_app

    pretrained = load(train_tiny(tmp_path_factory.mktemp("batch_serve")))
    with TestClient(create_app(pretrained, "tiny")) as client:
        yield client


def answers(client, body: dict) -> list[dict]:
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_a_list_of_prompts_answers_as_one_request_per_prompt(served, sampling):
    prompts = ["to be", "the mind whether", "or", "nobler in the mind to suffer"]
    body = {"max_tokens": 40, "n": 2, "logprobs": 2, **sampling}
    batch = answers(served, {"prompt": prompts, **body})
    assert [c["index"] for c in batch] == list(range(8))
    for p, prompt in enumerate(prompts):
        for alone in answers(served, {"prompt": prompt, **body}):
            mine = batch[p * 2 + alone["index"]]
            assert (mine["text"], mine["finish_reason"]) == (alone["text"], alone["finish_reason"])
            assert mine["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
            assert mine["logprobs"]["token_logprobs"] == pytest.approx(
                alone["logprobs"]["token_logprobs"], abs=1e-4)


def test_a_streamed_list_of_prompts_names_each_chunks_choice(served):
    import json

    prompts = ["to be", "the mind whether", "or"]
    body = {"prompt": prompts, "max_tokens": 30, "temperature": 0, "n": 2, "echo": True}
    whole = answers(served, body)
    with served.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    texts, ends = [""] * 6, [None] * 6
    for chunk in map(json.loads, data[:-1]):
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            ends[c["index"]] = c["finish_reason"] or ends[c["index"]]
    assert texts == [c["text"] for c in whole] and ends == [c["finish_reason"] for c in whole]
