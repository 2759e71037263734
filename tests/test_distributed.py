"""Distributed jobs: every collective gets a tensor on the job's device, as NCCL requires.

NCCL takes only tensors on the process's own GPU; gloo, the CPU backend the other tests use,
takes CPU tensors too, so a collective on a tensor that was never put on the job's device works
in a CPU test and fails at the first step on GPUs. The tests below catch that without a GPU:
a real 2-process gloo job runs with every collective checked, and a tensor whose device was left
to torch's default (the CPU) counts as misplaced, since on a GPU job it would be.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_training import step_losses, tiny_raw
from torch.overrides import TorchFunctionMode

from model.config import config_from_dict
from model.errors import ConfigError
from model.training import distributed
from model.training.callbacks import Callback, TrainingState

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


def tiny_job(tmp_path: Path, name: str, **train: object) -> dict:
    """A 2-process job of a few steps on a small corpus, with dropout so that each rank's
    random generators matter."""
    raw = tiny_raw(tmp_path, max_steps=4, eval_interval=2, eval_steps=1, batch_size=2, **train)
    raw["model"]["dropout"] = 0.1
    raw["train"]["out_dir"] = str(tmp_path / name)
    return raw


class StopAfterEvaluation(Callback):
    """Asks to stop where rank 0 alone has evaluated: every rank must still stop there."""

    def after_evaluation(self, state: TrainingState) -> None:
        state.request_stop()


def rank_main(rank: int, world_size: int, jobs: list[tuple[int, dict]], report: str,
              timeout: float) -> None:
    """One process of a torchrun-like job: trains each (port, config) in turn, collectives
    checked, and writes the collectives it ran to `report`.<rank>. Each run gets its own port:
    a rank that finishes first must not find the previous run's rendezvous still open. A
    process still running after `timeout` seconds prints where it is stuck and exits."""
    from model.training.loop import train

    faulthandler.dump_traceback_later(timeout, exit=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1")
    calls: list[str] = []
    for port, raw in jobs:
        os.environ["MASTER_PORT"] = str(port)
        device = torch.device(raw["train"]["device"])
        if device.type == "cuda":
            device = torch.device("cuda", rank)
        callbacks = [StopAfterEvaluation()] if raw.pop("stop_after_evaluation", False) else []
        with checked_collectives(device, calls):
            train(config_from_dict(raw, name="ddp"), callbacks=callbacks)
    Path(f"{report}.{rank}").write_text(" ".join(calls))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(world_size: int, jobs: list[dict], report: str, timeout: float = 240) -> None:
    """rank_main in `world_size` fresh processes; a hang fails the test instead of stalling it."""
    ports = [free_port() for _ in jobs]
    ctx = mp.start_processes(rank_main, args=(world_size, list(zip(ports, jobs)), report,
                                              timeout - 20), nprocs=world_size, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises when a process fails
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"the {world_size}-process job did not finish in {timeout} s")


def test_two_process_job_uses_the_job_device_and_resumes_bit_for_bit(tmp_path):
    """Every collective is checked (this fails on a collective over a CPU tensor made without
    device=, the bug NCCL jobs hit at their first step). The job then stops after one step
    and resumes: with dropout on, the losses equal an uninterrupted run's only when every
    rank draws the same masks after the resume as without it. A last run is stopped by a
    callback on rank 0 alone."""
    jobs = [tiny_job(tmp_path, "full"),
            tiny_job(tmp_path, "resumed", time_budget_s=1e-9),  # stops after step 1
            tiny_job(tmp_path, "resumed", resume=True),
            dict(tiny_job(tmp_path, "stopped"), stop_after_evaluation=True)]
    report = str(tmp_path / "calls")
    run_job(2, jobs, report)
    for rank in range(2):
        calls = Path(f"{report}.{rank}").read_text().split()
        # Agreeing on stopping and averaging the losses, at every step of every run.
        assert calls.count("all_reduce") >= 2 * 8, calls
    full, resumed = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert full.keys() == {1, 2, 3, 4}
    assert resumed == full
    # A stop asked by a callback on rank 0 only (after its evaluation) ends every rank there.
    assert step_losses(tmp_path / "stopped").keys() == {1, 2}


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
    job = distributed.Distributed(rank=0, local_rank=1, world_size=2, device=device)
    if device.type == "meta":
        distributed.mean_over_ranks(job, torch.zeros(3))
        assert seen == [("all_reduce", device)]
    else:
        distributed.barrier(job)
        assert seen == [("barrier", [1])]
    # all_agree reads its result on the host, which a meta tensor has not got: check the device.
    made: list[torch.device] = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda data, device=None: (
        made.append(torch.device(device) if device is not None else None)
        or real_tensor(data)))
    assert distributed.all_agree(job, False, True) == (False, True)
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
    job = distributed.setup_distributed(torch.device("cuda"))
    assert job.device == torch.device("cuda", 1) and job.rank == 1 and job.enabled
    # The timeout outlasts a long data preparation that the other ranks wait for.
    assert started == [{"backend": "cuda:nccl,cpu:gloo", "device_id": torch.device("cuda", 1),
                        "timeout": distributed.COLLECTIVE_TIMEOUT}]
    assert distributed.COLLECTIVE_TIMEOUT.total_seconds() >= 3600

    started.clear()
    job = distributed.setup_distributed(torch.device("cpu"))
    assert job.device == torch.device("cpu")
    assert started == [{"backend": "gloo", "timeout": distributed.COLLECTIVE_TIMEOUT}]


def test_more_processes_than_gpus_is_a_config_error(monkeypatch):
    started = _fake_torchrun(monkeypatch, rank=1, world_size=2, gpus=1)
    with pytest.raises(ConfigError, match="at most one process per GPU"):
        distributed.setup_distributed(torch.device("cuda"))
    assert started == []


def test_a_single_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("no group"))
    job = distributed.setup_distributed(torch.device("cpu"))
    assert not job.enabled and job.is_main and job.device == torch.device("cpu")


def test_a_group_the_caller_started_stays_open(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        with distributed.distributed_job(torch.device("cpu")):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("rank", "local_rank", "order"), [
    (0, 0, ["prepare", "barrier", "barrier"]),  # rank 0 first
    (8, 0, ["barrier", "prepare", "barrier"]),  # then the first process of each other machine
    (9, 1, ["barrier", "barrier", "prepare"]),  # then the rest, which only read
])
def test_token_files_are_prepared_by_one_process_at_a_time_per_machine(monkeypatch, rank,
                                                                       local_rank, order):
    from model.training import setup as run_setup

    seen: list[str] = []
    monkeypatch.setattr(run_setup, "prepare_data", lambda *args: seen.append("prepare") or args)
    monkeypatch.setattr(distributed, "barrier", lambda job: seen.append("barrier"))
    job = distributed.Distributed(rank=rank, local_rank=local_rank, world_size=16)
    run_setup.prepare_data_once(config_from_dict({}), job)
    assert seen == order
