"""TransformerLens's Slice semantics for one axis of a tensor, without TransformerLens.

    take(t, as_index(-1), dim=-2)       # the last position; that axis goes
    take(t, as_index((2, 5)), dim=-2)   # positions 2, 3, 4 (a tuple is slice(*tuple))
    take(t, as_index([0, 3]), dim=0)    # rows 0 and 3
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from model.errors import SmallGPTError


def as_index(selection: Any) -> Any:
    """TransformerLens's Slice semantics as an index for one axis: None keeps it whole, an int
    picks one entry (the axis goes), a tuple is slice(*tuple), a slice stays, a list, array or
    tensor picks those entries. A TransformerLens Slice object is read the same way."""
    if hasattr(selection, "mode") and hasattr(selection, "slice"):  # transformer_lens Slice
        selection = selection.slice
    if selection is None:
        return slice(None)
    if isinstance(selection, tuple):
        return slice(*selection)
    if isinstance(selection, slice):
        return selection
    if isinstance(selection, (int, np.integer)) or (
            isinstance(selection, torch.Tensor) and selection.ndim == 0):
        return int(selection)
    if isinstance(selection, (list, np.ndarray, torch.Tensor)):
        return torch.as_tensor(selection, dtype=torch.long)
    raise SmallGPTError(f"cannot select positions with {selection!r}: pass None, an int, a slice, "
                    "a tuple, or a list or tensor of indices")


def take(t: torch.Tensor, index: Any, dim: int) -> torch.Tensor:
    """t indexed by `index` (from as_index) along `dim` (negative dims count from the end)."""
    if isinstance(index, slice) and index == slice(None):
        return t
    if isinstance(index, torch.Tensor):
        index = index.to(t.device)
    return t[(slice(None),) * (dim % t.ndim) + (index,)]
