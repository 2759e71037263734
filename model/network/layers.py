"""The per-vector pieces of a block: the norms (with hook points for their scale and their
normalized input) and the MLP's non-linearities. model/gpt.py assembles them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.network.hooks import HookPoint


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.active or self.hook_normalized.active:
            return hooked_norm(self, x, center=False)
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # Mixed dtypes (autocast's bfloat16 queries and keys, a float32 weight): the fused kernel
        # takes one dtype, so compute in the wider of the two and return the input's.
        wide = torch.promote_types(x.dtype, self.weight.dtype)
        return F.rms_norm(x.to(wide), (x.size(-1),), self.weight.to(wide), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with hook points for its scale and its normalized input."""

    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__(dim, eps=eps, bias=bias)
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.active or self.hook_normalized.active:
            return hooked_norm(self, x, center=True)
        return super().forward(x)


def hooked_norm(norm: LayerNorm | RMSNorm, x: torch.Tensor, center: bool) -> torch.Tensor:
    """The norm spelled out so hooks see scale (B, T, 1) and (x - mean) / scale, before the
    weight and bias, as TransformerLens defines them."""
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    scale = norm.hook_scale((x.pow(2).mean(dim=-1, keepdim=True) + norm.eps).sqrt())
    x = norm.hook_normalized(x / scale) * norm.weight
    return x + norm.bias if getattr(norm, "bias", None) is not None else x


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf) form
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),  # GPT-2's approximation
    "relu2": lambda h: F.relu(h).square(),  # ReLU squared (So et al., 2021)
    "swiglu": _swiglu,  # Shazeer, 2020
}
