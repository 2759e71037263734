"""Faster generation on the CPU: every nn.Linear's weight repacked once into oneDNN's layout.

For inference only: a packed weight replaces the dense one (a tied W_U keeps W_E for the
embedding lookups), has no gradient and is missing from the state dict.
"""

from __future__ import annotations

import torch
from torch import nn

PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """nn.Linear's forward, its weight held in oneDNN's layout for one row of input at a time
    (the layout serves longer inputs too, e.g. a prompt's prefill)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Hinted for batch 1: decoding's matrix-vector products.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, unpacked on request (analysis code reading W_U or W_O)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed for oneDNN")


def can_pack(model: nn.Module) -> bool:
    """Whether `model`'s linear layers can be packed: weights on the CPU, in float32 or in a
    bfloat16 that this CPU computes natively, with a PyTorch built with oneDNN."""
    weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
    if not weights or not torch.backends.mkldnn.is_available():
        return False
    if any(w.device.type != "cpu" or w.dtype not in PACKABLE for w in weights):
        return False
    uses_bf16 = any(w.dtype == torch.bfloat16 for w in weights)
    return not uses_bf16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(model: nn.Module) -> int:
    """Replace each nn.Linear of `model` by a PackedLinear, in place, when can_pack says the
    CPU can run them; the number replaced (0: left as it was). For inference only."""
    if not can_pack(model):
        return 0
    found = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in found:
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, attr, PackedLinear(getattr(parent, attr)))
    return len(found)
