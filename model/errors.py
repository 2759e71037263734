"""User-facing errors.

Every problem a user can cause (bad config, missing file, corrupt checkpoint, bad sampling
argument) raises a subclass of SmallGPTError with a one-line message that names the problem and
what to do. The command-line fronts print that line and exit non-zero instead of a traceback.
"""


class SmallGPTError(Exception):
    """Base class: the message is a complete, one-line explanation for the user."""


class ConfigError(SmallGPTError, ValueError):
    """A config file, key or value is wrong."""


class DataError(SmallGPTError):
    """A corpus, token file or data cache is missing, empty or invalid."""


class TokenizerError(SmallGPTError, ValueError):
    """Text or a tokenizer spec that the tokenizer cannot handle."""


class ChatFormatError(DataError, ValueError):
    """A conversation (a chat request's messages or a record of chat data) is malformed.

    `field` names the offending part as a path, e.g. "messages[2].role"; the message starts
    with it (and, for data files, with the file and line before it)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class CheckpointError(SmallGPTError):
    """A checkpoint is missing, truncated or corrupt."""


class SamplingError(SmallGPTError, ValueError):
    """An out-of-range sampling argument (temperature, top-k, top-p, ...)."""


class TrainingError(SmallGPTError):
    """Training cannot go on (non-finite loss, unwritable output directory, ...)."""


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    """ConfigError naming `key` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    """ConfigError naming `key` unless `value` is > 0 (or >= 0 with allow_zero)."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the part
    of a library's error that fits into one of ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
