"""Scoring: the log-probability the model gives each token of a text, log p(ids[t] | ids[:t]).

This is what evaluation harnesses ask for (the log-likelihood of a continuation, perplexity),
what the server's `echo` + `logprobs` reports, and what research code compares between models.

    ids -> windows of at most block_size inputs -> forward (no gradients, several windows per
    pass) -> log_softmax in float32 -> the log-probability of each next token (+ the top-k)

A sequence that fits the context is one forward pass: the logits at position t - 1 score
token t. A longer one is scored with a sliding window (as Hugging Face's perplexity guide does):
windows of block_size inputs start every `stride` tokens, the last one ends at the end, and each
window scores only the tokens the previous one did not reach. Every token after the first
block_size thus sees at least block_size - stride + 1 earlier tokens; stride 1 gives every token
a full context (one forward pass per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from model.data.tokenizer import Tokenizer
from model.errors import ConfigError
from model.inference.sampling import without_padding


@dataclass
class TokenScores:
    """Log-probabilities (nats) of every token after the first of a sequence, or of each row
    of a batch: tokens[..., i] is ids[..., i + 1] and logprobs[..., i] its log p given all the
    tokens before it (within the window, see the module docstring)."""

    tokens: torch.Tensor  # (..., T - 1) long: the scored tokens, ids[..., 1:]
    logprobs: torch.Tensor  # (..., T - 1) float32
    top_ids: torch.Tensor | None = None  # (..., T - 1, top): the likeliest tokens, best first
    top_logprobs: torch.Tensor | None = None  # (..., T - 1, top)
    texts: list[str] | None = None  # score_text: each scored token as the tokenizer shows it

    def total(self) -> torch.Tensor:
        """The log-probability of all scored tokens together (per row): their sum."""
        return self.logprobs.sum(dim=-1)


def windows(length: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first) per window for a sequence of `length` ids: the window's inputs are
    ids[start:start + block_size] and it scores the targets from ids[first + 1] on (positions
    first - start.. of its logits). One window when length - 1 inputs fit."""
    inputs = length - 1
    if inputs <= block_size:
        return [(0, 0)]
    out, scored = [], 0  # scored: how many targets the windows so far cover
    start = 0
    while scored < inputs:
        start = min(start, inputs - block_size)
        out.append((start, scored))
        scored = start + block_size
        start += stride
    return out


