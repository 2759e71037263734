"""What `GPT.run_with_cache` returns: activations by name, and the views tutorials build on them.

The residual stream is a sum. After layer L it is the embeddings plus every attention and MLP
output before it, and each attention output is the sum of its heads' results plus the output
bias. The methods here return those pieces stacked on a first "component" axis, with labels,
so that one matrix product against a token direction says how much each piece pushes the
logits there (direct logit attribution):

    logits, cache = model.run_with_cache(idx)
    parts, labels = cache.decompose_resid(return_labels=True)      # (components, B, T, C)
    scaled = cache.apply_ln_to_stack(parts)                        # through the final norm
    attrs = cache.logit_attrs(scaled, tokens=ids_right, incorrect_tokens=ids_wrong)

Names and semantics follow TransformerLens's ActivationCache. One difference: our weights are
not folded, so `logit_attrs` folds the final norm's weight into the token directions itself
(W_U[token] * ln_final.weight); summed over the full decomposition, the attributions then equal
the logits minus the final norm's bias term.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch


class CachedModel(Protocol):
    """What the cache asks of the model that filled it (model.gpt.GPT is one)."""

    config: Any  # n_layer, and norm ("layernorm" centres, "rmsnorm" does not)

    def head_results(self, layer: int, z: torch.Tensor) -> torch.Tensor: ...

    def tokens_to_residual_directions(self, tokens: int | torch.Tensor) -> torch.Tensor: ...


# Short names (TransformerLens's utils.get_act_name) -> where they live in a block.
_IN_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "attn_scores", "pattern", "result"}
_IN_MLP = {"pre", "post"}
_IN_BLOCK = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook name: act_name("pattern", 0) -> "blocks.0.attn.hook_pattern",
    act_name("scale", 1, "ln2"), act_name("scale") -> "ln_final.hook_scale"."""
    if "." in name or name.startswith("hook_"):
        return name
    if name in ("embed", "pos_embed"):
        return f"hook_{name}"
    if name in ("scale", "normalized"):
        if layer is None:
            return f"ln_final.hook_{name}"
        return f"blocks.{layer}.{layer_type or 'ln1'}.hook_{name}"
    if layer is None:
        raise KeyError(f"{name!r} needs a layer, e.g. cache[{name!r}, 0]")
    if name in _IN_ATTN:
        return f"blocks.{layer}.attn.hook_{name}"
    if name in _IN_MLP:
        return f"blocks.{layer}.mlp.hook_{name}"
    if name in _IN_BLOCK:
        return f"blocks.{layer}.hook_{name}"
    raise KeyError(f"unknown activation {name!r}")


