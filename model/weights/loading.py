"""One name for a model, everywhere: `load_model(name)` returns the network and its tokenizer.

A name is
  - empty / None: the newest smallgpt checkpoint under out/;
  - gpt2, gpt2-medium, gpt2-large, gpt2-xl: OpenAI's weights on the Hugging Face hub
    (openai-community/<name>), downloaded once into the usual Hugging Face cache (config.json
    and model.safetensors only) and read from there afterwards, offline too;
  - a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin) of GPT-2
    or of a family model/hf.py reads (Llama, Qwen3, ...);
  - a smallgpt run directory or checkpoint directory; a LoRA run's (train.lora_rank) gives its
    base with the adapters merged in (load_lora_run).
train.init_from, `sample.py --checkpoint` and `python -m model.explore --checkpoint` all go
through here, and every kind of name gives the same result type, `Pretrained`.

Loading reads downward only: this module puts the pieces together from model/checkpoint.py
(smallgpt's files) and model/hf.py (the Hugging Face layout), which build on model/gpt.py.
A checkpoint never names code to run: a model of your own class loads with `model_class=`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from model.config import Config, DataConfig
from model.data.tokenizer import Tokenizer, tokenizer_from_spec
from model.errors import CheckpointError, SmallGPTError
from model.gpt import GPT, GPTConfig
from model.network import lora
from model.weights.checkpoint import (
    assign_state,
    find_checkpoints,
    listing,
    load_state,
    load_weights,
    read_checkpoint_config,
    read_lora_base,
    resolve_checkpoint,
)
from model.weights.hf import load_hf

HUB_NAMES = {name: f"openai-community/{name}"
             for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HUB_FILES = ["config.json", "model.safetensors"]


@dataclass
class Pretrained:
    """A loaded model in eval mode, with what it needs to be used and what a user should be
    told; the same for a smallgpt run and for Hugging Face weights."""

    model: nn.Module  # a GPT, or the `model_class` it was loaded with
    tokenizer: Tokenizer
    kind: str  # "smallgpt", or "gpt2" for Hugging Face weights (the hub or a directory)
    path: Path  # the directory the weights came from
    description: str  # one line for the user: what was loaded, from where
    # A smallgpt run's resolved config; for GPT-2, its shape and tokenizer (None: built by hand).
    config: Config | None = None
    state: dict[str, Any] = field(default_factory=dict)  # smallgpt: step, losses, resume state


def load_model(name: str | Path | None = None, device: str | torch.device = "cpu", *,
               root: str | Path = "out",
               model_class: Callable[[GPTConfig], nn.Module] = GPT,
               dtype: torch.dtype | None = None) -> Pretrained:
    """The model called `name` (see the module docstring), in eval mode on `device`.
    `model_class` builds a smallgpt checkpoint's network from its stored GPTConfig: pass the
    GPT subclass (or module) a variant was trained with. `dtype` converts the weights (None:
    float32); Hugging Face weights are converted as they are read, so gpt2-xl in bfloat16
    never holds its float32 copy."""
    name, hf_directory = _located(name, root)
    if hf_directory is not None:
        loaded = _hf(hf_directory, device, dtype)
        if str(name) in HUB_NAMES:
            loaded.description = (f"{name} ({HUB_NAMES[str(name)]}, {_params(loaded.model)}) "
                                  f"from {loaded.path}")
        return loaded
    loaded = _smallgpt(name, device, model_class, dtype)
    if dtype is not None:  # the rest: a LoRA run's merged model, buffers such as rotary tables
        loaded.model.to(dtype)
    return loaded


def _located(name: str | Path | None, root: str | Path) -> tuple[str | Path, Path | None]:
    """`name` (with none, the newest checkpoint under `root`), and the Hugging Face directory
    it stands for: a hub name's cached download, or the directory itself; None for a
    smallgpt run or checkpoint. load_model and parameter_count both start here."""
    if not name:
        found = find_checkpoints(root)
        if not found:
            raise CheckpointError(
                f"no checkpoint under {str(root)}/; train one (python train.py --config "
                "small.yaml) or name a model, e.g. --checkpoint gpt2")
        name = found[0]
    if str(name) in HUB_NAMES:
        return name, hub_snapshot(str(name))
    return name, Path(name) if is_hf_directory(Path(name)) else None


def parameter_count(name: str | Path | None = None, *, root: str | Path = "out") -> int:
    """How many parameters the model `name` names has, read from its files without loading
    its weights: the dtype to hold them in can then be chosen before they are read."""
    name, directory = _located(name, root)
    if directory is not None:
        weights = directory / "model.safetensors"
        if not weights.is_file():  # a pytorch_model.bin: float32, 4 bytes a parameter
            return (directory / "pytorch_model.bin").stat().st_size // 4
        try:
            with safe_open(weights, framework="pt") as file:  # reads the header only
                return sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys()
                           # older GPT-2 files hold causal masks, not parameters
                           if not key.endswith((".attn.bias", ".attn.masked_bias")))
        except Exception as exc:  # the format's own errors for a truncated or corrupt file
            raise CheckpointError(f"cannot read {str(weights)!r}, it looks truncated or "
                                  f"corrupt ({type(exc).__name__})") from exc
    config, _ = read_checkpoint_config(resolve_checkpoint(name))
    with torch.device("meta"):  # shapes only: the count of a LoRA run's merged model too
        return GPT(config.model).num_params()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *,
                    model_class: Callable[[GPTConfig], nn.Module] = GPT) -> Pretrained:
    """`load_model(path, ...)` under the name the public API has had since the start."""
    return load_model(path, device, model_class=model_class)


def _smallgpt(path: str | Path, device: str | torch.device,
              model_class: Callable[[GPTConfig], nn.Module],
              dtype: torch.dtype | None = None) -> Pretrained:
    """A smallgpt checkpoint or run directory (its latest/), rebuilt with `model_class`. Every
    error, for a missing or a damaged checkpoint, lists the checkpoints that exist."""
    ckpt = resolve_checkpoint(path)
    try:
        config, spec = read_checkpoint_config(ckpt)
        try:
            tokenizer = tokenizer_from_spec(spec)
        except SmallGPTError as exc:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: tokenizer spec is invalid: {exc}") from exc
        if config.train.lora_rank is None:
            model = _built_with_weights(model_class, config.model, ckpt, device, dtype)
        state = load_state(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {listing()}") from exc
    if config.train.lora_rank is not None:  # adapters: the base, with them merged in
        model = load_lora_run(ckpt, config)
    model.to(device).eval()
    description = (f"smallgpt checkpoint {ckpt} (step {state.get('step')}, "
                   f"{_params(model)})")
    if config.train.lora_rank is not None:
        description += f", LoRA adapters merged into {config.train.init_from}"
    return Pretrained(model, tokenizer, "smallgpt", ckpt, description, config, state)


def _built_with_weights(model_class: Callable[[GPTConfig], nn.Module], config: GPTConfig,
                        ckpt: Path, device: str | torch.device,
                        dtype: torch.dtype | None) -> nn.Module:
    """model_class(config) holding the checkpoint's weights, read in `dtype`.

    Built on the meta device, so the random init that the weights replace never runs (for
    GPT-2-124M it took longer than generating 100 tokens). A class of the user's whose
    construction needs real memory, or that keeps tensors outside its state dict (which
    loading cannot fill), is built the plain way instead.
    """
    try:
        with torch.device("meta"):
            model = model_class(config)
    except Exception:  # any failure on meta, e.g. .item() or numpy of a meta tensor
        model = None  # the plain build below raises what is really wrong, if anything
    if model is not None:
        load_weights(model, ckpt, device, dtype=dtype, assign=True)
        if not _holds_meta_tensors(model):
            return model
    model = model_class(config)
    load_weights(model, ckpt, device, dtype=dtype)
    return model


def _holds_meta_tensors(model: nn.Module) -> bool:
    """Whether any parameter, buffer or plain tensor attribute of `model` is still on meta."""
    return any(isinstance(value, torch.Tensor) and value.is_meta
               for module in model.modules()
               for value in (*vars(module).values(), *module._parameters.values(),
                             *module._buffers.values()))


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
    with torch.device("meta"):
        model = GPT(config)
    assign_state(model, state)
    crop = f", block_size cropped {before} -> {after}" if after < before else ""
    # keep_vars: the Parameters themselves, so a tied W_E/W_U counts once (state_dict's
    # detached tensors are new objects under each name).
    tensors = len({id(t) for t in model.state_dict(keep_vars=True).values()})
    return model, (f"init_from {source.description}: {tensors} tensors loaded, "
                   f"{model.num_params():,} parameters{crop}")


def lora_base_record(name: str, source: Pretrained) -> dict[str, str]:
    """What a LoRA run started from `source` (loaded by `name`) records about its base."""
    path = None if name in HUB_NAMES else source.path.resolve()  # the hub's: by name
    return lora.base_record(name, source.model, path)


def _hf(directory: Path, device: str | torch.device, dtype: torch.dtype | None) -> Pretrained:
    """Weights in a Hugging Face directory (GPT-2, Llama, Qwen3, ...: model/hf.py reads them)
    with their tokenizer; the config holds their shape and the tokenizer's name."""
    model, tokenizer, model_type = load_hf(directory, dtype or torch.float32)
    model = model.to(device, dtype).eval()  # dtype: the buffers (rotary tables) too
    config = Config(model=model.config, data=DataConfig(tokenizer=tokenizer.name),
                    name=directory.name)
    what = "GPT-2" if model_type == "gpt2" else model_type
    return Pretrained(model, tokenizer, "gpt2", directory,
                      f"{what} weights ({_params(model)}) from {directory}", config)


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


def _params(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f}M parameters" if n >= 1e6 else f"{n:,} parameters"
