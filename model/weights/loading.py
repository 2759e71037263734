"""One name for a model, everywhere: `load_model(name)` returns the network and its tokenizer.

A name is
  - empty / None: the newest smallgpt checkpoint under out/;
  - gpt2, gpt2-medium, gpt2-large, gpt2-xl: OpenAI's weights on the Hugging Face hub
    (openai-community/<name>), downloaded once into the usual Hugging Face cache (config.json
    and model.safetensors only) and read from there afterwards, offline too;
  - a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin) of GPT-2
    or of a family model/weights/hf.py reads (Llama, Qwen3, ...);
  - a smallgpt run directory or checkpoint directory; a LoRA run's (train.lora_rank) gives its
    base with the adapters merged in (load_lora_run).
train.init_from, `sample.py --checkpoint` and `python -m model.explore --checkpoint` all go
through here, and every kind of name gives the same result type, `Pretrained`.

A name is resolved once per load: `locate` finds its files (and reads a checkpoint's stored
config), and the `Located` it returns serves `parameter_count` (to choose a dtype before any
weight is read), `load_model` and the description the user is shown.

Loading reads downward only: this module puts the pieces together from checkpoint.py
(smallgpt's files) and hf.py (the Hugging Face layout), which build on model/gpt.py.
A checkpoint never names code to run: a model of your own class loads with `model_class=`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from model.config import Config, DataConfig
from model.data.tokenizer import Tokenizer, tokenizer_from_spec
from model.errors import CheckpointError, SmallGPTError
from model.gpt import GPT, GPTConfig
from model.network import lora
from model.weights.checkpoint import (
    find_checkpoints,
    listing,
    load_state,
    load_weights,
    read_checkpoint_config,
    read_lora_base,
    resolve_checkpoint,
)
from model.weights.hf import load_hf
from model.weights.meta import assign_state, holds_meta_tensors, on_meta

HUB_NAMES = {name: f"openai-community/{name}"
             for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HUB_FILES = ["config.json", "model.safetensors"]


@dataclass(kw_only=True)
class Pretrained:
    """A loaded model in eval mode, with what it needs to be used and what a user should be
    told; the same for a smallgpt run and for Hugging Face weights."""

    model: nn.Module  # a GPT, or the `model_class` it was loaded with
    tokenizer: Tokenizer
    kind: Literal["smallgpt", "huggingface"]  # huggingface: the hub or a directory
    path: Path  # the directory the weights came from
    description: str  # one line for the user: what was loaded, from where
    # A smallgpt run's resolved config; for Hugging Face weights, their shape and tokenizer
    # (None: built by hand).
    config: Config | None = None
    state: dict[str, Any] = field(default_factory=dict)  # smallgpt: step, losses, resume state

    @property
    def chat_trained(self) -> bool:
        """Whether the model was fine-tuned on conversations: its run's config says the data
        was chat data (data.format "chat", which the chat configs set)."""
        return self.config is not None and self.config.data.format == "chat"


@dataclass(frozen=True)
class Located:
    """A model name resolved to its files: a Hugging Face directory, or a smallgpt checkpoint
    directory with the config stored in it."""

    name: str  # as given; with none, the newest checkpoint's directory
    path: Path  # the Hugging Face directory, or the checkpoint directory
    hub: str | None = None  # a hub name's repository (openai-community/<name>)
    config: Config | None = None  # a smallgpt checkpoint's stored config; None: Hugging Face
    tokenizer_spec: dict[str, Any] | None = None  # a smallgpt checkpoint's

    @property
    def kind(self) -> Literal["smallgpt", "huggingface"]:
        return "huggingface" if self.config is None else "smallgpt"


def locate(name: str | Path | None = None, *, root: str | Path = "out") -> Located:
    """The files `name` stands for (see the module docstring); with no name, the newest
    checkpoint under `root`. A smallgpt checkpoint's config.json is read here, once."""
    if not name:
        found = find_checkpoints(root)
        if not found:
            raise CheckpointError(
                f"no checkpoint under {str(root)}/; train one (python train.py --config "
                "small.yaml) or name a model, e.g. --checkpoint gpt2")
        name = found[0]
    if str(name) in HUB_NAMES:
        return Located(str(name), hub_snapshot(str(name)), hub=HUB_NAMES[str(name)])
    if is_hf_directory(Path(name)):
        return Located(str(name), Path(name))
    ckpt = resolve_checkpoint(name)
    try:
        config, spec = read_checkpoint_config(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {listing()}") from exc
    return Located(str(name), ckpt, config=config, tokenizer_spec=spec)


def _located(name: str | Path | Located | None, root: str | Path) -> Located:
    return name if isinstance(name, Located) else locate(name, root=root)


def load_model(name: str | Path | Located | None = None, device: str | torch.device = "cpu", *,
               root: str | Path = "out",
               model_class: Callable[[GPTConfig], nn.Module] = GPT,
               dtype: torch.dtype | None = None) -> Pretrained:
    """The model called `name` (see the module docstring, or a `locate` result), in eval mode
    on `device`. `model_class` builds a smallgpt checkpoint's network from its stored
    GPTConfig: pass the GPT subclass (or module) a variant was trained with. `dtype` converts
    the weights as they are read (None: float32), so gpt2-xl in bfloat16 never holds its
    float32 copy."""
    located = _located(name, root)
    if located.kind == "huggingface":
        loaded = _hf(located, device, dtype)
    else:
        loaded = _smallgpt(located, device, model_class, dtype)
    loaded.model.tokenizer = loaded.tokenizer  # model.to_tokens(...), text in forward
    return loaded


def parameter_count(name: str | Path | Located | None = None, *,
                    root: str | Path = "out") -> int:
    """How many parameters the model `name` (or a `locate` result) has, read from its files
    without loading its weights: the dtype to hold them in can then be chosen before they
    are read."""
    located = _located(name, root)
    if located.kind == "smallgpt":  # shapes only: the count of a LoRA run's merged model too
        return _count_parameters(on_meta(GPT, located.config.model))
    weights = located.path / "model.safetensors"
    if not weights.is_file():  # a pytorch_model.bin: float32, 4 bytes a parameter
        return (located.path / "pytorch_model.bin").stat().st_size // 4
    try:
        with safe_open(weights, framework="pt") as file:  # reads the header only
            return sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys()
                       # older GPT-2 files hold causal masks, not parameters
                       if not key.endswith((".attn.bias", ".attn.masked_bias")))
    except Exception as exc:  # the format's own errors for a truncated or corrupt file
        raise CheckpointError(f"cannot read {str(weights)!r}, it looks truncated or "
                              f"corrupt ({type(exc).__name__})") from exc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *,
                    model_class: Callable[[GPTConfig], nn.Module] = GPT) -> Pretrained:
    """`load_model(path, ...)`, the public API's other name for it."""
    return load_model(path, device, model_class=model_class)


