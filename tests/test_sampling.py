"""model.inference.sampling on tiny seeded models: the sampling rules, the KV cache against full
recomputation across the block_size boundary, stop strings, streaming text, and bad arguments."""

import math
import warnings

import pytest
import torch
from torch import nn

from model import GPT, ConfigError, GPTConfig, SamplingError, TokenizerError
from model.data.tokenizer import train_tokenizer
from model.inference.sampling import (
    SamplingParams,
    Step,
    TextStream,
    encode_prompt,
    filter_logits,
    generate,
    repetition_penalty,
    sample_next,
    scaled,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n"
BLOCK = 16


@pytest.fixture(scope="module")
def chars():
    return train_tokenizer("char", [TEXT])


def sharp_model(vocab: int, pos_emb: str = "learned", seed: int = 0, **overrides) -> GPT:
    """A tiny float64 GPT with large random weights: its predictions depend strongly on the
    context (so greedy outputs vary) and float64 keeps near-ties from flipping between paths."""
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32,
                  pos_emb=pos_emb)
    model = GPT(GPTConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.double().eval()


def tokens_of(steps, sample: int = 0) -> list[int]:
    return [s.token for s in steps if s.sample == sample]


def text_of(steps, sample: int = 0) -> str:
    return "".join(s.delta for s in steps if s.sample == sample)


class Scripted(nn.Module):
    """A stand-in model whose i-th forward pass makes script[i] by far the most likely token;
    it records what it was shown."""

    def __init__(self, script: list[int], vocab: int, block_size: int = BLOCK) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=1, n_head=1,
                                n_embd=2)
        self.weight = nn.Parameter(torch.zeros(1))
        self.script, self.seen = script, []

    def forward(self, idx, targets=None, cache=None):
        self.seen.append(idx.tolist())
        logits = torch.zeros(idx.size(0), idx.size(1), self.config.vocab_size)
        logits[:, -1, self.script[min(len(self.seen), len(self.script)) - 1]] = 20.0
        return logits, None


# -- the sampling rules -----------------------------------------------------------------------

def test_temperature_zero_is_argmax_with_plain_softmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    tokens, probs = sample_next(logits, temperature=0.0, top_k=3, top_p=0.1)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(probs, logits.softmax(-1))


def test_temperature_divides_logits():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    _, probs = sample_next(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs, (logits / 0.5).softmax(-1))


def test_top_k_never_samples_outside_the_k_best():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 40, generator=gen)
    logits[:, :6] = 3.0  # ties at the top: still exactly k tokens may stay
    kept = filter_logits(logits, top_k=4).isfinite()
    assert kept.sum(-1).tolist() == [4] * 64
    # the kept tokens are the best: none dropped is more likely than any kept
    worst_kept = logits.masked_fill(~kept, 9e9).amin(-1)
    assert (worst_kept >= logits.masked_fill(kept, -9e9).amax(-1)).all()
    for _ in range(20):
        tokens, probs = sample_next(logits, 2.0, top_k=4, generator=gen)
        assert kept.gather(1, tokens[:, None]).all()
        assert torch.equal(probs > 0, kept)


