"""Where each token stands: its position (the learned and rotary embeddings read it) and the
earlier tokens it may attend to.

Without padding every row of a batch is one text from its first column: positions run
start, start + 1, ... (start: the tokens already in the KV cache) and a query sees every key up
to its own column (causal attention, the fused kernels' is_causal). A padded batch, given as an
`attention_mask` (batch, time; 1 = token, 0 = padding, as in transformers), gives each row its
own positions, counted from its first real token, so that a row computes what its text alone
computes, left padding or right; padding is hidden from every query. A padding query sees only
itself, so that its row of attention is never empty (an empty row would be NaN); what padding
computes is never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.errors import ConfigError
from model.network.kv_cache import KVCache


@dataclass
class Placement:
    """One forward pass's tokens: where they stand and what they see. positions and mask are
    None on the unpadded path (every row at start, start + 1, ...; causal attention)."""

    start: int  # columns already in the cache
    positions: torch.Tensor | None  # (B, T) each token's position in its row's text
    mask: torch.Tensor | None  # (B, 1, T, S) bool: the keys each query sees
    real: torch.Tensor | None  # (B, T) bool: which tokens are not padding


def place(idx: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None,
          block_size: int) -> Placement:
    """The Placement of idx (B, T) after what `cache` holds. A mask of ones is no padding: the
    unpadded path, with its fused kernels. A cache that has held a padded batch keeps each row's
    positions and hidden columns (KVCache.mark), so later passes need no mask for tokens."""
    B, T = idx.shape
    start = cache.length if cache is not None else 0
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must "
                              f"match the tokens' {tuple(idx.shape)} (1 = token, 0 = padding)")
        real = attention_mask.to(device=idx.device, dtype=torch.bool)
        if bool(real.all()):
            attention_mask = None
    if attention_mask is None and (cache is None or cache.mask is None):
        return Placement(start, None, None, None)  # GPT.embed checks the length
    if attention_mask is None:
        real = torch.ones(B, T, dtype=torch.bool, device=idx.device)
    if cache is not None:
        if start + T > cache.capacity:
            raise ConfigError(f"the KV cache holds {cache.capacity} positions, {start} are "
                              f"filled; {T} more do not fit")
        before, keys = cache.mark(real)
    else:
        before, keys = torch.zeros(B, 1, dtype=torch.long, device=idx.device), real
    positions = before + real.cumsum(dim=1) - 1  # a token's position: real tokens before it
    last = int(positions.max()) if T else -1
    if last >= block_size:
        raise ConfigError(f"a row of {last + 1} tokens is longer than the context size "
                          f"model.block_size={block_size}; crop it to the last {block_size}")
    return Placement(start, positions.clamp(min=0), visible_keys(keys, start), real)


def visible_keys(keys: torch.Tensor, start: int) -> torch.Tensor:
    """(B, 1, T, S) booleans from keys (B, S), which key columns hold tokens: query t (at column
    start + t) sees the token columns up to its own, and always itself."""
    S = keys.size(1)
    rows = torch.arange(start, S, device=keys.device)[:, None]
    cols = torch.arange(S, device=keys.device)[None, :]
    return (((cols <= rows) & keys[:, None, :]) | (cols == rows))[:, None]


def text_positions(placement: Placement, idx: torch.Tensor, window_start: Any) -> torch.Tensor:
    """(B, T) long: each token's index in its row's whole text (window_start, a number or (B,),
    counts the tokens before the window the model sees), -1 at padding: what HookPoint.positions
    shows."""
    B, T = idx.shape
    if placement.positions is None:
        start = placement.start
        positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
    else:
        positions = placement.positions
    if isinstance(window_start, torch.Tensor) and window_start.dim() == 1:
        window_start = window_start.to(positions.device)[:, None]  # one per row
    positions = positions + window_start
    if placement.real is not None:
        positions = positions.masked_fill(~placement.real, -1)
    return positions


def causal_mask(T: int, past: int, device: Any) -> torch.Tensor:
    """(T, past + T) booleans: query i (at position past + i) sees keys 0 .. past + i."""
    rows = torch.arange(T, device=device)[:, None] + past
    return torch.arange(past + T, device=device)[None, :] <= rows


def rope_tables(head_dim: int, length: int, base: float, device: Any = None) -> torch.Tensor:
    """cos and sin of position * frequency, stacked: (2, length, head_dim // 2), float32."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), freqs)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's vector by its position's angle.

    x: (B, H, T, D); table: (2, T, D/2) for the positions of x, or (2, B, 1, T, D/2) when each
    row has its own positions.
    """
    cos, sin = table[0].to(x.dtype), table[1].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
