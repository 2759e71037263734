"""Training speed against nanoGPT's CPU example, on this machine, alternating runs.

    python bench/nanogpt_side_by_side.py --nanogpt PATH/TO/nanoGPT [--rounds 3] [--steps 200]

nanoGPT is not a dependency: point --nanogpt at a checkout of github.com/karpathy/nanoGPT
(its train.py, model.py, configurator.py and config/train_shakespeare_char.py are used as they
are). Without one the script says so and exits. Its data/shakespeare_char is prepared from
../shared/data/tinyshakespeare.txt when missing (copied to input.txt, so nothing is downloaded).

Both sides train the same shape (4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0,
float32, no compile) for --steps steps; each reports the median step time after --warmup steps,
turned into tokens/s (12 x 64 tokens per step). Runs alternate, nanoGPT first, so drift in the
machine's load hits both sides alike. Every run and the ratio of the medians are printed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_line, require_tiny_shakespeare

TOKENS_PER_STEP = 12 * 64
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
    args = parser.parse_args()
    nanogpt = Path(args.nanogpt) if args.nanogpt else None
    if nanogpt is None or not (nanogpt / "train.py").is_file():
        print("skipped: pass --nanogpt PATH, a checkout of github.com/karpathy/nanoGPT "
              "(git clone https://github.com/karpathy/nanoGPT); nanoGPT is not a dependency")
        return
    prepare_nanogpt_data(nanogpt)
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
