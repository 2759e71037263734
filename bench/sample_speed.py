"""Generation speed with and without the KV cache, in new tokens per second.

    python bench/sample_speed.py --repeats 3          # random 6x6x384 model, context 256, 65 chars
    python bench/sample_speed.py --checkpoint out/shakespeare_char --threads 0

Both runs use the same seed and the same context-window policy (model.inference.sampling), so they
produce the same tokens; only the way the logits are computed differs. Numbers include the prompt's
prefill and the window refills past block_size. The CPU may be shared: run it a few times.

Measured with `python bench/sample_speed.py --repeats 3` (2-core AMD EPYC VM shared with other
jobs, torch 2.13 CPU, 1 thread, float32): with the cache 150-159 tokens/s, without 15.6-16.4
tokens/s, 9-10x. Decoding is bound by reading the 43 MB of weights per token (more than the
32 MB L3): the 24 matrix-vector products take ~4.2 of the ~6 ms per token.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine_line

from model.config import GPTConfig
from model.data.tokenizer import Tokenizer, train_tokenizer
from model.gpt import GPT
from model.inference.sampling import generate
from model.network.packed import pack_linears
from model.runtime import choose_dtype
from model.weights.loading import load_checkpoint

# nanoGPT's shakespeare_char vocabulary: the 65 characters of tiny-shakespeare.
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def tokens_per_second(model: GPT, tokenizer: Tokenizer, args: argparse.Namespace,
                      use_cache: bool) -> float:
    steps = generate(model, tokenizer, args.prompt, max_new_tokens=args.tokens,
                     temperature=1.0, seed=args.seed, show_top=0, use_cache=use_cache,
                     ignore_eot=True)
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start)


def measure(model: GPT, tokenizer: Tokenizer, args: argparse.Namespace, use_cache: bool) -> float:
    """The best of `repeats` runs (the least disturbed by other work), with the range shown."""
    runs = [tokens_per_second(model, tokenizer, args, use_cache) for _ in range(args.repeats)]
    if len(runs) > 1:
        print(f"  {'cached' if use_cache else 'full'} runs: "
              + ", ".join(f"{r:.1f}" for r in runs) + " tokens/s")
    return max(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="measure a trained model instead of a random one")
    p.add_argument("--tokens", type=int, default=500, help="new tokens per run")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--pos-emb", default="learned", choices=["learned", "rope"])
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="weights and cache; bfloat16 halves the memory each token reads; auto "
                        "as sample.py chooses (bfloat16 where the CPU computes it natively)")
    # Decoding one token at a time is bound by reading the weights, not by arithmetic: a second
    # thread adds little, and on a shared CPU its spin-waiting can make everything 5x slower.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each; best and range shown")
    p.add_argument("--no-uncached", action="store_true", help="skip the slow reference run")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (dynamic shapes), as sample.py --compile does")
    p.add_argument("--no-pack", action="store_true",
                   help="PyTorch's own CPU kernels, as sample.py --no-pack (default: the linear "
                        "layers packed for oneDNN where the CPU can, as sample.py does)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        model, tokenizer, what = ckpt.model, ckpt.tokenizer, str(ckpt.path)
    else:
        tokenizer = train_tokenizer("char", [CHARS])
        torch.manual_seed(args.seed)
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.context,
                              n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                              pos_emb=args.pos_emb))
        what = "random weights"
    precision = choose_dtype(args.dtype, torch.device("cpu"), setting="--dtype")
    model.to(precision.dtype)
    params = model.num_params()
    if args.compile:
        model = torch.compile(model, dynamic=True)
    packed = not (args.compile or args.no_pack) and pack_linears(model) > 0
    c = model.config
    print(machine_line())
    print(f"model: {what}; {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context "
          f"{c.block_size}, vocab {c.vocab_size}, {c.pos_emb} positions, "
          f"{params / 1e6:.2f}M parameters, {precision.describe()}, "
          f"compile={args.compile}, packed for oneDNN={packed}")
    print(f"run: {args.tokens} new tokens after {args.prompt!r}, temperature 1, seed {args.seed}")

    for _ in generate(model, tokenizer, args.prompt, max_new_tokens=8, show_top=0):
        pass  # warm-up: first-call allocations and kernel selection are not what we measure
    cached = measure(model, tokenizer, args, use_cache=True)
    print(f"with KV cache:                {cached:8.1f} tokens/s")
    if not args.no_uncached:
        full = measure(model, tokenizer, args, use_cache=False)
        print(f"without (full recomputation): {full:8.1f} tokens/s")
        print(f"speed-up: {cached / full:.1f}x")


if __name__ == "__main__":
    main()