def nucleus(probs: list[float], p: float) -> set[int]:
    """The smallest set of most likely tokens with total probability >= p, by hand."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    chosen, total = set(), 0.0
    for i in order:
        chosen.add(i)
        total += probs[i]
        if total >= p:
            break
    return chosen


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_top_p_never_samples_outside_the_nucleus(top_p):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 20, generator=gen) * 2
    sets = [nucleus(row.softmax(-1).tolist(), top_p) for row in logits]
    kept = filter_logits(logits, top_p=top_p).isfinite()
    assert [set(row.nonzero().flatten().tolist()) for row in kept] == sets
    for _ in range(30):
        tokens, _ = sample_next(logits, 1.0, top_p=top_p, generator=gen)
        assert all(t in s for t, s in zip(tokens.tolist(), sets))


def test_top_p_keeps_at_least_the_most_likely_token():
    logits = torch.tensor([[0.0, 0.0, 5.0, 1.0]])
    assert filter_logits(logits, top_p=1e-9).isfinite().tolist() == [[False, False, True, False]]


def test_top_p_applies_to_the_top_k_distribution():
    logits = torch.tensor([[4.0, 3.9, 3.8, 0.0, -1.0]])  # probabilities ~ .35 .32 .29 .02 .01
    # alone, p = 0.5 needs two tokens; after top-k=2 the first has 0.525 of the mass
    assert filter_logits(logits, top_p=0.5).isfinite().sum().item() == 2
    assert filter_logits(logits, top_k=2, top_p=0.5).isfinite().tolist() == [
        [True, False, False, False, False]]


# -- generate: KV cache equivalence ------------------------------------------------------------

@pytest.mark.parametrize("pos_emb,extra", [("learned", {}), ("rope", {"n_kv_head": 2})],
                         ids=["learned", "rope-gqa"])
def test_cached_greedy_equals_full_recomputation_past_block_size(chars, pos_emb, extra):
    model = sharp_model(chars.vocab_size, pos_emb, **extra)
    kwargs = dict(prompt="First", max_new_tokens=4 * BLOCK, temperature=0.0, ignore_eot=True)
    cached = list(generate(model, chars, use_cache=True, **kwargs))
    full = list(generate(model, chars, use_cache=False, **kwargs))
    assert len(cached) == 4 * BLOCK
    assert tokens_of(cached) == tokens_of(full)
    assert len(set(tokens_of(cached))) > 3  # a varied output, so the comparison means something
    assert [s.prob for s in cached] == pytest.approx([s.prob for s in full], abs=1e-9)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_sliding_window_matches_a_plain_cropping_loop(chars, pos_emb):
    """window_shift=1 is nanoGPT's loop: every step sees exactly the last block_size tokens."""
    model = sharp_model(chars.vocab_size, pos_emb, seed=3)
    idx = torch.tensor([chars.encode("Before we")])
    expected = []
    with torch.no_grad():
        for _ in range(3 * BLOCK):
            logits, _ = model(idx[:, -BLOCK:])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            expected.append(nxt.item())
            idx = torch.cat((idx, nxt), dim=1)
    for use_cache in (True, False):
        steps = generate(model, chars, "Before we", max_new_tokens=3 * BLOCK, temperature=0.0,
                         window_shift=1, use_cache=use_cache, ignore_eot=True)
        assert tokens_of(steps) == expected


def test_window_policy_refills_then_steps_one_token(chars):
    model = Scripted([1] * 40, chars.vocab_size)
    list(generate(model, chars, "Fir", max_new_tokens=30, temperature=0, use_cache=False))
    lengths = [len(seen[0]) for seen in model.seen]
    keep = BLOCK + 1 - BLOCK // 4
    # grows to block_size, drops back to block_size - shift, grows again...
    assert lengths[:BLOCK - 2] == list(range(3, BLOCK + 1))
    assert lengths[BLOCK - 2] == keep
    assert max(lengths) == BLOCK and min(lengths[BLOCK - 2:]) == keep


def test_seeded_sampling_is_reproducible_and_cache_independent(chars):
    model = sharp_model(chars.vocab_size)
    kwargs = dict(prompt="All:", max_new_tokens=40, temperature=1.0, top_k=10, ignore_eot=True)
    a = tokens_of(generate(model, chars, seed=7, **kwargs))
    torch.manual_seed(123)  # the global generator plays no part
    rng = torch.get_rng_state()
    b = tokens_of(generate(model, chars, seed=7, **kwargs))
    assert torch.equal(rng, torch.get_rng_state())
    c = tokens_of(generate(model, chars, seed=8, **kwargs))
    d = tokens_of(generate(model, chars, seed=7, use_cache=False, **kwargs))
    assert a == b == d
    assert a != c


def test_generated_tokens_stay_in_top_k_of_the_models_distribution(chars):
    model = sharp_model(chars.vocab_size, seed=1)
    prompt = chars.encode("Speak")
    steps = list(generate(model, chars, prompt, max_new_tokens=BLOCK - len(prompt),
                          temperature=1.5, top_k=3, seed=0, show_top=5, ignore_eot=True))
    idx = list(prompt)
    with torch.no_grad():
        for step in steps:
            logits = model(torch.tensor([idx]))[0][0, -1]
            assert step.token in logits.topk(3).indices.tolist()
            assert len(step.top) <= 3 and step.token in [t for t, _, _ in step.top]
            expected = (logits.float() / 1.5).softmax(-1)
            assert step.prob == pytest.approx(expected[step.token].item()
                                              / expected.topk(3).values.sum().item(), rel=1e-4)
            idx.append(step.token)


