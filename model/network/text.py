"""A model that knows its tokenizer: text in wherever token ids go, TransformerLens's names.

Mixed into model.gpt.GPT. `load_model` gives the model its tokenizer (`model.tokenizer`); a GPT
built by hand has none until you set it. The network never imports the data wing: these methods
ask the tokenizer object for what they need (to_tokens, to_str_tokens, encode, decode).

    model.to_tokens("The cat sat")            # (1, T) ids on the model's device
    model.to_tokens(["a b", "c d"])           # (2, T): one row per text (Tokenizer.to_tokens)
    model.to_str_tokens("The cat sat")        # ["The", " cat", " sat"]
    model.to_string(ids)                      # text (a list of texts for (B, T) ids)
    model.to_single_token(" Paris")           # an id; a text of several tokens is an error
    model("The cat sat"), model.run_with_cache("The cat sat")

Unlike TransformerLens, no start token is prepended unless asked (prepend_bos=True): smallgpt
models are trained without one.
"""

from __future__ import annotations

from typing import Any

import torch

from model.errors import TokenizerError


class TextModel:
    """to_tokens, to_str_tokens, to_string, to_single_token and as_tokens, through
    `self.tokenizer`."""

    tokenizer: Any = None  # a model.data.tokenizer.Tokenizer; load_model sets it
    W_E: torch.Tensor  # model/network/views.py: its device is the model's

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer: load it with load_model, or set "
                                 "model.tokenizer = tokenizer (e.g. load_model(...).tokenizer)")
        return self.tokenizer

    def to_tokens(self, input: str | list[str], prepend_bos: bool = False,
                  padding_side: str = "right", move_to_device: bool = True) -> torch.Tensor:
        """(B, T) token ids of a text or a list of texts, on the model's device."""
        device = self.W_E.device if move_to_device else None
        return self._tokenizer().to_tokens(input, prepend_bos=prepend_bos,
                                           padding_side=padding_side, device=device)

    def to_str_tokens(self, input: Any, prepend_bos: bool = False) -> list:
        """Each token of a text, or of ids, as text; for a list of texts or (B, T) ids with
        B > 1, one list per row."""
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text, prepend_bos) for text in input]
        if not isinstance(input, str):
            ids = torch.as_tensor(input)
            if ids.ndim == 2 and ids.size(0) > 1:
                return [self.to_str_tokens(row) for row in ids]
            input = ids.reshape(-1)
        return self._tokenizer().to_str_tokens(input, prepend_bos=prepend_bos)

    def to_string(self, tokens: Any) -> str | list[str]:
        """The text of ids (T,), or one text per row of (B, T) ids."""
        ids = torch.as_tensor(tokens)
        if ids.ndim > 2:
            raise TokenizerError(f"to_string takes ids of shape (T,) or (B, T), got "
                                 f"{tuple(ids.shape)}")
        if ids.ndim == 2:
            return [self._tokenizer().decode(row.tolist()) for row in ids]
        return self._tokenizer().decode(ids.reshape(-1).tolist())

    def to_single_token(self, string: str) -> int:
        """The id of a text that is exactly one token."""
        ids = self._tokenizer().encode(string)
        if len(ids) != 1:
            raise TokenizerError(f"{string!r} is {len(ids)} tokens, not one: pass a text that "
                                 "the tokenizer encodes as a single token (mind the leading "
                                 "space)")
        return ids[0]

    def as_tokens(self, input: Any) -> torch.Tensor:
        """Token ids as they are; a text or a list of texts through to_tokens."""
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input
                                      and all(isinstance(text, str) for text in input)):
            return self.to_tokens(input)
        return input
