"""Batches: (x, y) windows over memory-mapped token files, y = x shifted by one token.

The seeded, resumable BatchSampler draws training windows at random; eval_windows gives a fixed
set for validation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.token_cache import memmap_tokens
from model.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]
TokenSource = str | Path | np.ndarray | torch.Tensor


def open_tokens(tokens: TokenSource | Sequence[int], dtype: Any = None) -> np.ndarray:
    """A read-only token array: a .bin file memory-mapped (its dtype from meta.json beside it,
    else `dtype`, else uint16), or an array / tensor / list as it is."""
    if isinstance(tokens, (str, Path)):
        path = Path(tokens)
        if not path.is_file():
            raise DataError(f"token file {str(path)!r} not found; prepare the data first")
        if dtype is None:
            meta = path.with_name("meta.json")
            dtype = json.loads(meta.read_text())["dtype"] if meta.is_file() else np.uint16
        return memmap_tokens(path, dtype)
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return np.asarray(tokens)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch's host array as a tensor on `device`."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously while the GPU works.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def windows(data: np.ndarray, starts: np.ndarray, length: int, device: torch.device) -> Batch:
    """The windows data[s : s + length + 1] for each start s, as x = all but the last token and
    y = all but the first: int64 tensors of shape (len(starts), length) on `device`."""
    rows = data[starts[:, None] + np.arange(length + 1)]  # (B, T + 1)
    return (to_device(rows[:, :-1].astype(np.int64), device),
            to_device(rows[:, 1:].astype(np.int64), device))


def _check_length(data: np.ndarray, block_size: int) -> None:
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if len(data) < block_size + 1:
        raise DataError(f"the token split holds {len(data)} tokens, fewer than one window of "
                        f"block_size + 1 = {block_size + 1}; use more text or a smaller block_size")


class SeededSampler:
    """What every training sampler shares: batch k is a pure function of (seed, k), so the
    whole state is the count of batches drawn, and a restored sampler continues exactly where
    the saved one stopped. Each rank keeps its slice of the global batch."""

    def __init__(self, block_size: int, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu") -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.batches_drawn = 0

    def state_dict(self) -> dict[str, int]:
        """JSON-serializable; the same on every rank except `rank`, so rank 0's restores all."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "rank": self.rank,
                "world_size": self.world_size, "block_size": self.block_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError("sampler state is damaged: it needs 'seed' and 'batches_drawn'; "
                            "resume from another checkpoint or start afresh") from exc


class BatchSampler(SeededSampler):
    """Random windows of block_size + 1 tokens -> (x, y) with y = x shifted by one.

    Batch k is drawn from a generator seeded by (seed, k): it picks world_size * batch_size
    windows, the global batch, and each rank keeps its own slice. So ranks see different
    windows, and N ranks together see exactly what one process with N times the batch sees.
    The whole state is the count of batches drawn: a restored sampler continues exactly where
    the saved one stopped.
    """

    def __init__(self, tokens: TokenSource, block_size: int, batch_size: int, seed: int, *,
                 rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        super().__init__(block_size, batch_size, seed, rank=rank, world_size=world_size,
                         device=device)
        self.data = open_tokens(tokens)
        _check_length(self.data, block_size)

    def next_batch(self) -> Batch:
        """x, y: int64 (batch_size, block_size) on the sampler's device."""
        rng = np.random.default_rng([self.seed % 2**63, self.batches_drawn])
        self.batches_drawn += 1
        global_starts = rng.integers(0, len(self.data) - self.block_size,
                                     size=self.batch_size * self.world_size)
        starts = global_starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return windows(self.data, starts, self.block_size, self.device)



def eval_windows(tokens: TokenSource, block_size: int, batch_size: int, num_batches: int,
                 device: str | torch.device = "cpu") -> list[Batch]:
    """A fixed set of evaluation batches: windows spread evenly over the split, same every call,
    so successive evaluations measure the model and not the luck of the draw."""
    data = open_tokens(tokens)
    _check_length(data, block_size)
    starts = np.linspace(0, len(data) - block_size - 1, batch_size * num_batches)
    starts = starts.round().astype(np.int64)
    return [windows(data, starts[b * batch_size:(b + 1) * batch_size], block_size,
                    torch.device(device)) for b in range(num_batches)]

