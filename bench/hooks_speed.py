"""What unused hook points cost: training and generation tokens/s of this checkout's GPT against
another tree's (the code before hook points), alternating runs.

    git worktree add /tmp/base978 978b855           # the GPT before hook points
    flock /tmp/bench.lock python bench/hooks_speed.py --base /tmp/base978 --rounds 5

Each measurement runs in a fresh process that imports `model` from one tree, builds the same
seeded model and times (a) training steps: forward, backward and AdamW on a (batch, context)
batch, and (b) greedy generation with the KV cache, one token per forward call (the case where
per-call overhead shows most). Time is the process's CPU time (one thread), which the other
jobs on a shared machine disturb far less than wall time (--wall for wall-clock time). Only the
GPT's own API is used (new_cache, forward), which both trees share, so the figures compare the
model code alone. The trees alternate A, B, B, A, ... so that load from other jobs falls on
both; the median of the rounds is reported. In this checkout's process it also times one
`hook_dict` lookup (every hook point found again, so that replaced modules' points are named:
once per run_with_hooks, run_with_cache or hooks() block, never per forward call) and the text
check each forward call makes.

Measured with `flock /tmp/bench.lock python bench/hooks_speed.py --base /tmp/base978 --rounds 7`
(2-core AMD EPYC VM shared with 7 other jobs, load 2-3; torch 2.13 CPU, one thread; 6x6x384
model, context 256, batch 4), tokens per CPU second, median of 7, two runs 20 minutes apart:
training 1,028 vs 997 (ratio 1.03), then 1,011 vs 962 (1.05); generation 145 vs 143 (1.01),
then 140 vs 153 (0.92). The rounds' spread (108-170 tokens/s for generation) is wider than
any difference, so on this machine these figures cannot resolve 2% either way. Measured inside
one process, where the load cannot blur it, the unused hook points' calls take 0.11% of a
decode step (68 calls of ~100 ns; the other points are flag checks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """Runs inside one tree (its `model` first on sys.path); prints the figures as JSON."""
    import torch

    from model.gpt import GPT, GPTConfig

    torch.set_num_threads(args.threads)
    # On a shared machine, wall time mostly measures the other jobs; the process's CPU time
    # (one thread) measures the work done. --wall for wall-clock time.
    clock = time.perf_counter if args.wall else time.process_time
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab, block_size=args.context, n_layer=args.layers,
                       n_head=args.heads, n_embd=args.width, activation="gelu_tanh")
    model = GPT(config)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.context), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.context), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        _, loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # warm-up: allocations, first-call costs
    start = clock()
    for _ in range(args.steps):
        train_step()
    train = args.steps * args.batch * args.context / (clock() - start)

    model.eval()
    prompt = x[:1, :16]

    @torch.no_grad()
    def decode() -> int:
        cache = model.new_cache(1)
        logits, _ = model(prompt, cache=cache)
        new = 0
        while cache.length < min(args.context, 16 + args.tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits, _ = model(nxt, cache=cache)
            new += 1
        return new

    decode()
    start = clock()
    new = decode()
    generate = new / (clock() - start)
    figures = {"train": train, "generate": generate}
    from model import gpt as gpt_module

    # Not `import model.network.hooks`: an editable install would find it in another tree.
    HookPoint = getattr(gpt_module, "HookPoint", None)  # None: the tree before hook points
    if HookPoint is not None:
        figures["hook_share_of_a_decode_step"] = hook_share(model, HookPoint, clock, generate)
    if hasattr(model, "as_tokens"):  # the tree whose hook_dict is found at each lookup
        figures.update(lookup_costs(model, clock))

    print(json.dumps({**figures, "tree": gpt_module.__file__}))


def hook_share(model, HookPoint, clock, generate: float) -> float:
    """What unused hook points cost in one decode step, measured in this process (so the other
    jobs cannot blur it): calls per step, times the cost of one call, over the step's time."""
    import torch

    calls = 0
    plain_call = HookPoint.__call__

    def counting(self, x):
        nonlocal calls
        calls += 1
        return plain_call(self, x)

    HookPoint.__call__ = counting
    with torch.no_grad():
        cache = model.new_cache(1)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    HookPoint.__call__ = plain_call
    point, x, n = HookPoint(), torch.zeros(1), 100_000
    start = clock()
    for _ in range(n):
        point(x)
    per_call = (clock() - start) / n
    return calls * per_call * generate  # (seconds of hook calls per step) / (seconds per step)


