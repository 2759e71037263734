"""Text generation: temperature, top-k and top-p sampling over a KV cache, one token at a time.

    prompt -> tokens -> prefill the cache -> per step: last logits -> logits processors ->
    temperature -> top-k -> top-p -> softmax -> seeded draw -> Step(token, its probability,
    the top alternatives, optionally the raw logits)

`generate` yields a `Step` for every new token of every sample, so a caller can stream the text,
print the distribution behind each choice, or collect the tokens for research. How it samples is
one frozen `SamplingParams`, or the same fields as keyword arguments. Research code can
change the logits before the draw with a logits processor, `fn(ids, logits) -> logits`: it sees
every token so far (the prompt and all generated tokens, also those the context window has moved
past) and the logits (B, V) of the step; `repetition_penalty` is one.

The context window. The model sees at most `block_size` tokens. Re-running the whole window for
every new token (a sliding window) would throw the cache away at each step, so once the window is
full the next token moves it on by `shift` tokens at once: the oldest `shift` are dropped and the
cache is refilled with the remaining `block_size + 1 - shift` in one forward pass; the following
tokens again cost one cached position each until the window is full again. The model therefore
always sees between `block_size + 1 - shift` and `block_size` of the latest tokens. The reference
path (`use_cache=False`) recomputes exactly the same window from scratch at every step, so both
give the same greedy tokens. `window_shift=1` is the classic sliding window (a refill per token).

Several prompts of different lengths are one batch (model/inference/decoding.py: left padding,
an attention mask, one forward pass per step); each prompt's window follows this policy on its
own, so its samples are those it would get alone. Hooks passed as `fwd_hooks` (steering) are
registered around the generation's forward passes only, so that a generator consumed lazily is
steered exactly as one consumed at once.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from model.data.tokenizer import Tokenizer
from model.errors import ConfigError, SamplingError
from model.inference.decoding import Windows
from model.inference.text_stream import TextStream
from model.network.hooks import HookFn, NameFilter


@dataclass
class Step:
    """One generated token of one sample.

    `prob` and `top` come from the distribution the token was drawn from (after temperature,
    top-k and top-p); for greedy decoding (temperature 0) from the plain softmax of the logits.
    `delta` is the text this token adds to the output: it can be empty while the bytes of a
    UTF-8 character are incomplete or while the text may be the start of a stop string.
    """

    sample: int  # which of the num_samples sequences
    index: int  # 0 for the first generated token of that sample
    token: int
    text: str  # the token on its own, as tokenizer.token_text shows it
    prob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token, text, prob)
    delta: str = ""
    finished: str | None = None  # None while going on, else "stop", "eot" or "length"
    # The model's logits (V,) that this token was chosen from, before any logits processor,
    # temperature or filtering; only with generate(..., with_logits=True), else None.
    logits: torch.Tensor | None = None
    prompt: int = 0  # which of generate's prompts (0 when it was given one)

    def to_dict(self, *, top_id: str = "token", with_sample: bool = True) -> dict[str, Any]:
        """The step as JSON-ready data (the logits left out): sample, index, token, text, prob,
        top as [{top_id: id, "text", "prob"}], delta, finished. sample.py --json writes the
        default; the playground page's token events call it with top_id="id",
        with_sample=False (one sample, its alternatives named by id)."""
        record: dict[str, Any] = {"sample": self.sample} if with_sample else {}
        record.update(index=self.index, token=self.token, text=self.text, prob=self.prob,
                      top=[{top_id: t, "text": s, "prob": p} for t, s, p in self.top],
                      delta=self.delta, finished=self.finished)
        return record


# A prompt: a text, or token ids. generate also takes a list of them.
Prompt = str | Sequence[int]

# A logits processor: fn(ids (B, t), logits (B, V)) -> logits (B, V). ids holds the prompt and
# every token generated so far for each sample; the result replaces the logits of the step.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """A logits processor that makes every token already in the sequence (prompt included)
    less likely: its logit is divided by `penalty` when positive, multiplied when negative,
    as in CTRL (Keskar et al., 2019, section 4.1). penalty 1 changes nothing."""
    if not penalty > 0 or penalty == float("inf"):
        raise SamplingError(f"the repetition penalty must be a number > 0, got {penalty}")

    def apply(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen = logits.gather(-1, ids)  # (B, t): a token seen twice is gathered twice, same value
        seen = torch.where(seen > 0, seen / penalty, seen * penalty)
        return logits.scatter(-1, ids, seen)

    return apply


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How `generate` samples, checked on construction: a value out of range raises
    SamplingError in one line that names it. window_shift is checked by `generate`, against the
    model's block_size."""

    max_new_tokens: int = 256  # per sample
    temperature: float = 1.0  # 0 is greedy: the argmax
    top_k: int | None = None  # draw from the k likeliest tokens only
    top_p: float | None = None  # draw from the nucleus of mass top_p only, 0 < top_p <= 1
    num_samples: int = 1  # continuations generated side by side, in one batch
    seed: int | None = None  # the same seed gives the same text; None draws a fresh one
    stop: tuple[str, ...] = ()  # a sample ends when its text contains one of these
    show_top: int = 5  # alternatives reported per step (those with non-zero probability)
    window_shift: int | None = None  # how far a full context window moves; block_size // 4
    ignore_eot: bool = False  # keep going past end-of-text (for benchmarks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # any sequence; kept immutable
        if not self.temperature >= 0 or self.temperature == float("inf"):  # `not >=`: NaN too
            raise SamplingError(
                f"temperature must be a number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SamplingError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise SamplingError(f"max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise SamplingError(f"num-samples must be >= 1, got {self.num_samples}")
        if self.show_top < 0:
            raise SamplingError(
                f"the number of alternatives to show must be >= 0, got {self.show_top}")
        if any(s == "" for s in self.stop):
            raise SamplingError("a stop string must not be empty")

    def shift(self, block_size: int) -> int:
        """How many tokens the full context window moves on by (see the module docstring):
        window_shift, by default a quarter of the context."""
        shift = self.window_shift if self.window_shift is not None else max(1, block_size // 4)
        if not 1 <= shift <= block_size:
            raise SamplingError(
                f"window shift must be in [1, block_size={block_size}], got {shift}")
        return shift


def without_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`logits` (..., V) with every id from `vocab_size` on at -inf. A head can be wider than
    its tokenizer (gpt2_124m.yaml pads 50257 to 50304 for faster matmuls): those ids have no
    text, so they must never be drawn, shown or counted in a distribution."""
    if logits.size(-1) <= vocab_size:
        return logits
    return logits.index_fill(-1, torch.arange(vocab_size, logits.size(-1),
                                              device=logits.device), float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Set every logit outside the top-k, then outside the nucleus, to -inf. logits: (B, V).

    The nucleus is the smallest set of most likely tokens whose probabilities add up to at least
    top_p; it always holds the most likely token.
    """
    if top_k is not None and top_k < logits.size(-1):
        # Scatter the k best back into -inf rather than compare with the k-th value: with ties
        # a comparison would keep more than k tokens.
        values, indices = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = mass_before >= top_p  # the set was already complete before this token
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (> 0). A temperature so small that the division overflows, or that
    is 0 in the logits' dtype (1e-45 and 5e-324 are valid floats), is as good as greedy: then
    the largest logits become 0 and the others -inf, which gives that softmax without the
    infinities that would make it NaN. Logits already -inf (padding ids) stay so."""
    out = logits / temperature
    if torch.isfinite(out).all() or (torch.isfinite(out) | torch.isneginf(logits)).all():
        return out
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return torch.where(shifted == 0, 0.0, shifted / temperature)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row of logits (B, V); return tokens (B,) and the
    probabilities (B, V) they were drawn from. Temperature 0 is greedy: the argmax, reported
    with the plain softmax (top-k and top-p cannot change the argmax, so they are skipped)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1), logits.softmax(dim=-1)
    probs = filter_logits(scaled(logits, temperature), top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], block_size: int,
                  on_overflow: Literal["crop", "error"] = "crop",
                  warn: Callable[[str], None] | None = None) -> list[int]:
    """Prompt tokens; an empty prompt is the end-of-text token, where documents start.

    A prompt longer than the context (block_size tokens) is cropped to its last block_size
    tokens with a warning (on_overflow="crop": generation only needs the latest context), or
    refused with a ConfigError (on_overflow="error": analysis reports on every prompt token).
    """
    return crop_prompt(prompt_tokens(tokenizer, prompt), block_size, on_overflow, warn)


def prompt_tokens(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """The prompt's tokens, all of them; an empty prompt is the end-of-text token."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return ids or [tokenizer.eot_id]


def crop_prompt(ids: list[int], block_size: int, on_overflow: Literal["crop", "error"] = "crop",
                warn: Callable[[str], None] | None = None) -> list[int]:
    """ids if they fit the context, else their last block_size (see encode_prompt)."""
    if len(ids) <= block_size:
        return ids
    message = (f"the prompt has {len(ids)} tokens, more than the context size "
               f"block_size={block_size}; ")
    if on_overflow == "error":
        raise ConfigError(message + "shorten it")
    message += f"using its last {block_size} tokens"
    if warn is None:
        warnings.warn(message, stacklevel=3)  # points at the caller of generate
    else:
        warn(message)
    return ids[-block_size:]


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: Prompt | Sequence[Prompt] = "", *,
             params: SamplingParams | None = None, use_cache: bool = True,
             warn: Callable[[str], None] | None = None,
             logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
             with_logits: bool = False,
             fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (), **sampling: Any
             ) -> Iterator[Step]:
    """Generate `num_samples` continuations of `prompt` side by side (one batch), yielding a
    Step per new token per sample, in sample order within each position.

    `prompt` is a text or token ids, or a list of them: several prompts, of any lengths, are
    decoded in one batch (one forward pass per step; model/inference/decoding.py), each with its
    num_samples samples; a Step's `prompt` names its prompt and `sample` its sample of that
    prompt, and within a position the steps come prompt by prompt. Each prompt's samples are
    what generating it alone gives: a seed seeds every prompt's own draws, and greedy tokens
    agree (the logits within float rounding).

    How to sample is `params`, or SamplingParams' fields as keyword arguments
    (`generate(model, tokenizer, "ROMEO:", max_new_tokens=20, temperature=0)`); keyword
    arguments given with `params` replace its fields. A sample ends at the end-of-text token
    (its Step has finished="eot"), when its text contains a stop string ("stop"), or after
    max_new_tokens ("length"). `use_cache=False` recomputes the whole window at every step (the
    reference path). A prompt longer than the context keeps its last block_size tokens, with a
    warning through `warn` (default: warnings.warn). The model is in eval mode until the
    generator ends.

    `logits_processor` (one, or several applied in order) rewrites each step's logits before the
    temperature and the draw: it is called as fn(ids, logits) with ids (B, t), the prompt (all of
    it, even if longer than the context) and every token generated so far, and the float32
    logits (B, V), its own copy; finished samples ride along in the batch. With several prompts
    it is called once per prompt, with that prompt's samples. `prob` and `top` then describe the
    processed distribution. `with_logits` puts the model's raw logits of each step on its Step
    (before processors, temperature and filtering; in the model's dtype).

    `fwd_hooks`, [(name, fn)] as in model.run_with_hooks, steer the generation: they are
    registered around each of its forward passes (however lazily the generator is consumed, and
    never while it waits), so they neither leak into other work nor get lost. A hook reads each
    token's index in its text, prompt and generated tokens together, as `hook.positions`.

    Arguments are checked here, before the first step, so bad values fail at the call.
    """
    unknown = sorted(sampling.keys() - {f.name for f in dataclasses.fields(SamplingParams)})
    if unknown:
        raise TypeError(f"generate() got an unexpected keyword argument {unknown[0]!r}")
    params = dataclasses.replace(params or SamplingParams(), **sampling)
    params.shift(model.config.block_size)  # checked at the call, not at the first step
    if logits_processor is None:
        processors: tuple[LogitsProcessor, ...] = ()
    elif callable(logits_processor):
        processors = (logits_processor,)
    else:
        processors = tuple(logits_processor)
    for fn in processors:
        if not callable(fn):
            raise SamplingError(f"a logits processor must be callable, got {fn!r}")
    if fwd_hooks:
        if not hasattr(model, "hooks"):
            raise SamplingError(f"fwd_hooks need a model with hook points, such as GPT; "
                                f"{type(model).__name__} has none")
        with model.hooks(fwd_hooks):  # an unknown hook name fails here, at the call
            pass
    histories = [prompt_tokens(tokenizer, p) for p in prompt_list(prompt) or [prompt]]
    windows = []
    for ids in histories:  # a loop, not a comprehension: the warning names generate's caller
        windows.append(crop_prompt(ids, model.config.block_size, warn=warn))
    return _generate(model, tokenizer, windows, params, use_cache=use_cache,
                     processors=processors, histories=histories,
                     with_logits=with_logits, fwd_hooks=tuple(fwd_hooks))


def prompt_list(prompt: Any) -> list[Any] | None:
    """The prompts of a list of prompts (texts, or token ids each), or None for one prompt (a
    text, or token ids)."""
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], int):
        if isinstance(prompt[0], (str, list, tuple)) or getattr(prompt[0], "ndim", 0) == 1:
            return list(prompt)
    return None


