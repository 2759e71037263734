"""One name for a model, everywhere: `load_model(name)` returns the network and its tokenizer.

A name is
  - empty / None: the newest smallgpt checkpoint under out/;
  - gpt2, gpt2-medium, gpt2-large, gpt2-xl: OpenAI's weights on the Hugging Face hub
    (openai-community/<name>), downloaded once into the usual Hugging Face cache (config.json
    and model.safetensors only) and read from there afterwards, offline too;
  - a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin);
  - a smallgpt run directory or checkpoint directory.
train.init_from, `sample.py --checkpoint`, `python -m model.explore --checkpoint`,
`GPT.from_pretrained` and `load_checkpoint` (model/checkpoint.py) all go through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, find_checkpoints, load_checkpoint
from .config import Config, DataConfig
from .errors import CheckpointError
from .gpt import GPT
from .hf import load_hf
from .tokenizer import Tokenizer

HUB_NAMES = {name: f"openai-community/{name}"
             for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HUB_FILES = ["config.json", "model.safetensors"]


@dataclass
class Pretrained:
    """A loaded model with what it needs to be used and what a user should be told."""

    model: GPT
    tokenizer: Tokenizer
    kind: str  # "smallgpt" or "gpt2" (OpenAI's weights, from the hub or a directory)
    path: Path  # the directory the weights came from
    description: str  # one line for the user: what was loaded, from where
    config: Config | None = None  # smallgpt checkpoints: the run's resolved config


def load_model(name: str | None = None, device: str | torch.device = "cpu",
               root: str | Path = "out") -> Pretrained:
    """The model called `name` (see the module docstring), in eval mode on `device`."""
    if not name:
        found = find_checkpoints(root)
        if not found:
            raise CheckpointError(
                f"no checkpoint under {str(root)}/; train one (python train.py --config "
                "small.yaml) or name a model, e.g. --checkpoint gpt2")
        name = str(found[0])
    if name in HUB_NAMES:
        directory = hub_snapshot(name)
        model, tokenizer, _ = load_hf(directory)
        model = model.to(device).eval()
        return Pretrained(model, tokenizer, "gpt2", directory,
                          f"{name} ({HUB_NAMES[name]}, {_params(model)}) from {directory}")
    path = Path(name)
    if is_hf_directory(path):
        model, tokenizer, model_type = load_hf(path)
        model = model.to(device).eval()
        what = "GPT-2" if model_type == "gpt2" else model_type
        return Pretrained(model, tokenizer, "gpt2", path,
                          f"{what} weights ({_params(model)}) from {path}")
    ckpt = load_checkpoint(path, device)
    step = ckpt.state.get("step")
    return Pretrained(ckpt.model, ckpt.tokenizer, "smallgpt", ckpt.path,
                      f"smallgpt checkpoint {ckpt.path} (step {step}, "
                      f"{_params(ckpt.model)})", ckpt.config)


def is_gpt2_name(name: str | Path) -> bool:
    """Whether `name` means OpenAI's GPT-2 weights: a hub name or a Hugging Face directory."""
    return str(name) in HUB_NAMES or is_hf_directory(Path(name))


def load_gpt2_checkpoint(name: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """GPT-2 weights as `checkpoint.load_checkpoint` returns a smallgpt run: model, tokenizer,
    a config holding their shape and tokenizer name, and no training state."""
    loaded = load_model(str(name), device)
    config = Config(model=loaded.model.config, data=DataConfig(tokenizer=loaded.tokenizer.name),
                    name=Path(name).name)
    return Checkpoint(model=loaded.model, tokenizer=loaded.tokenizer, config=config,
                      path=loaded.path)


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


def _params(model: GPT) -> str:
    n = model.num_params()
    return f"{n / 1e6:.1f}M parameters" if n >= 1e6 else f"{n:,} parameters"
