"""Aggregate streaming speed of the server: new tokens per second summed over 1, 4 and 8 clients
that each stream a completion at the same time, on a model of configs/small.yaml's shape.

    python bench/serve_speed.py                      # random weights, small.yaml's model section
    python bench/serve_speed.py --checkpoint out/small --clients 1 4 8 16
    python bench/serve_speed.py --checkpoint RUN --clients 1 4 --threads 2 --quantize int8

The server runs in its own process (as `python sample.py --serve` would), so the clients'
parsing does not share its interpreter; each client is a thread streaming POST /v1/completions
(temperature 1, its own seed, end-of-text allowed) and counting tokens from the usage chunk.
Aggregate = all clients' tokens / wall time from the first request to the last [DONE]; the best of
--repeats runs is reported. The "direct" line is model.inference.sampling.generate in this process
with no server, for the cost of HTTP and of taking turns. Without --checkpoint the weights are
random (the speed does not depend on them; the text is noise) and the tokenizer is a 1024-token BPE
trained on tiny-shakespeare, as small.yaml's is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import socket
import threading
import time
from pathlib import Path

import httpx
import torch
from common import machine_line, require_tiny_shakespeare

from model.config import load_config
from model.data.tokenizer import Tokenizer, tokenizer_from_spec, train_tokenizer
from model.gpt import GPT
from model.inference.sampling import generate
from model.network.packed import pack_linears
from model.network.quantized import quantize_int8
from model.runtime import choose_dtype
from model.weights.loading import Pretrained

PROMPT = "ROMEO:\nBut soft, what light"


def random_small() -> tuple[GPT, Tokenizer]:
    """small.yaml's model with seeded random weights and a BPE like the one it trains."""
    text = require_tiny_shakespeare().read_text(encoding="utf-8")
    cfg = load_config("small.yaml")
    tokenizer = train_tokenizer("bpe", [text], cfg.data.bpe_vocab_size)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    return model.eval(), tokenizer


def prepare_linears(model: torch.nn.Module, pack: bool, quantize: bool) -> str:
    """The linear layers as the server has them: int8 with --quantize int8, else packed for
    oneDNN unless --no-pack; what was done, in words."""
    if quantize:
        quantize_int8(model)
        return "linear layers in int8"
    return f"linear layers packed for oneDNN: {pack and pack_linears(model) > 0}"


def serve_child(checkpoint: str | None, port: int, threads: int, dtype: str,
                pack: bool, quantize: bool) -> None:
    """The server process: the same app `python sample.py --serve` runs."""
    import uvicorn

    from model.serve import create_app
    from model.weights.loading import load_model

    torch.set_num_threads(threads)
    if checkpoint:
        loaded = load_model(checkpoint, "cpu")
    else:
        model, tokenizer = random_small()
        loaded = Pretrained(model=model, tokenizer=tokenizer, kind="smallgpt",
                            path=Path("random"), description="random small.yaml model")
    loaded.model.to(choose_dtype(dtype, torch.device("cpu"), setting="--dtype").dtype)
    prepare_linears(loaded.model, pack, quantize)
    uvicorn.run(create_app(loaded, "bench", max_tokens=4096), host="127.0.0.1", port=port,
                log_level="warning")


def stream_one(url: str, tokens: int, seed: int, out: list, i: int) -> None:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, done, last = None, None, ""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            last = line
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                done = chunk["usage"]["completion_tokens"]
    if done is None:  # the stream ended with an error event instead of its usage
        raise RuntimeError(f"client {i}: the stream ended without usage: {last[:300]}")
    out[i] = (done, first, time.perf_counter() - start)


def aggregate(url: str, clients: int, tokens: int, run: int) -> tuple[float, float, float]:
    """(aggregate tokens/s, mean tokens/s per client, mean seconds to the first token)."""
    results: list = [None] * clients
    threads = [threading.Thread(target=stream_one, args=(url, tokens, 1000 * run + i, results, i))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if None in results:
        raise SystemExit("error: a client's stream failed (its error is printed above)")
    total = sum(r[0] for r in results)
    per_client = sum(r[0] / r[2] for r in results) / clients
    return total / wall, per_client, sum(r[1] for r in results) / clients


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="serve this model instead of a random small.yaml one")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=200, help="new tokens per client")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="the served weights' dtype; auto as sample.py --serve chooses")
    p.add_argument("--no-pack", action="store_true",
                   help="PyTorch's own CPU kernels, as the server's --no-pack (default: the "
                        "linear layers packed for oneDNN where the CPU can, as the server does)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights, as the server's option")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    print(machine_line())
    if args.checkpoint:
        from model.weights.loading import load_model

        loaded = load_model(args.checkpoint, "cpu")
        model, tokenizer = loaded.model, loaded.tokenizer
        print(f"model: {loaded.description}")
    else:
        model, tokenizer = random_small()
        print(f"model: small.yaml's shape ({model.num_params() / 1e6:.2f}M parameters, context "
              f"{model.config.block_size}, {tokenizer.vocab_size}-token BPE), RANDOM weights")
    precision = choose_dtype(args.dtype, torch.device("cpu"), setting="--dtype")
    model.to(precision.dtype)
    linears = prepare_linears(model, not args.no_pack, args.quantize == "int8")  # the direct line's
    print(f"serving in {precision.describe()}; {linears}")
    spec = tokenizer.spec()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    server = ctx.Process(target=serve_child,
                         args=(args.checkpoint, port, args.threads, args.dtype,
                               not args.no_pack, args.quantize == "int8"),
                         daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not server.is_alive():
                raise SystemExit("error: the server did not start")
            time.sleep(0.2)
        aggregate(url, 1, 20, 99)  # warm-up
        direct = []
        for r in range(args.repeats):
            start = time.perf_counter()
            n = sum(1 for _ in generate(model, tokenizer_from_spec(spec), PROMPT,
                                        max_new_tokens=args.tokens, temperature=1.0, seed=r,
                                        show_top=0))
            direct.append(n / (time.perf_counter() - start))
        print(f"direct generate, no server: {max(direct):.1f} tokens/s")
        print(f"{'clients':>7}  {'aggregate tok/s':>15}  {'per client tok/s':>16}  "
              f"{'first token s':>13}")
        for clients in args.clients:
            runs = [aggregate(url, clients, args.tokens, r) for r in range(args.repeats)]
            best = max(runs)
            print(f"{clients:>7}  {best[0]:>15.1f}  {best[1]:>16.1f}  {best[2]:>13.3f}")
    finally:
        server.terminate()
        server.join(10)


if __name__ == "__main__":
    main()
