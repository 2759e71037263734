"""8-bit weights for generation: every linear layer's weight as int8, one scale per output row.

Decoding a token reads every weight once, so on a CPU its speed is the memory's, and int8
weights are a quarter of float32's bytes. Each row w of a weight (one output feature) becomes
q = round(w / s) with s = max|w| / 127: symmetric, per output channel, so a weight is off by
at most s / 2.

The matmul has two kernels. Where torch's x86 quantized engine is there (FBGEMM), the
activations are made integers too for the product (llama.cpp's Q8_0 does so with a scale per 32
values): each call's input gets one scale and zero point from its range, so rows of a batch
share them, and FBGEMM's integer matmul runs at twice the speed of the other kernel on an AVX2
CPU (docs/decoding.md). The cost, measured with `python bench/quality.py --evaluate RUN
--quantize int8`: small.yaml's trained model goes from 2.1262 to 2.1288 bits/byte on
tiny-shakespeare's validation split, its first 50 greedy tokens unchanged. Elsewhere, torch's
int8 weight-pack kernel (the weight-only one gpt-fast uses) takes the activations in bfloat16.

Computed at load time from the float weights (no file format of its own), and for inference
only, like packed.py: the int8 weights have no gradient and are not in the state dict. A tied
head (W_U = W_E) gets its own int8 copy; the embedding lookups keep reading W_E.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from model.errors import ConfigError


def fbgemm_available() -> bool:
    """Whether torch's x86 quantized engine (FBGEMM) runs the quantized matmuls here."""
    return (torch.backends.quantized.engine in ("x86", "fbgemm")
            and hasattr(torch, "_make_per_channel_quantized_tensor"))


class Int8Linear(nn.Module):
    """nn.Linear's forward with an int8 weight and a scale per output feature."""

    def __init__(self, linear: nn.Linear, fbgemm: bool | None = None) -> None:
        """`fbgemm`: which kernel (None: FBGEMM where fbgemm_available says it runs)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        int8, scale = int8_rows(linear.weight.detach())
        self.register_buffer("scale", scale, persistent=False)
        self.bias = linear.bias
        self.fbgemm = fbgemm_available() if fbgemm is None else fbgemm
        if not self.fbgemm:
            self.register_buffer("int8_weight", int8, persistent=False)
        else:  # FBGEMM's own layout of the same int8 values and scales, held there alone
            zero = torch.zeros(len(scale), dtype=torch.long)
            with warnings.catch_warnings():
                # torch says its quantized tensor types will go; this one only carries the
                # weight into FBGEMM's layout (fbgemm_available turns the path off without it).
                warnings.simplefilter("ignore", UserWarning)
                quantized = torch._make_per_channel_quantized_tensor(int8, scale.double(), zero,
                                                                      0)
            bias = None if linear.bias is None else linear.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(quantized, bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight these int8 values stand for (analysis code reading W_U or W_O)."""
        if self.fbgemm:
            return torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()
        return self.int8_weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fbgemm:
            # reduce_range: 7-bit activations, so that AVX2's 16-bit sums of pairs of products
            # cannot saturate (CPUs without VNNI).
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.int8_weight,
                                               self.scale.to(torch.bfloat16))
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 weights")


def int8_rows(weight: torch.Tensor, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (N, K) as round(w / s) in int8 and s = max|w| / 127 per row (float32, (N,)).

    A few rows at a time through one small float32 buffer: dividing a whole matrix at once
    allocates a temporary as large as it, whose fresh pages cost more than the arithmetic
    (GPT-2-124M: 0.39 s this way, 0.58 s at once)."""
    scale = torch.linalg.vector_norm(weight, float("inf"), dim=1, dtype=torch.float32).div_(127)
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero row: any scale gives zeros
    int8 = torch.empty(weight.shape, dtype=torch.int8)
    rows = max(1, chunk // weight.size(1))
    buffer = torch.empty(rows, weight.size(1))
    for start in range(0, len(weight), rows):
        part = buffer[:len(weight[start:start + rows])]
        torch.div(weight[start:start + rows], scale[start:start + rows, None], out=part)
        int8[start:start + rows] = part.round_()
    return int8, scale


def quantize_int8(model: nn.Module, *, fbgemm: bool | None = None) -> int:
    """Replace each nn.Linear of `model` by an Int8Linear, in place; the number replaced. Each
    float weight is dropped as soon as its int8 copy exists (a tied head's W_E stays, for the
    embedding), so memory never holds two copies of the model. For inference only, on the CPU;
    a model elsewhere is a ConfigError."""
    found = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    devices = sorted({model.get_submodule(n).weight.device.type for n in found} - {"cpu"})
    if devices:
        raise ConfigError(f"int8 weights run on the CPU, and the model is on {devices[0]}; "
                          "use --device cpu, or bfloat16 on a GPU")
    for name in found:
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, attr, Int8Linear(getattr(parent, attr), fbgemm))
    return len(found)