class ActivationCache:
    """Activations by hook name. cache["blocks.0.hook_resid_post"] or cache["resid_post", 0]."""

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: CachedModel) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.n_layer = model.config.n_layer

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        if isinstance(key, tuple):
            name, layer, *rest = key
            if layer is not None and layer < 0:
                layer += self.n_layer
            key = act_name(name, layer, *rest)
        elif key not in self.cache_dict and "." not in key and not key.startswith("hook_"):
            key = act_name(key)  # "embed", "scale": names outside the blocks
        if key not in self.cache_dict:
            raise KeyError(f"{key!r} is not in the cache (was it left out by names_filter?)")
        return self.cache_dict[key]

    def __contains__(self, key: str) -> bool:
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self) -> Any:
        return self.cache_dict.keys()

    def items(self) -> Any:
        return self.cache_dict.items()

    def _layer(self, layer: int | None) -> int:
        """None means after the last block; a negative layer counts from the end."""
        if layer is None:
            return self.n_layer
        return layer + self.n_layer if layer < 0 else layer

    @staticmethod
    def _stack(parts: list[torch.Tensor], labels: list[str], pos_slice: Any,
               return_labels: bool) -> Any:
        stack = torch.stack(parts)  # (components, B, T, C)
        if pos_slice is not None:
            stack = stack[:, :, pos_slice]
        return (stack, labels) if return_labels else stack

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False,
                          apply_ln: bool = False, pos_slice: Any = None,
                          return_labels: bool = False) -> Any:
        """The residual stream before each block up to `layer` (exclusive; None: all, and the
        final stream), (components, B, T, C): what the logit lens reads."""
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer):
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if incl_mid:
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        if layer == self.n_layer:
            parts.append(self["resid_post", self.n_layer - 1])
            labels.append("final_post")
        out = self._stack(parts, labels, pos_slice, True)
        stack = self.apply_ln_to_stack(out[0], layer) if apply_ln else out[0]
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, *,
                        apply_ln: bool = False, pos_slice: Any = None,
                        incl_embeds: bool = True, return_labels: bool = False) -> Any:
        """The residual stream before `layer` (None: the final one) as its summands: the
        embeddings, then each earlier block's attention and MLP output (mlp_input: also this
        block's attention output). They add up to that residual stream exactly."""
        layer = self._layer(layer)
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"])
            labels.append("embed")
            if "hook_pos_embed" in self.cache_dict:
                parts.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for i in range(layer + (1 if mlp_input else 0)):
            parts.append(self["attn_out", i])
            labels.append(f"{i}_attn_out")
            if i < layer:
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        parts = [p.expand_as(parts[0]) for p in parts]
        stack = self._stack(parts, labels, pos_slice, False)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> torch.Tensor:
        """(B, T, H, C): each head's output in the residual stream, without the output bias.
        Cached `attn.hook_result` when present, else computed from `hook_z` and W_O."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self.cache_dict:
            return self.cache_dict[name]
        return self.model.head_results(layer, self["z", layer])

    def stack_head_results(self, layer: int | None = None, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: Any = None,
                           apply_ln: bool = False) -> Any:
        """Every head's result in the blocks before `layer` (None: all), (components, B, T, C),
        labelled L{layer}H{head}; incl_remainder adds what the rest contributes to the stream."""
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer):
            results = self.head_results(i)
            for h in range(results.size(2)):
                parts.append(results[:, :, h])
                labels.append(f"L{i}H{h}")
        if incl_remainder:
            resid = (self["resid_post", layer - 1] if layer == self.n_layer
                     else self["resid_pre", layer])
            parts.append(resid - sum(parts))
            labels.append("remainder")
        stack = self._stack(parts, labels, pos_slice, False)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None,
                          mlp_input: bool = False, pos_slice: Any = None) -> torch.Tensor:
        """Each component scaled as the whole stream was by the norm before `layer` (None: the
        final norm): centred (LayerNorm) and divided by the cached scale, weight not applied.
        Linear, so the scaled components still add up to the normalized stream."""
        layer = self._layer(layer)
        if layer == self.n_layer:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self["scale", layer, "ln2" if mlp_input else "ln1"]
        if pos_slice is not None:
            scale = scale[:, pos_slice]
        if self.model.config.norm == "layernorm":
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        return residual_stack / scale

    def tokens_to_residual_directions(self, tokens: int | torch.Tensor) -> torch.Tensor:
        """For each token the direction whose dot product with the normalized final stream is
        that token's logit (less the norm's bias term): W_U[token] * ln_final.weight."""
        return self.model.tokens_to_residual_directions(tokens)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: int | torch.Tensor,
                    incorrect_tokens: int | torch.Tensor | None = None,
                    pos_slice: Any = None) -> torch.Tensor:
        """How much each component pushes the logit of `tokens` (minus that of
        `incorrect_tokens`): (components, ...) dot products with the token directions.
        Pass a stack already through apply_ln_to_stack."""
        if pos_slice is not None:
            residual_stack = residual_stack[:, :, pos_slice]
        directions = self.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            directions = directions - self.tokens_to_residual_directions(incorrect_tokens)
        return (residual_stack * directions.to(residual_stack.dtype)).sum(dim=-1)

