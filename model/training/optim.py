"""Optimizers and the learning-rate schedule.

Weight decay, for any module: a trainable parameter with two or more dimensions (a weight
matrix, an embedding table, a convolution kernel) decays; one with fewer (a bias, a norm's gain)
does not: those are offsets and scales, and pulling them towards zero only hurts (as in GPT-3's
and nanoGPT's set-ups). Frozen parameters (requires_grad=False) are left out of the optimizer.
The rule reads only shapes, so it holds for a GPT subclass or a module of your own alike. With
`optimizer: muon`, the 2-D weights inside the model's `blocks` use Muon (orthogonalised
momentum; Jordan et al., 2024) and everything else (embeddings, head, norms, biases) keeps
AdamW, as Muon's authors recommend; a model without `blocks` trains with AdamW alone.

The schedule is a pure function of the step, so a resumed run gets the same rate as an
uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from model.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay (or a constant rate and a linear cool-down,
    "wsd") down to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        cooldown_start = cfg.max_steps * (1.0 - cfg.cooldown_fraction)
        if step < cooldown_start:
            return cfg.lr
        progress = (step - cooldown_start) / max(1.0, cfg.max_steps - cooldown_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class CombinedOptimizer:
    """Several optimizers stepped together, so the loop and checkpoints see one object."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        # Every group in one list, so the schedule treats this like a single optimizer.
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)


def hidden_matrices(model: nn.Module) -> set[int]:
    """The ids of the 2-D weights inside `model.blocks` (the blocks' linear layers): the
    matrices Muon is designed for; none for a model without blocks."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        return set()
    return {id(p) for p in blocks.parameters() if p.ndim == 2}


def decays(param: nn.Parameter) -> bool:
    """The weight-decay rule (see the module docstring): matrices and tables, not vectors."""
    return param.ndim >= 2


def weight_decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: those that decay (at `weight_decay`) and those that do not."""
    return [
        {"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
    ]


Optimizer = torch.optim.Optimizer | CombinedOptimizer


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizer:
    """AdamW (fused kernels on CUDA) or Muon + AdamW (its group marked `muon`), over the
    trainable parameters of `model`."""
    # parameters() lists a tied W_E/W_U once, in the order the model registered them.
    params = [p for p in model.parameters() if p.requires_grad]
    muon = cfg.optimizer == "muon"
    hidden_ids = hidden_matrices(model) if muon else set()
    hidden = [p for p in params if id(p) in hidden_ids]
    rest = [p for p in params if id(p) not in hidden_ids]
    groups = weight_decay_groups(rest, cfg.weight_decay)
    # Fused AdamW updates every tensor in one kernel, on CUDA and on the CPU.
    fused = device.type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if not muon:
        return adamw
    muon_opt = Muon([{"params": hidden, "muon": True}], lr=cfg.muon_lr,
                    weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
    return CombinedOptimizer([muon_opt, adamw])


class Muon(torch.optim.Optimizer):
    """Momentum, then the update's nearest semi-orthogonal matrix (Jordan et al., 2024).

    torch.optim.Muon runs its Newton-Schulz iterations in bfloat16, which CPUs without bf16
    units compute slowly and which costs precision at these tiny widths; this one stays in the
    parameter's dtype (float32 here). Nesterov momentum, decoupled weight decay, and the
    update scaled by sqrt(max(1, rows / cols)) as in the original recipe.
    """

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov: look one step ahead
                update = orthogonalize(update, group["ns_steps"])
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T by a quintic Newton-Schulz iteration whose
    coefficients (3.4445, -4.7750, 2.0315) push every singular value towards 1 quickly
    (Jordan et al., 2024). Works on the wide orientation so X X^T is the smaller product."""
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = x / (x.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def set_lr(optimizer: Optimizer, step: int, cfg: TrainConfig) -> float:
    """Scale each group's configured rate by the schedule's factor at `step`; return the AdamW
    rate. Rates come from `cfg`, not from the groups, so a resumed run uses the new config's."""
    lr = lr_at(step, cfg)
    factor = lr / cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = (cfg.muon_lr if group.get("muon") else cfg.lr) * factor
    return lr
