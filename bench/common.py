"""Shared by the benchmarks: where the figures came from, and the tiny-shakespeare corpus."""

from __future__ import annotations

import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# ../shared next to the checkout, or next to the folder of git worktrees it is one of.
SHARED = next((d for d in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if d.is_dir()),
              ROOT.parent / "shared")
TINY_SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

# Run from anywhere: the benchmarks import the package from this checkout.
sys.path.insert(0, str(ROOT))


def machine_line() -> str:
    """One line naming the machine, torch and the thread count, printed with every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {cpu}, {os.cpu_count()} CPUs{gpu}; python {platform.python_version()}; "
            f"torch {torch.__version__}; threads {torch.get_num_threads()}")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def require_tiny_shakespeare() -> Path:
    if not TINY_SHAKESPEARE.exists():
        sys.exit(f"error: {TINY_SHAKESPEARE} not found; this benchmark needs tiny-shakespeare "
                 "(pass --corpus PATH)")
    return TINY_SHAKESPEARE


def scratch_dir(prefix: str, parent: str | None) -> tempfile.TemporaryDirectory:
    """A temporary directory for generated corpora or weights, deleted afterwards; inside
    `parent` (created if missing) when one is given, else in the system's temporary folder."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
