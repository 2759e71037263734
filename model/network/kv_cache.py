"""The generation cache: keys and values of every layer for the positions seen so far.

Without it, generating token t+1 recomputes attention inputs for all t earlier tokens; with it,
each new token costs one position's compute. The tensors are preallocated to the context size.
"""

from __future__ import annotations

from typing import Any

import torch


class KVCache:
    """Keys and values (B, H_kv, capacity, D) per layer; `length` positions are filled.

    The model writes new keys and values at [length, length + T) and advances `length` once per
    forward pass (after every layer has written).
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, capacity: int,
                 head_dim: int, *, device: Any = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_kv_head, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0
        self.capacity = capacity

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, H_kv, T, D) after the filled part; return all keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
