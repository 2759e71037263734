"""Shared plumbing for the command-line fronts: user errors become one line and an exit code,
and a model named on the command line is loaded with a note on what it is."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from model.errors import SmallGPTError

if TYPE_CHECKING:
    import torch

    from model.runtime import DtypeChoice
    from model.weights.loading import Pretrained


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


def load_named_model(name: str | None, device: str | torch.device,
                     err: TextIO | None = None,
                     precision: DtypeChoice | None = None, *, pack: bool = False) -> Pretrained:
    """The model `name` names (model.weights.loading: with no name, the newest checkpoint under
    out/), saying on stderr what was loaded, since the user should know which one. With
    `precision` the weights are converted to its dtype as they are read (bfloat16 halves the
    memory each generated token reads) and the line says which dtype and why. `pack`: for
    generation only, the linear layers are packed for oneDNN where the CPU can
    (model/network/packed.py). The name is resolved once for all of it."""
    from model.weights.loading import load_model, locate, parameter_count

    located = locate(name)
    dtype = None
    if precision is not None:
        from model.runtime import generation_precision

        # Chosen before the weights are read, so that they are converted as they load.
        precision = generation_precision(precision, parameter_count(located))
        dtype = precision.dtype
    loaded = load_model(located, device, dtype=dtype)
    which = "" if name else "the newest checkpoint under out/: "
    line = f"using {which}{loaded.description}"
    if precision is not None:
        line += f", in {precision.describe()}"
    if pack:
        from model.network.packed import pack_linears

        if pack_linears(loaded.model):
            line += "; linear layers packed for oneDNN (--no-pack: PyTorch's own kernels)"
    print(line, file=err or sys.stderr)
    return loaded
