"""Generated tokens as printable text, one sample at a time (model.inference.sampling uses it)."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from model.data.tokenizer import Tokenizer


class TextStream:
    """Turns one sample's tokens into printable text as they arrive.

    Holds back the bytes of an incomplete UTF-8 character (a byte-level BPE token can end in the
    middle of one) and any tail that could be the start of a stop string, so no stop string is
    ever printed. Stop strings are looked for in the generated text only, not in the prompt.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded but not yet handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Text now safe to show, and whether a stop string has appeared (it is not shown)."""
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        found = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Everything held back, at the end of the sample."""
        out = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out
