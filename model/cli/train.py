"""Train a GPT from a YAML config: python train.py --config small.yaml [section.key=value ...]

A thin front over model.training.train; see configs/ for the shipped configs.
"""

from __future__ import annotations

import argparse

from model.cli.common import run_cli
from model.config import load_config
from model.training.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a smallgpt model.",
        epilog="example: python train.py --config tiny.yaml train.max_steps=50 model.n_layer=2")
    parser.add_argument("--config", default="small.yaml",
                        help="a YAML file, or the name of one in configs/ (default: small.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_steps=50")
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, progress=not args.no_progress)
        if result.val_bpb is not None:
            print(f"done: {result.steps} steps, val loss {result.val_loss:.4f} nats/token, "
                  f"{result.val_bpb:.4f} bits/byte, {result.tokens_per_second:,.0f} tokens/s; "
                  f"checkpoint in {result.run_dir / 'latest'}")
        return 130 if result.interrupted else 0

    return run_cli(run)
