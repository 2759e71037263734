"""Data preparation speed: BPE training time and tokenization throughput.

    python bench/prepare_speed.py                      # the embedded Shakespeare (~5 MB)
    python bench/prepare_speed.py --corpus some/dir --vocab-size 8192

Trains a byte-level BPE on the corpus, then tokenizes the corpus with gpt2 (when its files are
available), the trained bpe and char, through `tokenize_documents`, the function prepare_data
uses (threads, in-order writes to a .bin file). Wall-clock and CPU seconds are both printed:
on a shared machine CPU time shows how much of the wall time was ours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED, machine_line

from model.corpus import load_corpus
from model.errors import SmallGPTError
from model.prepare import tokenize_documents
from model.tokenizer import Tokenizer, train_tokenizer

SHARED_TIKTOKEN = SHARED / "tiktoken_cache"


def timed(fn, *args, **kwargs) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def throughput(tokenizer: Tokenizer, docs, megabytes: float, workers: int, repeats: int) -> str:
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            counts, wall, cpu = timed(tokenize_documents, tokenizer, docs, Path(tmp) / "t.bin",
                                      workers, progress=False)
            walls.append(wall)
            cpus.append(cpu)
    best, median = min(walls), statistics.median(walls)
    return (f"{megabytes / median:6.1f} MB/s median, {megabytes / best:6.1f} MB/s best "
            f"({median:.2f} s wall, {statistics.median(cpus):.2f} s CPU, "
            f"{counts['bytes'] / counts['tokens']:.2f} bytes/token)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="shakespeare",
                        help="shakespeare (default), a .txt file, a directory, a glob or hf:NAME")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2, help="tokenizer threads (data.num_proc)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN)
    print(machine_line())
    print(f"{len(os.sched_getaffinity(0))} CPUs usable, load average {os.getloadavg()[0]:.2f} "
          f"at start, tokenizer threads {args.workers}")

    try:
        docs, wall, _ = timed(load_corpus, args.corpus)
    except SmallGPTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    megabytes = sum(len(d.text.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {args.corpus}, {len(docs)} documents, {megabytes:.2f} MB, "
          f"loaded in {wall:.2f} s")

    bpe, wall, cpu = timed(train_tokenizer, "bpe", [d.text for d in docs], args.vocab_size)
    print(f"bpe training, vocabulary {bpe.vocab_size}: {wall:.1f} s wall, {cpu:.1f} s CPU")

    tokenizers: list[tuple[str, Tokenizer]] = []
    try:
        tokenizers.append(("gpt2", train_tokenizer("gpt2", [])))
    except SmallGPTError as exc:
        print(f"gpt2 skipped: {exc}")
    tokenizers += [(f"bpe{bpe.vocab_size}", bpe),
                   ("char", train_tokenizer("char", [d.text for d in docs]))]
    for name, tokenizer in tokenizers:
        for workers in sorted({1, args.workers}):
            result = throughput(tokenizer, docs, megabytes, workers, args.repeats)
            print(f"tokenize {name:8s} {workers} thread{'s' if workers > 1 else ' '}: {result}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
