"""Peak memory and speed of a fine-tuning step, every weight against LoRA adapters, side by side.

    flock /tmp/bench.lock python bench/lora_memory.py --shape gpt2 --shape gpt2-xl
    python bench/lora_memory.py --shape gpt2 --dir some/hf/gpt2 --dtype float32 --dtype bfloat16

For each shape, a GPT-2-shaped Hugging Face directory is written by `transformers` from random
weights (as bench/load_memory.py does; nothing is downloaded) into a temporary folder deleted at
the end. Each case then runs in a fresh process, through the functions train() uses: load the
directory as train.init_from does, add adapters (LoRA cases; the frozen base in bfloat16 when
training computes in bfloat16), build AdamW over what trains, and run --steps optimizer steps
on random tokens. Each process runs under an address-space limit (--cap-gib, lowered to what the
machine has available): a case that needs more fails to allocate and is reported as not fitting,
instead of pushing the machine out of memory. Full fine-tuning with AdamW needs about 16 bytes
per parameter (weights, gradients, two moments): 25 GB for gpt2-xl.

Figures: peak RSS of the whole process (loading included) and the peak sampled every 10 ms
during the steps; tokens/s over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine_line, scratch_dir
from load_memory import SHAPES, WRITE

STEPS = """
import json, resource, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
directory, mode, dtype_name = sys.argv[2:5]
steps, batch, block, rank = map(int, sys.argv[5:9])
from model.network import lora
from model.gpt import count_parameters
from model import runtime
from model.config import config_from_dict
from model.training.finetune import adopt_source, load_source
from model.training.optim import build_optimizer
from model.weights.loading import lora_base_record, model_from_source
from model.training.distributed import seed_everything
from model.training.loop import train_step

peak_during_steps, sampling = [0], [False]
def sample_rss():  # resident pages of this process, every 10 ms while the steps run
    page = resource.getpagesize()
    while True:
        if sampling[0]:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            peak_during_steps[0] = max(peak_during_steps[0], rss)
        time.sleep(0.01)
threading.Thread(target=sample_rss, daemon=True).start()

train = dict(init_from=directory, device="cpu", dtype=dtype_name, batch_size=batch,
             max_steps=steps, warmup_steps=0, lr=1e-4, min_lr=1e-5, grad_clip=1.0)
if mode == "lora":
    train["lora_rank"] = rank
cfg = config_from_dict({"model": {"block_size": block}, "train": train})
t, device = cfg.train, torch.device("cpu")
dtype = runtime.choose_dtype(t.dtype, device).dtype
seed_everything(0)
started = time.perf_counter()
source = load_source(cfg)
cfg = adopt_source(cfg, source)
if t.lora is not None:
    lora_base_record(t.init_from, source)  # the digest every LoRA run computes once
model, _ = model_from_source(cfg.model, source)
source = None
if t.lora is not None:
    lora.apply(model, t.lora, base_dtype=lora.frozen_dtype(dtype))
model.train()
optimizer = build_optimizer(model, t, device)
scaler = torch.amp.GradScaler("cpu", enabled=False)
load_seconds = time.perf_counter() - started
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

class RandomTokens:  # the step's cost does not depend on what the tokens are
    device = device
    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)
    def next_batch(self):
        ids = torch.randint(0, cfg.model.vocab_size, (batch, block + 1), generator=self.generator)
        return ids[:, :-1], ids[:, 1:]

sampler, seconds = RandomTokens(), []
sampling[0] = True
for step in range(steps):
    t0 = time.perf_counter()
    loss, _ = train_step(model, optimizer, sampler, step, t, dtype=dtype, scaler=scaler)
    loss.item()
    seconds.append(time.perf_counter() - t0)
sampling[0] = False
trained, total = count_parameters(model, trainable_only=True), count_parameters(model)
timed = seconds[1:] or seconds
print(json.dumps({
    "params": total, "trained": trained, "dtype": str(dtype).removeprefix("torch."),
    "load_seconds": load_seconds, "load_peak_gib": load_peak / 2**30,
    "step_peak_gib": peak_during_steps[0] / 2**30,
    "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    "step_seconds": seconds, "tokens_per_s": batch * block * len(timed) / sum(timed)}))
"""


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_case(directory: Path, mode: str, dtype: str, args: argparse.Namespace,
             cap_gib: float) -> dict:
    """One case in a fresh process under an address-space limit of `cap_gib`."""
    cap = int(cap_gib * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    command = [sys.executable, "-c", STEPS, str(ROOT), str(directory), mode, dtype,
               *map(str, (args.steps, args.batch, args.block, args.rank))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        why = "out of memory" if "can't allocate memory" in last or "MemoryError" in last else last
        return {"fits": False, "why": why[:160]}
    return {"fits": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES),
                        help="repeat for several (default: gpt2 and gpt2-xl)")
    parser.add_argument("--dir", default=None, help="an existing HF GPT-2 directory (one shape)")
    parser.add_argument("--dtype", action="append", choices=["auto", "float32", "bfloat16"],
                        help="train.dtype, repeat for several (default: auto)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8, help="train.lora_rank (targets: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=16.0,
                        help="address-space limit of each case (lowered to what is available)")
    parser.add_argument("--tmp", default=None, help="where the generated directories go")
    args = parser.parse_args()
    shapes, dtypes = args.shape or ["gpt2", "gpt2-xl"], args.dtype or ["auto"]
    print(machine_line())
    print(f"{args.steps} steps of {args.batch} x {args.block} tokens, LoRA rank {args.rank} "
          f"on every target, AdamW; {args.threads} threads; load: {os.getloadavg()[0]:.2f}")

    rows = []
    with scratch_dir("smallgpt-lora-", args.tmp) as tmp:
        for shape in shapes:
            directory = Path(args.dir) if args.dir else Path(tmp) / shape
            if not args.dir:
                print(f"writing a random {shape}-shaped directory with transformers ...",
                      flush=True)
                subprocess.run([sys.executable, "-c", WRITE, str(directory),
                                *map(str, SHAPES[shape])], check=True)
            for dtype in dtypes:
                for mode in ("full", "lora"):
                    cap = min(args.cap_gib, available_gib() - 2.0)
                    r = run_case(directory, mode, dtype, args, cap)
                    rows.append((shape, mode, dtype, cap, r))
                    print(json.dumps({"shape": shape, "mode": mode, "dtype": dtype,
                                      "cap_gib": round(cap, 1), **r}), flush=True)
            if not args.dir:
                for f in directory.iterdir():
                    f.unlink()

    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print("| shape | mode | dtype | trained params | peak RSS GiB (steps) | load s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for shape, mode, dtype, cap, r in rows:
        if not r["fits"]:
            print(f"| {shape} | {mode} | {dtype} | - | does not fit under {cap:.1f} GiB "
                  f"({r['why'][:60]}) | - | - |")
            continue
        print(f"| {shape} | {mode} | {r['dtype']} | {r['trained']:,} of {r['params']:,} | "
              f"{r['peak_gib']:.2f} ({r['step_peak_gib']:.2f}) | {r['load_seconds']:.1f} | "
              f"{r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
