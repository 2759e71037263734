"""smallgpt: a small, readable GPT. `from model import GPT, GPTConfig`.

Importing this package does no work: no device set-up, no downloads, no global state.
"""

from .config import Config, DataConfig, GPTConfig, TrainConfig, load_config
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    SamplingError,
    SmallGPTError,
    TokenizerError,
    TrainingError,
)
from .gpt import GPT, KVCache
from .tally import parameter_tally

__all__ = [
    "GPT", "GPTConfig", "KVCache", "Config", "DataConfig", "TrainConfig", "load_config",
    "parameter_tally", "SmallGPTError", "ConfigError", "DataError",
    "TokenizerError", "CheckpointError", "SamplingError", "TrainingError",
]
