"""The generation cache: keys and values of every layer for the positions seen so far.

Without it, generating token t+1 recomputes attention inputs for all t earlier tokens; with it,
each new token costs one position's compute. The tensors are preallocated to the context size.

A padded batch (rows of different lengths, model/network/positions.py) also leaves here which
cached columns hold tokens and each row's next position, so that later passes continue every
row where it stands without a mask; `drop_front` and `splice` let a decoder move one row's
context window on without recomputing the others (model/inference/decoding.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class KVCache:
    """Keys and values (B, H_kv, capacity, D) per layer; `length` columns are filled.

    The model writes new keys and values at [length, length + T) and advances `length` once per
    forward pass (after every layer has written). `mask` and `next_position` are None until a
    padded batch comes: then (B, capacity) booleans, which columns hold tokens, and (B,) each
    row's next position. `window_start` is what the last pass that named it said: how many
    tokens of each row's text come before what the cache holds (HookPoint.positions adds it).
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, capacity: int,
                 head_dim: int, *, device: Any = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_kv_head, capacity, head_dim)
        # Uninitialised: a column is only ever read after a pass wrote it (filling GPT-2's
        # 1024 columns with zeros took 60 ms of every generation's start).
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0
        self.capacity = capacity
        self.mask: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None
        self.window_start: int | torch.Tensor = 0

    def reset(self) -> None:
        self.length = 0
        self.mask = self.next_position = None
        self.window_start = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, H_kv, T, D) after the filled part; return all keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _masked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mask and next_position, made (every column so far a token) on first use."""
        if self.mask is None or self.next_position is None:
            B, device = self.keys[0].size(0), self.keys[0].device
            self.mask = torch.ones(B, self.capacity, dtype=torch.bool, device=device)
            self.next_position = torch.full((B,), self.length, device=device)
        return self.mask, self.next_position

    def mark(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record which of the next T columns hold tokens (real: (B, T) booleans). Returns each
        row's position before them (B, 1) and the token columns so far, (B, length + T)."""
        mask, before = self._masked()
        end = self.length + real.size(1)
        mask[:, self.length:end] = real
        self.next_position = before + real.sum(dim=1)
        return before[:, None], mask[:, :end]

    def drop_front(self, n: int) -> None:
        """Forget the first n columns (padding in every row), moving the rest to the front."""
        if n <= 0:
            return
        keep = self.length - n
        for t in (*self.keys, *self.values):
            t[:, :, :keep] = t[:, :, n:self.length].clone()
        if self.mask is not None:
            self.mask[:, :keep] = self.mask[:, n:self.length].clone()
        self.length = keep

    def hide_rows(self, rows: Sequence[int]) -> None:
        """Make every filled column of `rows` padding (rows that are about to be replaced)."""
        mask, _ = self._masked()
        mask[list(rows), :self.length] = False

    def splice(self, rows: Sequence[int], source: KVCache) -> None:
        """Rows `rows` take the contents of `source` (one unpadded row each, in order), placed
        to end at the last filled column; their earlier columns become padding, and their
        positions and window start continue from source's."""
        n, end = source.length, self.length
        if n > end:
            raise ValueError(f"rows of {n} columns do not fit in {end} filled columns")
        index = torch.tensor(list(rows), device=self.keys[0].device)
        for mine, theirs in zip((*self.keys, *self.values), (*source.keys, *source.values)):
            mine[index, :, end - n:end] = theirs[:, :, :n]
        self.hide_rows(rows)
        mask, next_position = self._masked()
        mask[index, end - n:end] = True
        next_position[index] = n
        if not isinstance(self.window_start, torch.Tensor):
            self.window_start = torch.full_like(next_position, self.window_start)
        self.window_start[index] = torch.as_tensor(source.window_start,
                                                   device=index.device).expand(len(index))
