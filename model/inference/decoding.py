"""The model's side of generation: each row's context window, and the forward passes that keep
the batch's logits up to date as tokens are appended (model.inference.sampling draws them).

Rows of equal length (one prompt's samples, or prompts of one length) run unpadded, exactly as a
single row does: one prefill, then one cached position per step; when the windows are full they
move on together, the cache refilled in one pass (sampling.py's docstring has the policy). Rows
of different lengths are left-padded, so that one forward pass serves them all and every row's
newest token sits in the last column; each row's window then moves on by itself when it is full:
that row alone is refilled (its window has `keep` tokens, unpadded, as it would have alone) and
spliced into the shared cache, whose leading columns are dropped once they are padding in every
row. Without a cache (the reference path) every window is recomputed at every step.

A row's logits equal those of its prompt generated alone within float rounding (padding changes
the shapes the kernels see, not what a row attends to): greedy tokens agree unless two logits
tie to the last bits.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.network.hooks import HookFn, NameFilter
from model.network.kv_cache import KVCache


def hooked(model: nn.Module, fwd_hooks: Sequence[tuple[NameFilter, HookFn]]) -> Any:
    """A context in which `fwd_hooks` are registered on `model` (nothing for no hooks)."""
    return model.hooks(fwd_hooks) if fwd_hooks else contextlib.nullcontext()


def takes_keyword(model: nn.Module, name: str) -> bool:
    """Whether model's forward accepts the keyword `name` (a stand-in model may not)."""
    params = inspect.signature(model.forward).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


class Windows:
    """The rows' context windows over their texts and the model calls that follow them.

    `rows` are the windows to start from (prompts cropped to the context), `before` how many
    tokens of each row's text lie before its window (HookPoint.positions counts them), `keep` the
    tokens a full window keeps when it moves on. `fwd_hooks` are registered around each of these
    forward passes and at no other time.
    """

    def __init__(self, model: nn.Module, rows: list[list[int]], before: list[int], *,
                 keep: int, use_cache: bool,
                 fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = ()) -> None:
        self.model, self.keep, self.fwd_hooks = model, keep, fwd_hooks
        self.rows, self.starts = [list(r) for r in rows], list(before)
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = model.new_cache(len(rows)) if use_cache else None
        self.tells_start = takes_keyword(model, "window_start")

    def first(self) -> torch.Tensor:
        """The logits (B, V) after every row's window: the prefill."""
        return self._whole(range(len(self.rows)), self.cache)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B,), one per row; the logits (B, V) after the new windows."""
        moved = []
        for b, token in enumerate(tokens.tolist()):
            row = self.rows[b]
            row.append(token)
            if len(row) > self.block_size:  # full: move on by len(row) - keep tokens
                self.starts[b] += len(row) - self.keep
                self.rows[b] = row[-self.keep:]
                moved.append(b)
        cache = self.cache
        if cache is None:
            return self._whole(range(len(self.rows)), None)
        if len(moved) == len(self.rows):
            cache.reset()
            return self._whole(moved, cache)
        if not moved:
            self._make_room(range(len(self.rows)))
            return self._forward(tokens[:, None], cache)
        refilled = self.model.new_cache(len(moved))
        logits_moved = self._whole(moved, refilled)  # each `keep` long: unpadded, as alone
        cache.hide_rows(moved)
        self._make_room([b for b in range(len(self.rows)) if b not in moved])
        real = torch.ones(len(self.rows), 1, dtype=torch.bool, device=self.device)
        real[moved] = False  # the moved rows step as padding, then take their refill
        logits = self._forward(tokens[:, None], cache, attention_mask=real)
        cache.splice(moved, refilled)
        logits[moved] = logits_moved
        return logits

    def _make_room(self, rows: Sequence[int]) -> None:
        """Before a step: when the cache is full, drop the leading columns that are padding in
        every row (`rows` hold their windows but the newest token; the others are replaced)."""
        cache = self.cache
        assert cache is not None
        if cache.length < cache.capacity:
            return
        needed = max([len(self.rows[b]) - 1 for b in rows] + [self.keep - 1])
        cache.drop_front(cache.length - needed)

    def _whole(self, rows: Sequence[int], cache: KVCache | None) -> torch.Tensor:
        """The logits after `rows`' whole windows, left-padded to one length, into `cache`."""
        windows = [self.rows[b] for b in rows]
        width = max(len(w) for w in windows)
        idx = torch.zeros(len(windows), width, dtype=torch.long)
        for i, window in enumerate(windows):
            idx[i, width - len(window):] = torch.tensor(window, dtype=torch.long)
        extra: dict[str, Any] = {}
        if any(len(w) != width for w in windows):
            real = torch.arange(width)[None, :] >= torch.tensor(
                [width - len(w) for w in windows])[:, None]
            extra["attention_mask"] = real.to(self.device)
        starts = [self.starts[b] for b in rows]
        if self.tells_start and any(starts):
            extra["window_start"] = torch.tensor(starts, device=self.device)
        return self._forward(idx.to(self.device), cache, **extra)

    def _forward(self, idx: torch.Tensor, cache: KVCache | None, **extra: Any) -> torch.Tensor:
        with hooked(self.model, self.fwd_hooks):
            return self.model(idx, cache=cache, **extra)[0][:, -1]
