"""Shared test set-up."""

import pytest
import torch


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
