"""Shared test set-up."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Beside a checkout in the development set-up; CI exports TIKTOKEN_CACHE_DIR to it instead.
SHARED_TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: a second intra-op thread only adds synchronisation, and on a
    busy 2-core machine its spin-waiting makes each op up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def float32_cpu():
    """dtype auto computes in float32 in every test and in the processes tests start, whatever
    the CPU: results compared with float32 references (transformers, a library call, another
    process) must not depend on the machine. tests/test_precision.py fakes both kinds of CPU."""
    import os

    from model.runtime import CPU_BF16_ENV

    before = os.environ.get(CPU_BF16_ENV)
    os.environ[CPU_BF16_ENV] = "0"
    yield
    if before is None:
        del os.environ[CPU_BF16_ENV]
    else:
        os.environ[CPU_BF16_ENV] = before


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped where none is visible")


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda run only where torch sees a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def tiktoken_loads_gpt2(env: dict[str, str]) -> bool:
    """Whether tiktoken loads GPT-2's BPE under env: from its cache directory (TIKTOKEN_CACHE_DIR
    or its default) or by downloading it. In a child process with a time limit: tiktoken's
    download has none, and a network that drops packets would hang the suite."""
    load = "import tiktoken; tiktoken.get_encoding('gpt2')"
    try:
        done = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@functools.cache
def gpt2_vocabulary_env() -> dict[str, str] | None:
    """The environment changes under which tiktoken can load GPT-2's BPE right now ({}: as it
    is), or None where it cannot. Asked once per session."""
    if tiktoken_loads_gpt2(dict(os.environ)):
        return {}
    shared = {"TIKTOKEN_CACHE_DIR": str(SHARED_TIKTOKEN_CACHE)}
    if SHARED_TIKTOKEN_CACHE.is_dir() and tiktoken_loads_gpt2({**os.environ, **shared}):
        return shared
    return None


@pytest.fixture
def gpt2_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that need GPT-2's vocabulary run whenever tiktoken can load it, else skip."""
    env = gpt2_vocabulary_env()
    if env is None:
        pytest.skip("tiktoken cannot load GPT-2's BPE here: set TIKTOKEN_CACHE_DIR to a directory "
                    "holding its files, or allow the download")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
