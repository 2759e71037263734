"""One model in sample.py and in llama.cpp: generation speed as whole processes, and how close
llama.cpp's logits are to ours.

    python bench/llama_cpp_speed.py                          # a random GPT-2-124M-shaped model
    python bench/llama_cpp_speed.py --checkpoint out/small   # logits only: context 128

The model is exported with `python -m model.export --format gguf` in each outtype and run by
llama-cpp-python (`pip install -e ".[gguf]"`). Every runner is one command that starts a
process, loads the model, reads the prompt and generates exactly N tokens greedily, then exits:

    decode tokens/s   (250 - 50) / (seconds for 250 tokens - seconds for 50): the rate after
                      start-up, which both lengths pay once
    100 tokens        the whole process, start-up and loading included, as a user waits for it

Runners alternate within a round and the order reverses every round, so that a change in the
machine's load falls on all of them alike; medians over the rounds are printed. Each runner is
first run once with its output checked to hold exactly N tokens (a model that ends its text
early would make the rate wrong). The random default model never picks end-of-text: its
embedding row is zero, so its logit is 0 where some other token's is always higher.

RUNNERS is the list to extend: a runner is a name and a function from N to a command line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import ROOT, machine_line, scratch_dir

from model.config import Config, DataConfig
from model.data.tokenizer import train_tokenizer
from model.gpt import GPT, GPTConfig
from model.weights.checkpoint import save_checkpoint
from model.weights.export import export
from model.weights.loading import load_model

PROMPT = "The meaning of life is"
SHORT, LONG, WHOLE = 50, 250, 100
# A child process for llama.cpp: load the GGUF, generate exactly N tokens greedily (generate
# never stops by itself), print how many it made.
LLAMA_CHILD = """
import sys, llama_cpp
path, prompt = sys.argv[1], sys.argv[2]
n, threads, n_ctx = (int(a) for a in sys.argv[3:6])
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
count = 0
for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False), temp=0.0):
    count += 1
    if count == n:
        break
