"""Batches of whole conversations: one conversation per row, padded, loss on replies only.

Each row is one conversation from its start (a longer one than block_size + 1 tokens is cut
after the last reply that ends within them, so no row teaches a reply that never ends), so no
attention can cross from one conversation into another and the model's fused causal attention
(flash on CUDA) needs no mask: padding comes after the real tokens, where causal attention never
looks back from. Targets are -1 wherever the loss mask is 0 (system and user text, headers) and
on padding; GPT.forward ignores -1, so the loss is the mean over reply tokens.

Padding, not packing several conversations into a window: packing needs a block-diagonal mask
and per-conversation positions in the model, and loses the fused kernel on CUDA. To keep
padding small, each group of GROUP batches is drawn together and sorted by length, so a batch
holds conversations of similar length; the batch order within the group is shuffled.

The sampler is a pure function of (seed, batches drawn) like BatchSampler, so resuming is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from model.data.batches import Batch, SeededSampler, to_device
from model.data.chat_data import ChatData
from model.errors import DataError

GROUP = 16  # batches drawn and sorted by length together


def usable(data: ChatData, split: str, block_size: int) -> np.ndarray:
    """Indices of the split's conversations whose first reply ends within block_size + 1
    tokens (in a long conversation it may not)."""
    index = data.index(split)
    return np.flatnonzero(index[:, 2] < block_size + 1)


def fitted_length(tokens: np.ndarray, mask: np.ndarray, eot: int, length: int,
                  block_size: int) -> int:
    """`length` if the conversation fits block_size + 1 tokens, else the length up to the
    end-of-text of the last reply that ends within them."""
    if length <= block_size + 1:
        return length
    ends = np.flatnonzero((mask[:block_size + 1] == 1) & (tokens[:block_size + 1] == eot))
    return int(ends[-1]) + 1


def conversation_rows(data: ChatData, split: str, chosen: np.ndarray, block_size: int,
                      device: torch.device) -> Batch:
    """x, y (len(chosen), T) with T the longest chosen conversation minus one, rounded up to a
    multiple of 8 (at most block_size); x is padded with end-of-text, y with -1, and y is -1
    where the mask is 0."""
    tokens, mask, index = data.tokens(split), data.mask(split), data.index(split)
    eot = data.tokenizer.eot_id
    lengths = np.array([fitted_length(tokens[s:s + n], mask[s:s + n], eot, n, block_size)
                        for s, n in index[chosen, :2]])
    # Rows a multiple of 8 wide (within the context): fewer distinct shapes for torch.compile
    # to specialise on, and aligned for tensor cores; at most 7 more padded positions.
    width = min(-(-(int(lengths.max()) - 1) // 8) * 8, block_size) + 1
    ids = np.full((len(chosen), width), data.tokenizer.eot_id, dtype=np.int64)
    targets = np.full((len(chosen), width), -1, dtype=np.int64)
    for row, (c, n) in enumerate(zip(chosen, lengths)):
        start = index[c, 0]
        ids[row, :n] = tokens[start:start + n]
        trained = mask[start:start + n].astype(bool)
        targets[row, :n] = np.where(trained, ids[row, :n], -1)
    return to_device(ids[:, :-1], device), to_device(targets[:, 1:], device)


class ChatBatchSampler(SeededSampler):
    """Random batches of conversations; the same interface and state as BatchSampler.

    Batch k belongs to group k // GROUP, whose GROUP * world_size * batch_size conversations
    are drawn from a generator seeded by (seed, group), sorted by length and cut into batches;
    each rank keeps its slice of batch k, so N ranks see what one process with N times the
    batch would see.
    """

    def __init__(self, data: ChatData, block_size: int, batch_size: int, seed: int, *,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 split: str = "train") -> None:
        super().__init__(block_size, batch_size, seed, rank=rank, world_size=world_size,
                         device=device)
        self.data, self.split = data, split
        self.pool = usable(data, split, block_size)
        if not len(self.pool):
            raise DataError(f"no {split} conversation has a whole reply within the first "
                            f"{block_size + 1} tokens; raise model.block_size or shorten the "
                            "conversations")
        self.lengths = data.index(split)[:, 1]

    def next_batch(self) -> Batch:
        group, position = divmod(self.batches_drawn, GROUP)
        self.batches_drawn += 1
        rng = np.random.default_rng([self.seed % 2**63, group])
        per_batch = self.batch_size * self.world_size
        drawn = rng.choice(self.pool, size=GROUP * per_batch,
                           replace=len(self.pool) < GROUP * per_batch)
        drawn = drawn[np.argsort(self.lengths[drawn], kind="stable")]
        batch = rng.permutation(GROUP)[position]
        mine = drawn[batch * per_batch:(batch + 1) * per_batch]
        mine = mine[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return conversation_rows(self.data, self.split, mine, self.block_size, self.device)


def chat_eval_batches(data: ChatData, block_size: int, batch_size: int, num_batches: int,
                      device: str | torch.device = "cpu") -> list[Batch]:
    """Fixed validation batches: conversations spread evenly over the split, sorted by length
    (less padding), the same every call."""
    pool = usable(data, "val", block_size)
    if not len(pool):
        raise DataError(f"no validation conversation has a whole reply within the first "
                        f"{block_size + 1} tokens; raise model.block_size")
    count = min(len(pool), batch_size * num_batches)
    chosen = pool[np.linspace(0, len(pool) - 1, count).round().astype(np.int64)]
    chosen = chosen[np.argsort(data.index("val")[chosen, 1], kind="stable")]
    return [conversation_rows(data, "val", chosen[i:i + batch_size], block_size,
                              torch.device(device)) for i in range(0, count, batch_size)]
