"""Where the parameters are: a count per component of the GPT, summing to the true total.

Works on the meta device, so the 175-billion-parameter GPT-3 shape can be tallied without
allocating its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.gpt import GPT, GPTConfig

COMPONENTS = ("token embedding (W_E)", "positions", "attention", "MLP", "norms",
              "unembedding (W_U)")


@dataclass
class TallyRow:
    component: str
    shapes: list[tuple[int, ...]]  # one entry per distinct tensor shape in this component
    count: int  # parameters, each tensor counted once
    shared_with: str | None = None  # set when the tensors are another component's


def _component(name: str) -> str:
    if name.startswith("tok_emb"):
        return COMPONENTS[0]
    if name.startswith("pos_emb"):
        return COMPONENTS[1]
    if ".attn." in name and "_norm" not in name:
        return COMPONENTS[2]
    if ".mlp." in name:
        return COMPONENTS[3]
    if "norm" in name:
        return COMPONENTS[4]
    if name.startswith("lm_head"):
        return COMPONENTS[5]
    raise ValueError(f"parameter {name!r} belongs to no known component")


def parameter_tally(model: nn.Module | GPTConfig) -> list[TallyRow]:
    """Rows per component; a GPTConfig is built on the meta device (no memory)."""
    if isinstance(model, GPTConfig):
        with torch.device("meta"):
            model = GPT(model)
    rows = {c: TallyRow(c, [], 0) for c in COMPONENTS}
    owner: dict[int, str] = {}
    # remove_duplicate=False lists a tied tensor under both names, so the head is still seen.
    for name, param in model.named_parameters(remove_duplicate=False):
        component = _component(name)
        row = rows[component]
        shape = tuple(param.shape)
        if id(param) in owner:  # a tied tensor: counted where it was first seen
            row.shared_with = owner[id(param)]
            if shape not in row.shapes:
                row.shapes.append(shape)
            continue
        owner[id(param)] = component
        if shape not in row.shapes:
            row.shapes.append(shape)
        row.count += param.numel()
    return [r for r in rows.values() if r.count or r.shared_with]

