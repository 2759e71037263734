"""float32 against dtype auto (bfloat16 where the CPU computes it natively), alternating runs:
training, generation and the server's streamed throughput, at small.yaml's shape and GPT-2-124M's.

    python bench/dtype_speed.py [--rounds 2] [--parts train gen sample serve] [--tmp DIR]

Every figure comes from a fresh process running another bench script (or sample.py itself),
float32 first then auto, round after round, so drift in the machine's load hits both alike:
- train:  bench/train_speed.py, small.yaml as shipped, and gpt2_124m.yaml's model (12 x 768,
          context 1024, 50304 vocabulary) at batch 1 on tiny-shakespeare; median step.
- gen:    bench/sample_speed.py, tokens/s after start-up, random weights: small.yaml's shape and
          the GPT-2-124M checkpoint below.
- sample: `python sample.py` on a random GPT-2-124M-shaped checkpoint (GPT-2 tokenizer), 100
          new tokens: the whole process's wall time, start-up and loading included.
- serve:  bench/serve_speed.py on the same checkpoint, 1 and 4 streaming clients.
The random checkpoints are written to a temporary folder (--tmp) and deleted at the end. Each
run prints the dtype auto chose and why; the table gives every run and the ratio of medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, TINY_SHAKESPEARE, machine_line, require_tiny_shakespeare, scratch_dir

from model import runtime
from model.config import Config, load_config
from model.data.tokenizer import tokenizer_from_spec, train_tokenizer
from model.gpt import GPT
from model.weights.checkpoint import save_checkpoint

DTYPES = ("float32", "auto")
BENCH = ROOT / "bench"


def write_checkpoints(tmp: Path) -> dict[str, Path]:
    """Random-weight checkpoints: small.yaml's model (1024-token BPE) and GPT-2-124M's."""
    out = {}
    small = load_config("small.yaml")
    bpe = train_tokenizer("bpe", [require_tiny_shakespeare().read_text(encoding="utf-8")],
                          small.data.bpe_vocab_size)
    gpt2 = load_config("gpt2_124m.yaml")
    for name, cfg, tokenizer in (("small", small, bpe),
                                 ("gpt2-124m", gpt2, tokenizer_from_spec({"name": "gpt2"}))):
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size
                                        or tokenizer.vocab_size)
        out[name] = save_checkpoint(tmp / name, GPT(model_cfg), Config(model=model_cfg,
                                                                       name=name),
                                    tokenizer.spec())
    return out


def run(command: list[str], pattern: str) -> tuple[float, str]:
    """Run a bench command; the number its output's `pattern` captures, and the dtype line."""
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: {command} failed:\n{done.stderr[-2000:]}")
    text = done.stdout
    found = re.findall(pattern, text, re.M)
    if not found:
        raise SystemExit(f"error: {pattern!r} not in the output of {command}:\n{text}")
    dtype = re.search(r"dtype (\w+) \(", text)
    return float(found[-1].replace(",", "")), dtype.group(1) if dtype else "?"


def measures(ckpts: dict[str, Path], parts: list[str], threads: int) -> dict[str, tuple]:
    """name -> (unit, higher_is_better, function of the dtype setting returning a figure)."""
    tps = r"([\d,]+) tokens/s$"
    gpt2_train = ["model.block_size=1024", "train.batch_size=1", "train.grad_accum=1",
                  "train.compile=false", f"data.source={TINY_SHAKESPEARE}",
                  "data.val_fraction=0.1", "data.num_proc=1", f"train.threads={threads}"]
    table = {
        "train": {
            "train small.yaml, tokens/s": (True, lambda d: run(
                [str(BENCH / "train_speed.py"), "--config", "small.yaml", "--steps", "40",
                 "--warmup", "10", f"train.dtype={d}", f"train.threads={threads}"], tps)),
            "train GPT-2-124M shape (batch 1 x 1024), tokens/s": (True, lambda d: run(
                [str(BENCH / "train_speed.py"), "--config", "gpt2_124m.yaml", "--steps", "6",
                 "--warmup", "2", f"train.dtype={d}", *gpt2_train], tps)),
        },
        "gen": {
            f"generate {name}, tokens/s after start-up": (True, lambda d, c=ckpt: run(
                [str(BENCH / "sample_speed.py"), "--checkpoint", str(c), "--tokens", "200",
                 "--no-uncached", "--threads", str(threads), "--dtype", d],
                r"with KV cache:\s+([\d.]+) tokens/s"))
            for name, ckpt in ckpts.items()
        },
        "sample": {
            "sample.py GPT-2-124M shape, 100 tokens, whole process s": (False, lambda d: timed(
                ["sample.py", "--checkpoint", str(ckpts["gpt2-124m"]), "--prompt", "Hello",
                 "--max-new-tokens", "100", "--seed", "1", "--threads", str(threads),
                 "--dtype", d])),
        },
        "serve": {
            f"serve GPT-2-124M shape, {n} streaming clients, aggregate tokens/s": (
                True, lambda d, n=n: run(
                    [str(BENCH / "serve_speed.py"), "--checkpoint", str(ckpts["gpt2-124m"]),
                     "--clients", str(n), "--tokens", "60", "--repeats", "1", "--threads",
                     str(threads), "--dtype", d], rf"^\s+{n}\s+([\d.]+)\s"))
            for n in (1, 4)
        },
    }
    return {name: m for part in parts for name, m in table[part].items()}


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds of a whole process (interpreter start, imports, loading, generating)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: {command} failed:\n{done.stderr[-2000:]}")
    dtype = re.search(r"in dtype (\w+) \(", done.stderr)
    return seconds, dtype.group(1) if dtype else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["train", "gen", "sample", "serve"],
                   choices=["train", "gen", "sample", "serve"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every run (default: the cores idle at start)")
    p.add_argument("--tmp", help="folder for the random checkpoints (default: the system's)")
    args = p.parse_args()
    threads = args.threads or runtime.default_threads()
    auto = runtime.choose_dtype("auto", torch.device("cpu"))
    print(machine_line().rsplit(";", 1)[0] + f"; threads {threads}")
    print(f"auto here: {auto.describe()}", flush=True)
    with scratch_dir("dtype-speed-", args.tmp) as tmp:
        ckpts = write_checkpoints(Path(tmp))
        results: dict[str, dict[str, list[float]]] = {}
        table = measures(ckpts, args.parts, threads)
        for round_ in range(1, args.rounds + 1):
            for name, (_, measure) in table.items():
                for setting in DTYPES:
                    value, chosen = measure(setting)
                    results.setdefault(name, {}).setdefault(setting, []).append(value)
                    print(f"round {round_}: {name}: {setting} ({chosen}) {value:,.2f}  "
                          f"[load {Path('/proc/loadavg').read_text().split()[0]}]", flush=True)
    print(f"\n| what | float32 | auto ({auto.name}) | auto / float32 |")
    print("|---|---|---|---|")
    for name, (higher, _) in table.items():
        f32, mixed = results[name]["float32"], results[name]["auto"]
        ratio = (statistics.median(mixed) / statistics.median(f32) if higher
                 else statistics.median(f32) / statistics.median(mixed))
        print(f"| {name} | {' / '.join(f'{v:,.1f}' for v in f32)} | "
              f"{' / '.join(f'{v:,.1f}' for v in mixed)} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
