"""Train a GPT from a YAML config: python train.py --config small.yaml [section.key=value ...]

A thin front over model.training.train; see configs/ for the shipped configs. The run reports
to the terminal through `TerminalReport`, a callback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tqdm import tqdm

from model.cli.common import run_cli
from model.cli.progress import bars
from model.config import load_config
from model.progress import silent
from model.training.callbacks import Callback, TrainingState, describe_validation
from model.training.loop import train


class TerminalReport(Callback):
    """A run on the terminal (rank 0 only): the lines that describe it, a progress bar with the
    loss, learning rate and tokens/s, each validation loss, and where an interrupted run was
    saved. The bar shows the latest loss the loop copied anyway, so it costs the GPU no sync."""

    wants_each_loss = False

    def __init__(self, bar: bool = True) -> None:
        self.show_bar = bar
        self.bar: tqdm | None = None

    def at_start(self, state: TrainingState, notes: Sequence[str]) -> None:
        if state.rank != 0:
            return
        for line in notes:
            tqdm.write(line)
        self.bar = tqdm(total=state.config.train.max_steps, initial=state.step,
                        dynamic_ncols=True, disable=not self.show_bar, desc=state.config.name)

    def after_step(self, state: TrainingState) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.loss:.3f}" if state.loss is not None else "-",
                             lr=f"{state.lr:.2e}", tok_s=f"{state.tokens_per_second:,.0f}")

    def after_evaluation(self, state: TrainingState) -> None:
        tqdm.write(describe_validation(state.step, state.val_loss, state.val_bpb))

    def at_end(self, state: TrainingState) -> None:
        if self.bar is None:
            return
        if state.stop_reason == "signal":
            tqdm.write(f"interrupted: checkpoint saved at step {state.step} in "
                       f"{state.run_dir / 'latest'}; resume with train.resume=true")
        self.bar.close()
        self.bar = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a smallgpt model.",
        epilog="example: python train.py --config tiny.yaml train.max_steps=50 model.n_layer=2")
    parser.add_argument("--config", default="small.yaml",
                        help="a YAML file, or the name of one in configs/ (default: small.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_steps=50")
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, callbacks=[TerminalReport(bar=not args.no_progress)],
                       progress=silent if args.no_progress else bars)
        if result.val_bpb is not None:
            print(f"done: {result.steps} steps, val loss {result.val_loss:.4f} nats/token, "
                  f"{result.val_bpb:.4f} bits/byte, {result.tokens_per_second:,.0f} tokens/s; "
                  f"checkpoint in {result.run_dir / 'latest'}")
        return 130 if result.interrupted else 0

    return run_cli(run)
