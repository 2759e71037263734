"""The logit lens: each layer's residual stream read as if it were the last.

Every entry of `cache.accumulated_resid()` (the stream entering each block, then the final one)
goes through the model's own final norm (its statistics recomputed for that entry, its weight
and bias) and W_U, so the last entry is the model's own logits (nostalgebraist, 2020,
"interpreting GPT: the logit lens"). Arguments and results follow TransformerLens 4.3's
`cache.logit_lens()`, whose result nests these fields in `.readout`:

    lens = cache.logit_lens(targets=" Paris")          # the last position, by default
    lens.labels                                        # ["0_pre", "1_pre", ..., "final_post"]
    lens.values                                        # (entries, B, 1): the logit of " Paris"
    lens.rank_trajectory(" Paris")                     # (entries, B): its rank, 0 = the top
    cache.logit_lens(positions=None, top_k=5).top_ids  # (entries, B, T, 5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.errors import SmallGPTError
from model.network.slicing import as_index, take

RETURN_TYPES = ("logits", "log_probs", "probs")


@dataclass
class LogitLensResult:
    """values: (entries, ...leading dims, selected): the `return_type` of the tokens selected by
    targets, top_k or vocab (all the vocabulary without them). entropy (entries, ...) and
    target_ranks (0 = the likeliest token) are over the whole vocabulary."""

    values: torch.Tensor
    labels: list[str]
    return_type: str
    entropy: torch.Tensor
    top_ids: torch.Tensor | None = None
    vocab_ids: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    per_row_targets: bool = False
    target_names: list[str | None] | None = None

    @property
    def readout(self) -> LogitLensResult:
        return self  # TransformerLens's result holds these fields in .readout

    def rank_trajectory(self, target: str | int | None = None) -> torch.Tensor:
        """The rank of one target (a string as passed, or an id; None: the only one) at every
        entry, (entries, ...)."""
        if self.target_ranks is None or self.target_ids is None:
            raise SmallGPTError("rank_trajectory needs a lens run with targets=...")
        if target is None or self.per_row_targets:
            if not self.per_row_targets and self.target_ids.numel() != 1:
                raise SmallGPTError("pass target= when more than one target was requested")
            return self.target_ranks[..., 0]
        if isinstance(target, str):
            if target not in (self.target_names or []):
                raise SmallGPTError(f"{target!r} was not among the targets {self.target_names}")
            return self.target_ranks[..., self.target_names.index(target)]
        column = (self.target_ids == int(target)).nonzero()
        if not len(column):
            raise SmallGPTError(f"token id {target} was not among the targets")
        return self.target_ranks[..., int(column[0, 0])]


def _ids(model: Any, tokens: Any) -> torch.Tensor:
    """Token ids of an id, a single-token string, or a sequence of them."""
    if isinstance(tokens, (str, int)):
        tokens = [tokens]
    if isinstance(tokens, torch.Tensor):
        return tokens.long()
    return torch.tensor([model.to_single_token(t) if isinstance(t, str) else int(t)
                         for t in tokens], dtype=torch.long)


@torch.no_grad()
def logit_lens(cache: Any, *, layers: list[int] | None = None,
               incl_mid: bool = False, positions: Any = -1, batch_slice: Any = None,
               apply_ln: bool = True, vocab: Any = None, targets: Any = None,
               return_type: str = "logits", top_k: int | None = None) -> LogitLensResult:
    """Read the accumulated residual stream (`positions`, Slice semantics: default the last
    token) through the final norm and W_U. `layers` picks entries of the stack (negative ones
    count from the end). At most one of `targets` (single-token strings or ids, shared by
    every row; a tensor: one id per row, aligned with the trailing dims, e.g. (B,) for the
    default position), `top_k` and `vocab` (ids to keep). apply_ln=False reads the raw stream,
    which does not reproduce the model."""
    if return_type not in RETURN_TYPES:
        raise SmallGPTError(f"return_type: {return_type!r} is not one of {', '.join(RETURN_TYPES)}")
    if sum(x is not None for x in (vocab, targets, top_k)) > 1:
        raise SmallGPTError("pass at most one of targets, top_k and vocab")
    model = cache._model()
    stack, labels = cache.accumulated_resid(None, incl_mid, pos_slice=positions,
                                            return_labels=True)
    keep = list(range(len(labels))) if layers is None else list(layers)
    if any(not -len(labels) <= i < len(labels) for i in keep):
        raise SmallGPTError(f"layers {keep}: the stack has {len(labels)} entries, {labels}")
    keep = [i % len(labels) for i in keep]
    stack, labels = stack[keep], [labels[i] for i in keep]
    if cache.has_batch_dim:
        stack = take(stack, as_index(batch_slice), 1)
    per_row = isinstance(targets, torch.Tensor) and targets.ndim >= 1
    target_ids = None if targets is None else _ids(model, targets).to(stack.device)
    if per_row:
        target_ids = target_ids.expand(stack.shape[1:-1])
    vocab_ids = None if vocab is None else _ids(model, vocab).to(stack.device)
    rows: dict[str, list[torch.Tensor]] = {"values": [], "entropy": [], "top": [], "ranks": []}
    for entry in stack:  # one entry at a time, as the forward pass computes it
        logits = (model.unembed(entry) if apply_ln else entry @ model.W_U).float()
        log_probs = logits.log_softmax(dim=-1)
        rows["entropy"].append(-(log_probs.exp() * log_probs).sum(dim=-1))
        quantity = {"logits": logits, "log_probs": log_probs, "probs": log_probs.exp()}
        quantity = quantity[return_type]
        if target_ids is not None:
            picked = (target_ids[..., None] if per_row
                      else target_ids.expand(*logits.shape[:-1], -1))
            rows["values"].append(quantity.gather(-1, picked))
            rows["ranks"].append((logits[..., None, :] > logits.gather(-1, picked)[..., None])
                                 .sum(dim=-1))
        elif top_k is not None:
            top = logits.topk(top_k, dim=-1).indices
            rows["top"].append(top)
            rows["values"].append(quantity.gather(-1, top))
        else:
            rows["values"].append(quantity if vocab_ids is None else quantity[..., vocab_ids])
    stacked = {key: torch.stack(value) if value else None for key, value in rows.items()}
    names = None
    if targets is not None and not per_row:
        names = [t if isinstance(t, str) else None
                 for t in ([targets] if isinstance(targets, (str, int)) else targets)]
    return LogitLensResult(stacked["values"], labels, return_type, stacked["entropy"],
                           top_ids=stacked["top"], vocab_ids=vocab_ids, target_ids=target_ids,
                           target_ranks=stacked["ranks"], per_row_targets=per_row,
                           target_names=names)
