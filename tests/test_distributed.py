"""Distributed jobs: every collective gets a tensor on the job's device, as NCCL requires.

NCCL takes only tensors on the process's own GPU; gloo, the CPU backend the other tests use,
takes CPU tensors too, so a collective on a tensor that was never put on the job's device works
in a CPU test and fails at the first step on GPUs. The tests below catch that without a GPU:
a real 2-process gloo job runs with every collective checked, and a tensor whose device was left
to torch's default (the CPU) counts as misplaced, since on a GPU job it would be.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

from model import runtime
from model.errors import ConfigError

# Functions that create a tensor and take `device=`; without it the tensor lands on the CPU.
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
             torch.arange, torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce", "gather", "scatter")
TAG = "_device_left_to_default"


class DefaultDeviceTracker(TorchFunctionMode):
    """Tags every tensor made by a factory without `device=`; `.to(device)` removes the tag,
    as the code then chose where the tensor lives."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        if func in FACTORIES and kwargs.get("device") is None:
            setattr(out, TAG, True)
        elif func is torch.Tensor.to and _names_device(args[1:], kwargs):
            setattr(out, TAG, False)
        return out


def _names_device(args: tuple, kwargs: dict) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str, int)) for a in args)


@contextlib.contextmanager
def checked_collectives(job_device: torch.device, calls: list[str]) -> Iterator[None]:
    """Every collective asserts its tensors lie on `job_device`, placed there by the code."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def checking(name: str):
        def collective(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            for t in tensors:
                assert t.device == job_device, f"{name} on {t.device}, the job runs on {job_device}"
                assert not getattr(t, TAG, False), (
                    f"{name} on a tensor made without device=: it is on the CPU whatever the job's "
                    "device, and NCCL rejects it")
            calls.append(name)
            return originals[name](tensor, *args, **kwargs)
        return collective

    original_barrier = dist.barrier

    def barrier(*args, **kwargs):
        ids = kwargs.get("device_ids")
        if job_device.type == "cuda":
            assert ids == [job_device.index], f"barrier on {ids}, the job runs on {job_device}"
        calls.append("barrier")
        return original_barrier(*args, **kwargs)

    for name in COLLECTIVES:
        setattr(dist, name, checking(name))
    dist.barrier = barrier
    try:
        with DefaultDeviceTracker():
            yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        dist.barrier = original_barrier


def tiny_job(tmp_path: Path) -> dict:
    words = ["to", "be", "or", "not", "the", "question", "whether", "nobler", "mind", "suffer"]
    text = "\n".join(" ".join(words[(i * k) % len(words)] for k in range(1, 5)) + "."
                     for i in range(2000))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text + "\n", encoding="utf-8")
    return {
        "model": dict(block_size=16, n_layer=1, n_head=2, n_embd=32),
        "data": dict(source=str(corpus), tokenizer="char", cache_dir=str(tmp_path / "cache"),
                     num_proc=1),
        "train": dict(out_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, lr=3e-3,
                      warmup_steps=1, eval_interval=2, eval_steps=1, log_interval=1, seed=7,
                      device="cpu", threads=1),
    }


def _rank_main(rank: int, world_size: int, port: int, raw: dict, report: str) -> None:
    from model.config import config_from_dict
    from model.training import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    calls: list[str] = []
    with checked_collectives(torch.device(raw["train"]["device"]), calls):
        train(config_from_dict(raw, name="ddp"), progress=False)
    Path(f"{report}.{rank}").write_text(" ".join(calls))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_collective_of_a_two_process_job_uses_the_job_device(tmp_path):
    """Fails on a collective over a CPU tensor made without device= (the bug NCCL jobs hit
    at their first step) and on any tensor off the job's device."""
    raw = tiny_job(tmp_path)
    report = str(tmp_path / "calls")
    mp.spawn(_rank_main, args=(2, _free_port(), raw, report), nprocs=2, join=True)
    for rank in range(2):
        calls = Path(f"{report}.{rank}").read_text().split()
        # Agreeing on stopping and averaging the losses at least, every step.
        assert calls.count("all_reduce") >= 3, calls


def test_the_tracker_catches_a_tensor_made_without_device():
    calls: list[str] = []
    with pytest.raises(AssertionError, match="without device="):
        with checked_collectives(torch.device("cpu"), calls):
            dist.all_reduce(torch.tensor([1.0]))  # checked before it needs a process group
    with checked_collectives(torch.device("cpu"), calls):
        placed = torch.tensor([1.0]).to("cpu")
        assert not getattr(placed, TAG)
        assert getattr(torch.zeros(2) + 1, TAG, False) is False  # results of ops are untagged


@pytest.mark.parametrize("name", ["cuda:1", "meta"])
def test_helpers_put_their_tensors_on_the_job_device(monkeypatch, name):
    """mean_over_ranks, all_agree and barrier, for a job on a device other than the CPU."""
    device = torch.device(name)
    seen: list[tuple[str, object]] = []
    monkeypatch.setattr(dist, "all_reduce",
                        lambda t, op=None: seen.append(("all_reduce", t.device)))
    monkeypatch.setattr(dist, "barrier",
                        lambda device_ids=None: seen.append(("barrier", device_ids)))
    ctx = runtime.Distributed(rank=0, local_rank=1, world_size=2, device=device)
    if device.type == "meta":
        runtime.mean_over_ranks(ctx, torch.zeros(3))
        assert seen == [("all_reduce", device)]
    else:
        runtime.barrier(ctx)
        assert seen == [("barrier", [1])]
    # all_agree reads its result on the host, which a meta tensor has not got: check the device.
    made: list[torch.device] = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda data, device=None: (
        made.append(torch.device(device) if device is not None else None)
        or real_tensor(data)))
    assert runtime.all_agree(ctx, False, True) == (False, True)
    assert made == [device]


def _fake_torchrun(monkeypatch, rank: int, world_size: int, gpus: int) -> list[dict]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    started: list[dict] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: started.append(kw))
    return started


def test_cuda_jobs_start_nccl_for_gpu_tensors_and_gloo_for_cpu_ones(monkeypatch):
    started = _fake_torchrun(monkeypatch, rank=1, world_size=2, gpus=2)
    ctx = runtime.setup_distributed(torch.device("cuda"))
    assert ctx.device == torch.device("cuda", 1) and ctx.rank == 1 and ctx.enabled
    assert started == [{"backend": "cuda:nccl,cpu:gloo", "device_id": torch.device("cuda", 1)}]

    started.clear()
    ctx = runtime.setup_distributed(torch.device("cpu"))
    assert ctx.device == torch.device("cpu") and started == [{"backend": "gloo"}]


def test_more_processes_than_gpus_is_a_config_error(monkeypatch):
    started = _fake_torchrun(monkeypatch, rank=1, world_size=2, gpus=1)
    with pytest.raises(ConfigError, match="at most one process per GPU"):
        runtime.setup_distributed(torch.device("cuda"))
    assert started == []


def test_a_single_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("no group"))
    ctx = runtime.setup_distributed(torch.device("cpu"))
    assert not ctx.enabled and ctx.is_main and ctx.device == torch.device("cpu")
