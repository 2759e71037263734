"""Activation patching sweeps, as TransformerLens's `transformer_lens.patching` runs them.

Run the corrupted input, put back one piece of the clean run's activations (one layer and
position of the residual stream, one head's output, ...), and score the logits with a metric;
one patched forward pass per piece. The result holds one score per piece:

    from model import patching
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    resid = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)
    # (n_layer, pos)
    heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache,
                                                         metric)  # (n_layer, n_head)

`metric(logits) -> scalar tensor` (e.g. a logit difference). Each function takes
`(model, corrupted_tokens, clean_cache, patching_metric)` and returns the shape and values
TransformerLens's function of the same name returns; TransformerLens's extras (index_df,
reduce=, baseline=, several metrics at once) are left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from model.errors import SmallGPTError
from model.network.activation_cache import ActivationCache, act_name

Metric = Callable[[torch.Tensor], torch.Tensor]
# patch_setter(corrupted activation, index (layer first), clean activation) -> patched one
PatchSetter = Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor]


def generic_activation_patch(model: Any, corrupted_tokens: torch.Tensor,
                             clean_cache: ActivationCache, patching_metric: Metric, *,
                             patch_setter: PatchSetter, activation_name: str,
                             index_axis_names: Sequence[str]) -> torch.Tensor:
    """The metric after patching each index of `index_axis_names` ("layer" first, then "pos",
    "head", "dest_pos" or "src_pos"), one patched forward pass each; a tensor with one axis
    per name."""
    if model.training:
        raise SmallGPTError("activation patching needs the model in evaluation mode (dropout "
                            "would make every run differ): call model.eval() first")
    c = model.config
    heads = c.kv_heads if activation_name in ("k", "v") else c.n_head
    pos = corrupted_tokens.shape[-1]
    sizes = {"layer": c.n_layer, "pos": pos, "dest_pos": pos, "src_pos": pos,
             "head": heads, "head_index": heads}
    ranges = [sizes[axis] for axis in index_axis_names]
    results = torch.zeros(ranges, device=corrupted_tokens.device)
    for index in itertools.product(*(range(n) for n in ranges)):
        name = act_name(activation_name, index[0])
        clean = clean_cache[name]

        def patch(corrupted: torch.Tensor, hook: Any, index: tuple = index,
                  clean: torch.Tensor = clean) -> torch.Tensor:
            if corrupted.requires_grad:
                corrupted = corrupted.clone()
            return patch_setter(corrupted, index, clean)

        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, patch)])
        results[index] = patching_metric(logits).detach()
    return results


# Where each index puts the clean values. Vectors are (batch, pos, ...) and per-head vectors
# (batch, pos, head, ...); attention patterns and scores are (batch, head, dest_pos, src_pos).
def layer_pos_patch_setter(corrupted: torch.Tensor, index: Sequence[int],
                           clean: torch.Tensor) -> torch.Tensor:
    _, pos = index
    corrupted[:, pos] = clean[:, pos]
    return corrupted


def layer_pos_head_vector_patch_setter(corrupted: torch.Tensor, index: Sequence[int],
                                       clean: torch.Tensor) -> torch.Tensor:
    _, pos, head = index
    corrupted[:, pos, head] = clean[:, pos, head]
    return corrupted


def layer_head_vector_patch_setter(corrupted: torch.Tensor, index: Sequence[int],
                                   clean: torch.Tensor) -> torch.Tensor:
    _, head = index
    corrupted[:, :, head] = clean[:, :, head]
    return corrupted


def layer_head_pattern_patch_setter(corrupted: torch.Tensor, index: Sequence[int],
                                    clean: torch.Tensor) -> torch.Tensor:
    _, head = index
    corrupted[:, head] = clean[:, head]
    return corrupted


def layer_head_pos_pattern_patch_setter(corrupted: torch.Tensor, index: Sequence[int],
                                        clean: torch.Tensor) -> torch.Tensor:
    _, head, dest = index
    corrupted[:, head, dest] = clean[:, head, dest]
    return corrupted


def _sweep(name: str, setter: PatchSetter, axes: tuple[str, ...], doc: str) -> Any:
    fn = partial(generic_activation_patch, patch_setter=setter, activation_name=name,
                 index_axis_names=axes)
    fn.__doc__ = f"{doc}: the metric for each patch, ({', '.join(axes)})."
    return fn


_BY_POS, _ALL_POS = ("layer", "pos", "head"), ("layer", "head")
get_act_patch_resid_pre = _sweep("resid_pre", layer_pos_patch_setter, ("layer", "pos"),
                                 "The residual stream entering each block, by position")
get_act_patch_resid_mid = _sweep("resid_mid", layer_pos_patch_setter, ("layer", "pos"),
                                 "The residual stream between attention and MLP, by position")
get_act_patch_attn_out = _sweep("attn_out", layer_pos_patch_setter, ("layer", "pos"),
                                "Each attention layer's output, by position")
get_act_patch_mlp_out = _sweep("mlp_out", layer_pos_patch_setter, ("layer", "pos"),
                               "Each MLP's output, by position")
get_act_patch_attn_head_out_by_pos = _sweep(
    "z", layer_pos_head_vector_patch_setter, _BY_POS, "Each head's output (z), by position")
get_act_patch_attn_head_q_by_pos = _sweep(
    "q", layer_pos_head_vector_patch_setter, _BY_POS, "Each head's queries, by position")
get_act_patch_attn_head_k_by_pos = _sweep(
    "k", layer_pos_head_vector_patch_setter, _BY_POS, "Each key head's keys, by position")
get_act_patch_attn_head_v_by_pos = _sweep(
    "v", layer_pos_head_vector_patch_setter, _BY_POS, "Each value head's values, by position")
get_act_patch_attn_head_pattern_by_pos = _sweep(
    "pattern", layer_head_pos_pattern_patch_setter, ("layer", "head", "dest_pos"),
    "Each head's attention pattern, by destination position")
get_act_patch_attn_head_out_all_pos = _sweep(
    "z", layer_head_vector_patch_setter, _ALL_POS, "Each head's output (z), at every position")
get_act_patch_attn_head_q_all_pos = _sweep(
    "q", layer_head_vector_patch_setter, _ALL_POS, "Each head's queries, at every position")
get_act_patch_attn_head_k_all_pos = _sweep(
    "k", layer_head_vector_patch_setter, _ALL_POS, "Each key head's keys, at every position")
get_act_patch_attn_head_v_all_pos = _sweep(
    "v", layer_head_vector_patch_setter, _ALL_POS, "Each value head's values, at every position")
get_act_patch_attn_head_pattern_all_pos = _sweep(
    "pattern", layer_head_pattern_patch_setter, _ALL_POS, "Each head's attention pattern")