def _smallgpt(located: Located, device: str | torch.device,
              model_class: Callable[[GPTConfig], nn.Module],
              dtype: torch.dtype | None) -> Pretrained:
    """A smallgpt checkpoint, rebuilt with `model_class`. Every error, for a missing or a
    damaged checkpoint, lists the checkpoints that exist."""
    ckpt, config = located.path, located.config
    lora_run = config.train.lora_rank is not None
    try:
        try:
            tokenizer = tokenizer_from_spec(located.tokenizer_spec)
        except SmallGPTError as exc:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: tokenizer spec is invalid: {exc}") from exc
        if not lora_run:
            model = _built_with_weights(model_class, config.model, ckpt, device, dtype)
        state = load_state(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {listing()}") from exc
    if lora_run:  # adapters: the base, with them merged in, then in dtype
        model = load_lora_run(ckpt, config).to(dtype)
    model.to(device).eval()
    description = f"smallgpt checkpoint {ckpt} (step {state.get('step')}, {_params(model)})"
    if lora_run:
        description += f", LoRA adapters merged into {config.train.init_from}"
    return Pretrained(model=model, tokenizer=tokenizer, kind="smallgpt", path=ckpt,
                      description=description, config=config, state=state)


def _built_with_weights(model_class: Callable[[GPTConfig], nn.Module], config: GPTConfig,
                        ckpt: Path, device: str | torch.device,
                        dtype: torch.dtype | None) -> nn.Module:
    """model_class(config) holding the checkpoint's weights, read in `dtype`. Built on the
    meta device (no random init for the weights about to replace it), or the plain way for a
    class that keeps tensors outside its state dict, which loading cannot fill."""
    model = on_meta(model_class, config, dtype)
    load_weights(model, ckpt, device, dtype=dtype, assign=True)
    if holds_meta_tensors(model):
        model = model_class(config).to(dtype)
        load_weights(model, ckpt, device, dtype=dtype)
    return model


def load_lora_run(ckpt: Path, config: Config) -> GPT:
    """A LoRA checkpoint's model: its base, loaded as train.init_from named it and checked
    against the digest the run recorded, with the saved adapters merged into its weights."""
    record = read_lora_base(ckpt)
    where = record.get("path") or record["name"]  # the absolute directory, where there is one
    if "path" in record and not Path(where).exists():
        raise CheckpointError(f"{where}: the base of LoRA run {str(ckpt)!r} is missing; put it "
                              "back there, or fine-tune again from another base")
    try:
        base = load_model(where, "cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: the base of LoRA run {str(ckpt)!r} cannot be loaded: "
                              f"{exc}") from exc
    lora.check_base(record, lora.weights_digest(base.model), str(base.path), str(ckpt))
    model, _ = model_from_source(config.model, base)  # the run's shape: block_size cropped
    lora.apply(model, config.train.lora)
    load_weights(model, ckpt)  # a model with adapters takes the adapters alone
    return lora.merge(model)


def model_from_source(config: GPTConfig, source: Pretrained) -> tuple[GPT, str]:
    """A model of `config` (adopt_source's) whose parameters are the source's tensors, its
    position table cropped to config.block_size; and a line saying what was loaded.

    The model is built on the meta device and takes the tensors themselves: no random init
    runs for weights about to be replaced, and memory holds them once, not twice. The source
    model shares them afterwards; drop it before training.
    """
    state = source.model.state_dict()
    before, after = source.model.config.block_size, config.block_size
    if "pos_emb.weight" in state and after < before:
        # A copy of the kept rows, so the parameter does not hold on to the whole table.
        state["pos_emb.weight"] = state["pos_emb.weight"][:after].clone()
    model = on_meta(GPT, config)
    assign_state(model, state)
    crop = f", block_size cropped {before} -> {after}" if after < before else ""
    # keep_vars: the Parameters themselves, so a tied W_E/W_U counts once (state_dict's
    # detached tensors are new objects under each name).
    tensors = len({id(t) for t in model.state_dict(keep_vars=True).values()})
    return model, (f"init_from {source.description}: {tensors} tensors loaded, "
                   f"{_count_parameters(model):,} parameters{crop}")


def lora_base_record(name: str, source: Pretrained) -> dict[str, str]:
    """What a LoRA run started from `source` (loaded by `name`) records about its base."""
    path = None if name in HUB_NAMES else source.path.resolve()  # the hub's: by name
    return lora.base_record(name, source.model, path)


def _hf(located: Located, device: str | torch.device, dtype: torch.dtype | None) -> Pretrained:
    """Weights in a Hugging Face directory (GPT-2, Llama, Qwen3, ...: hf.py reads them) with
    their tokenizer; the config holds their shape and the tokenizer's name."""
    directory = located.path
    model, tokenizer, model_type = load_hf(directory, dtype or torch.float32)
    model.to(device).eval()
    config = Config(model=model.config, data=DataConfig(tokenizer=tokenizer.name),
                    name=directory.name)
    if located.hub is not None:
        description = f"{located.name} ({located.hub}, {_params(model)}) from {directory}"
    else:
        what = "GPT-2" if model_type == "gpt2" else model_type
        description = f"{what} weights ({_params(model)}) from {directory}"
    return Pretrained(model=model, tokenizer=tokenizer, kind="huggingface", path=directory,
                      description=description, config=config)


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model directory: its config.json names a model_type (ours does not)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def hub_snapshot(name: str) -> Path:
    """The local directory of OpenAI's `name` weights: from the Hugging Face cache when they
    are there (no network needed), else downloaded into it once."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(HUB_NAMES[name], allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"{name}: not in the Hugging Face cache and the hub cannot be reached "
            f"({type(exc).__name__}); connect once to download it, or pass a local GPT-2 "
            "directory (config.json + model.safetensors) instead") from exc


def _count_parameters(model: nn.Module) -> int:
    """The model's parameters, a tied W_E/W_U counted once."""
    return sum(p.numel() for p in model.parameters())


def _params(model: nn.Module) -> str:
    """The parameter count for people: '124.4M parameters', '9,536 parameters'."""
    n = _count_parameters(model)
    return f"{n / 1e6:.1f}M parameters" if n >= 1e6 else f"{n:,} parameters"
