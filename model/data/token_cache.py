"""What every prepared token cache shares, text (model/prepare.py) and chat
(model/chat_data.py) alike: the splits it holds and the dtype its token ids are stored in."""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65536 in half the space of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
