"""Steady-state training speed of a config: tokens/s, ms/step, compile time, peak memory.

    python bench/train_speed.py --config shakespeare_char.yaml [--steps 150] [key=value ...]

Runs the real training loop (model.training.train) on the config's data (tiny-shakespeare from
../shared when the config's text file is absent, or --corpus), without evaluations, and reports
the median over the steps after --warmup.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import TINY_SHAKESPEARE, machine_line, peak_rss_mib

from model import runtime
from model.config import load_config
from model.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shakespeare_char.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--corpus", default=None, help="text file to train on")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    overrides = list(args.overrides)
    # A config whose corpus file is not here (shakespeare_char.yaml's data/tinyshakespeare.txt)
    # trains on tiny-shakespeare from ../shared instead; the embedded corpus needs nothing.
    source = load_config(args.config, overrides).data.source
    corpus = args.corpus or (str(TINY_SHAKESPEARE) if TINY_SHAKESPEARE.exists()
                             and source.endswith(".txt") and not Path(source).exists() else None)
    if corpus:
        overrides.append(f"data.source={corpus}")
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, overrides + [
            f"train.out_dir={out}/run", f"train.max_steps={args.steps}",
            f"train.eval_interval={args.steps}", "train.eval_steps=1",
            "train.log_interval=1"])
        result = train(cfg)
    steady = result.step_seconds[args.warmup:]
    ms = statistics.median(steady) * 1e3
    tokens = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum
    print(machine_line())
    print(f"config {args.config} ({' '.join(args.overrides) or 'as shipped'}): "
          f"{cfg.model.n_layer} layers, {cfg.model.n_embd} wide, context {cfg.model.block_size}, "
          f"batch {cfg.train.batch_size}x{cfg.train.grad_accum}, {tokens} tokens/step, "
          f"compile={cfg.train.compile}")
    precision = runtime.choose_dtype(cfg.train.dtype, runtime.pick_device(cfg.train.device))
    print(f"training in {runtime.training_precision(precision)}")
    print(f"steady state over {len(steady)} steps: median {ms:.1f} ms/step "
          f"(p10 {1e3 * statistics.quantiles(steady, n=10)[0]:.1f}, "
          f"p90 {1e3 * statistics.quantiles(steady, n=10)[-1]:.1f}), "
          f"{tokens / (ms / 1e3):,.0f} tokens/s")
    if cfg.train.compile:
        print(f"first step (compilation included): {result.step_seconds[0]:.1f} s")
    print(f"peak resident memory: {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
