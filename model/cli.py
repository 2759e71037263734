"""Shared plumbing for the command-line fronts: user errors become one line and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import SmallGPTError


def run_cli(main: Callable[[], int | None]) -> int:
    """Call `main`; a SmallGPTError prints `error: <message>` on stderr and exits 2, Ctrl-C 130.

    Tracebacks are kept for real bugs, which a user should report rather than fix.
    """
    try:
        return main() or 0
    except SmallGPTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python sample.py ... | head`
        return 0
