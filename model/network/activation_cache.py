"""What `GPT.run_with_cache` returns: activations by name, and the views tutorials build on them.

The residual stream is a sum. After layer L it is the embeddings plus every attention and MLP
output before it, and each attention output is the sum of its heads' results plus the output
bias. The methods here return those pieces stacked on a first "component" axis, with labels,
so that one matrix product against a token direction says how much each piece pushes the
logits there (direct logit attribution), and the residual stream after each layer, so that
reading it through the final norm and W_U shows each layer's prediction (the logit lens):

    logits, cache = model.run_with_cache(idx)
    parts, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)  # (comp, B, C)
    attrs = cache.logit_attrs(parts, right_ids, wrong_ids, pos_slice=-1)     # (comp, B)
    lens = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True) @ model.W_U

Every method that shares a name with TransformerLens 4.3's ActivationCache takes the same
arguments with the same meaning: `layer` None or -1 is the final residual stream, `pos_slice`
is an int (that axis dropped), a slice, a (start, stop[, step]) tuple, a list or tensor of
positions, or TransformerLens's own Slice. Arguments past the fifth are keyword-only here
(return_labels, incl_embeds, has_batch_dim, recompute_ln). One difference: our weights are not
folded (the final norm keeps its weight and bias); a TransformerLens helper that assumes folded
weights says in its docstring here what we do instead.

`torch.save(cache)` saves the activations without the model; `torch.load` gives back a cache
whose helpers that need the model (apply_ln, head results, token directions) ask for it:
`cache.model = model`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from model.errors import SmallGPTError
from model.network.slicing import as_index, take


class CachedModel(Protocol):
    """What the cache asks of the model that filled it (model.gpt.GPT is one)."""

    config: Any  # n_layer, and norm ("layernorm" centres, "rmsnorm" does not)
    ln_final: Any  # the final norm, a module

    def head_results(self, layer: int, z: torch.Tensor) -> torch.Tensor: ...

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor: ...


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

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: CachedModel | None,
                 has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        config = model.config if model is not None else None
        self.n_layer: int = config.n_layer if config is not None else 0
        # LayerNorm subtracts the mean before it divides by the scale; RMSNorm only divides.
        self.center = config is not None and config.norm == "layernorm"

    # -- a dict of tensors -----------------------------------------------------------------------

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

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def keys(self) -> Any:
        return self.cache_dict.keys()

    def values(self) -> Any:
        return self.cache_dict.values()

    def items(self) -> Any:
        return self.cache_dict.items()

    def to(self, device: str | torch.device) -> ActivationCache:
        """Every activation moved to `device`, in place; returns the cache."""
        self.cache_dict = {name: t.to(device) for name, t in self.cache_dict.items()}
        return self

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of a batch-1 cache, in place: (1, T, C) -> (T, C)."""
        if not self.has_batch_dim:
            return self
        sizes = {t.size(0) for t in self.cache_dict.values() if t.ndim}
        if sizes - {1}:
            raise SmallGPTError(f"remove_batch_dim needs a cache of batch size 1, this one has "
                                f"{max(sizes)}; select one row with apply_slice_to_batch_dim")
        self.cache_dict = {name: t[0] if t.ndim else t for name, t in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> ActivationCache:
        """A new cache holding the rows `batch_slice` selects (an int drops the batch axis)."""
        if not self.has_batch_dim:
            raise SmallGPTError("this cache has no batch axis to select from")
        index = as_index(batch_slice)
        return ActivationCache({name: take(t, index, 0) for name, t in self.cache_dict.items()},
                               self.model, has_batch_dim=not isinstance(index, int))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "model": None}  # the activations, not the model's weights

    def _model(self) -> CachedModel:
        if self.model is None:
            raise SmallGPTError("this cache has no model (it was loaded from a file): set "
                                "cache.model = model, the model that filled it")
        return self.model

    # -- the residual stream, stacked ----------------------------------------------------------

    def _layer(self, layer: int | None) -> int:
        """None and -1 mean the final residual stream (n_layer); -2 the input to the last
        block, and so on."""
        if layer is None:
            return self.n_layer
        return layer + self.n_layer + 1 if layer < 0 else layer

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False,
                          apply_ln: bool = False, pos_slice: Any = None,
                          mlp_input: bool = False, *, return_labels: bool = False) -> Any:
        """The residual stream entering each block up to and including block `layer` (None or
        -1: every block's, then the final stream), (components, B, T, C), labelled "0_pre",
        "0_mid" (incl_mid), ..., "final_post". mlp_input adds block `layer`'s resid_mid.
        apply_ln: up to the final stream, each entry through the final norm itself, its own
        statistics, weight and bias (so `@ W_U` is the logit lens); before it, as
        apply_ln_to_stack scales."""
        layer = self._layer(layer)
        index = as_index(pos_slice)
        parts, labels = [], []
        for i in range(layer + 1):
            if i == self.n_layer:
                parts.append(self["resid_post", self.n_layer - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = torch.stack([take(p, index, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice,
                                           recompute_ln=layer == self.n_layer)
        return (stack, labels) if return_labels else stack

    def logit_lens(self, **kwargs: Any) -> Any:
        """The logit lens over this cache: model/network/logit_lens.py's `logit_lens(cache,
        layers=, incl_mid=, positions=-1, targets=, top_k=, vocab=, return_type=)`."""
        from model.network.logit_lens import logit_lens

        return logit_lens(self, **kwargs)

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: str = "all", apply_ln: bool = False, pos_slice: Any = None, *,
                        incl_embeds: bool = True, return_labels: bool = False) -> Any:
        """The residual stream entering block `layer` (None or -1: the final one) as its
        summands: the embeddings, then each earlier block's attention and MLP output
        (mode "attn" or "mlp": only those; mlp_input: also block `layer`'s attention output).
        They add up to that residual stream exactly. apply_ln: see apply_ln_to_stack."""
        layer = self._layer(layer)
        parts, labels = [], []
        if incl_embeds:
            for name in ("embed", "pos_embed"):
                if f"hook_{name}" in self.cache_dict:
                    parts.append(self[f"hook_{name}"])
                    labels.append(name)
        for i in range(layer + (1 if mlp_input else 0)):
            if mode != "mlp":
                parts.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if mode != "attn" and i < layer:
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        index = as_index(pos_slice)
        stack = torch.stack([take(p.expand_as(parts[0]), index, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> torch.Tensor:
        """(B, T, H, C): each head's output in the residual stream, without the output bias.
        Cached `attn.hook_result` when present, else computed from `hook_z` and W_O."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self.cache_dict:
            return self.cache_dict[name]
        z = self["z", layer]
        if not self.has_batch_dim:
            return self._model().head_results(layer, z[None])[0]
        return self._model().head_results(layer, z)

    def compute_head_results(self) -> None:
        """Store every layer's `attn.hook_result` in the cache (stack_head_results computes
        them when needed without storing them: n_head times the residual stream's size)."""
        for layer in range(self.n_layer):
            self.cache_dict[f"blocks.{layer}.attn.hook_result"] = self.head_results(layer)

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: Any = None,
                           apply_ln: bool = False) -> Any:
        """Every head's result in the blocks before `layer` (None or -1: all), (components,
        B, T, C), labelled L{layer}H{head}; incl_remainder adds what the rest of the residual
        stream entering `layer` holds (biases, embeddings, MLPs), labelled "remainder"."""
        layer = self._layer(layer)
        index = as_index(pos_slice)
        results = [take(self.head_results(i), index, -3) for i in range(layer)]
        labels = [f"L{i}H{h}" for i, r in enumerate(results) for h in range(r.size(-2))]
        if results:
            stack = torch.cat(results, dim=-2).movedim(-2, 0)  # (..., heads, C) -> (heads, ..., C)
        else:
            shape = take(self["hook_embed"], index, -2).shape
            stack = self["hook_embed"].new_zeros(0, *shape)
        if incl_remainder:
            resid = take(self["resid_post", layer - 1], index, -2)
            stack = torch.cat([stack, (resid - stack.sum(dim=0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int | None = -1,
                         sublayer_type: str | None = None) -> torch.Tensor:
        """One activation of every block before `layer` (None or -1: all), stacked."""
        return torch.stack([self[activation_name, i, sublayer_type]
                            for i in range(self._layer(layer))])

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None,
                          mlp_input: bool = False, pos_slice: Any = None,
                          batch_slice: Any = None, *, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Each component scaled as the whole stream was by the norm before block `layer`
        (ln1, or ln2 with mlp_input; None or -1: the final norm): centred (LayerNorm) and
        divided by the cached scale, so the scaled components still add up to the normalized
        stream. The norm's weight and bias are not applied: TransformerLens folds them into the
        next weights, ours are not folded (logit_attrs puts the weight into its directions).
        pos_slice and batch_slice select the cached scale's positions and rows, to match a stack
        already sliced so; batch_slice also slices the stack. recompute_ln (final norm only):
        each component through the final norm itself, with its own statistics, weight and bias.
        """
        layer = self._layer(layer)
        batch = as_index(batch_slice)
        if has_batch_dim:
            residual_stack = take(residual_stack, batch, 1)
        if recompute_ln and layer == self.n_layer:
            norm = self._model().ln_final
            return torch.stack([norm(component) for component in residual_stack])
        if self.center:
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        if layer == self.n_layer:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self["scale", layer, "ln2" if mlp_input else "ln1"]
        scale = take(scale, as_index(pos_slice), -2)
        if self.has_batch_dim:
            scale = take(scale, batch, 0)
        return residual_stack / scale

    # -- direct logit attribution ----------------------------------------------------------------

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """For each token the direction whose dot product with the normalized final stream is
        that token's logit (less the norm's bias term): W_U[:, token] times the final norm's
        weight (TransformerLens folds that weight into W_U; ours is not folded)."""
        return self._model().tokens_to_residual_directions(tokens)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: Any,
                    incorrect_tokens: Any = None, pos_slice: Any = None,
                    batch_slice: Any = None, *, has_batch_dim: bool = True) -> torch.Tensor:
        """How much each component pushes the logit of `tokens` (minus that of
        `incorrect_tokens`): the stack through apply_ln_to_stack (final norm; pos_slice and
        batch_slice as there), dotted with tokens_to_residual_directions. Tokens are ids or
        single-token strings; a [batch] tensor picks one token per example. Summed over
        decompose_resid's components the attributions equal the logit (difference) less the
        final norm's bias term."""
        directions = self.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if _shape(tokens) != _shape(incorrect_tokens):
                raise SmallGPTError(f"tokens and incorrect_tokens must have the same shape, got "
                                    f"{_shape(tokens)} and {_shape(incorrect_tokens)}")
            directions = directions - self.tokens_to_residual_directions(incorrect_tokens)
        stack = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice,
                                       batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        if (has_batch_dim and stack.ndim == 4 and directions.ndim == 2
                and directions.size(0) == stack.size(1)
                and not isinstance(as_index(batch_slice), int)):
            directions = directions.unsqueeze(-2)  # one token per example, for every position
        return (stack * directions.to(stack.dtype)).sum(dim=-1)


def _shape(tokens: Any) -> tuple[int, ...]:
    return () if isinstance(tokens, (str, int)) else tuple(torch.as_tensor(tokens).shape)


# torch.load's default (weights_only) unpickles only allow-listed classes: this one holds tensors.
torch.serialization.add_safe_globals([ActivationCache])
