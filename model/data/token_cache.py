"""What every token cache shares, text (prepare.py) and chat (chat_data.py) alike: one protocol
for writing, finding and reopening a directory of token files.

A cache is <cache_dir>/<fingerprint>/: the fingerprint is a hash of everything that changes the
tokens, so a re-run finds the cache without reading the source, and any change writes a new one.

    find_cache    a directory with meta.json is reopened (every file the size meta.json says)
                  and reused; a damaged one is never used but rebuilt
    start_cache   the directory proven writable; the old meta.json removed first, so a crash
                  during the rebuild cannot pair it with new files; leftovers of killed runs go
    staged_files  (model/files.py) the token files, under temporary names until each is whole
    finish_cache  meta.json written last, by rename: it marks the cache complete

Both kinds hold a split's tokens in `{split}.bin` and write meta.json with the same core keys:
format_version (each kind its own), fingerprint, tokenizer (its spec), vocab_size, eot_id,
dtype and splits (counts per split). The key "format" differs: a chat cache's meta.json says
"chat" there, a text cache keeps its format version under "settings". They stay as they are
written: fingerprints hash them, so renaming one would rebuild every cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from model.data.tokenizer import Tokenizer
from model.errors import DataError
from model.files import ensure_writable_dir, fsync_dir, write_json_atomic

SPLITS = ("train", "val")
META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65536 in half the space of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def digest(value: Any) -> str:
    """The sha256 (hex) of a JSON value written with sorted keys: equal settings, equal digest."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def hashed_split(key: bytes, val_fraction: float) -> str:
    """"val" for about val_fraction of keys, decided by the key alone (its sha256's first 8
    bytes, read as a fraction of 2**64, fall below val_fraction): a stream is split in one
    pass, and equal keys always land on the same side."""
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return "val" if value < val_fraction * 2**64 else "train"


def memmap_tokens(path: Path, dtype: Any) -> np.ndarray:
    """A read-only memory map of a token file (an empty file, which mmap refuses: no tokens)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class TokenCache:
    """A complete cache directory: its meta.json and the tokenizer its tokens were encoded
    with. Each kind adds what its files hold."""

    dir: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    reused: bool = False  # True when an existing cache was found; False when just built

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    def split_stats(self, split: str) -> dict[str, Any]:
        """meta.json's counts for one split."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
        return self.meta["splits"][split]

    def num_tokens(self, split: str) -> int:
        return self.split_stats(split)["tokens"]

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per trained token, for bits per byte = nats/token / ln 2 / this."""
        raise NotImplementedError


Cache = TypeVar("Cache", bound=TokenCache)


def find_cache(directory: Path, reopen: Callable[[Path], Cache]) -> Cache | None:
    """The complete cache in `directory`, reopened and marked reused; None when there is none,
    or when it is damaged or half-written (never used: the caller rebuilds it)."""
    if not (directory / META).exists():
        return None
    try:
        cache = reopen(directory)
    except DataError:
        return None
    cache.reused = True
    return cache


def start_cache(directory: Path, cache_dir: str) -> None:
    """Make `directory` ready for a (re)build; `cache_dir` is the setting, for the error."""
    try:
        ensure_writable_dir(directory)
    except OSError as exc:
        raise DataError(f"the data cache directory {str(Path(cache_dir))!r} is not "
                        f"writable ({exc.strerror or exc}); set data.cache_dir to a writable "
                        "folder") from exc
    (directory / META).unlink(missing_ok=True)
    for leftover in directory.glob("*.tmp-*"):
        leftover.unlink(missing_ok=True)


def tokenizer_meta(tokenizer: Tokenizer) -> dict[str, Any]:
    """meta.json's keys for the tokenizer: enough to rebuild it and to read its token files."""
    return {"tokenizer": tokenizer.spec(), "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id, "dtype": token_dtype(tokenizer.vocab_size).name}


def finish_cache(directory: Path, meta: dict[str, Any]) -> None:
    """Mark the cache complete: its meta.json, written last, by rename."""
    write_json_atomic(directory / META, meta)
    fsync_dir(directory)


def read_meta(directory: Path, version: int,
              file_sizes: Callable[[dict[str, Any]], dict[str, int]]) -> dict[str, Any]:
    """meta.json of a complete cache of format `version`, whose files (name -> bytes, as
    `file_sizes(meta)` works them out) all have their full size; else a DataError."""
    meta_path = directory / META
    if not meta_path.is_file():
        raise DataError(f"{str(directory)!r} holds no meta.json: it is not a prepared data cache, "
                        "or its preparation was interrupted; prepare the data again")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        found = meta["format_version"]
        expected = file_sizes(meta)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{str(meta_path)!r} is damaged ({type(exc).__name__}); delete "
                        f"{str(directory)!r} and prepare the data again") from exc
    if found != version:
        raise DataError(f"{str(directory)!r} was prepared by another version (format {found}, "
                        f"this is {version}); prepare the data again")
    for name, size in expected.items():
        path = directory / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise DataError(f"{str(path)!r} has {actual} bytes, expected {size}: the cache is "
                            "incomplete (an interrupted run?); prepare the data again")
    return meta