def lookup_costs(model, clock) -> dict[str, float]:
    """Microseconds of one `hook_dict` lookup (every hook point found again: once per
    run_with_hooks, run_with_cache or hooks() block) for this model and for GPT-2 small's
    shape, and of the text check every forward call makes (`as_tokens` on token ids)."""
    import torch

    from model.gpt import GPT, GPTConfig

    gpt2 = GPT(GPTConfig.from_preset("gpt2"), device="meta")
    ids, n = torch.zeros(1, 1, dtype=torch.long), 10_000
    costs = {}
    for name, fn in (("lookup_us", lambda: model.hook_dict),
                     ("lookup_gpt2_us", lambda: gpt2.hook_dict),
                     ("as_tokens_us", lambda: model.as_tokens(ids))):
        reps = n if name == "as_tokens_us" else n // 100
        start = clock()
        for _ in range(reps):
            fn()
        costs[name] = (clock() - start) / reps * 1e6
    return costs


def run_in(tree: Path, argv: list[str]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *argv],
                         cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"error: the worker in {tree} failed:\n{out.stderr[-2000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    if not figures.pop("tree").startswith(str(tree)):
        sys.exit(f"error: the worker for {tree} imported `model` from another tree")
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the other tree, e.g. a worktree of 978b855 (required)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per run")
    p.add_argument("--tokens", type=int, default=200, help="generated tokens per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        worker(args)
        return
    base = Path(args.base or "").resolve()
    if not args.base or not (base / "model" / "gpt.py").exists():
        sys.exit(f"error: {base} has no model/gpt.py; pass a checkout, e.g. "
                 "`git worktree add /tmp/base978 978b855`")
    argv = [a for a in sys.argv[1:] if not a.startswith("--base") and a != str(args.base)]
    trees = {"hooks (this checkout)": ROOT, f"base ({base})": base}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
        for name, tree in order:
            results[name].append(run_in(tree, argv))
            print(f"round {r + 1} {name}: " + ", ".join(
                f"{k} {v:,.0f} tok/s" for k, v in results[name][-1].items()
                if k in ("train", "generate")), flush=True)
    import torch  # only for the machine line

    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine_line

    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"model {args.layers}x{args.heads}x{args.width}, context {args.context}, "
          f"batch {args.batch}; tokens per {'wall' if args.wall else 'CPU'} second, "
          f"median of {args.rounds} alternating rounds; "
          f"load {os.getloadavg()[0]:.2f}")
    medians = {name: {k: statistics.median(run[k] for run in runs) for k in runs[0]}
               for name, runs in results.items()}
    ours, theirs = medians.values()
    for k in ("train", "generate"):
        print(f"{k:9s} hooks {ours[k]:10,.0f} tok/s   base {theirs[k]:10,.0f} tok/s   "
              f"ratio {ours[k] / theirs[k]:.3f}")
    share = ours["hook_share_of_a_decode_step"]
    print(f"unused hook points' calls take {100 * share:.2f}% of a decode step's CPU time "
          "(counted calls x the cost of one call, measured in the same process)")
    if "lookup_us" in ours:
        step_us = 1e6 / ours["generate"]
        print(f"one hook_dict lookup: {ours['lookup_us']:.0f} us (GPT-2 small's shape: "
              f"{ours['lookup_gpt2_us']:.0f} us), a decode step {step_us:,.0f} us; the text "
              f"check in forward: {ours['as_tokens_us']:.2f} us a call "
              f"({100 * ours['as_tokens_us'] / step_us:.3f}% of a decode step)")


if __name__ == "__main__":
    main()
