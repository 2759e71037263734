"""LoRA: fine-tune a large model by training small low-rank updates beside its frozen weights.

A frozen linear layer W (out x in) gets the update scale * B @ A, with A (rank x in) and
B (out x rank) and a rank far below in and out (Hu et al., 2021, "LoRA: Low-Rank Adaptation of
Large Language Models"). B starts at zero, so the adapted model starts as exactly the base;
A starts as nn.Linear's weights do, so B's first gradients are not zero. scale = alpha / rank
keeps the update's size about the same when the rank changes. Dropout acts on the adapters'
input only. Only A and B train: the optimizer holds moments for them alone, and a checkpoint
holds them alone (megabytes) with the name and digest of the base they belong to.

Targets, as train.lora_targets names them (comma-separated, or "all", the default):
    q, k, v     the query, key and value slices of the fused attn.qkv layer, one adapter each,
                so "q,v" (the LoRA paper's choice) trains no key update
    attn_out    attention's output projection (attn.proj)
    mlp_in      the MLP's widening layer (mlp.fc; for SwiGLU gate and value together)
    mlp_out     the MLP's projection back (mlp.proj)
"all" follows QLoRA (Dettmers et al., 2023), which needed adapters on every linear layer of the
blocks to match full fine-tuning.

    from model import load_model
    from model.network import lora
    model = load_model("gpt2").model
    lora.apply(model, lora.LoRAConfig(rank=8))   # in place: adapters added, the rest frozen
    ...                                          # train (only the adapters have gradients)
    lora.adapter_state_dict(model)               # the trained tensors, to save
    lora.merge(model)                            # in place: a plain GPT, W + scale * B @ A
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import CheckpointError, ConfigError
from model.gpt import GPT, count_parameters

QKV_TARGETS = ("q", "k", "v")
TARGETS = (*QKV_TARGETS, "attn_out", "mlp_in", "mlp_out")


def parse_targets(text: str, key: str = "train.lora_targets") -> tuple[str, ...]:
    """'q, v' -> ('q', 'v'); 'all' -> every target. Errors name `key`."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if names == ["all"]:
        return TARGETS
    if not names:
        raise ConfigError(f"{key}: names no target; use all or some of {', '.join(TARGETS)}")
    for name in names:
        if name not in TARGETS:
            raise ConfigError(f"{key}: unknown target {name!r}; choose from "
                              f"{', '.join(TARGETS)} (comma-separated) or all")
    return tuple(t for t in TARGETS if t in names)  # one order, whatever the spelling


