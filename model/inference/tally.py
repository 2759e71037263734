"""Where the parameters are: a count per component of the GPT, summing to the true total.

Works on the meta device, so the 175-billion-parameter GPT-3 shape can be tallied without
allocating its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.gpt import GPT, GPTConfig

# GPT.components()'s parts, as the tally names them, in this order.
COMPONENTS = {"embed": "token embedding (W_E)", "pos_embed": "positions", "attn": "attention",
              "mlp": "MLP", "norm": "norms", "unembed": "unembedding (W_U)"}


@dataclass
class TallyRow:
    component: str
    shapes: list[tuple[int, ...]]  # one entry per distinct tensor shape in this component
    count: int  # parameters, each tensor counted once
    shared_with: str | None = None  # set when the tensors are another component's


def parameter_tally(model: GPT | GPTConfig) -> list[TallyRow]:
    """Rows per component; a GPTConfig is built on the meta device (no memory)."""
    if isinstance(model, GPTConfig):
        model = GPT(model, device="meta")
    rows, owner = [], {}
    for part, modules in model.components().items():
        row = TallyRow(COMPONENTS[part], [], 0)
        for param in (p for m in modules for p in m.parameters()):
            if tuple(param.shape) not in row.shapes:
                row.shapes.append(tuple(param.shape))
            if id(param) in owner:  # a tied tensor: counted where it was first seen
                row.shared_with = owner[id(param)]
            else:
                owner[id(param)] = row.component
                row.count += param.numel()
        rows.append(row)
    unplaced = [name for name, p in model.named_parameters() if id(p) not in owner]
    if unplaced:
        raise ValueError(f"parameter {unplaced[0]!r} belongs to no component")
    return [r for r in rows if r.count or r.shared_with]
