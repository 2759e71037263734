"""smallgpt: a small, readable GPT.

    from model import GPT, GPTConfig, train, generate, load_model, load_config

Importing this package does no work: no device set-up, no downloads, no global state, and not
even torch is imported. Each name below is looked up in its module on first use (PEP 562), so
`import model` stays instant and a script pays only for what it touches.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. Start reading at model/gpt.py.
_EXPORTS = {
    "GPT": "gpt",
    "GPTConfig": "gpt",
    "KVCache": "kv_cache",
    "HookPoint": "hooks",
    "ActivationCache": "activation_cache",
    "to_tokens": "activation_cache",
    "to_str_tokens": "activation_cache",
    "Config": "config",
    "DataConfig": "config",
    "TrainConfig": "config",
    "load_config": "config",
    "Tokenizer": "tokenizer",
    "prepare_data": "prepare",
    "train": "training",
    "Callback": "callbacks",
    "TrainingState": "callbacks",
    "generate": "sampling",
    "repetition_penalty": "sampling",
    "score_tokens": "scoring",
    "score_text": "scoring",
    "load_checkpoint": "pretrained",
    "load_model": "pretrained",
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
