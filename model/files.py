"""Small file-system helpers shared by checkpoints and token caches.

Both write things a user must not lose (checkpoints, token files), so both need the same two
guarantees: a write is all-or-nothing, and a directory is proven writable before hours of work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    """Flush a directory entry: on POSIX a rename is durable only once its directory is synced."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk, so a rename that publishes it never exposes a hole."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file, flush it, then rename it over `path`: readers see the old
    file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` and prove it takes a file (permission bits alone can lie, e.g. on a
    read-only mount). Raises OSError; callers turn it into their own one-line error."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A hidden temporary directory beside `target` to write into; when the block ends without
    an error, it takes `target`'s place by renames, so that at every instant one complete copy
    exists (the old `target`, kept as `.NAME.old` while the swap runs, or the new one). An
    error leaves `target` as it was and removes the temporary directory."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a write that was killed: never used
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.iterdir():
            if path.is_file():
                fsync_file(path)
        fsync_dir(tmp)  # the files' names reach the disk before tmp takes target's place
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_files(directory: Path, names: Iterable[str]) -> Iterator[dict[str, BinaryIO]]:
    """Files to write in `directory`, open in binary mode under temporary names (NAME.tmp-PID).
    When the block ends without an error each is flushed to disk and renamed to NAME, and the
    directory synced: a reader finds whole files or old ones, never half of one. An error
    removes them."""
    tmp = {name: directory / f"{name}.tmp-{os.getpid()}" for name in names}
    try:
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(open(path, "wb")) for name, path in tmp.items()}
            yield files
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in tmp.items():
        os.replace(path, directory / name)
    fsync_dir(directory)
