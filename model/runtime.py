"""Where and how the model runs: the device, the dtype it computes in (and why), autocast, and
the CPU threads. What every wing may use; a training job's processes are
model/training/distributed.py.

Nothing here runs at import; the training and sampling code call these with explicit arguments.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.errors import ConfigError

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
    """The dtype to compute in. The fields decide what happens next; `reason` only explains
    the choice to the user ("auto: ...")."""

    dtype: torch.dtype
    automatic: bool  # chosen by `auto`, not named by the user
    native: bool  # the device computes `dtype` in hardware; False: torch emulates it
    device_type: str  # "cpu", "cuda", "mps", ...
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"dtype {self.name} ({self.reason})"


def computes_natively(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` computes `dtype` in hardware: float32 everywhere; bfloat16 on a CPU
    with native_bf16_feature and on a CUDA GPU that supports it; float16 on a GPU."""
    if dtype == torch.float32:
        return True
    if device.type == "cpu":
        return dtype == torch.bfloat16 and native_bf16_feature() is not None
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    return True


def choose_dtype(name: str, device: torch.device, setting: str = "train.dtype") -> DtypeChoice:
    """'auto': bfloat16 on CUDA GPUs that support it, float16 on older ones; on the CPU
    bfloat16 where the processor computes it natively (native_bf16_feature), float32 elsewhere
    (mps included). An explicit name is taken as given. Errors name `setting`."""
    if name == "auto":
        dtype, reason = _automatic(device, setting)
        return DtypeChoice(dtype, automatic=True, native=computes_natively(dtype, device),
                           device_type=device.type, reason=reason)
    if name not in DTYPES:
        raise ConfigError(f"{setting}: {name!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        raise ConfigError(f"{setting}: float16 needs a GPU; use float32 or bfloat16 on the CPU")
    dtype = DTYPES[name]
    return DtypeChoice(dtype, automatic=False, native=computes_natively(dtype, device),
                       device_type=device.type, reason=f"{setting}={name}")


def _automatic(device: torch.device, setting: str) -> tuple[torch.dtype, str]:
    """What `auto` picks on `device`, and why in words."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bfloat16"
        return torch.float16, "auto: this GPU lacks bfloat16"
    if device.type == "cpu":
        feature = native_bf16_feature()
        if feature:
            return torch.bfloat16, (f"auto: this CPU computes bfloat16 natively, {feature}; "
                                    f"{setting}=float32 for full precision")
        why = (f"{CPU_BF16_ENV}=0" if os.environ.get(CPU_BF16_ENV, "").strip() == "0"
               else f"no {' or '.join(NATIVE_BF16_FEATURES)}")
        return torch.float32, (f"auto: this CPU has no native bfloat16 ({why}); emulated, "
                               "bfloat16 would be slower")
    return torch.float32, f"auto: float32 on {device.type}"


# `auto` keeps float32 weights for generation on the CPU below this size: decoding a small
# model in bfloat16 there is slower than in float32, as the per-operation conversions outweigh
# the halved weight reads (bench/dtype_speed.py measures both).
MIN_BF16_GENERATION_PARAMS = 50_000_000


def generation_precision(choice: DtypeChoice, num_params: int) -> DtypeChoice:
    """The dtype to hold a model's weights in for generation: `choice`, except that the
    bfloat16 `auto` picked on a CPU becomes float32 for models under
    MIN_BF16_GENERATION_PARAMS."""
    if (choice.automatic and choice.device_type == "cpu" and choice.dtype == torch.bfloat16
            and num_params < MIN_BF16_GENERATION_PARAMS):
        return DtypeChoice(torch.float32, automatic=True, native=True, device_type="cpu",
                           reason=f"auto: a model of {num_params / 1e6:.1f}M parameters "
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

    On the CPU in bfloat16, attention also takes torch's math kernels (matmuls and a softmax),
    whose matmuls get the bfloat16 units: torch's CPU flash-attention kernels are slower than
    those in bfloat16."""
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


def default_threads() -> int:
    """Threads for training or generation when none are set: the cores no other process is
    using when it starts (at least one); under torchrun the processes of one machine share
    them. A thread on a core another process holds would hold every operation up."""
    cores = usable_cores()
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(share, round(cores - busy_cores())))


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls on CUDA (Ampere and newer run them on tensor cores)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
