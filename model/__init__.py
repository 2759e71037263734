"""smallgpt: a small, readable GPT.

    from model import GPT, GPTConfig, train, generate, load_model, load_config

Start reading at model/gpt.py (the network), then model/training/loop.py (training) and
model/inference/sampling.py (generation). The rest lives in wings, one job each:

    base       errors.py, files.py, progress.py, runtime.py: what every wing may use
    network    gpt.py and network/: the nn.Module, hook points, caches, LoRA, packed layers
    data       data/: corpora, tokenizers, token caches, batches, the chat template
    config     config.py: a whole run's settings, validated once
    weights    weights/: checkpoints, loading by name, Hugging Face files, export
    training   training/: train() and its parts
    inference  inference/: generation, scoring, analysis; patching.py: patching sweeps
    serve      serve/: the playground page and the OpenAI-compatible API
    cli        cli/ (and the `python -m model.<command>` doors): every argparse and print

A wing imports only wings above it in this list, with two exceptions: the network and data
import nothing but base (data never imports the network), and training and inference never
import each other (serve imports inference, not training). tests/test_layout.py checks every
import, at module level, inside functions and under TYPE_CHECKING alike.

Importing this package does no work: no device set-up, no downloads, no global state, and not
even torch is imported. Each name below is looked up in its module on first use (PEP 562), so
`import model` stays instant and a script pays only for what it touches.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "GPT": "gpt",
    "GPTConfig": "gpt",
    "KVCache": "network.kv_cache",
    "HookPoint": "network.hooks",
    "ActivationCache": "network.activation_cache",
    "to_tokens": "data.tokenizer",
    "to_str_tokens": "data.tokenizer",
    "Config": "config",
    "DataConfig": "data.config",
    "TrainConfig": "config",
    "load_config": "config",
    "Tokenizer": "data.tokenizer",
    "prepare_data": "data.prepare",
    "train": "training.loop",
    "Callback": "training.callbacks",
    "TrainingState": "training.callbacks",
    "generate": "inference.sampling",
    "quantize_int8": "network.quantized",
    "SamplingParams": "inference.sampling",
    "repetition_penalty": "inference.sampling",
    "score_tokens": "inference.scoring",
    "score_text": "inference.scoring",
    "load_checkpoint": "weights.loading",
    "load_model": "weights.loading",
    "SmallGPTError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "TokenizerError": "errors",
    "CheckpointError": "errors",
    "SamplingError": "errors",
    "TrainingError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        # AttributeError also lets `from model import tokenizer` fall back to the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
