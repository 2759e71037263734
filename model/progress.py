"""Progress without printing: library code reports how far it is through a callable it is
given, and the command lines draw the bars (model/cli/progress.py).

    def prepare(..., progress: Progress = silent):
        with progress("tokenizing", total_bytes) as advance:
            for piece in pieces:
                ...
                advance(len(piece))

A Progress is called with a stage's name, its total (None when unknown) and the unit counted
("B" for bytes, "" for plain counts), and returns a context manager holding `advance(amount)`
for the stage's duration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[[float], object]


class Progress(Protocol):
    def __call__(self, stage: str, total: float | None = None,
                 unit: str = "B") -> contextlib.AbstractContextManager[Advance]: ...


@contextlib.contextmanager
def silent(stage: str, total: float | None = None, unit: str = "B") -> Iterator[Advance]:
    """The Progress that reports nothing: what library calls get by default."""
    yield lambda amount: None
