"""Checkpoints: safetensors weights plus JSON, written atomically, loaded without pickled code.

A run directory holds `latest/` and `best/`, each a complete checkpoint:

    model.safetensors   the plain module's weights (a tied W_U is stored once, as W_E); for a
                        LoRA run (train.lora_rank) its adapters only (model/network/lora.py)
    config.json         the format version, the full resolved config and the tokenizer spec:
                        sampling needs nothing else but, for a LoRA run, its base: name and
                        weights' digest under "lora_base"
    optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
    state.json          step, best validation loss, sampler state, RNG states

A save writes a hidden temporary directory, then swaps it in (model.files.staged_directory),
so a crash or kill during a save leaves the previous checkpoint loadable (as `latest/` or
`.latest.old/`).

This module reads and writes those files and builds nothing: model/weights/loading.py puts a
model and its tokenizer together from them (`load_model`).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from model.config import Config, config_from_dict
from model.errors import CheckpointError, SmallGPTError, first_line
from model.files import staged_directory, write_json_atomic
from model.network import lora
from model.weights.meta import assign_state, tied_names

# config.json's "format": raise it when a change here makes checkpoints that older code would
# misread. A checkpoint of a newer format than this is refused; older ones load.
FORMAT_VERSION = 1
WEIGHTS, CONFIG, OPTIMIZER, STATE = "model.safetensors", "config.json", "optimizer.pt", "state.json"


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's CPU generator state, and the CUDA one of `device` if it is a GPU, as JSON-safe
    base64 strings. Only this process's GPU: asking for all of them would start a CUDA context
    on every GPU of the machine."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
        state["cuda"] = base64.b64encode(cuda.numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    cuda = state.get("cuda")
    if cuda and device.type == "cuda":
        if isinstance(cuda, list):  # one state per GPU of the saving machine: take this one's
            cuda = cuda[min(device.index or 0, len(cuda) - 1)]
        torch.cuda.set_rng_state(decode(cuda), device)


def save_checkpoint(directory: str | Path, model: nn.Module, config: Config,
                    tokenizer_spec: dict[str, Any], *,
                    optimizer: torch.optim.Optimizer | None = None,
                    state: dict[str, Any] | None = None,
                    lora_base: dict[str, str] | None = None) -> Path:
    """Write a complete checkpoint to `directory` atomically. `model` must be the plain module
    (not wrapped by DDP or torch.compile). A model with LoRA adapters saves them alone, with
    `lora_base` (lora.base_record) naming the weights they adapt."""
    target = Path(directory)
    adapters = lora.has_adapters(model)
    if adapters and lora_base is None:
        raise ValueError("a model with LoRA adapters is saved with its lora_base record")
    meta = {"format": FORMAT_VERSION, "config": config.to_dict(), "tokenizer": tokenizer_spec}
    with staged_directory(target) as tmp:
        if adapters:
            save_file(lora.adapter_state_dict(model), str(tmp / WEIGHTS))
            meta["lora_base"] = lora_base
        else:
            save_model(model, str(tmp / WEIGHTS))  # handles the tied W_E/W_U tensor
        write_json_atomic(tmp / CONFIG, meta)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        write_json_atomic(tmp / STATE, state or {})
    return target


def copy_checkpoint(source: str | Path, directory: str | Path) -> Path:
    """Atomically make `directory` a copy of checkpoint `source` (used to keep the best)."""
    target = Path(directory)
    with staged_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return target


def find_checkpoints(root: str | Path = "out") -> list[Path]:
    """Every checkpoint directory under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.parent for p in root.rglob(CONFIG) if (p.parent / WEIGHTS).exists()
             and not p.parent.name.startswith(".")]
    return sorted(found, key=lambda p: (p / WEIGHTS).stat().st_mtime, reverse=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its `latest/`, falling back to the copy a
    killed save left behind, then `best/`)."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        path = path.parent
    if (path / WEIGHTS).exists():
        return path
    for name in ("latest", ".latest.old", "best"):
        if (path / name / WEIGHTS).exists():
            return path / name
    what = "holds no checkpoint" if path.exists() else "does not exist"
    raise CheckpointError(f"checkpoint {str(path)!r} {what}; "
                          f"{listing(path if path.is_dir() else 'out')}")


def listing(root: str | Path = "out") -> str:
    """'checkpoints found: ...' naming up to five, so an error says what to use instead."""
    existing = find_checkpoints(root)
    listed = ", ".join(str(p) for p in existing[:5]) if existing else "none under out/"
    return f"checkpoints found: {listed}"


