"""Hook points: read or change any intermediate activation of a GPT, by TransformerLens's names.

Each place in the forward pass that TransformerLens names (`blocks.0.attn.hook_pattern`,
`blocks.3.hook_resid_post`, ...) holds a HookPoint. A hook is `fn(tensor, hook)`: it returns
None to leave the activation as it is, or a tensor that replaces it for the rest of the pass.
`hook.name` says where it fired. A backward hook receives the activation's gradient instead.
`hook.positions` (batch, pos) is each token's index in its text during the pass (a GPT sets it
on every hooked point: it counts past the KV cache and generation's moving window; -1 marks
padding).

    logits, cache = model.run_with_cache(idx)                 # every activation, by name
    cache["blocks.0.attn.hook_pattern"]                       # (batch, head, query, key)
    model.run_with_hooks(idx, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_3)])
    with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_z"), show)]):
        model(idx)

Unused hook points cost one attribute check: a HookPoint is a plain object, not a module, and
returns its input untouched when nothing is registered, so training and generation run the same
kernels (fused attention) and `torch.compile` traces through them. A hooked attention pattern or
score switches that layer alone to explicit attention; per-head outputs (`attn.hook_result`) are
computed only while something is registered there. HookPoints hold no weights: checkpoints are
unaffected.

`hook_dict` finds the points again at each lookup (once per run_with_hooks, run_with_cache or
hooks() block, never per forward call: walking the modules costs 0.4 ms, 3% of a GPT-2 token),
so a module replaced after construction brings its own points under the same names and the
replaced module's are gone (a forward pass sets `positions` on the points the last lookup
found); a point named in run_with_hooks or run_with_cache that the forward pass never reaches
is an error naming it. A variant of the
attention reaches its queries and keys the public way: `self.split_qkv(self.qkv(x))`, through
`self.hook_q` / `hook_k` / `hook_v` (and `hook_rot_q` / `hook_rot_k` with rotary positions).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from model.errors import ConfigError
from model.network.activation_cache import ActivationCache

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class HookPoint:
    """One named activation. Calling it passes the tensor through the registered hooks."""

    def __init__(self) -> None:
        self.name = ""  # set by the model, e.g. "blocks.0.attn.hook_q"
        self.fwd: list[HookFn] = []
        self.bwd: list[HookFn] = []
        self.active = False  # fwd or bwd: the one flag the forward pass checks
        self.positions: torch.Tensor | None = None  # (B, T) set by the model while hooked

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        for fn in self.fwd:
            out = fn(x, self)
            if out is not None:
                x = out
        if self.bwd and x.requires_grad:
            x = x.view_as(x)  # a fresh node, so the gradient hook sees only this point's grad
            for fn in self.bwd:
                x.register_hook(lambda grad, fn=fn: fn(grad, self))
        return x

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """For a (B, H, T, D) tensor: hooks see it as (B, T, H, D), TransformerLens's layout."""
        return x if not self.active else self(x.transpose(1, 2)).transpose(1, 2)

    def add_hook(self, fn: HookFn, dir: str = "fwd") -> None:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        (self.fwd if dir == "fwd" else self.bwd).append(fn)
        self.active = True

    def remove_hook(self, fn: HookFn, dir: str = "fwd") -> None:
        (self.fwd if dir == "fwd" else self.bwd).remove(fn)
        self.active = bool(self.fwd or self.bwd)

    def remove_hooks(self) -> None:
        self.fwd, self.bwd, self.active = [], [], False

    def layer(self) -> int:
        """The block this point belongs to (TransformerLens's `hook.layer()`)."""
        match = re.match(r"blocks\.(\d+)\.", self.name)
        if match is None:
            raise ValueError(f"{self.name} is not inside a block")
        return int(match.group(1))

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, fwd={len(self.fwd)}, bwd={len(self.bwd)})"


def name_hook_points(root: torch.nn.Module,
                     renames: dict[str, str]) -> dict[str, HookPoint]:
    """Every HookPoint held by `root` or its submodules now, by TransformerLens name, each
    point's `name` set to it. `renames` maps our module names to theirs (norm1 -> ln1), so
    state_dict keys keep our names."""
    found: dict[str, HookPoint] = {}

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for attr, value in vars(module).items():
            if isinstance(value, HookPoint):
                value.name = prefix + attr
                found[value.name] = value
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{renames.get(name, name)}.")

    visit(root, "")
    return found


def _matcher(names: NameFilter) -> Callable[[str], bool]:
    if names is None:
        return lambda name: True
    if isinstance(names, str):
        return lambda name: name == names
    if callable(names):
        return names
    wanted = set(names)
    return lambda name: name in wanted


def _named(names: NameFilter) -> list[str]:
    """The names a filter spells out (a name or a list of them); none for a predicate."""
    if isinstance(names, str):
        return [names]
    return list(names) if isinstance(names, (list, tuple, set)) else []


RETURN_TYPES = ("logits", "loss", "both", None)


