"""Several prompts of different lengths: decoded as one batch against one after the other.

    python bench/batch_speed.py --shape gpt2 --repeats 3     # GPT-2-124M's shape, random weights
    python bench/batch_speed.py --shape small --repeats 3    # configs/small.yaml's shape

Four prompts (5, 20, 40 and 60 tokens by default) each get 100 new tokens, greedy, past
end-of-text. `generate(model, tokenizer, [p1, p2, p3, p4])` decodes them in one batch, one
forward pass per step (left padding and an attention mask); the other way generates each prompt
alone, in turn. Both give the same tokens (checked here); the figures are the seconds of the
whole job and its new tokens per second, batched and one by one alternating so that both see
the same background load. Weights are random in the shape's sizes (the speed does not depend on
their values); prompts are random token ids; the tokenizer is GPT-2's (the small shape's 1024
ids are a part of it). Runs as sample.py runs: float32, the linear layers packed for oneDNN.
With small.yaml's 128-token context the longer prompts' windows fill and move on during the run.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine_line

from model.config import GPTConfig, load_config
from model.data.tokenizer import GPT2Tokenizer, Tokenizer
from model.gpt import GPT
from model.inference.sampling import generate
from model.network.packed import pack_linears


def build(shape: str, seed: int) -> GPT:
    torch.manual_seed(seed)
    if shape == "gpt2":
        config = GPTConfig.from_preset("gpt2")
    else:
        config = load_config("small.yaml").model
        config.vocab_size = 1024  # its BPE vocabulary (data.bpe_vocab_size)
    return GPT(config).eval()


def run(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], tokens: int,
        batched: bool) -> tuple[float, list[list[int]]]:
    """Seconds for every prompt's `tokens` new tokens, and those tokens per prompt."""
    kwargs = dict(max_new_tokens=tokens, temperature=0, ignore_eot=True, show_top=0)
    out: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    if batched:
        for step in generate(model, tokenizer, prompts, **kwargs):
            out[step.prompt].append(step.token)
    else:
        for p, prompt in enumerate(prompts):
            out[p] = [step.token for step in generate(model, tokenizer, prompt, **kwargs)]
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["gpt2", "small"], default="small")
    p.add_argument("--lengths", type=int, nargs="+", default=[5, 20, 40, 60],
                   help="the prompts' lengths in tokens")
    p.add_argument("--tokens", type=int, default=100, help="new tokens per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating pairs of runs")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-pack", action="store_true", help="PyTorch's own CPU kernels")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.shape, args.seed)
    params = model.num_params()
    packed = not args.no_pack and pack_linears(model) > 0
    tokenizer = GPT2Tokenizer()
    draw = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=draw).tolist()
               for n in args.lengths]
    c = model.config
    print(machine_line())
    print(f"model: {args.shape} shape, random weights; {c.n_layer} layers, {c.n_head} heads, "
          f"{c.n_embd} wide, context {c.block_size}, vocab {c.vocab_size}, "
          f"{params / 1e6:.1f}M parameters, float32, packed for oneDNN={packed}")
    print(f"job: prompts of {args.lengths} tokens, {args.tokens} new tokens each, greedy")
    run(model, tokenizer, prompts, 4, True)  # warm-up: first-call allocations and kernels
    run(model, tokenizer, prompts[:1], 4, False)
    total = args.tokens * len(prompts)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats):
        for batched in ((True, False) if r % 2 == 0 else (False, True)):
            seconds, out = run(model, tokenizer, prompts, args.tokens, batched)
            times[batched].append(seconds)
            if batched:
                batch_out = out
            else:
                alone_out = out
            print(f"  {'batched   ' if batched else 'one by one'} {seconds:6.2f} s "
                  f"{total / seconds:7.1f} tokens/s")
    same = batch_out == alone_out
    best = {k: min(v) for k, v in times.items()}
    print(f"best: batched {best[True]:.2f} s ({total / best[True]:.1f} tokens/s), one by one "
          f"{best[False]:.2f} s ({total / best[False]:.1f} tokens/s): "
          f"{best[False] / best[True]:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
