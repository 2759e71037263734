"""CPU thread policy: the cores idle at start, for training and for decoding; kept across resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import tiny_raw  # tests/ is on sys.path under pytest (rootdir conftest)

from model import runtime
from model.config import config_from_dict
from model.training.callbacks import Callback, TrainingState
from model.training.loop import train


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    """One rule for training and for decoding."""
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    for busy, expected in ((0.0, 2), (0.3, 2), (1.0, 1), (1.8, 1), (5.0, 1)):
        monkeypatch.setattr(runtime, "busy_cores", lambda interval=0.25, b=busy: b)
        assert runtime.default_threads() == expected, busy


def test_processes_of_one_torchrun_machine_share_its_cores(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    monkeypatch.setattr(runtime, "busy_cores", lambda interval=0.25: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.default_threads() == 2


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="busy_cores reads Linux /proc/stat")
def test_busy_cores_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = runtime.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.6 <= busy <= runtime.os.cpu_count() + 0.01


def test_resume_keeps_the_thread_count_it_started_with(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)
    raw = tiny_raw(tmp_path, max_steps=4, threads=None)
    train(config_from_dict(raw))
    state = json.loads((tmp_path / "run" / "latest" / "state.json").read_text())
    assert state["threads"] == 1
    monkeypatch.setattr(runtime, "default_threads", lambda: 2)  # the machine got quieter
    raw = tiny_raw(tmp_path, max_steps=8, threads=None, resume=True)
    seen: list[int] = []

    class Threads(Callback):
        def after_step(self, state: TrainingState) -> None:
            seen.append(torch.get_num_threads())

    train(config_from_dict(raw), callbacks=[Threads()])
    assert seen == [1, 1, 1, 1]