class HookedModel:
    """run_with_cache, run_with_hooks, hooks(): mixed into a model whose forward is
    `forward(idx, targets=None, **kwargs) -> (logits, loss)`, that turns text into token ids
    with `as_tokens` (model/network/text.py), and names our modules as TransformerLens does
    through `hook_renames`."""

    hook_renames: dict[str, str] = {}

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point of the model as it is now, by name. Found again at each lookup, so
        that a module replaced after construction (`model.blocks[0].attn = MyAttention(...)`)
        brings its own points under these names and the replaced module's are gone."""
        return self.find_hook_points()

    def find_hook_points(self) -> dict[str, HookPoint]:
        """Walk the modules for their hook points, naming each; a forward pass then checks
        the points found (`known_hook_points`) without walking again."""
        found = name_hook_points(self, self.hook_renames)  # type: ignore[arg-type]
        self.known_hook_points = list(found.values())
        return found

    def _points(self, names: NameFilter,
                hook_dict: dict[str, HookPoint] | None = None) -> list[HookPoint]:
        """The hook points a name, list of names or predicate selects; an unknown name is an
        error (a typo would otherwise silently hook nothing)."""
        hook_dict = self.hook_dict if hook_dict is None else hook_dict
        for name in _named(names):
            if name not in hook_dict:
                close = [n for n in hook_dict if n.endswith(name.split(".")[-1])][:3]
                hint = f"; e.g. {', '.join(close)}" if close else ""
                raise KeyError(f"no hook point named {name!r}{hint}")
        match = _matcher(names)
        return [hp for name, hp in hook_dict.items() if match(name)]

    def add_hook(self, name: NameFilter, fn: HookFn, dir: str = "fwd") -> None:
        """Register fn at every point `name` selects (a name or a predicate on names). It stays
        until `reset_hooks()`; prefer `hooks()` or `run_with_hooks`, which always remove it."""
        for hp in self._points(name):
            hp.add_hook(fn, dir)

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks()

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
              bwd_hooks: Sequence[tuple[NameFilter, HookFn]] = ()) -> Iterator[Any]:
        """Hooks registered for the `with` block and removed at its end, also on an exception
        (hooks added with add_hook stay). Run the backward pass inside the block for backward
        hooks to fire."""
        added: list[tuple[HookPoint, HookFn, str]] = []
        hook_dict = self.hook_dict
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    for hp in self._points(name, hook_dict):
                        hp.add_hook(fn, direction)
                        added.append((hp, fn, direction))
            yield self
        finally:
            for hp, fn, direction in added:
                hp.remove_hook(fn, direction)

    def run_with_hooks(self, input: Any, fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
                       *, return_type: str | None = "logits", **forward_kwargs: Any) -> Any:
        """One forward pass of `input` (token ids, a text or a list of texts) with the given
        hooks, removed afterwards. return_type as TransformerLens's: "logits" (B, T, V),
        "loss" (the mean next-token loss over the input), "both" (logits, loss), or None.
        A point named in fwd_hooks that the pass never reaches is an error naming it.
        (Backward hooks fire during loss.backward(): register them with `hooks()`.)"""
        fired: set[str] = set()
        named = sorted({name for names, _ in fwd_hooks for name in _named(names)})
        seen = [(named, lambda x, hook: fired.add(hook.name))] if named else []
        with self.hooks([*fwd_hooks, *seen]):
            out = self._forward_as(input, return_type, forward_kwargs)
        _check_fired(named, fired)
        return out

    def run_with_cache(self, input: Any, names_filter: NameFilter = None, detach: bool = True,
                       *, return_type: str | None = "logits", remove_batch_dim: bool = False,
                       **forward_kwargs: Any) -> tuple[Any, ActivationCache]:
        """The output (return_type as in run_with_hooks) and an ActivationCache of every
        activation `names_filter` selects. The default takes all but the per-head results
        (`attn.hook_result`, n_head times the residual's size; the cache computes them from
        `hook_z` when asked). detach=False keeps the activations in the autograd graph, for
        gradients with respect to them. remove_batch_dim: the cache of a batch-1 input without
        its batch axis."""
        if names_filter is None:
            names_filter = lambda name: not name.endswith("attn.hook_result")  # noqa: E731

        store: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = x.detach() if detach else x

        with self.hooks([(names_filter, save)]):
            out = self._forward_as(input, return_type, forward_kwargs)
        _check_fired(_named(names_filter), store)
        cache = ActivationCache(store, self)  # type: ignore[arg-type]
        return out, cache.remove_batch_dim() if remove_batch_dim else cache

    def _forward_as(self, input: Any, return_type: str | None,
                    forward_kwargs: dict[str, Any]) -> Any:
        """The forward pass of run_with_hooks and run_with_cache, returning `return_type`."""
        if return_type not in RETURN_TYPES:
            raise ConfigError(f"return_type: {return_type!r} is not one of "
                              "'logits', 'loss', 'both' or None")
        idx = self.as_tokens(input)  # type: ignore[attr-defined]
        targets = None
        if return_type in ("loss", "both"):  # each position predicts the next token
            targets = F.pad(idx[:, 1:], (0, 1), value=-1)
            mask = forward_kwargs.get("attention_mask")
            if mask is not None:  # padding is never a target
                targets = targets.masked_fill(F.pad(mask[:, 1:], (0, 1)) == 0, -1)
        logits, loss = self(idx, targets, **forward_kwargs)  # type: ignore[operator]
        return {"logits": logits, "loss": loss, "both": (logits, loss), None: None}[return_type]


def _check_fired(named: Sequence[str], fired: Any) -> None:
    """A hook point asked for by name that the forward pass did not reach: its module holds it
    but never calls it (a forward replaced without its hook points)."""
    silent = [name for name in named if name not in fired]
    if silent:
        raise KeyError(f"hook point {silent[0]!r} did not fire in the forward pass: its module "
                       "never calls it; hook a point that the module's forward calls")
