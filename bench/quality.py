"""Quality per minute: bits per byte on tiny-shakespeare's validation split after a fixed
wall-clock training budget.

    python bench/quality.py --config shakespeare_fast.yaml --budget-seconds 300 [key=value ...]
    python bench/quality.py --evaluate out/small --quantize int8   # a checkpoint, float and int8

Trains on the first 90% of ../shared/data/tinyshakespeare.txt (or --corpus) and scores the
whole last 10% in non-overlapping windows of the model's context. Data preparation and
evaluation are outside the budget. The learning-rate schedule needs a step count, so a short
calibration run measures the step time first and max_steps is set to fill the budget; the
budget also stops training if the machine turns out slower.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch
from common import machine_line, require_tiny_shakespeare

from model import runtime
from model.config import load_config
from model.data.batches import Batch, TokenSource, open_tokens, windows
from model.data.prepare import prepare_data
from model.errors import DataError
from model.inference.sampling import generate
from model.network.quantized import quantize_int8
from model.training.loop import train
from model.weights.loading import load_checkpoint


def sequential_windows(tokens: TokenSource, block_size: int, batch_size: int = 1,
                       device: str | torch.device = "cpu") -> Iterator[Batch]:
    """Non-overlapping windows covering the whole split: every token after the first is a
    target exactly once. Full windows come in batches of `batch_size`; a shorter last window
    (1, remainder) follows if the split does not divide evenly."""
    data = open_tokens(tokens)
    if len(data) < 2:
        raise DataError(f"the token split holds {len(data)} tokens; it needs at least 2")
    device = torch.device(device)
    full = (len(data) - 1) // block_size
    for first in range(0, full, batch_size):
        starts = np.arange(first, min(first + batch_size, full)) * block_size
        yield windows(data, starts, block_size, device)
    rest = len(data) - 1 - full * block_size
    if rest > 0:
        yield windows(data, np.array([full * block_size]), rest, device)


@torch.no_grad()
def whole_split_bits_per_byte(model: torch.nn.Module, tokens_path, block_size: int,
                              bytes_per_token: float) -> tuple[float, float, int]:
    """(nats/token, bits/byte, tokens scored) over every token of the split."""
    model.eval()
    total_nats, count = 0.0, 0
    for x, y in sequential_windows(tokens_path, block_size, batch_size=64):
        logits, _ = model(x)
        nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                 reduction="sum")
        total_nats += nats.item()
        count += y.numel()
    per_token = total_nats / count
    return per_token, per_token / math.log(2) / bytes_per_token, count


def evaluate_only(path: str, quantize: bool, prompt: str) -> None:
    """Whole-validation-split bits per byte of a trained checkpoint, on its own data cache; with
    `quantize`, also of its int8 form (model/network/quantized.py), and the first 50 greedy
    tokens of each after `prompt`."""
    ckpt = load_checkpoint(path)
    data = prepare_data(ckpt.config.data, ckpt.config.model.block_size)
    print(machine_line())
    print(f"{ckpt.path} (step {ckpt.state.get('step')}, source {ckpt.config.data.source}): "
          f"whole validation split, non-overlapping windows of {ckpt.config.model.block_size}")
    for name in ["float32", "int8"] if quantize else ["float32"]:
        if name == "int8":
            quantize_int8(ckpt.model)
        nats, bpb, scored = whole_split_bits_per_byte(
            ckpt.model, data.val_path, ckpt.config.model.block_size, data.bytes_per_token("val"))
        print(f"{name:>8}: {scored:,} tokens, {nats:.4f} nats/token = {bpb:.4f} bits/byte")
        if quantize:
            steps = generate(ckpt.model, ckpt.tokenizer, prompt, max_new_tokens=50,
                             temperature=0, ignore_eot=True)
            print(f"{'':>8}  greedy: {prompt + ''.join(s.delta for s in steps)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shakespeare_fast.yaml")
    parser.add_argument("--budget-seconds", type=float, default=300.0)
    parser.add_argument("--calibration-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps, no time budget: compares recipes "
                             "step for step when the machine is too busy for fair timings")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--evaluate", metavar="CHECKPOINT",
                        help="only score an already trained checkpoint on the whole split")
    parser.add_argument("--quantize", choices=["int8"],
                        help="with --evaluate: also score the checkpoint with int8 weights")
    parser.add_argument("--prompt", default="ROMEO:",
                        help="with --quantize: the greedy texts start here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    if args.evaluate:
        evaluate_only(args.evaluate, args.quantize == "int8", args.prompt)
        return
    corpus = args.corpus or str(require_tiny_shakespeare())
    with tempfile.TemporaryDirectory() as out:
        base = [f"data.source={corpus}", "data.val_fraction=0.1", *args.overrides]
        cfg = load_config(args.config, base)
        t0 = time.perf_counter()
        data = prepare_data(cfg.data, cfg.model.block_size)
        prep_seconds = time.perf_counter() - t0

        if args.steps:
            steps, step_seconds, budget = args.steps, math.nan, []
        else:
            calib = load_config(args.config, base + [
                f"train.out_dir={out}/calib", f"train.max_steps={args.calibration_steps}",
                f"train.eval_interval={args.calibration_steps}", "train.eval_steps=1"])
            step_seconds = statistics.median(train(calib).step_seconds[5:])
            steps = max(10, int(args.budget_seconds / step_seconds * 0.97))
            budget = [f"train.time_budget_s={args.budget_seconds}"]

        run = load_config(args.config, base + [
            f"train.out_dir={out}/run", f"train.max_steps={steps}", *budget])
        result = train(run)
        model = load_checkpoint(result.run_dir).model
        nats, bpb, scored = whole_split_bits_per_byte(
            model, data.val_path, run.model.block_size, data.bytes_per_token("val"))

    print(machine_line())
    print(f"config {args.config} ({' '.join(args.overrides) or 'as shipped'}), "
          f"tokenizer {cfg.data.tokenizer} (vocab {data.tokenizer.vocab_size}), "
          f"{model.num_params():,} parameters")
    precision = runtime.choose_dtype(run.train.dtype, runtime.pick_device(run.train.device))
    print(f"training in {runtime.training_precision(precision)}")
    print(f"data preparation {prep_seconds:.1f} s (outside the budget); calibrated "
          f"{step_seconds * 1e3:.1f} ms/step -> max_steps {steps}")
    limit = "no time budget" if args.steps else f"a {args.budget_seconds:.0f} s budget"
    print(f"trained {result.steps} steps in {result.train_seconds:.1f} s of {limit} "
          f"({result.tokens_per_second:,.0f} tokens/s)")
    print(f"validation (whole last 10%, {scored:,} tokens, non-overlapping windows of "
          f"{run.model.block_size}): {nats:.4f} nats/token = {bpb:.4f} bits/byte")


if __name__ == "__main__":
    main()