def read_checkpoint_config(ckpt: str | Path) -> tuple[Config, dict[str, Any]]:
    """The resolved Config and tokenizer spec stored in checkpoint directory `ckpt` (as
    resolve_checkpoint gives it)."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} has no {CONFIG}; it is incomplete") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt_config(ckpt, exc) from exc
    _check_format(ckpt, meta)
    try:
        config = config_from_dict(meta["config"], name=meta["config"].get("name", "run"))
        return config, meta["tokenizer"]
    except (KeyError, TypeError) as exc:
        raise _corrupt_config(ckpt, exc) from exc
    except SmallGPTError as exc:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: stored config is invalid: {exc}") from exc


def _check_format(ckpt: Path, meta: Any) -> None:
    """A CheckpointError for a config.json written in a format newer than this code reads."""
    version = meta.get("format", FORMAT_VERSION) if isinstance(meta, dict) else FORMAT_VERSION
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} is in format {version}, newer than the {FORMAT_VERSION} "
            "this smallgpt reads; update smallgpt (git pull) to load it")


def _corrupt_config(ckpt: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(ckpt)!r}: {CONFIG} is corrupt ({type(exc).__name__})")


def load_weights(model: nn.Module, path: str | Path, device: str | torch.device = "cpu", *,
                 dtype: torch.dtype | None = None, assign: bool = False) -> None:
    """Fill `model` with a checkpoint's weights. A damaged file, a tensor of another shape, or
    names that do not match the model's (saying which) are each a CheckpointError. A model
    with LoRA adapters takes a LoRA run's adapters.

    `dtype` converts floating tensors as they are read. `assign=True` makes the file's tensors
    the model's own instead of copying them in: for a model built on the meta device, which
    so skipped the random init they would replace. Tied parameters (W_U = W_E, stored once)
    come out tied either way."""
    if lora.has_adapters(model):
        file = Path(path) / WEIGHTS
        try:
            adapters = load_file(file, device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise _damaged(path, exc) from exc
        lora.load_adapter_state_dict(model, adapters, str(file))
        return
    state = _read_weights(path, device, dtype)
    tied = tied_names(model)
    untied = []  # a file that stores two tensors for one tied parameter is an untied model's
    for names in tied:  # every name of a tied tensor gets the one the file stores
        stored = [name for name in names if name in state]
        untied += stored[1:]
        if stored:
            state.update(dict.fromkeys(names, state[stored[0]]))
    try:
        missing, unexpected = (assign_state(model, state, strict=False) if assign
                               else model.load_state_dict(state, strict=False))
        unexpected = [*unexpected, *untied]
    except RuntimeError as exc:  # load_state_dict: "size mismatch for <name>: ..."
        mismatch = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        if not mismatch:
            raise _damaged(path, exc) from exc
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"{'; '.join(mismatch)[:300]}; build the model with the shape it was saved with"
        ) from exc
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"{_names('missing', missing)}{_names('unexpected', unexpected)}"
            "load it with the model class it was trained with (model_class=...)")


def read_safetensors(file: str | Path, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on `device`, each floating one converted to `dtype` as it
    is read (None: as stored). Raises the format's own errors; callers say which file broke.

    Kept as stored, the tensors are the file mapped into memory: nothing is copied or read
    before it is used (copy-on-write: writing to a tensor never changes the file), and only
    another device copies them. Converted, each is read (pread) into memory of its own: a
    mapping would keep the whole file resident beside the converted tensors until the last of
    them is freed."""
    with safe_open(file, framework="pt") as opened:  # mapped on the CPU: no bytes read yet
        mapped = {key: opened.get_tensor(key) for key in opened.keys()}
    if dtype is None or all(t.dtype == dtype or not t.is_floating_point()
                            for t in mapped.values()):
        return {key: tensor.to(device) for key, tensor in mapped.items()}
    del mapped
    with safe_open(file, framework="pt", device=str(device), backend="pread") as opened:
        return {key: tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor
                for key in opened.keys() for tensor in [opened.get_tensor(key)]}


def _read_weights(path: str | Path, device: str | torch.device,
                  dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """model.safetensors' tensors on `device`, floating ones converted to `dtype` one at a time."""
    try:
        return read_safetensors(Path(path) / WEIGHTS, dtype, device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc


def _names(what: str, names: list[str] | set[str]) -> str:
    """'missing keys a, b (2); ' naming at most five, or '' for none."""
    if not names:
        return ""
    ordered = sorted(names)
    shown = ", ".join(ordered[:5]) + (", ..." if len(ordered) > 5 else "")
    return f"{what} keys {shown} ({len(ordered)}); "


def _damaged(path: str | Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: {WEIGHTS} is truncated or corrupt "
                           f"({first_line(exc)[:120]}); use another checkpoint, e.g. the run's "
                           "best/")


def read_lora_base(ckpt: str | Path) -> dict[str, str]:
    """The base record (lora.base_record) a LoRA checkpoint keeps in its config.json."""
    try:
        meta = json.loads((Path(ckpt) / CONFIG).read_text(encoding="utf-8"))
        _check_format(Path(ckpt), meta)
        record = meta["lora_base"]
        if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
            raise TypeError("lora_base")
        return record
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {CONFIG} does not name the base of "
                              "its LoRA adapters (lora_base); it is incomplete") from exc


def load_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / STATE
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE} is corrupt") from exc


def load_optimizer_state(path: str | Path) -> dict[str, Any] | None:
    """The optimizer's state dict, loaded with weights_only=True (no pickled code runs)."""
    file = Path(path) / OPTIMIZER
    if not file.exists():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {OPTIMIZER} is truncated or corrupt "
            f"({type(exc).__name__})") from exc