@torch.inference_mode()  # as a decorator it is switched on only while the generator runs
def _generate(model: nn.Module, tokenizer: Tokenizer, prompts: list[list[int]],
              params: SamplingParams, *, use_cache: bool,
              processors: tuple[LogitsProcessor, ...], histories: list[list[int]],
              with_logits: bool, fwd_hooks: tuple[tuple[NameFilter, HookFn], ...]
              ) -> Iterator[Step]:
    max_new_tokens, n, show_top = params.max_new_tokens, params.num_samples, params.show_top
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    block_size = model.config.block_size
    eot = None if params.ignore_eot else tokenizer.eot_id
    generators = [torch.Generator(device=device) for _ in prompts]  # one per prompt: as alone
    for generator in generators:
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
    was_training = model.training
    model.eval()
    rows = [ids for ids in prompts for _ in range(n)]  # row p * n + s: sample s of prompt p
    cropped = [len(full) - len(ids) for ids, full in zip(prompts, histories) for _ in range(n)]
    windows = Windows(model, rows, cropped, keep=block_size + 1 - params.shift(block_size),
                      use_cache=use_cache, fwd_hooks=fwd_hooks)
    # Every token so far per prompt, for the processors: unlike the window it never drops any.
    history = [torch.empty(n, len(h) + max_new_tokens, dtype=torch.long, device=device)
               for h in (histories if processors else [])]
    for h, ids in zip(history, histories):
        h[:, :len(ids)] = torch.tensor(ids, device=device)
    streams = [TextStream(tokenizer, params.stop) for _ in rows]
    alive = [True] * len(rows)
    try:
        logits = windows.first()  # prefill: the whole prompts at once
        for index in range(max_new_tokens):
            # Its own copy: a view would keep the whole forward pass's (B, T, V) logits alive.
            raw = logits.clone() if with_logits else None
            logits = without_padding(logits, tokenizer.vocab_size)
            if processors:
                logits = logits.to(torch.float32, copy=True)  # the processors' own copy
                logits = torch.cat([process(processors, h[:, :len(ids) + index],
                                            logits[p * n:(p + 1) * n])
                                    for p, (h, ids) in enumerate(zip(history, histories))])
            drawn = [sample_next(logits[p * n:(p + 1) * n], params.temperature, params.top_k,
                                 params.top_p, generator) for p, generator in enumerate(generators)]
            tokens, probs = (torch.cat(parts) for parts in zip(*drawn))
            chosen = probs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
            if show_top:
                top_probs, top_ids = probs.topk(min(show_top, probs.size(-1)), dim=-1)
                top_probs, top_ids = top_probs.tolist(), top_ids.tolist()
            for b, token in enumerate(tokens.tolist()):
                if not alive[b]:
                    continue  # finished samples ride along in the batch; their tokens are unused
                if token == eot:
                    delta, finished = streams[b].flush(), "eot"
                else:
                    delta, stopped = streams[b].push(token)
                    finished = "stop" if stopped else None
                if finished is None and index == max_new_tokens - 1:
                    delta, finished = delta + streams[b].flush(), "length"
                alive[b] = finished is None
                top = ([(t, tokenizer.token_text(t), p) for t, p in zip(top_ids[b], top_probs[b])
                        if p > 0] if show_top else [])
                yield Step(b % n, index, token, tokenizer.token_text(token), chosen[b], top, delta,
                           finished, raw[b] if raw is not None else None, b // n)
            if not any(alive):
                return
            for p, (h, ids) in enumerate(zip(history, histories)):
                h[:, len(ids) + index] = tokens[p * n:(p + 1) * n]
            logits = windows.advance(tokens)
    finally:
        model.train(was_training)


def process(processors: tuple[LogitsProcessor, ...], ids: torch.Tensor,
            logits: torch.Tensor) -> torch.Tensor:
    """One prompt's logits (n, V) through the processors, each result checked."""
    shape = logits.shape
    for fn in processors:
        logits = fn(ids, logits)
        if not isinstance(logits, torch.Tensor) or logits.shape != shape:
            raise SamplingError(f"the logits processor {fn!r} must return a tensor of shape "
                                f"{tuple(shape)}, got "
                                f"{getattr(logits, 'shape', type(logits).__name__)}")
    return logits


def window_start(prompt_len: int, index: int, block_size: int, shift: int | None = None) -> int:
    """Where, in the prompt followed by the generated tokens, the context that `generate` used
    for its step `index` begins (generate's window policy, see the module docstring): the window
    grows to block_size, then moves on by `shift` tokens at once (SamplingParams.shift). It
    ends just before the step's token, at prompt_len + index."""
    keep = block_size + 1 - SamplingParams(window_shift=shift).shift(block_size)
    length = prompt_len
    for _ in range(index):
        length += 1
        if length > block_size:
            length = keep
    return prompt_len + index - length


@dataclass
class Candidate:
    """A token a Distribution lists: its id, its text (tokenizer.token_text) and its logit."""

    id: int
    text: str
    logit: float


@dataclass
class Distribution:
    """The next-token distribution after some tokens. `tokens` are the k likeliest (by logit,
    so the likeliest at every temperature) plus any asked for; probs[j][i] is tokens[i]'s
    probability at temperatures[j], and rest[j] the total of every token not listed."""

    tokens: list[Candidate]
    temperatures: list[float]
    probs: list[list[float]]
    rest: list[float]


@torch.inference_mode()
def distribution(model: nn.Module, tokenizer: Tokenizer, ids: Sequence[int], *,
                 temperatures: Sequence[float], k: int, top_k: int | None = None,
                 top_p: float | None = None, include: Sequence[int] = ()) -> Distribution:
    """softmax(filter(logits / T)) after `ids` for each temperature T, the distribution
    `generate` draws the next token from: top-k and top-p apply after the temperature, and
    T = 0 reports the plain softmax, as greedy decoding does (sample_next). `ids` must fit the
    context; ids past the tokenizer's vocabulary are never listed."""
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logits = model(idx)[0][0, -1]  # (V,): the last position predicts the next token
    return distribution_from_logits(logits, tokenizer, temperatures=temperatures, k=k,
                                    top_k=top_k, top_p=top_p, include=include)


def distribution_from_logits(logits: torch.Tensor, tokenizer: Tokenizer, *,
                             temperatures: Sequence[float], k: int, top_k: int | None = None,
                             top_p: float | None = None,
                             include: Sequence[int] = ()) -> Distribution:
    """`distribution` of logits (V,) already computed (the walk's, from its one forward pass)."""
    logits = without_padding(logits.float(), tokenizer.vocab_size)
    shown = logits.topk(min(k, tokenizer.vocab_size)).indices.tolist()
    shown += [i for i in include if i not in shown]
    probs, rest = [], []
    for t in temperatures:
        if t == 0:
            p = logits.softmax(dim=-1)
        else:
            p = filter_logits(scaled(logits, t)[None], top_k, top_p)[0].softmax(dim=-1)
        row = p[shown]
        probs.append(row.tolist())
        rest.append(max(0.0, 1.0 - row.sum().item()))
    tokens = [Candidate(i, tokenizer.token_text(i), v)
              for i, v in zip(shown, logits[shown].tolist())]
    return Distribution(tokens, list(temperatures), probs, rest)
