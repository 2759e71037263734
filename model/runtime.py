"""Where and how the model runs: device and dtype choice, autocast, threads, seeding, Ctrl-C
as a request to stop, and torchrun jobs (set-up and the collectives training uses).

Nothing here runs at import; the training and sampling code call these with explicit arguments.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How long a rank waits in a collective. The other ranks wait in a barrier while the first
# process of each machine prepares the token files, which for a corpus of tens of GB takes
# hours at ~10 MB/s: torch's default (10 minutes for NCCL) would end the job during it.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


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


# CPU features that compute bfloat16 in hardware: AVX512-BF16 dot products (AMD Zen 4 and
# later, Intel Cooper Lake, Sapphire Rapids and later) and AMX tiles (Sapphire Rapids and
# later). Elsewhere torch emulates bfloat16 by converting to float32 and back, which is slower
# than float32 itself, so `auto` must not pick it there.
NATIVE_BF16_FEATURES = ("amx_bf16", "avx512_bf16")
# Overrides the detection: 0 treats the CPU as lacking native bfloat16, 1 as having it (a CPU
# torch does not know, or a test suite that must compute the same on every machine).
CPU_BF16_ENV = "SMALLGPT_CPU_BF16"


def cpu_capabilities() -> dict[str, Any]:
    """What torch found this CPU can do (torch.cpu.get_capabilities: feature name -> bool);
    empty where this torch cannot tell."""
    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):
        return {}


def native_bf16_feature() -> str | None:
    """Why this CPU counts as computing bfloat16 natively (the feature torch reports, or the
    SMALLGPT_CPU_BF16=1 override), or None when it would only emulate it."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return f"{CPU_BF16_ENV}=1" if override == "1" else None
    found = cpu_capabilities()
    return next((name for name in NATIVE_BF16_FEATURES if found.get(name)), None)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype to compute in and why, in words for the user ("auto: ...")."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"dtype {self.name} ({self.reason})"


def choose_dtype(name: str, device: torch.device, setting: str = "train.dtype") -> DtypeChoice:
    """'auto': bfloat16 on CUDA GPUs that support it, float16 on older ones; on the CPU
    bfloat16 where the processor computes it natively (native_bf16_feature), float32 elsewhere
    (mps included). An explicit name is taken as given. Errors name `setting`."""
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return DtypeChoice(torch.bfloat16, "auto: this GPU supports bfloat16")
            return DtypeChoice(torch.float16, "auto: this GPU lacks bfloat16")
        if device.type == "cpu":
            feature = native_bf16_feature()
            if feature:
                return DtypeChoice(torch.bfloat16, f"auto: this CPU computes bfloat16 natively, "
                                   f"{feature}; {setting}=float32 for full precision")
            why = (f"{CPU_BF16_ENV}=0" if os.environ.get(CPU_BF16_ENV, "").strip() == "0"
                   else f"no {' or '.join(NATIVE_BF16_FEATURES)}")
            return DtypeChoice(torch.float32, "auto: this CPU has no native bfloat16 "
                               f"({why}); emulated, bfloat16 would be slower")
        return DtypeChoice(torch.float32, f"auto: float32 on {device.type}")
    if name not in DTYPES:
        raise ConfigError(f"{setting}: {name!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        raise ConfigError(f"{setting}: float16 needs a GPU; use float32 or bfloat16 on the CPU")
    return DtypeChoice(DTYPES[name], f"{setting}={name}")


def pick_dtype(name: str, device: torch.device, setting: str = "train.dtype") -> torch.dtype:
    """choose_dtype's dtype, without the reason."""
    return choose_dtype(name, device, setting).dtype


# Decoding a small model in bfloat16 on the CPU is slower than in float32 (per-operation
# conversions outweigh the halved weight reads): bench/dtype_speed.py, AMD EPYC avx512_bf16,
# 1 thread: small.yaml's model (2M parameters) 92 against 153 tokens/s, GPT-2-124M's shape 21.7
# against 14.8. So `auto` keeps float32 weights for generation below this size.
MIN_BF16_GENERATION_PARAMS = 50_000_000


def generation_precision(choice: DtypeChoice, num_params: int, auto: bool) -> DtypeChoice:
    """The dtype to hold a model's weights in for generation: `choice`, except that `auto`'s
    CPU bfloat16 becomes float32 for models under MIN_BF16_GENERATION_PARAMS."""
    if (auto and choice.dtype == torch.bfloat16 and "CPU" in choice.reason
            and num_params < MIN_BF16_GENERATION_PARAMS):
        return DtypeChoice(torch.float32, f"auto: a model of {num_params / 1e6:.1f}M parameters "
                           "decodes faster in float32 on the CPU than in bfloat16")
    return choice


def training_precision(choice: DtypeChoice) -> str:
    """How training uses `choice`, in words: the matmuls run in it under autocast, while the
    weights, their gradients and the optimizer's moments stay float32."""
    if choice.dtype == torch.float32:
        return choice.describe()
    return (f"{choice.describe()}: autocast computes in {choice.name}; weights and optimizer "
            "state stay float32")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision: weights stay float32, matmuls run in `dtype`. A no-op for float32.

    On the CPU in bfloat16, attention also takes torch's math kernels (matmuls and a softmax):
    its CPU flash-attention kernels are slower in bfloat16 than those, whose matmuls get the
    bfloat16 units (small.yaml's training step, one thread, CPU time: 370 ms against 386 ms
    with flash attention, 538 ms in float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type != "cpu" or dtype != torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=dtype)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type="cpu", dtype=dtype))
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


