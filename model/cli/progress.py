"""Progress bars on the terminal: the model.progress.Progress the command lines hand to the
library (tqdm draws them on stderr)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm

from model.progress import Advance


@contextlib.contextmanager
def bars(stage: str, total: float | None = None, unit: str = "B") -> Iterator[Advance]:
    """A bar for one stage of work (bytes are shown as kB, MB, ...)."""
    with tqdm(desc=stage, total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1000,
              dynamic_ncols=True) as bar:
        yield bar.update