def test_batched_samples_are_independent_and_labelled(chars):
    model = sharp_model(chars.vocab_size)
    steps = list(generate(model, chars, "F", max_new_tokens=10, num_samples=3, seed=0,
                          temperature=2.0, ignore_eot=True))
    assert [s.sample for s in steps[:3]] == [0, 1, 2]
    assert [s.index for s in steps if s.sample == 2] == list(range(10))
    assert len({tuple(tokens_of(steps, i)) for i in range(3)}) == 3
    greedy = list(generate(model, chars, "F", max_new_tokens=10, num_samples=2, temperature=0))
    assert tokens_of(greedy, 0) == tokens_of(greedy, 1)


def test_show_top_lists_the_most_likely_tokens(chars):
    model = sharp_model(chars.vocab_size)
    step = next(iter(generate(model, chars, "F", max_new_tokens=1, temperature=0, show_top=4)))
    probs = [p for _, _, p in step.top]
    assert len(step.top) == 4 and probs == sorted(probs, reverse=True)
    assert step.top[0][0] == step.token and step.prob == pytest.approx(probs[0])
    assert step.top[0][1] == chars.token_text(step.token) == step.text
    assert sum(probs) <= 1 + 1e-6


# -- endings and text ---------------------------------------------------------------------------

def test_stop_string_ends_the_sample_and_is_not_shown(chars):
    script = chars.encode("Speak, speak.\nmore")
    model = Scripted(script, chars.vocab_size)
    steps = list(generate(model, chars, "All:", max_new_tokens=30, temperature=0,
                          stop=["ak.\n", "zz"], use_cache=False))
    assert text_of(steps) == "Speak, spe"
    assert steps[-1].finished == "stop" and len(steps) == len("Speak, speak.\n")
    # the held-back "a" of "ak." came out only once it could not start a stop string
    assert [s.delta for s in steps[3:6]] == ["", "", "ak,"]


def test_stop_strings_ignore_the_prompt(chars):
    model = Scripted(chars.encode("hear"), chars.vocab_size)
    steps = list(generate(model, chars, "All:", max_new_tokens=4, temperature=0, stop=["All"],
                          use_cache=False))
    assert text_of(steps) == "hear" and steps[-1].finished == "length"


def test_end_of_text_stops_generation(chars):
    model = Scripted(chars.encode("hi") + [chars.eot_id, 5, 5], chars.vocab_size)
    steps = list(generate(model, chars, "F", max_new_tokens=10, temperature=0, use_cache=False))
    assert [s.finished for s in steps] == [None, None, "eot"]
    assert text_of(steps) == "hi"


def test_utf8_split_across_tokens_is_held_back():
    bpe = train_tokenizer("bpe", ["plain ascii text"], vocab_size=257)  # bytes only: é is 2 tokens
    script = list("né".encode()) + [ord("!")]
    model = Scripted(script, bpe.vocab_size)
    steps = list(generate(model, bpe, "x", max_new_tokens=4, temperature=0, use_cache=False))
    assert [s.delta for s in steps] == ["n", "", "é", "!"]


def test_text_stream_flushes_a_held_back_tail(chars):
    stream = TextStream(chars, stop=["eak!"])
    assert stream.push(chars.encode("e")[0]) == ("", False)
    assert stream.push(chars.encode("a")[0]) == ("", False)
    assert stream.flush() == "ea"


def test_empty_prompt_starts_from_end_of_text(chars):
    model = Scripted([1], chars.vocab_size)
    list(generate(model, chars, "", max_new_tokens=1, use_cache=False))
    assert model.seen[0] == [[chars.eot_id]]


def test_long_prompt_keeps_its_last_block_size_tokens_with_a_warning(chars):
    model = Scripted([1], chars.vocab_size)
    messages = []
    list(generate(model, chars, TEXT, max_new_tokens=1, use_cache=False, warn=messages.append))
    assert model.seen[0] == [chars.encode(TEXT)[-BLOCK:]]
    assert len(messages) == 1 and f"last {BLOCK} tokens" in messages[0]
    with pytest.warns(UserWarning, match="longer|more than the context"):
        generate(model, chars, TEXT, max_new_tokens=1, use_cache=False)


def test_encode_prompt_crops_or_refuses_a_long_prompt(chars):
    ids = chars.encode(TEXT)
    assert encode_prompt(chars, TEXT, BLOCK, warn=lambda m: None) == ids[-BLOCK:]
    with pytest.raises(ConfigError, match=f"{len(ids)} tokens, more than the context size"):
        encode_prompt(chars, TEXT, BLOCK, on_overflow="error")
    assert encode_prompt(chars, TEXT[:BLOCK], BLOCK, on_overflow="error") == ids[:BLOCK]
    assert encode_prompt(chars, "", BLOCK, on_overflow="error") == [chars.eot_id]
    assert encode_prompt(chars, [3, 4], BLOCK) == [3, 4]  # token ids pass through


