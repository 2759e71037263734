"""Training speed, or quality per wall-clock budget, against nanoGPT's CPU example.

    python bench/nanogpt_side_by_side.py --nanogpt PATH/TO/nanoGPT [--rounds 3] [--steps 200]
    python bench/nanogpt_side_by_side.py --nanogpt PATH/TO/nanoGPT --quality [--budget-seconds 300]

nanoGPT is not a dependency: point --nanogpt at a checkout of github.com/karpathy/nanoGPT
(its train.py, model.py, configurator.py and config/train_shakespeare_char.py are used as they
are). Without one the script says so and exits. Its data/shakespeare_char is prepared from
../shared/data/tinyshakespeare.txt when missing (copied to input.txt, so nothing is downloaded).

Both sides train the same shape (4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0,
float32, no compile) for --steps steps; each reports the median step time after --warmup steps,
turned into tokens/s (12 x 64 tokens per step). Runs alternate, nanoGPT first, so drift in the
machine's load hits both sides alike. Every run and the ratio of the medians are printed.

--quality trains nanoGPT's published CPU recipe (README: 4 layers, 4 heads, 128 wide, context
64, batch 12, dropout 0, float32, no compile, cosine schedule) with its iterations and
lr_decay_iters fitted to --budget-seconds: a short calibration run measures its time per
iteration on this machine now. Its evaluations are outside the budget, as ours are in
bench/quality.py. Its final checkpoint is then scored on the whole validation split (the last
10% of tiny-shakespeare, the same characters bench/quality.py scores) in non-overlapping windows
of its context, in bits per byte (the text is ASCII: one character is one byte). Run
bench/quality.py with the same budget for our side.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_line, require_tiny_shakespeare

TOKENS_PER_STEP = 12 * 64
# nanoGPT README's "I only have a macbook" recipe (its iterations are set by --quality).
CPU_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
              "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
              "--n_head=4", "--n_embd=128", "--dropout=0.0"]
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                "--eval_iters=1", "--eval_interval=1000000", "--log_interval=1",
                "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0", "--wandb_log=False",
                "--always_save_checkpoint=False"]


def prepare_nanogpt_data(nanogpt: Path) -> None:
    data = nanogpt / "data" / "shakespeare_char"
    if (data / "train.bin").exists():
        return
    if not (data / "input.txt").exists():
        shutil.copy(require_tiny_shakespeare(), data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


def nanogpt_tokens_per_s(nanogpt: Path, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={steps}",
                   f"--lr_decay_iters={steps}", f"--out_dir={out}"]
        text = subprocess.run(command, cwd=nanogpt, check=True, capture_output=True,
                              text=True).stdout
    times = [float(ms) for ms in re.findall(r"^iter \d+: .*time ([\d.]+)ms", text, re.M)]
    return TOKENS_PER_STEP / (statistics.median(times[warmup:]) / 1e3)


def nanogpt_run(nanogpt: Path, out: str, iters: int, extra: list[str]) -> list[float]:
    """Train nanoGPT's CPU recipe for `iters` iterations (schedule stretched to them); the
    seconds of each iteration after the first (which includes the step-0 evaluation)."""
    command = [sys.executable, "train.py", *CPU_RECIPE, f"--max_iters={iters}",
               f"--lr_decay_iters={iters}", f"--eval_interval={iters}", f"--out_dir={out}",
               *extra]
    text = subprocess.run(command, cwd=nanogpt, check=True, capture_output=True,
                          text=True).stdout
    times = [float(ms) / 1e3 for ms in re.findall(r"^iter \d+: .*time ([\d.]+)ms", text, re.M)]
    return times[1:]


def nanogpt_bits_per_byte(nanogpt: Path, checkpoint: Path) -> tuple[float, int, int]:
    """(bits/byte, characters scored, iteration) of a nanoGPT checkpoint over its whole
    validation split, loaded with its own model.py."""
    import numpy as np
    import torch

    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    block = ckpt["model_args"]["block_size"]
    val = np.fromfile(nanogpt / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16)
    ids = torch.from_numpy(val.astype(np.int64))
    windows = (len(ids) - 1) // block
    x = ids[:windows * block].view(windows, block)
    y = ids[1:windows * block + 1].view(windows, block)
    nats = 0.0
    with torch.no_grad():
        for i in range(0, windows, 64):
            _, loss = model(x[i:i + 64], y[i:i + 64])  # mean over the batch's characters
            nats += loss.item() * y[i:i + 64].numel()
    return nats / y.numel() / math.log(2), y.numel(), ckpt["iter_num"]


def quality(nanogpt: Path, budget: float, calibration: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        calib = nanogpt_run(nanogpt, f"{out}/calib", calibration, ["--eval_iters=1"])
        seconds = statistics.median(calib[5:])
        iters = max(10, int(budget / seconds * 0.97))
        print(f"nanoGPT calibration: {seconds * 1e3:.1f} ms/iteration -> max_iters = "
              f"lr_decay_iters = {iters}", flush=True)
        times = nanogpt_run(nanogpt, f"{out}/run", iters, ["--eval_iters=20"])
        bpb, scored, step = nanogpt_bits_per_byte(nanogpt, Path(out) / "run" / "ckpt.pt")
    print(machine_line().rsplit(";", 1)[0])
    print(f"nanoGPT CPU recipe ({' '.join(CPU_RECIPE[1:])}): trained {len(times)} iterations "
          f"in {sum(times):.1f} s (budget {budget:.0f} s; evaluations excluded); checkpoint of "
          f"iteration {step}")
    print(f"validation (whole last 10%, {scored:,} characters, non-overlapping windows of 64): "
          f"{bpb * math.log(2):.4f} nats/char = {bpb:.4f} bits/byte")


def smallgpt_tokens_per_s(steps: int, warmup: int) -> float:
    command = [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--config",
               "shakespeare_char.yaml", "--steps", str(steps), "--warmup", str(warmup)]
    text = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"([\d,]+) tokens/s$", text, re.M).group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", help="path to a nanoGPT checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quality", action="store_true",
                        help="bits/byte of nanoGPT's CPU recipe after --budget-seconds")
    parser.add_argument("--budget-seconds", type=float, default=300.0)
    parser.add_argument("--calibration-steps", type=int, default=60)
    args = parser.parse_args()
    nanogpt = Path(args.nanogpt) if args.nanogpt else None
    if nanogpt is None or not (nanogpt / "train.py").is_file():
        print("skipped: pass --nanogpt PATH, a checkout of github.com/karpathy/nanoGPT "
              "(git clone https://github.com/karpathy/nanoGPT); nanoGPT is not a dependency")
        return
    prepare_nanogpt_data(nanogpt)
    if args.quality:
        quality(nanogpt, args.budget_seconds, args.calibration_steps)
        return
    theirs, ours = [], []
    for round_ in range(1, args.rounds + 1):
        theirs.append(nanogpt_tokens_per_s(nanogpt, args.steps, args.warmup))
        ours.append(smallgpt_tokens_per_s(args.steps, args.warmup))
        print(f"round {round_}: nanoGPT {theirs[-1]:,.0f} tokens/s, "
              f"smallgpt {ours[-1]:,.0f} tokens/s", flush=True)
    print(machine_line().rsplit(";", 1)[0])
    mine, peer = statistics.median(ours), statistics.median(theirs)
    print(f"median over {args.rounds} alternating rounds: smallgpt {mine:,.0f} tokens/s, "
          f"nanoGPT {peer:,.0f} tokens/s, ratio {mine / peer:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
