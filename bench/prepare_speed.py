"""Data preparation: wall time, throughput and peak memory, against tiktoken's own speed.

    python bench/prepare_speed.py --size 10MB,200MB,1GB --layout file,dir --tokenizer gpt2,bpe
    python bench/prepare_speed.py --size 200MB --source hf-parquet
    python bench/prepare_speed.py --corpus some/dir --tokenizer bpe      # an existing corpus

Each corpus is generated from tiny-shakespeare with variation (lines drawn at random from the
original and from variants with words swapped and capitalised, seeded), so nothing repeats in a
way a cache could exploit. Layouts: one .txt file, a directory of 250 KB files, or (--source
hf-parquet) a local Parquet dataset of ~5 KB rows read through hf:. Every combination runs
prepare_data in a fresh subprocess, which reports its own peak RSS (getrusage) and the time of
its phases (timers around train_tokenizer and write_tokens). Beside each run,
the raw speed of tiktoken's encode_ordinary_batch with 2 threads on 20 MB of the same text and
the same tokenizer is measured, so the ratio is comparable on a shared machine. Generated files
live in a temporary directory that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
from common import ROOT, SHARED, machine_line, require_tiny_shakespeare, scratch_dir

SHARED_TIKTOKEN = SHARED / "tiktoken_cache"
FILE_BYTES = 250_000  # directory layout: one file per 250 KB
ROW_BYTES = 5_000  # hf-parquet layout: rows of about this size (OpenWebText's are ~5 KB)
RAW_SAMPLE = 20_000_000  # bytes of text for the raw tiktoken measurement

# Runs in the subprocess: prepare_data with timers around its phases, results as JSON.
CHILD = """
import json, resource, sys, time
import model.data.prepare as p
from model.config import DataConfig
phases = {}
def timed(name, fn):
    def run(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = time.perf_counter() - start
            phases[name + " cpu"] = time.process_time() - cpu
    return run
p.train_tokenizer = timed("tokenizer", p.train_tokenizer)
p.write_tokens = timed("tokenizing", p.write_tokens)
start = time.perf_counter()
data = p.prepare_data(DataConfig(**json.loads(sys.argv[1])), 64)
wall = time.perf_counter() - start
split_bytes = sum(data.meta["splits"][s]["bytes"] for s in p.SPLITS)
usage = resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss: the peak, in KiB on Linux
print(json.dumps({"wall": wall, "phases": phases, "bytes": split_bytes, "dir": str(data.dir),
                  "rss": usage.ru_maxrss / 1024, "cpu": usage.ru_utime + usage.ru_stime}))
"""

# Runs in a subprocess too: encode_ordinary_batch with 2 threads, the tokenizer from meta.json.
RAW = """
import json, sys, time
from model.data.tokenizer import tokenizer_from_spec
meta = json.load(open(sys.argv[1]))
encoding = tokenizer_from_spec(meta["tokenizer"]).encoding
with open(sys.argv[2], encoding="utf-8") as f:
    text = f.read(int(sys.argv[3]))
texts = [text[i:i + (1 << 18)] for i in range(0, len(text), 1 << 18)]
best = best_cpu = 0.0
for _ in range(2):
    start, cpu = time.perf_counter(), time.process_time()
    encoding.encode_ordinary_batch(texts, num_threads=2)
    best = max(best, len(text.encode()) / (time.perf_counter() - start))
    best_cpu = max(best_cpu, len(text.encode()) / (time.process_time() - cpu))
print(json.dumps({"raw": best, "raw_cpu": best_cpu}))
"""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*(KB|MB|GB)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: write e.g. 10MB, 200MB or 1GB")
    unit = {"KB": 1e3, "MB": 1e6, "GB": 1e9}[(match.group(2) or "MB").upper()]
    return int(float(match.group(1)) * unit)


def varied_lines(seed: int) -> list[str]:
    """Tiny-shakespeare's lines plus nine variants of each with words swapped or capitalised."""
    lines = require_tiny_shakespeare().read_text(encoding="utf-8").splitlines(keepends=True)
    words = sorted({w for line in lines for w in line.split()})
    rng = random.Random(seed)
    pool = list(lines)
    for _ in range(9):
        for line in lines:
            parts = line.split(" ")
            for _ in range(1 + len(parts) // 4):
                k = rng.randrange(len(parts))
                if parts[k].strip():
                    word = rng.choice(words)
                    parts[k] = word.upper() if rng.random() < 0.1 else word
            text = " ".join(parts)
            pool.append(text if text.endswith("\n") else text + "\n")
    return pool


def text_stream(total: int, seed: int) -> Iterator[str]:
    """Blocks of about 4 MB of varied text, `total` bytes in all."""
    pool = varied_lines(seed)
    rng = np.random.default_rng(seed)
    written = 0
    while written < total:
        block = "".join(pool[i] for i in rng.integers(0, len(pool), 100_000))
        block = block.encode()[:total - written].decode("utf-8", errors="ignore")
        written += len(block.encode())
        yield block


def generate(kind: str, size: int, where: Path, seed: int) -> tuple[str, Path]:
    """Write a corpus; returns its data.source and a file of its first 20 MB for the raw speed."""
    sample = where / "sample.txt"
    with open(sample, "w", encoding="utf-8") as sample_file:
        if kind == "file":
            path = where / "corpus.txt"
            with open(path, "w", encoding="utf-8") as f:
                for block in text_stream(size, seed):
                    f.write(block)
                    if sample_file.tell() < RAW_SAMPLE:
                        sample_file.write(block)
            return str(path), sample
        blocks = text_stream(size, seed)
        if kind == "dir":
            folder, count = where / "corpus", 0
            folder.mkdir()
            for block in blocks:
                if sample_file.tell() < RAW_SAMPLE:
                    sample_file.write(block)
                start = 0
                while start < len(block):  # files of about FILE_BYTES, ending at a line's end
                    cut = block.find("\n", start + FILE_BYTES) + 1 or len(block)
                    (folder / f"{count:06d}.txt").write_text(block[start:cut], encoding="utf-8")
                    start, count = cut, count + 1
            return str(folder), sample
        return f"hf:{write_parquet(blocks, where / 'parquet', sample_file)}", sample


def write_parquet(blocks: Iterator[str], folder: Path, sample_file: TextIO) -> Path:
    """Rows of about ROW_BYTES in shards of about 256 MB, as hub datasets come."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    schema = pa.schema([("text", pa.string())])
    writer, shard, in_shard = None, 0, 0
    for block in blocks:
        if sample_file.tell() < RAW_SAMPLE:
            sample_file.write(block)
        rows, start = [], 0
        while start < len(block):
            cut = block.find("\n", start + ROW_BYTES) + 1 or len(block)
            rows.append(block[start:cut])
            start = cut
        if writer is None:
            writer = pq.ParquetWriter(folder / f"train-{shard:05d}.parquet", schema)
        writer.write_table(pa.table({"text": rows}, schema=schema), row_group_size=1000)
        in_shard += len(block)
        if in_shard >= 256_000_000:
            writer.close()
            writer, shard, in_shard = None, shard + 1, 0
    if writer is not None:
        writer.close()
    return folder


def run(args: list[str], env: dict[str, str]) -> dict:
    """The JSON that a Python subprocess prints last."""
    proc = subprocess.run([sys.executable, "-c", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"subprocess failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="10MB", help="comma-separated, e.g. 10MB,200MB,1GB")
    parser.add_argument("--layout", default="file", help="file, dir or both: file,dir")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2, bpe or both: gpt2,bpe")
    parser.add_argument("--source", default="text", help="text (--layout), hf-parquet, or both")
    parser.add_argument("--corpus", default=None, help="an existing source instead (sizes unused)")
    parser.add_argument("--bpe-vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2, help="data.num_proc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="where generated corpora go (deleted after)")
    args = parser.parse_args()

    env = dict(os.environ)
    if "TIKTOKEN_CACHE_DIR" not in env and SHARED_TIKTOKEN.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print(machine_line())
    print(f"{len(os.sched_getaffinity(0))} CPUs usable, load average "
          f"{os.getloadavg()[0]:.2f} at start, tokenizer threads {args.workers}")
    base = run(["import json, resource, model.data.prepare, model.data.tokenizer as t; "
                "t.train_tokenizer('gpt2', []); "
                "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))"],
               env)
    print(f"a process that only imports model.data.prepare and loads gpt2: "
          f"{base['rss'] / 1024:.0f} MiB peak RSS")
    print("MB/s: whole preparation; tokenizing: its write_tokens phase; raw: tiktoken's "
          "encode_ordinary_batch, 2 threads; per CPU-s: MB per CPU-second, which a busy machine "
          "disturbs less than wall time")
    print("| corpus | tokenizer | wall s | MB/s | tokenizing MB/s | raw MB/s | ratio | "
          "tokenizing MB/CPU-s | raw MB/CPU-s | CPU ratio | tokenizer s | peak RSS MiB | CPU % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    layouts = [layout for source in args.source.split(",") for layout in
               (args.layout.split(",") if source == "text" else [source])]
    sizes = [0] if args.corpus else [parse_size(s) for s in args.size.split(",")]
    with scratch_dir("smallgpt-bench-", args.tmp) as tmp:
        for size in sizes:
            for layout in dict.fromkeys(layouts):
                where = Path(tmp) / f"{layout}-{size}"
                where.mkdir()
                if args.corpus:
                    source, sample, name = args.corpus, None, args.corpus
                else:
                    source, sample = generate(layout, size, where, args.seed)
                    name = f"{size / 1e6:g} MB {layout}"
                for tokenizer in args.tokenizer.split(","):
                    cfg = {"source": source, "tokenizer": tokenizer, "num_proc": args.workers,
                           "bpe_vocab_size": args.bpe_vocab_size,
                           "cache_dir": str(where / f"cache-{tokenizer}")}
                    result = run([CHILD, json.dumps(cfg)], env)
                    raw = {}
                    if sample is not None:
                        raw = run([RAW, str(Path(result["dir"]) / "meta.json"), str(sample),
                                   str(RAW_SAMPLE)], env)
                    mb, phases = result["bytes"] / 1e6, result["phases"]
                    speeds = [mb / phases["tokenizing"], raw.get("raw", 0) / 1e6,
                              mb / phases["tokenizing cpu"], raw.get("raw_cpu", 0) / 1e6]
                    cells = [f"{x:.1f}" if x else "-" for x in speeds]
                    ratios = [f"{speeds[i] / speeds[i + 1]:.2f}" if speeds[i + 1] else "-"
                              for i in (0, 2)]
                    print(f"| {name} | {tokenizer} | {result['wall']:.1f} | "
                          f"{mb / result['wall']:.1f} | {cells[0]} | {cells[1]} | {ratios[0]} | "
                          f"{cells[2]} | {cells[3]} | {ratios[1]} | "
                          f"{phases.get('tokenizer', 0):.1f} | {result['rss']:.0f} | "
                          f"{100 * result['cpu'] / result['wall']:.0f} |", flush=True)
                    shutil.rmtree(cfg["cache_dir"], ignore_errors=True)
                shutil.rmtree(where, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