def test_generation_leaves_model_mode_and_grad_mode_alone(chars):
    model = sharp_model(chars.vocab_size).train()
    for _ in generate(model, chars, "F", max_new_tokens=3):
        assert not model.training
        assert not torch.is_inference_mode_enabled()  # only while the generator itself runs
    assert model.training


def test_max_new_tokens_zero_yields_nothing(chars):
    assert list(generate(sharp_model(chars.vocab_size), chars, "F", max_new_tokens=0)) == []


# -- bad arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,words", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top-p"),
    (dict(top_p=1.5), "top-p"),
    (dict(top_k=0), "top-k"),
    (dict(max_new_tokens=-1), "max-new-tokens"),
    (dict(num_samples=0), "num-samples"),
    (dict(stop=[""]), "stop"),
    (dict(window_shift=0), "window shift"),
    (dict(window_shift=BLOCK + 1), "window shift"),
])
def test_bad_arguments_fail_at_the_call_with_one_line(chars, kwargs, words):
    model = sharp_model(chars.vocab_size)
    with pytest.raises(SamplingError, match=words) as info:
        generate(model, chars, "F", **kwargs)  # no iteration needed
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,words", [
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top-p"),
    (dict(top_k=0), "top-k"),
    (dict(max_new_tokens=-1), "max-new-tokens"),
    (dict(num_samples=0), "num-samples"),
    (dict(show_top=-1), "alternatives to show"),
    (dict(stop=("a", "")), "stop"),
])
def test_sampling_params_are_checked_on_construction(kwargs, words):
    with pytest.raises(SamplingError, match=words) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_sampling_params_are_frozen_named_and_hold_their_stop_strings_as_a_tuple():
    params = SamplingParams(stop=["\n\n", "END"], temperature=0.5)
    assert params.stop == ("\n\n", "END") and hash(params) == hash(SamplingParams(
        stop=("\n\n", "END"), temperature=0.5))
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # frozen
    with pytest.raises(TypeError):
        SamplingParams(20)  # every field by name


def test_generate_takes_params_or_their_fields_by_keyword(chars):
    """params=SamplingParams(...) and the same fields as keywords give the same steps;
    keywords given with params replace those fields; anything else is a TypeError."""
    model = sharp_model(chars.vocab_size)
    fields = dict(max_new_tokens=12, temperature=1.3, top_k=9, top_p=0.9, num_samples=2,
                  stop=["ee"], show_top=3)
    by_name = list(generate(model, chars, "Fir", seed=5, **fields))
    by_params = list(generate(model, chars, "Fir", params=SamplingParams(seed=5, **fields)))
    overridden = list(generate(model, chars, "Fir", params=SamplingParams(seed=4, **fields),
                               seed=5))
    assert by_name == by_params == overridden
    assert tokens_of(generate(model, chars, "Fir", seed=4, **fields)) != tokens_of(by_name)
    with pytest.raises(TypeError, match="'temprature'"):
        generate(model, chars, "Fir", temprature=0.5)
    with pytest.raises(TypeError):
        generate(model, chars, "Fir", 12)  # max_new_tokens and the rest by keyword only


def test_step_to_dict_is_the_json_of_sample_py_and_of_the_page():
    step = Step(1, 4, 7, "a", 0.5, [(7, "a", 0.5), (3, "b", 0.25)], "a", "length",
                torch.zeros(3))
    assert list(step.to_dict().items()) == [
        ("sample", 1), ("index", 4), ("token", 7), ("text", "a"), ("prob", 0.5),
        ("top", [{"token": 7, "text": "a", "prob": 0.5}, {"token": 3, "text": "b", "prob": 0.25}]),
        ("delta", "a"), ("finished", "length")]
    assert step.to_dict(top_id="id", with_sample=False) == {
        "index": 4, "token": 7, "text": "a", "prob": 0.5, "delta": "a", "finished": "length",
        "top": [{"id": 7, "text": "a", "prob": 0.5}, {"id": 3, "text": "b", "prob": 0.25}]}


def test_unknown_characters_in_the_prompt_are_named(chars):
    with pytest.raises(TokenizerError, match="'Z'"):
        generate(sharp_model(chars.vocab_size), chars, "Zebra")


