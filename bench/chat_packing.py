"""Chat batches: one conversation per row (padded) against several per row (packed).

    python bench/chat_packing.py [--tokenizer gpt2] [--block-size 256] [--batch-size 8]
                                 [--n-layer 4 --n-embd 256] [--steps 12]

Trains a randomly initialised GPT on the offline demo set (model/data/chat_demo.py) three ways, the
same batch of rows each step, and reports training throughput in tokens that carry loss
(reply tokens) and in real (non-padding) tokens per second:

  padded, grouped  what training does (model/data/chat_batches.py): one conversation per row,
                   rows of similar length batched together, padded to the longest
  padded, random   the same without grouping by length
  packed           whole conversations back to back in rows of block_size tokens, attention
                   kept inside each conversation by a block-diagonal causal mask (so the fused
                   is_causal kernel cannot be used; positions restart per conversation only
                   with rotary tables per row, which this benchmark does not do)

The packed path exists only here (attention patched for the run): it is what packing would
cost, measured before deciding to build it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from common import machine_line, peak_rss_mib

from model.config import DataConfig
from model.data.chat_batches import GROUP, ChatBatchSampler, conversation_rows, usable
from model.data.chat_data import prepare_chat
from model.data.tokenizer import train_tokenizer
from model.gpt import GPT, CausalSelfAttention, GPTConfig

MASK: list[torch.Tensor | None] = [None]  # the packed batch's (B, 1, T, T) attention mask


@contextmanager
def document_masked_attention():
    original = CausalSelfAttention.forward

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        q, k, v = self._heads(x, rope, None)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=MASK[0])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    CausalSelfAttention.forward = forward
    try:
        yield
    finally:
        CausalSelfAttention.forward = original


def packed_batch(data, order: np.ndarray, cursor: int, rows: int, block_size: int):
    """Fill `rows` rows of block_size + 1 tokens with whole conversations from order[cursor:];
    returns x, y, the attention mask and the new cursor."""
    tokens, mask, index = data.tokens("train"), data.mask("train"), data.index("train")
    width = block_size + 1
    ids = np.full((rows, width), data.tokenizer.eot_id, dtype=np.int64)
    targets = np.full((rows, width), -1, dtype=np.int64)
    doc = np.full((rows, width), -1, dtype=np.int64)
    for row in range(rows):
        used, d = 0, 0
        while True:
            start, length, _ = index[order[cursor % len(order)]]
            length = min(length, width)
            if used + length > width:
                break
            ids[row, used:used + length] = tokens[start:start + length]
            trained = mask[start:start + length].astype(bool)
            targets[row, used:used + length] = np.where(trained, ids[row, used:used + length],
                                                        -1)
            doc[row, used:used + length] = d
            used, d, cursor = used + length, d + 1, cursor + 1
    x, y, doc = (torch.from_numpy(a) for a in (ids[:, :-1], targets[:, 1:], doc[:, :-1]))
    T = block_size
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    attn = (same & causal)[:, None]
    attn |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves: no NaN
    return x, y, attn, cursor


def run(model, batches, steps: int, warmup: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, replies, real, width = [], 0, 0, 0
    for i in range(steps + warmup):
        x, y, attn = next(batches)
        MASK[0] = attn
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
            replies += int((y >= 0).sum())
            real += int(x.numel() if attn is not None else (x != -2).sum())
            width += x.size(1)
    return {"s_per_step": statistics.median(times), "replies": replies / steps,
            "tokens": x.numel(), "width": width / steps, "total_s": sum(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    tok = train_tokenizer(args.tokenizer, [], None)
    with tempfile.TemporaryDirectory() as cache:
        data = prepare_chat(DataConfig(source="shakespeare-chat", format="chat",
                                       cache_dir=cache), args.block_size, tokenizer=tok)
        lengths = data.index("train")[:, 1]
        print(f"{len(lengths)} training conversations, {lengths.mean():.1f} tokens on average "
              f"(median {np.median(lengths):.0f}, max {lengths.max()})")
        config = GPTConfig(vocab_size=tok.vocab_size, block_size=args.block_size,
                           n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd)
        B, T = args.batch_size, args.block_size
        results = {}

        def padded(group: bool):
            sampler = ChatBatchSampler(data, T, B, seed=1)
            rng = np.random.default_rng(1)
            pool = usable(data, "train", T)
            while True:
                if group:
                    x, y = sampler.next_batch()
                else:
                    x, y = conversation_rows(data, "train", rng.choice(pool, B), T,
                                             torch.device("cpu"))
                yield x, y, None

        def packed():
            order = np.random.default_rng(1).permutation(usable(data, "train", T))
            cursor = 0
            while True:
                x, y, attn, cursor = packed_batch(data, order, cursor, B, T)
                yield x, y, attn

        for name, batches in [("padded, grouped", padded(True)),
                              ("padded, random", padded(False)),
                              ("packed", packed())]:
            torch.manual_seed(0)
            model = GPT(config)
            if name == "packed":
                with document_masked_attention():
                    results[name] = run(model, batches, args.steps, args.warmup)
            else:
                results[name] = run(model, batches, args.steps, args.warmup)
    print(machine_line())
    print(f"model: {args.n_layer} layers, {args.n_embd} wide, vocab {tok.vocab_size}, "
          f"block_size {T}, {B} rows per step (grouping: {GROUP} batches)")
    print(f"{'':16} {'s/step':>8} {'row width':>10} {'reply tok/step':>15} {'reply tok/s':>12}")
    for name, r in results.items():
        print(f"{name:16} {r['s_per_step']:8.3f} {r['width']:10.1f} {r['replies']:15.1f} "
              f"{r['replies'] / r['s_per_step']:12.1f}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
