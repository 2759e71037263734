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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

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
    """Every HookPoint held by `root` or its submodules, by TransformerLens name. `renames` maps
    our module names to theirs (norm1 -> ln1), so state_dict keys keep our names."""
    found = {}
    for path, module in root.named_modules():
        parts = [renames.get(p, p) for p in path.split(".") if p]
        for attr, value in vars(module).items():
            if isinstance(value, HookPoint):
                value.name = ".".join([*parts, attr])
                found[value.name] = value
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


class HookedModel:
    """run_with_cache, run_with_hooks, hooks(): mixed into a model that sets `hook_dict` and
    whose forward returns (logits, ...)."""

    hook_dict: dict[str, HookPoint]

    def _points(self, names: NameFilter) -> list[HookPoint]:
        """The hook points a name, list of names or predicate selects; an unknown name is an
        error (a typo would otherwise silently hook nothing)."""
        if isinstance(names, str) and names not in self.hook_dict:
            close = [n for n in self.hook_dict if n.endswith(names.split(".")[-1])][:3]
            hint = f"; e.g. {', '.join(close)}" if close else ""
            raise KeyError(f"no hook point named {names!r}{hint}")
        if isinstance(names, (list, tuple, set)):
            unknown = [n for n in names if n not in self.hook_dict]
            if unknown:
                raise KeyError(f"no hook point named {unknown[0]!r}")
        match = _matcher(names)
        return [hp for name, hp in self.hook_dict.items() if match(name)]

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
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    for hp in self._points(name):
                        hp.add_hook(fn, direction)
                        added.append((hp, fn, direction))
            yield self
        finally:
            for hp, fn, direction in added:
                hp.remove_hook(fn, direction)

    def run_with_hooks(self, idx: torch.Tensor,
                       fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (), *,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, T, V) of one forward pass with the given hooks, removed afterwards.
        (Backward hooks fire during loss.backward(): register them with `hooks()`.)
        attention_mask (1 = token, 0 = padding) goes to the model's forward."""
        with self.hooks(fwd_hooks):
            return self(idx, attention_mask=attention_mask)[0]

    def run_with_cache(self, idx: torch.Tensor, names_filter: NameFilter = None,
                       detach: bool = True, *, attention_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits and every activation `names_filter` selects, in a dict by name (GPT wraps
        it in an ActivationCache). The default takes all but the per-head results
        (`attn.hook_result`, n_head times the residual's size; the cache computes them from
        `hook_z` when asked). detach=False keeps the activations in the autograd graph, for
        gradients with respect to them. attention_mask goes to the model's forward."""
        if names_filter is None:
            names_filter = lambda name: not name.endswith("attn.hook_result")  # noqa: E731

        store: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = x.detach() if detach else x

        points = self._points(names_filter)
        with self.hooks([(lambda name, wanted={hp.name for hp in points}: name in wanted,
                          save)]):
            logits = self(idx, attention_mask=attention_mask)[0]
        return logits, store
