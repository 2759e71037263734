"""A training job's processes: the torchrun group and the collectives training uses, each
rank's seeds, and Ctrl-C as a request to stop that every rank then agrees on.

A single process is rank 0 of a job of 1: every function here works there and does nothing
collective. NCCL, the backend for CUDA, only takes tensors on the process's own GPU; gloo takes
CPU tensors. So every collective below puts its tensor on `Distributed.device`, the device the
job trains on: a CPU tensor would work in a CPU (gloo) job and fail at the first step on GPUs.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model.errors import ConfigError

# How long a rank waits in a collective. The other ranks wait in a barrier while the first
# process of each machine prepares the token files, which for a large corpus takes hours:
# torch's default (10 minutes for NCCL) would end the job during it.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


@dataclass
class Distributed:
    """This process's place in a torchrun job; a single process is rank 0 of 1. `device` is
    where this process trains and where its collectives' tensors live (cuda:<local_rank>)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by torchrun (RANK and WORLD_SIZE > 1 set).

    On CUDA each process takes the GPU of its local rank before the group starts, and the group
    gets NCCL for CUDA tensors and gloo for CPU ones (torch's form for mixed use), bound to that
    GPU. On the CPU it is gloo alone.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"train.device: process {local_rank} of this node needs GPU "
                              f"{local_rank} but {torch.cuda.device_count()} are visible; start "
                              "at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="cuda:nccl,cpu:gloo", device_id=device,
                                    timeout=COLLECTIVE_TIMEOUT)
    elif device.type == "cpu":
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    else:
        raise ConfigError(f"train.device: {device.type} cannot run a multi-process job; "
                          "use cuda or cpu with torchrun")
    return Distributed(rank, local_rank, world_size, device)


@contextlib.contextmanager
def distributed_job(device: torch.device) -> Iterator[Distributed]:
    """setup_distributed, and the group it started destroyed at the end however the job ends
    (a group the caller started before stays theirs)."""
    started_before = dist.is_available() and dist.is_initialized()
    job = setup_distributed(device)
    try:
        yield job
    finally:
        if not started_before and dist.is_available() and dist.is_initialized():
            # DDP wrappers the job dropped live on in reference cycles; collect them while the
            # group is still registered. Were a DDP freed after the group, it would destroy the
            # group itself, holding the GIL while it waits for gloo's worker threads, which may
            # need the GIL to free their last tensors: a hang at exit (pytorch/pytorch#56297).
            gc.collect()
            dist.destroy_process_group()


def barrier(job: Distributed) -> None:
    """Wait for every rank; on CUDA on this process's GPU, as NCCL requires."""
    if job.enabled:
        dist.barrier(device_ids=[job.device.index] if job.device.type == "cuda" else None)


def all_agree(job: Distributed, *flags: bool) -> tuple[bool, ...]:
    """Each flag becomes true on every rank if it is true on any rank."""
    if not job.enabled:
        return flags
    values = torch.tensor([float(f) for f in flags], device=job.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def mean_over_ranks(job: Distributed, values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over all ranks (as a tensor on the job's device)."""
    if not job.enabled:
        return values
    values = values.to(job.device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)  # AVG exists for NCCL only, not for gloo
    return values / job.world_size


# -- seeds and signals ----------------------------------------------------------------------------


def derived_seed(*numbers: int) -> int:
    """One well-mixed 32-bit seed from several numbers, e.g. (seed, rank, step)."""
    return int(np.random.SeedSequence(numbers).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (dropout and initialization draw from torch's)."""
    random.seed(seed)
    torch.manual_seed(seed)


class GracefulStop:
    """Turn Ctrl-C (and SIGTERM from schedulers) into a flag checked between steps, so the loop
    can finish the step, save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