@torch.no_grad()
def score_tokens(model: nn.Module, ids: Sequence[int] | torch.Tensor, *, top: int = 0,
                 stride: int | None = None, batch_size: int = 4,
                 vocab_size: int | None = None) -> TokenScores:
    """log p(ids[t] | ids[:t]) for t >= 1 of ids (T,) or of each row of ids (B, T).

    `top` also returns the likeliest tokens at each position. Sequences longer than the
    context (model.config.block_size + 1 ids) are scored with a sliding window that starts a
    new window every `stride` tokens (default block_size // 2; see the module docstring).
    Up to `batch_size` windows go through the model together. The model runs in eval mode
    (no dropout) without gradients; its mode is restored afterwards. `vocab_size` is the
    vocabulary (the tokenizer's; default the model's): ids must be below it, and the ids of a
    head padded past it are left out of every distribution.
    """
    block_size = model.config.block_size
    stride = stride if stride is not None else max(1, block_size // 2)
    vocab = vocab_size if vocab_size is not None else model.config.vocab_size
    if not 1 <= stride <= block_size:
        raise ConfigError(f"stride must be in [1, block_size={block_size}], got {stride}")
    if top < 0:
        raise ConfigError(f"top must be >= 0, got {top}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    ids = torch.as_tensor(ids, dtype=torch.long).to(next(model.parameters()).device)
    if ids.dim() not in (1, 2):
        raise ConfigError(f"ids must be (T,) or (B, T), got shape {tuple(ids.shape)}")
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
        raise ConfigError(f"ids must be token ids in 0..{vocab - 1}")
    top = min(top, vocab)
    rows = ids.view(-1, ids.size(-1))  # (B, T)
    logprobs, top_logprobs, top_ids = _score_rows(model, rows, top=top, stride=stride,
                                                  batch_size=batch_size, vocab=vocab)
    shape = ids.shape[:-1] + (logprobs.size(-1),)
    return TokenScores(
        tokens=ids[..., 1:], logprobs=logprobs.view(shape),
        top_ids=top_ids.view(*shape, top) if top else None,
        top_logprobs=top_logprobs.view(*shape, top) if top else None)


def _score_rows(model: nn.Module, rows: torch.Tensor, *, top: int, stride: int,
                batch_size: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-probabilities (B, T - 1) of rows (B, T) after their first token, and the `top`
    likeliest (B, T - 1, top) as log-probabilities and ids, `batch_size` windows per pass."""
    B, T = rows.shape
    block_size = model.config.block_size
    logprobs = torch.zeros(B, max(T - 1, 0), device=rows.device)
    top_logprobs = torch.zeros(B, max(T - 1, 0), top, device=rows.device)
    top_ids = torch.zeros(B, max(T - 1, 0), top, dtype=torch.long, device=rows.device)
    if T < 2:
        return logprobs, top_logprobs, top_ids
    # Every (row, window) pair is one forward input of the same length, so any of them batch
    # together.
    plan = [(b, start, first) for b in range(B) for start, first in windows(T, block_size, stride)]
    span = min(T - 1, block_size)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(plan), batch_size):
            chunk = plan[i:i + batch_size]
            inputs = torch.stack([rows[b, s:s + span] for b, s, _ in chunk])  # (n, span)
            logits = model(inputs)[0]  # (n, span, V)
            for window_logits, (b, start, first) in zip(logits, chunk):
                # Only the positions no earlier window scored: they predict ids[first + 1:].
                new = without_padding(window_logits[first - start:].float(), vocab)
                new = new.log_softmax(dim=-1)
                targets = rows[b, first + 1:start + span + 1]
                scored = slice(first, first + len(targets))
                logprobs[b, scored] = new.gather(-1, targets[:, None]).squeeze(-1)
                if top:
                    top_logprobs[b, scored], top_ids[b, scored] = new.topk(top, dim=-1)
    finally:
        model.train(was_training)
    return logprobs, top_logprobs, top_ids


def score_text(model: nn.Module, tokenizer: Tokenizer, text: str, *, top: int = 0,
               prepend_eot: bool = True, stride: int | None = None,
               batch_size: int = 4) -> TokenScores:
    """The log-probability of each token of `text` (see score_tokens).

    With `prepend_eot` the text is scored as the start of a document, after the end-of-text
    token GPT-2 was trained to see there, so its first token is scored too; without it the
    first token is only context. `texts` shows each scored token.
    """
    ids = tokenizer.encode(text)
    if prepend_eot:
        ids = [tokenizer.eot_id] + ids
    scores = score_tokens(model, ids, top=top, stride=stride, batch_size=batch_size,
                          vocab_size=tokenizer.vocab_size)
    return replace(scores, texts=[tokenizer.token_text(t) for t in scores.tokens.tolist()])


@dataclass
class TokenLogprob:
    """One token of a text with the log-probability the model gave it and the `top` likeliest
    tokens at its position as (text, log-probability), best first."""

    token: int
    text: str
    logprob: float | None  # None for the first token: nothing predicts it
    top: list[tuple[str, float]] | None  # None for the first token


def prompt_logprobs(model: nn.Module, tokenizer: Tokenizer, ids: Sequence[int],
                    top: int = 0) -> list[TokenLogprob]:
    """Every token of `ids` with log p(ids[t] | ids[:t]) and the `top` likeliest alternatives,
    from score_tokens in one forward pass (len(ids) must be at most the context size). A
    probability that underflows is -inf."""
    scores = score_tokens(model, ids, top=top, vocab_size=tokenizer.vocab_size)
    out = [TokenLogprob(ids[0], tokenizer.token_text(ids[0]), None, None)]
    top_ids = scores.top_ids.tolist() if top else [[] for _ in ids[1:]]
    top_lp = scores.top_logprobs.tolist() if top else [[] for _ in ids[1:]]
    for t, (lp, row_ids, row_lp) in enumerate(zip(scores.logprobs.tolist(), top_ids, top_lp),
                                              start=1):
        alternatives = [(tokenizer.token_text(i), v) for i, v in zip(row_ids, row_lp)]
        out.append(TokenLogprob(ids[t], tokenizer.token_text(ids[t]), lp, alternatives))
    return out
