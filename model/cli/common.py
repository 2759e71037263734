"""Shared plumbing for the command-line fronts: user errors become one line and an exit code,
--threads is checked and applied, a model named on the command line is loaded with a note on
what it is, and --steer FILE --steer-layer N --steer-scale X (sample.py and the server) become a
steering vector.

torch and the loaders are imported inside the functions that use them: `python -m model.data`
needs neither, and starts without them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TextIO

from model.errors import SamplingError, SmallGPTError

if TYPE_CHECKING:
    import torch

    from model.weights.loading import Pretrained
    from model.weights.steering import Steering


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


def exit_at_once(code: int) -> NoReturn:
    """End the process with `code` once its output is flushed, skipping Python's teardown: with
    torch loaded it unloads thousands of objects and modules one by one (0.5-1 s after a
    generation on a 2-core CPU), where the OS reclaims the memory at once. For a command's last
    line only: no atexit handler runs."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a closed pipe (`| head`) or a closed stream
            pass
    os._exit(code)


def use_threads(threads: int | None) -> None:
    """--threads: torch's CPU threads, by default the cores no other process is busy on at
    start (model.runtime.default_threads)."""
    from model.runtime import configure_threads, default_threads

    if threads is not None and threads < 1:
        raise SamplingError(f"--threads must be >= 1, got {threads}")
    configure_threads(threads or default_threads())


def load_named_model(name: str | None, device: str | torch.device = "auto", *,
                     dtype: str | None = None, pack: bool = False, compile: bool = False,
                     quantize: str | None = None, err: TextIO | None = None) -> Pretrained:
    """The model `name` names (model.weights.loading: with no name, the newest checkpoint under
    out/), saying on stderr what was loaded, since the user should know which one.

    `device` and `dtype` are as the user wrote them (--device auto, cpu, cuda:N or mps; --dtype
    auto, float32, bfloat16 or float16), or a device already picked. With `dtype` the weights
    are converted as they are read (bfloat16 halves the memory each generated token reads) and
    the line says which dtype and why; without it they keep the dtype they were saved in.
    `pack`: for generation only, the linear layers are packed for oneDNN where the CPU can
    (model/network/packed.py). `compile`: torch.compile with dynamic shapes, one graph for
    every cache length instead of a recompile per token (packing is then left out).
    `quantize="int8"`: the linear layers' weights in int8 (model/network/quantized.py), in
    place of packing. The name is resolved once for all of it."""
    from model.runtime import choose_dtype, generation_precision, pick_device
    from model.weights.loading import load_model, locate, parameter_count

    if quantize not in (None, "int8"):
        raise SamplingError(f"--quantize: {quantize!r} is not a choice; use int8")
    if isinstance(device, str):
        device = pick_device(device, setting="--device")
    precision = None if dtype is None else choose_dtype(dtype, device, setting="--dtype")
    located = locate(name)
    if precision is not None:
        # Chosen before the weights are read, so that they are converted as they load.
        precision = generation_precision(precision, parameter_count(located))
    loaded = load_model(located, device, dtype=None if precision is None else precision.dtype)
    which = "" if name else "the newest checkpoint under out/: "
    line = f"using {which}{loaded.description}"
    if precision is not None:
        line += f", in {precision.describe()}"
    if quantize == "int8":
        from model.network.quantized import quantize_int8

        quantize_int8(loaded.model)
        line += "; linear layers in int8 (one scale per output feature)"
    elif pack and not compile:
        from model.network.packed import pack_linears

        if pack_linears(loaded.model):
            line += "; linear layers packed for oneDNN (--no-pack: PyTorch's own kernels)"
    print(line, file=err or sys.stderr)
    if compile:
        import torch

        loaded.model = torch.compile(loaded.model, dynamic=True)
    return loaded


def add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    """--no-pack and --quantize: how the CPU runs the linear layers (sample.py, the server)."""
    parser.add_argument("--no-pack", action="store_true",
                        help="keep PyTorch's own CPU matrix kernels instead of packing the "
                             "linear layers for oneDNN (model/network/packed.py)")
    parser.add_argument("--quantize", choices=["int8"],
                        help="int8: the linear layers' weights in 8 bits, one scale per output "
                             "feature, made at load time (CPU only; model/network/quantized.py)")


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("steering (model/weights/steering.py)")
    group.add_argument("--steer", metavar="FILE",
                       help="add the vector in FILE (.pt or .safetensors, one vector of the "
                            "model's width) to the residual stream at every position")
    group.add_argument("--steer-layer", type=int, metavar="N",
                       help="with --steer: add it after block N (blocks.N.hook_resid_post)")
    group.add_argument("--steer-scale", type=float, metavar="X",
                       help="with --steer: times X (default 1)")


def check_steering(path: str | None, layer: int | None, scale: float | None) -> None:
    """The --steer options, checked before the (slow) model load: they go together, and the
    file holds one vector (its width and the layer are checked against the model later)."""
    if path is None:
        if layer is not None or scale is not None:
            raise SamplingError("--steer-layer and --steer-scale only apply with --steer FILE")
        return
    if layer is None:
        raise SamplingError("--steer needs --steer-layer N: the block after which the vector is "
                            "added")
    from model.weights.steering import read_vector

    read_vector(path)


def load_steering_option(path: str | None, model: torch.nn.Module, layer: int | None,
                         scale: float | None, err: TextIO | None = None) -> Steering | None:
    """The steering vector the --steer options name, checked against `model`, with a line on
    stderr saying it is on (None without --steer)."""
    if path is None or layer is None:
        return None
    from model.weights.steering import load_steering

    steering = load_steering(path, model, layer, 1.0 if scale is None else scale)
    print(f"steering: {path} x {steering.scale} added to {steering.hook_name} at every "
          "position", file=err or sys.stderr)
    return steering