# -- CPU threads --------------------------------------------------------------------------------
# A laptop always runs something else. torch's default is one OpenMP thread per core, and every
# parallel operation ends when its slowest thread does: if another process holds a core, the
# thread on it is descheduled and every operation waits for it. Small operations suffer most.


def configure_threads(threads: int) -> None:
    """Set this process's CPU intra-op thread count."""
    torch.set_num_threads(threads)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(interval: float = 0.25) -> float:
    """How many cores other processes keep busy, measured from /proc/stat over `interval`
    seconds (Linux); 0.0 where that is not available."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total1 - total0
    if elapsed <= 0:
        return 0.0
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / elapsed)


def idle_cores() -> int:
    """The cores no other process is using right now (at least one). Under torchrun the
    processes of one machine share them."""
    cores = usable_cores()
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(share, round(cores - busy_cores())))


def training_threads() -> int:
    """Threads for training when train.threads is not set: the cores idle when the run starts.
    Training's matmuls are large enough to gain from every free core, but a thread on a busy
    core would hold every operation up."""
    return idle_cores()


def generation_threads() -> int:
    """Threads for generating text when --threads is not given: the cores idle at start, as for
    training. On a quiet 2-core machine two threads decode faster than one (bench/busy_machine.py:
    6.4 s against 8.0 s for sample.py's 500 tokens); beside a busy process, one thread keeps each
    small matrix-vector product from waiting for a descheduled thread (17.6 s with two)."""
    return idle_cores()


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls on CUDA (Ampere and newer run them on tensor cores)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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


# -- torchrun jobs ------------------------------------------------------------------------------
# NCCL, the backend for CUDA, only takes tensors on the process's own GPU; gloo takes CPU tensors.
# So every collective below puts its tensor on `Distributed.device`, the device the job trains
# on: a CPU tensor would work in a CPU (gloo) job and fail at the first step on GPUs.


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
    ctx = setup_distributed(device)
    try:
        yield ctx
    finally:
        if not started_before and dist.is_available() and dist.is_initialized():
            # DDP wrappers the job dropped live on in reference cycles; collect them while the
            # group is still registered. Were a DDP freed after the group, it would destroy the
            # group itself, holding the GIL while it waits for gloo's worker threads, which may
            # need the GIL to free their last tensors: a hang at exit (pytorch/pytorch#56297).
            gc.collect()
            dist.destroy_process_group()


def barrier(ctx: Distributed) -> None:
    """Wait for every rank; on CUDA on this process's GPU, as NCCL requires."""
    if ctx.enabled:
        dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def all_agree(ctx: Distributed, *flags: bool) -> tuple[bool, ...]:
    """Each flag becomes true on every rank if it is true on any rank."""
    if not ctx.enabled:
        return flags
    values = torch.tensor([float(f) for f in flags], device=ctx.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def mean_over_ranks(ctx: Distributed, values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over all ranks (as a tensor on the job's device)."""
    if not ctx.enabled:
        return values
    values = values.to(ctx.device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)  # AVG exists for NCCL only, not for gloo
    return values / ctx.world_size

