"""The model work behind the endpoints that is not plain generation, run on the engine thread:
the log-probability of every prompt token (how evaluation harnesses score a text), and the
next-token distribution after some tokens at several temperatures (the page's live slider).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.data.tokenizer import Tokenizer
from model.gpt import GPT
from model.inference.sampling import filter_logits, scaled, without_padding
from model.inference.scoring import score_tokens

LOGPROB_FLOOR = -1e4  # JSON has no -inf: a probability that underflows reports this instead


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


@dataclass
class TokenLogprob:
    """One token of a text with the log-probability the model gave it and the k likeliest
    alternatives at that position (text, log-probability), best first."""

    token: int
    text: str
    logprob: float | None  # None for the first token: nothing predicts it
    top: list[tuple[str, float]] | None


def prompt_logprobs(model: GPT, tokenizer: Tokenizer, ids: Sequence[int],
                    k: int) -> list[TokenLogprob]:
    """log p(ids[t] | ids[:t]) for every t >= 1 and the k likeliest alternatives, from
    model.scoring (one forward pass: len(ids) must be at most the context size)."""
    scores = score_tokens(model, ids, top=k, vocab_size=tokenizer.vocab_size)
    out = [TokenLogprob(ids[0], tokenizer.token_text(ids[0]), None, None)]
    top_ids = scores.top_ids.tolist() if k else [[] for _ in ids[1:]]
    top_lp = scores.top_logprobs.tolist() if k else [[] for _ in ids[1:]]
    for t, (lp, row_ids, row_lp) in enumerate(zip(scores.logprobs.tolist(), top_ids, top_lp),
                                              start=1):
        top = [(tokenizer.token_text(i), finite(v)) for i, v in zip(row_ids, row_lp)]
        out.append(TokenLogprob(ids[t], tokenizer.token_text(ids[t]), finite(lp), top))
    return out


@dataclass
class Distribution:
    """The next-token distribution after some tokens: `tokens` are the k likeliest (by logit,
    so the likeliest at every temperature) plus any asked for; probs[j][i] is tokens[i]'s
    probability at temperatures[j] and rest[j] the total of all other tokens."""

    tokens: list[dict]  # {"id", "text", "logit"}
    temperatures: list[float]
    probs: list[list[float]]
    rest: list[float]


@torch.inference_mode()
def distribution(model: GPT, tokenizer: Tokenizer, ids: Sequence[int],
                 temperatures: Sequence[float], k: int, top_k: int | None = None,
                 top_p: float | None = None, include: Sequence[int] = ()) -> Distribution:
    """softmax(filter(logits / T)) after `ids` for each T, the way model.sampling draws a token:
    top-k and top-p apply after the temperature. T = 0 reports the plain softmax, as greedy
    decoding does (sampling.sample_next)."""
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logits = model(idx)[0][0, -1].float()  # (V,): the last position predicts the next token
    logits = without_padding(logits, tokenizer.vocab_size)
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
    tokens = [{"id": i, "text": tokenizer.token_text(i), "logit": v}
              for i, v in zip(shown, logits[shown].tolist())]
    return Distribution(tokens, list(temperatures), probs, rest)


def window_start(prompt_len: int, index: int, block_size: int, shift: int | None = None) -> int:
    """Where, in the prompt followed by the generated tokens, the context that `generate` used
    for its step `index` begins: the window grows to block_size, then moves on by `shift`
    tokens at once (model.sampling's policy; default shift block_size // 4). It ends just
    before the step's token, at prompt_len + index."""
    shift = shift if shift is not None else max(1, block_size // 4)
    keep = block_size + 1 - shift
    length = prompt_len
    for _ in range(index):
        length += 1
        if length > block_size:
            length = keep
    return prompt_len + index - length