def test_top_p_one_and_large_top_k_change_nothing():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(filter_logits(logits, top_k=50, top_p=1.0), logits)


# -- research: logits processors and raw logits ----------------------------------------------

def constant_model(vocab: int, preference: torch.Tensor) -> GPT:
    """A real GPT whose logits are `preference` whatever the context: the final norm's weight is
    zero and its bias picks the first column of W_U, which holds the preference."""
    model = GPT(GPTConfig(vocab_size=vocab, block_size=BLOCK, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = preference
    return model.eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_repetition_penalty_avoids_tokens_the_window_has_moved_past(chars, use_cache):
    """Every token is preferred in a fixed order, so greedy decoding repeats the favourite;
    with a strong penalty it takes the favourites one by one, never one seen before, also once
    the context window has moved on past the prompt and the first generated tokens."""
    vocab = chars.vocab_size
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    preference = torch.empty(vocab)
    preference[order] = torch.linspace(30.0, 1.0, vocab)  # all positive: /penalty lowers them
    model = constant_model(vocab, preference)
    prompt = chars.encode("Fir")
    n = vocab - len(prompt)  # every token not in the prompt, once
    assert len(prompt) + n > BLOCK + BLOCK // 4  # the window moves on at least once
    kwargs = dict(max_new_tokens=n, temperature=0, ignore_eot=True, use_cache=use_cache)
    plain = tokens_of(generate(model, chars, prompt, **kwargs))
    assert plain == [order[0].item()] * n
    penalised = tokens_of(generate(model, chars, prompt, logits_processor=repetition_penalty(100.0),
                                   **kwargs))
    assert penalised == [t for t in order.tolist() if t not in prompt]


def penalise_by_hand(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    logits = logits.clone()
    for t in set(history):
        logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
    return logits


@pytest.mark.parametrize("use_cache", [True, False])
def test_repetition_penalty_matches_a_hand_written_loop_past_block_size(chars, use_cache):
    model = sharp_model(chars.vocab_size, seed=3)
    history = chars.encode("Before we")
    expected = []
    with torch.no_grad():
        for _ in range(3 * BLOCK):
            logits = model(torch.tensor([history[-BLOCK:]]))[0][0, -1]
            nxt = penalise_by_hand(logits, history, 1.8).argmax().item()
            expected.append(nxt)
            history.append(nxt)
    kwargs = dict(max_new_tokens=3 * BLOCK, temperature=0.0, window_shift=1,
                  use_cache=use_cache, ignore_eot=True)
    steps = list(generate(model, chars, "Before we", logits_processor=repetition_penalty(1.8),
                          **kwargs))
    assert tokens_of(steps) == expected
    assert tokens_of(generate(model, chars, "Before we", **kwargs)) != expected  # it mattered


def test_processors_see_the_whole_history_and_apply_in_order(chars):
    model = sharp_model(chars.vocab_size, seed=2)
    prompt = chars.encode(TEXT[:BLOCK + 5])  # longer than the context: cropped for the model
    seen, calls = [], []

    def record(ids, logits):
        seen.append(ids.clone())
        calls.append("record")
        return logits

    def ban_space(ids, logits):
        calls.append("ban")
        return logits.index_fill(-1, torch.tensor(chars.encode(" ")), float("-inf"))

    with pytest.warns(UserWarning, match="more than the context"):
        steps = list(generate(model, chars, prompt, max_new_tokens=2 * BLOCK, temperature=1.0,
                              seed=0, num_samples=2, ignore_eot=True,
                              logits_processor=[record, ban_space]))
    assert calls[:4] == ["record", "ban", "record", "ban"]
    assert len(seen) == 2 * BLOCK
    for i, ids in enumerate(seen):
        assert ids.shape == (2, len(prompt) + i) and ids.dtype == torch.long
        for b in range(2):
            assert ids[b].tolist() == prompt + tokens_of(steps, b)[:i]
    assert chars.encode(" ")[0] not in tokens_of(steps, 0) + tokens_of(steps, 1)


def test_raw_logits_equal_a_full_forward_over_the_window(chars):
    model = sharp_model(chars.vocab_size, seed=4)
    prompt = chars.encode("All")
    steps = list(generate(model, chars, prompt, max_new_tokens=2 * BLOCK, temperature=1.0,
                          seed=1, num_samples=2, window_shift=1, ignore_eot=True,
                          with_logits=True, logits_processor=repetition_penalty(3.0)))
    histories = [list(prompt), list(prompt)]
    with torch.no_grad():
        for step in steps:
            history = histories[step.sample]
            expected = model(torch.tensor([history[-BLOCK:]]))[0][0, -1]
            assert step.logits.shape == (chars.vocab_size,)
            torch.testing.assert_close(step.logits, expected)  # raw: before the penalty
            history.append(step.token)
    assert histories[0] != histories[1]
    plain = next(iter(generate(model, chars, prompt, max_new_tokens=1)))
    assert plain.logits is None


def test_bad_logits_processors_are_named(chars):
    model = sharp_model(chars.vocab_size)
    with pytest.raises(SamplingError, match="callable"):
        generate(model, chars, "F", logits_processor=[repetition_penalty(1.2), 3])
    with pytest.raises(SamplingError, match="shape"):
        list(generate(model, chars, "F", max_new_tokens=2,
                      logits_processor=lambda ids, logits: logits[:, :5]))
    for penalty in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(SamplingError, match="repetition penalty"):
            repetition_penalty(penalty)


def test_ids_past_the_tokenizer_are_never_drawn_shown_or_scored(chars):
    """A head wider than its tokenizer (gpt2_124m.yaml pads 50257 to 50304) has ids with no
    text: here they get by far the largest logits, and still nothing picks or lists them."""
    from model.inference.analysis import logit_lens, next_token
    from model.inference.sampling import distribution
    from model.inference.scoring import score_text

    vocab = chars.vocab_size
    model = sharp_model(vocab + 7).float()
    with torch.no_grad():
        model.lm_head.weight[vocab:] = 50 * model.lm_head.weight[:7]  # tied: W_E's rows too
    steps = list(generate(model, chars, "First", max_new_tokens=40, temperature=1.5, seed=0,
                          show_top=vocab + 7, with_logits=True))
    assert all(s.token < vocab and all(t < vocab for t, _, _ in s.top) for s in steps)
    assert steps[0].logits.shape == (vocab + 7,)  # the raw logits stay the model's own
    scores = score_text(model, chars, "First Citizen", top=vocab + 7)
    assert scores.top_ids.max() < vocab and scores.top_ids.shape[-1] == vocab
    assert torch.allclose(scores.top_logprobs.exp().sum(-1), torch.ones(()), atol=1e-5)
    assert max(t.id for t in next_token(model, chars, "First", k=vocab + 7).top) < vocab
    assert max(s.id for row in logit_lens(model, chars, "Fi", k=vocab + 7).top for pos in row
               for s in pos) < vocab
    shown = distribution(model, chars, chars.encode("First"), temperatures=[1.0], k=vocab + 7)
    assert max(t.id for t in shown.tokens) < vocab


def test_top_p_keeps_the_smallest_set_reaching_p_even_when_a_prefix_sums_to_p_exactly():
    """Probabilities 0.5, 0.25, 0.25 with top_p 0.5: the first token alone reaches 0.5, so it is
    the whole nucleus (a rule that needs mass strictly above p would keep a second token)."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    kept = filter_logits(logits, top_p=0.5)
    assert torch.isfinite(kept).tolist() == [[True, False, False]]
    kept = filter_logits(logits, top_p=0.75)
    assert torch.isfinite(kept).tolist() == [[True, True, False]]


def test_repetition_penalty_lowers_every_seen_tokens_probability_also_for_negative_logits():
    """CTRL's rule: a positive logit is divided by the penalty, a negative one multiplied, so
    a seen token always loses probability (dividing a negative logit would raise it)."""
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[0, 1]])
    out = repetition_penalty(2.0)(seen, logits.clone())
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    before, after = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert after[0] < before[0] and after[1] < before[1]


def test_a_temperature_so_small_that_dividing_overflows_samples_the_argmax():
    """1e-45 is a float a client may send: logits / T overflows to infinities, whose softmax
    would be NaN; the draw must still be the most likely token, with probability 1."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5]])
    for temperature in (1.401298464324817e-45, 1e-40, 5e-324):  # the last is 0 in float32
        tokens, probs = sample_next(logits, temperature, top_p=0.9,
                                    generator=torch.Generator().manual_seed(0))
        assert tokens.tolist() == [1]
        assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_padding_ids_do_not_change_how_the_logits_are_scaled():
    """-inf logits (ids past the tokenizer) take the plain division, as the other logits do."""
    logits = torch.tensor([[1.0, 3.0, -2.0, float("-inf")]])
    assert torch.equal(scaled(logits, 0.7), logits / 0.7)
