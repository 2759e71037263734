"""A steering vector: one direction of the residual stream, read from a file, added to every
position's `blocks.N.hook_resid_post` times a scale while the model generates.

    steering = load_steering("honest.safetensors", model, layer=6, scale=4.0)
    generate(model, tokenizer, "I think", fwd_hooks=steering.hooks())

The file holds one tensor of the model's width (n_embd): a `.pt` file written by
`torch.save(vector, path)` (read with weights_only=True: no pickled code runs) or a
`.safetensors` file with one tensor under any name. sample.py and the server take it as
`--steer FILE --steer-layer N --steer-scale X`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.errors import ConfigError, first_line
from model.network.hooks import HookFn, HookPoint
from model.weights.checkpoint import read_safetensors


@dataclass(frozen=True)
class Steering:
    """`vector` (n_embd,) added times `scale` to the residual stream after block `layer`."""

    vector: torch.Tensor
    layer: int
    scale: float
    source: str  # the file it came from, for messages and /api/info

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def hooks(self) -> list[tuple[str, HookFn]]:
        """[(hook name, fn)] for generate's fwd_hooks, model.hooks() or run_with_hooks."""
        def add(resid: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return resid + self.scale * self.vector.to(resid.dtype)

        return [(self.hook_name, add)]

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the file, the layer, the hook point, the scale and the vector's norm."""
        return {"file": self.source, "layer": self.layer, "hook": self.hook_name,
                "scale": self.scale, "norm": float(self.vector.float().norm())}


def read_vector(path: str | Path) -> torch.Tensor:
    """The one tensor a .pt or .safetensors file holds, flattened; ConfigError in one line for a
    missing or unreadable file, another suffix, or anything but exactly one tensor."""
    path = Path(path)
    if path.suffix not in (".pt", ".safetensors"):
        raise ConfigError(f"steering vector {str(path)!r}: expected a .pt or .safetensors file")
    if not path.is_file():
        raise ConfigError(f"steering vector {str(path)!r} does not exist; give the path of a "
                          ".pt or .safetensors file holding one vector")
    try:
        if path.suffix == ".pt":
            loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
        else:
            loaded = read_safetensors(path)
    except Exception as exc:  # pickle, format and OS errors alike: the file is not readable
        raise ConfigError(f"steering vector {str(path)!r} cannot be read "
                          f"({first_line(exc)[:120]})") from exc
    if isinstance(loaded, dict):
        tensors = [v for v in loaded.values() if isinstance(v, torch.Tensor)]
        loaded = tensors[0] if len(tensors) == 1 and len(loaded) == 1 else None
    if not isinstance(loaded, torch.Tensor) or not loaded.is_floating_point():
        raise ConfigError(f"steering vector {str(path)!r} must hold one floating-point tensor "
                          "(torch.save(vector, path), or a .safetensors file with one tensor)")
    return loaded


def load_steering(path: str | Path, model: nn.Module, layer: int,
                  scale: float = 1.0) -> Steering:
    """The steering vector in `path`, checked against `model` (its width, its layers) and put
    on the model's device in its dtype. Every problem is a ConfigError in one line."""
    config = model.config
    if not isinstance(layer, int) or not 0 <= layer < config.n_layer:
        raise ConfigError(f"steering layer {layer} does not exist: the model has layers 0.."
                          f"{config.n_layer - 1}")
    if not math.isfinite(scale):
        raise ConfigError(f"steering scale must be a finite number, got {scale}")
    vector = read_vector(path)
    if vector.numel() != config.n_embd or vector.dim() != 1 and max(vector.shape) != vector.numel():
        raise ConfigError(f"steering vector {str(path)!r} has shape {tuple(vector.shape)}; this "
                          f"model's residual stream is {config.n_embd} wide (n_embd)")
    if not torch.isfinite(vector).all():
        raise ConfigError(f"steering vector {str(path)!r} holds inf or NaN")
    reference = next(model.parameters())
    vector = vector.flatten().to(device=reference.device, dtype=reference.dtype)
    return Steering(vector, layer, float(scale), str(path))
