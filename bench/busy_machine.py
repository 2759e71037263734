"""Training and generation speed on a quiet machine and beside one busy process, side by side.

    python bench/busy_machine.py [--repeats 2] [--threads N]

A laptop always runs something else. This script measures, in fresh processes:
  - training: `bench/train_speed.py --config shakespeare_char.yaml` (nanoGPT's CPU example shape),
    steady-state tokens/s;
  - generation: `sample.py` as a user runs it, the whole process (import, load, 500 tokens), on a
    randomly initialised 6-layer, 384-wide, context-256 character model;
first with nothing else running, then while a busy process it starts itself keeps one core at
100%, alternating the two conditions. It prints each run and the busy/quiet ratios. --threads N
passes an explicit thread count (train.threads / --threads) instead of smallgpt's default policy.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine_line, require_tiny_shakespeare

SPIN = "while True: pass"


def train_tokens_per_s(threads: int | None) -> float:
    command = [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--config",
               "shakespeare_char.yaml", "--steps", "120", "--warmup", "20"]
    if threads:
        command.append(f"train.threads={threads}")
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return float(re.search(r"([\d,]+) tokens/s$", out, re.M).group(1).replace(",", ""))


def generation_seconds(checkpoint: Path, threads: int | None) -> float:
    command = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(checkpoint),
               "--prompt", "ROMEO:", "--max-new-tokens", "500", "--seed", "1",
               "--temperature", "1.0"]
    if threads:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return time.perf_counter() - start


def make_checkpoint(directory: Path) -> Path:
    """A random 6x384 character model with context 256 (the shape of the issue's figures),
    whose end-of-text logit is pinned far below the others, so every run writes all 500 tokens:
    W_U is untied, the final norm's bias is 1 in every feature, and the end-of-text row of W_U
    is -10 in every feature (the normalised part sums to zero, leaving -10 * 384)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from model.config import Config, DataConfig
    from model.data.tokenizer import train_tokenizer
    from model.gpt import GPT, GPTConfig
    from model.weights.checkpoint import save_checkpoint

    tokenizer = train_tokenizer("char", [require_tiny_shakespeare().read_text()])
    torch.manual_seed(0)
    shape = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=6, n_head=6, n_embd=384,
                      block_size=256, tie_embeddings=False)
    model = GPT(shape)
    with torch.no_grad():
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight[tokenizer.eot_id].fill_(-10.0)
    config = Config(model=shape, data=DataConfig(tokenizer="char"), name="busy")
    return save_checkpoint(directory / "latest", model, config, tokenizer.spec())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per condition")
    parser.add_argument("--threads", type=int, default=None,
                        help="explicit thread count instead of the default policy")
    args = parser.parse_args()
    require_tiny_shakespeare()
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        for _ in range(args.repeats):
            for condition in ("quiet", "busy"):
                spinner = (subprocess.Popen([sys.executable, "-c", SPIN])
                           if condition == "busy" else None)
                try:
                    train = train_tokens_per_s(args.threads)
                    gen = generation_seconds(checkpoint, args.threads)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                results.setdefault(("train", condition), []).append(train)
                results.setdefault(("generate", condition), []).append(gen)
                print(f"{condition:>5}: training {train:,.0f} tokens/s, "
                      f"generation {gen:.2f} s for 500 tokens", flush=True)
    print(machine_line().rsplit(";", 1)[0])
    print(f"threads: {args.threads or 'default policy'}; medians of {args.repeats} runs each")
    quiet_t = statistics.median(results[("train", "quiet")])
    busy_t = statistics.median(results[("train", "busy")])
    quiet_g = statistics.median(results[("generate", "quiet")])
    busy_g = statistics.median(results[("generate", "busy")])
    print(f"training:   quiet {quiet_t:,.0f} tokens/s, busy {busy_t:,.0f} tokens/s, "
          f"busy/quiet speed {busy_t / quiet_t:.2f} (target >= 0.5)")
    print(f"generation: quiet {quiet_g:.2f} s, busy {busy_g:.2f} s, "
          f"busy/quiet speed {quiet_g / busy_g:.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