print(count)
llm.close()
"""


@dataclass(frozen=True)
class Runner:
    """One way to run the model: `command(n)` generates n tokens as a whole process and prints
    them (sample.py: the text, or with `checked` one JSON line per token; llama.cpp: the count).
    """

    name: str
    command: Callable[[int, bool], list[str]]  # (n, checked) -> argv


def sample_py(checkpoint: Path, dtype: str, threads: int) -> Runner:
    """sample.py in `dtype` (float32, bfloat16), or "int8": float32 with --quantize int8."""
    precision = ["--dtype", "float32", "--quantize", "int8"] if dtype == "int8" else [
        "--dtype", dtype]

    def command(n: int, checked: bool) -> list[str]:
        return [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(checkpoint),
                "--prompt", PROMPT, "--max-new-tokens", str(n), "--temperature", "0",
                "--threads", str(threads), *precision, *(["--json"] if checked else [])]
    return Runner(f"sample.py {dtype}", command)


def llama_cpp(gguf_file: Path, outtype: str, threads: int, n_ctx: int) -> Runner:
    def command(n: int, checked: bool) -> list[str]:
        return [sys.executable, "-c", LLAMA_CHILD, str(gguf_file), PROMPT, str(n), str(threads),
                str(n_ctx)]
    return Runner(f"llama.cpp {outtype}", command)


def produced(runner: Runner, n: int) -> int:
    """How many tokens the runner's process made when asked for n (its checked form)."""
    out = subprocess.run(runner.command(n, True), capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    if runner.name.startswith("llama.cpp"):
        return int(out.split()[-1])
    return sum(1 for line in out.splitlines() if line.startswith("{") and json.loads(line))


def seconds(runner: Runner, n: int) -> float:
    start = time.perf_counter()
    subprocess.run(runner.command(n, False), capture_output=True, check=True, cwd=ROOT)
    return time.perf_counter() - start


def random_gpt2(directory: Path) -> Path:
    """A random GPT-2-124M-shaped checkpoint (GPT-2's tokenizer) whose end-of-text row is zero,
    so greedy decoding never ends early."""
    tokenizer = train_tokenizer("gpt2", [])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    with torch.no_grad():
        model.tok_emb.weight[tokenizer.eot_id] = 0
    run = Config(model=model.config, data=DataConfig(tokenizer="gpt2"), name="gpt2_random")
    return save_checkpoint(directory / "gpt2_random" / "ckpt", model, run, tokenizer.spec())


def logit_gap(checkpoint: Path, gguf_file: Path, n_ctx: int) -> tuple[float, float, float]:
    """(max |llama.cpp logit - ours|, the spread of our logits, the share of positions whose
    argmax agrees) on the first tokens of a fixed English text."""
    import llama_cpp as llama

    loaded = load_model(str(checkpoint))
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
            "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
            "incredulity, it was the season of Light, it was the season of Darkness.")
    ids = loaded.tokenizer.encode(text)[:min(64, n_ctx)]
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0][0].float().numpy()
    llm = llama.Llama(str(gguf_file), n_ctx=n_ctx, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    return float(np.abs(theirs - ours).max()), float(ours.std()), agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a smallgpt run or checkpoint (default: a random "
                                             "GPT-2-124M-shaped model)")
    parser.add_argument("--outtypes", nargs="+", default=["f32", "bf16", "q8_0"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"],
                        help="sample.py's --dtype values, and int8 (--quantize int8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", help="where to write the checkpoint and GGUF files "
                                      "(default: a temporary directory)")
    args = parser.parse_args()

    with scratch_dir("llama_cpp_speed-", args.dir) as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_gpt2(tmp)
        loaded = load_model(str(checkpoint))
        n_ctx = loaded.model.config.block_size
        timed = n_ctx >= len(loaded.tokenizer.encode(PROMPT)) + LONG
        runners = [sample_py(checkpoint, dtype, args.threads) for dtype in args.dtypes]
        print(machine_line())
        for outtype in args.outtypes:
            result = export(str(checkpoint), tmp / f"gguf-{outtype}", "gguf", outtype)
            gguf_file = next(result.directory.glob("*.gguf"))
            gap, spread, agree = logit_gap(checkpoint, gguf_file, n_ctx)
            print(f"{outtype}: {result.architecture}, {gguf_file.stat().st_size / 2**20:.0f} MiB, "
                  f"max |logit - ours| {gap:.2e} (our logits' std {spread:.2f}), argmax agrees "
                  f"at {agree:.0%} of positions")
            runners.append(llama_cpp(gguf_file, outtype, args.threads, n_ctx))
        if not timed:
            print(f"no timings: the model's context ({n_ctx}) holds fewer than the prompt and "
                  f"{LONG} new tokens")
            return

        for runner in runners:
            made = produced(runner, LONG)
            if made != LONG:
                sys.exit(f"error: {runner.name} made {made} tokens when asked for {LONG}; "
                         "a model that ends its text early cannot be timed this way")
        times: dict[str, dict[int, list[float]]] = {r.name: {} for r in runners}
        for i in range(args.rounds):
            for runner in runners if i % 2 == 0 else runners[::-1]:
                for n in (SHORT, LONG, WHOLE):
                    times[runner.name].setdefault(n, []).append(seconds(runner, n))

    print(f"{args.threads} threads, {args.rounds} rounds, medians; prompt {PROMPT!r}, greedy")
    print(f"{'runner':<20} {'decode tokens/s':>16} {f'{WHOLE} tokens, whole process':>28}")
    for runner in runners:
        t = {n: statistics.median(ts) for n, ts in times[runner.name].items()}
        rate = (LONG - SHORT) / (t[LONG] - t[SHORT])
        print(f"{runner.name:<20} {rate:>16.1f} {t[WHOLE]:>26.2f} s")


if __name__ == "__main__":
    main()
