"""Does bfloat16 training learn what float32 learns? The same run, step for step, in both.

    python bench/precision_curves.py [--config shakespeare_fast.yaml] [--steps 600]
                                     [--png curves.png] [key=value ...]

Trains the config twice on tiny-shakespeare with the same seed, so both runs draw the same
batches in the same order: train.dtype=float32, then train.dtype=bfloat16 (autocast over float32
weights and optimizer state, what `auto` picks on a CPU that computes bfloat16 natively). The
schedule is the config's, fitted to --steps. Prints the training loss of both (mean over each
window of --every steps), their difference, the gap between two float32 runs with different
seeds for scale (--noise), and the final whole-validation-split bits per byte of each;
--png draws the per-step curves side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import machine_line, require_tiny_shakespeare
from quality import whole_split_bits_per_byte

from model.config import load_config
from model.data.prepare import prepare_data
from model.training.loop import train
from model.weights.loading import load_checkpoint


def run(config: str, overrides: list[str], out: str) -> tuple[list[float], float, float]:
    """(per-step training losses, whole-split bits/byte, seconds) of one run."""
    cfg = load_config(config, [*overrides, f"train.out_dir={out}"])
    result = train(cfg)
    data = prepare_data(cfg.data, cfg.model.block_size)
    model = load_checkpoint(result.run_dir).model
    _, bpb, _ = whole_split_bits_per_byte(model, data.val_path, cfg.model.block_size,
                                          data.bytes_per_token("val"))
    return result.losses, bpb, result.train_seconds


def window_means(losses: list[float], every: int) -> list[float]:
    return [statistics.fmean(losses[i:i + every]) for i in range(0, len(losses), every)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="shakespeare_fast.yaml")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=50, help="steps per table row")
    p.add_argument("--noise", action="store_true",
                   help="also a float32 run with another seed: the run-to-run gap, for scale")
    p.add_argument("--png", help="write the per-step curves to this PNG")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    base = [f"data.source={require_tiny_shakespeare()}", "data.val_fraction=0.1",
            f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}",
            *args.overrides]
    runs = {"float32": ["train.dtype=float32"], "bfloat16": ["train.dtype=bfloat16"]}
    if args.noise:
        runs["float32, seed+1"] = ["train.dtype=float32", "train.seed=1338"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(runs.items()):
            results[name] = run(args.config, base + extra, f"{tmp}/{i}")
            print(f"{name}: {results[name][2]:.1f} s of training", flush=True)

    print(machine_line())
    print(f"config {args.config} ({' '.join(args.overrides) or 'as shipped'}), {args.steps} "
          f"steps, same seed and batches; training loss in nats/token, mean of {args.every} "
          "steps")
    names = list(results)
    means = {name: window_means(results[name][0], args.every) for name in names}
    print("| steps | " + " | ".join(names) + " | bfloat16 - float32 |")
    print("|---" * (len(names) + 2) + "|")
    for row in range(len(means["float32"])):
        start = row * args.every
        cells = " | ".join(f"{means[name][row]:.4f}" for name in names)
        gap = means["bfloat16"][row] - means["float32"][row]
        print(f"| {start + 1}-{min(start + args.every, args.steps)} | {cells} | {gap:+.4f} |")
    print("whole validation split, bits/byte: "
          + ", ".join(f"{name} {results[name][1]:.4f}" for name in names))
    if args.png:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for i, name in enumerate(names):
            color = f"C{i}"
            ax.plot(range(1, len(results[name][0]) + 1), results[name][0], color=color,
                    linewidth=0.6, alpha=0.35)
            centers = [min(k * args.every + args.every / 2, args.steps)
                       for k in range(len(means[name]))]
            ax.plot(centers, means[name], color=color, marker="o", markersize=3,
                    label=f"{name} (mean of {args.every} steps)")
        ax.set(xlabel="step", ylabel="training loss (nats/token)",
               title=f"{args.config}: float32 vs bfloat16 autocast, same batches")
        ax.legend()
        fig.savefig(args.png, dpi=120)
        print(f"curves: {args.png}")


if __name__ == "__main__":
    main()
