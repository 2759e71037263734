"""Where and how the model runs: device and dtype choice, autocast, seeding, torchrun/DDP set-up.

Nothing here runs at import; the training and sampling code call these with explicit arguments.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto", setting: str = "train.device") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is missing is an error
    naming `setting` (the config key or command-line option the name came from)."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name.startswith("cuda") and not cuda:
        raise ConfigError(
            f"{setting}: cuda was asked for but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not mps:
        raise ConfigError(f"{setting}: mps was asked for but is not available; use auto or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, setting: str = "train.dtype") -> torch.dtype:
    """'auto': bfloat16 on CUDA GPUs that support it, float16 on older ones, float32 elsewhere.
    Errors name `setting`."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"{setting}: {name!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        raise ConfigError(f"{setting}: float16 needs a GPU; use float32 or bfloat16 on the CPU")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision: weights stay float32, matmuls run in `dtype`. A no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device, threads: int | None = None) -> None:
    """TF32 matmuls on CUDA (Ampere and newer run them on tensor cores); CPU thread count."""
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (dropout and initialization draw from torch's)."""
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Distributed:
    """This process's place in a torchrun job; a single process is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set): NCCL on CUDA,
    gloo on CPU. Each CUDA process takes the GPU of its local rank."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    ctx = Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                      int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx


def local_device(device: torch.device, ctx: Distributed) -> torch.device:
    """On multi-GPU jobs each process uses cuda:<local_rank>."""
    if device.type == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return device


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_job(device: torch.device) -> Iterator[Distributed]:
    ctx = setup_distributed(device)
    try:
        yield ctx
    finally:
        teardown_distributed()
