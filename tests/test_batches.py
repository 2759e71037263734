"""The batch sampler and evaluation windows: shifted by one, seeded, resumable, rank-sliced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data.batches import BatchSampler, eval_windows
from model.errors import DataError

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.uint16)


def test_sampler_windows_are_shifted_by_one(tokens: np.ndarray) -> None:
    x, y = BatchSampler(tokens, block_size=16, batch_size=4, seed=1).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    data = torch.from_numpy(tokens.astype(np.int64))
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(len(data) - 16) if torch.equal(data[s:s + 16], row_x)]
        assert starts and torch.equal(data[starts[0] + 1:starts[0] + 17], row_y)


def test_sampler_is_seeded_and_ranks_differ(tokens: np.ndarray) -> None:
    def draws(**kwargs) -> list[torch.Tensor]:
        sampler = BatchSampler(tokens, 8, 4, **kwargs)
        return [sampler.next_batch()[0] for _ in range(3)]

    same = [torch.equal(a, b) for a, b in zip(draws(seed=5), draws(seed=5))]
    assert all(same)
    assert not torch.equal(draws(seed=5)[0], draws(seed=6)[0])
    rank0, rank1 = draws(seed=5, rank=0, world_size=2), draws(seed=5, rank=1, world_size=2)
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1))


def test_ranks_together_draw_one_global_batch(tokens: np.ndarray) -> None:
    whole = BatchSampler(tokens, 8, 6, seed=4).next_batch()[0]
    parts = [BatchSampler(tokens, 8, 2, seed=4, rank=r, world_size=3).next_batch()[0]
             for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_sampler_resumes_exactly(tokens: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    sampler = BatchSampler(path, 8, 4, seed=3)
    for _ in range(5):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next_batch() for _ in range(3)]
    restored = BatchSampler(path, 8, 4, seed=999)
    restored.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, (restored.next_batch() for _ in range(3))):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(DataError, match="sampler state is damaged"):
        restored.load_state_dict({"seed": 1})


def test_sampler_reads_dtype_from_meta(tmp_path: Path) -> None:
    wide = np.array([70000, 1, 2, 3, 4, 5], dtype=np.uint32)
    wide.tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32"}))
    x, y = BatchSampler(tmp_path / "train.bin", 5, 1, seed=0).next_batch()
    assert x.tolist() == [[70000, 1, 2, 3, 4]] and y.tolist() == [[1, 2, 3, 4, 5]]


def test_sampler_rejects_short_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        BatchSampler(np.arange(8), block_size=8, batch_size=1, seed=0)
    with pytest.raises(DataError, match="not found"):
        BatchSampler(tmp_path / "absent.bin", 8, 1, seed=0)
    (tmp_path / "empty.bin").write_bytes(b"")  # a split with no tokens: mmap refuses it
    with pytest.raises(DataError, match="holds 0 tokens"):
        BatchSampler(tmp_path / "empty.bin", 8, 1, seed=0)


def test_eval_windows_are_fixed(tokens: np.ndarray) -> None:
    first = eval_windows(tokens, 16, 4, 3)
    second = eval_windows(tokens, 16, 4, 3)
    assert len(first) == 3 and first[0][0].shape == (4, 16)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert first[-1][1][-1, -1].item() == int(tokens[-1])  # reaches the end of the split


def test_sequential_windows_cover_every_target_once(tokens: np.ndarray, monkeypatch) -> None:
    """bench/quality.py's whole-split windows (its bits per byte count every target once)."""
    monkeypatch.syspath_prepend(str(BENCH))
    from quality import sequential_windows

    batches = list(sequential_windows(tokens[:1000], block_size=64, batch_size=5))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert xs.tolist() == tokens[:999].tolist() and ys.tolist() == tokens[1:1000].tolist()
    assert batches[-1][0].shape == (1, 999 - 15 * 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_on_cuda(tokens: np.ndarray) -> None:
    x, y = BatchSampler(tokens, 16, 4, seed=1, device="cuda").next_batch()
    cpu_x, _ = BatchSampler(tokens, 16, 4, seed=1).next_batch()
    assert x.is_cuda and torch.equal(x.cpu(), cpu_x)


def test_token_files_over_4_gb_are_read_beyond_the_4_gb_mark(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    tokens = (1 << 31) + 100  # uint16: 4 GiB + 200 bytes, a sparse file that takes no disk
    with open(path, "wb") as f:
        f.truncate(2 * (tokens - 4))
    if path.stat().st_blocks * 512 > 1 << 20:
        pytest.skip("this file system does not make sparse files")
    with open(path, "ab") as f:
        f.write(np.array([1, 2, 3, 4], dtype=np.uint16).tobytes())
    (x, y), = eval_windows(path, block_size=3, batch_size=2, num_batches=1)
    assert x[1].tolist() == [1, 2, 3] and y[1].tolist() == [2, 3, 4]  # offset 2**32 + 192 bytes
    x, y = BatchSampler(path, 3, 1, seed=0).next_batch()  # starts drawn as int64 too
    assert x.shape == (1, 3)