@dataclass(frozen=True)
class LoRAConfig:
    """The adapters' settings, checked on construction; errors name the train.lora_* keys."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | tuple[str, ...] = "all"
    chosen: tuple[str, ...] = field(init=False, repr=False)  # `targets` parsed

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"train.lora_rank: must be an integer >= 1 (leave it unset to "
                              f"fine-tune every weight), got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"train.lora_alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.lora_dropout: must be in [0, 1), got {self.dropout}")
        text = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        object.__setattr__(self, "chosen", parse_targets(text))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus low-rank updates on chosen slices of its output features.

    `slices` maps a target name to the (start, stop) output rows it adapts; for attn.qkv these
    are the q, k and v parts, for the other layers one slice covering every output.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], rank: int,
                 alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1]))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, stop) in self.slices.items():
            a = torch.empty(rank, base.in_features, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init, as the paper's code
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        # A base stored in bfloat16 runs under bfloat16 autocast, which casts x the same way.
        y = F.linear(x if x.dtype == weight.dtype else x.to(weight.dtype), weight, self.base.bias)
        h = self.dropout(x)
        pieces, end = [], 0
        for name, (start, stop) in self.slices.items():
            update = F.linear(F.linear(h, self.lora_A[name]) * self.scale, self.lora_B[name])
            if start > end:  # a slice without adapter (k in "q,v") gets no update
                pieces.append(update.new_zeros(*update.shape[:-1], start - end))
            pieces.append(update)  # (..., stop - start)
            end = stop
        if end < y.size(-1):
            pieces.append(pieces[-1].new_zeros(*y.shape[:-1], y.size(-1) - end))
        return y + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + scale * B @ A in float32, for code that reads a layer's
        weight (per-head results, analysis); forward never forms it."""
        weight = self.base.weight.float().clone()
        for name, (start, stop) in self.slices.items():
            weight[start:stop] += self.scale * (self.lora_B[name] @ self.lora_A[name])
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain float32 nn.Linear computing W + scale * B @ A: the same function."""
        # On meta: no random init for weights about to be replaced.
        linear = nn.Linear(self.base.in_features, self.base.out_features,
                           bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().float().clone())
        return linear


def apply(model: GPT, config: LoRAConfig | None = None,
          base_dtype: torch.dtype | None = None) -> GPT:
    """Add adapters to `model` in place and freeze every other parameter; returns `model`.

    base_dtype (e.g. torch.bfloat16) stores the adapted layers' frozen weights in that dtype:
    half the memory, and the copies autocast would make are not needed. The model must then
    run under autocast of that dtype. Adapters stay float32.
    """
    config = config or LoRAConfig()
    if has_adapters(model):
        raise ConfigError("the model already has LoRA adapters; merge them (lora.merge) first")
    for p in model.parameters():
        p.requires_grad_(False)

    def adapt(linear: nn.Module, slices: dict[str, tuple[int, int]]) -> nn.Module:
        if not slices:
            return linear
        if base_dtype is not None:
            linear.to(base_dtype)
        adapted = LoRALinear(linear, slices, config.rank, config.alpha, config.dropout)
        return adapted.train(model.training)  # dropout on only if the model trains

    chosen = config.chosen
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        bounds = list(accumulate(attn.qkv_sizes, initial=0))  # q, k, v rows follow each other
        qkv = {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(QKV_TARGETS)}
        attn.qkv = adapt(attn.qkv, {n: r for n, r in qkv.items() if n in chosen})
        for target, parent, name in (("attn_out", attn, "proj"), ("mlp_in", mlp, "fc"),
                                     ("mlp_out", mlp, "proj")):
            linear = getattr(parent, name)
            if target in chosen:
                setattr(parent, name, adapt(linear, {target: (0, linear.out_features)}))
    return model


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name (e.g. blocks.0.attn.qkv.lora_A.q): all a run trains."""
    return {name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                            source: str = "adapters") -> None:
    """Copy adapters into a model prepared by `apply` with the same settings; names and shapes
    must match exactly (a CheckpointError names what differs, and `source`)."""
    params = dict(model.named_parameters())
    mine = {name for name in params if ".lora_" in name}
    missing, unexpected = sorted(mine - set(state)), sorted(set(state) - mine)
    if missing or unexpected:
        raise CheckpointError(f"{source}: adapters do not fit the model (missing "
                              f"{missing[:3] or 'none'}, unexpected {unexpected[:3] or 'none'}); "
                              "train.lora_rank and train.lora_targets must be the run's")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{source}: adapter {name} has shape {tuple(tensor.shape)}"
                                      f", the model's is {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def merge(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight, in place: `model` becomes a plain GPT (the
    layers' float32 weights W + scale * B @ A, every parameter trainable again); returns it."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def weights_digest(model: nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: the identity of a base model,
    whatever file format it came from. A tied W_E/W_U is hashed once."""
    digest, seen = hashlib.sha256(), set()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


# -- a LoRA run's base: what its checkpoints record, and the check when they are loaded -----------


def base_record(name: str, base: nn.Module, path: str | None = None) -> dict[str, str]:
    """What a LoRA checkpoint keeps about its base: the name train.init_from gave, the
    directory it was read from (absolute: the run may be loaded from elsewhere) and the
    digest of its weights."""
    record = {"name": name, "digest": weights_digest(base)}
    if path is not None:
        record["path"] = str(path)
    return record


def check_base(record: dict[str, str], digest: str, where: str, checkpoint: str) -> None:
    """CheckpointError naming `where` (the base's file) unless `digest` is that of the base
    the adapters in `checkpoint` were trained on, as its `record` (base_record) says."""
    if digest != record.get("digest"):
        raise CheckpointError(
            f"{where}: the base of LoRA run {checkpoint!r} has changed since it was trained "
            "(its weights' digest differs); restore that base, or fine-tune again from this one")


def describe(model: nn.Module, config: LoRAConfig) -> str:
    """One line for the user: what trains and what is frozen."""
    trained, total = count_parameters(model, trainable_only=True), count_parameters(model)
    dtypes = {m.base.weight.dtype for m in model.modules() if isinstance(m, LoRALinear)}
    frozen = ", ".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=str))
    return (f"LoRA: {trained:,} adapter parameters train (rank {config.rank}, alpha "
            f"{config.alpha:g}, targets {','.join(config.chosen)}); {total - trained:,} base "
            f"parameters frozen (adapted layers in {frozen})")


def frozen_dtype(compute_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to keep a frozen base in while training computes in `compute_dtype`: bfloat16
    when the matmuls run in bfloat16 anyway (autocast would copy every weight to it at every
    step, and keep those copies for the backward pass), else the weights' own (None)."""
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else None
