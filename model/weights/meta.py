"""A model built without memory, then given loaded tensors: how every loader builds one.

On the meta device a module has shapes but no storage, and no random init runs for weights
that loading is about to replace. `on_meta` builds it there; `assign_state` makes loaded
tensors its parameters, uncopied, and ties again what the model ties (W_U = W_E).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from model.gpt import GPTConfig


def on_meta(model_class: Callable[..., nn.Module], config: GPTConfig,
            dtype: torch.dtype | None = None) -> nn.Module:
    """`model_class(config, device="meta")`, in `dtype` (None: as built), the dtype the
    weights to be loaded are read in: each tensor is converted once, the weights as they are
    read and the tensors the constructor makes (GPT's rotary table) here.

    A class whose constructor takes no `device` is built the plain way, random init and all, as
    is one that fails on meta (its __init__ reads a tensor's values: .item(), numpy). Tensors
    that a class keeps outside its state dict stay on meta, as loading cannot fill them:
    `holds_meta_tensors` says so afterwards.
    """
    if "device" not in inspect.signature(model_class).parameters:
        return model_class(config).to(dtype)
    try:
        model = model_class(config, device="meta")
    except Exception:  # any failure on meta; the plain build raises what is really wrong, if any
        model = model_class(config)
    return model.to(dtype)


def holds_meta_tensors(model: nn.Module) -> bool:
    """Whether any parameter, buffer or plain tensor attribute of `model` is still on meta."""
    return any(isinstance(value, torch.Tensor) and value.is_meta
               for module in model.modules()
               for value in (*vars(module).values(), *module.parameters(recurse=False),
                             *module.buffers(recurse=False)))


def tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that the model holds under more than one name."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], *,
                 strict: bool = True) -> tuple[list[str], list[str]]:
    """Make the tensors of `state` the parameters of `model`, uncopied; load_state_dict's
    missing and unexpected names (strict: raised instead).

    For a model from `on_meta`: assign gives every name a Parameter of its own, so the
    parameters the model ties (W_U = W_E) are made one again.
    """
    tied = tied_names(model)
    missing, unexpected = model.load_state_dict(state, strict=strict, assign=True)
    for first, *others in tied:
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    return missing, unexpected
