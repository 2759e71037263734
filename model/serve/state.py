"""The state every endpoint shares: the one model this server runs, its tokenizer, its limits
and the engine thread. The app makes one `Served` at start; routers reach it through the
`ServedModel` parameter type (FastAPI's Depends), so no router imports the app.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from model.data.tokenizer import Tokenizer
from model.gpt import GPT
from model.serve.engine import Engine
from model.serve.http_errors import APIError
from model.weights.steering import Steering

DEFAULT_MAX_TOKENS = 1024  # the most new tokens one request may ask for


@dataclass
class Served:
    """The one model this server runs, with its limits; every endpoint reads it from here."""

    model: GPT
    tokenizer: Tokenizer
    model_id: str  # what /v1/models lists and requests may name
    description: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    chat_trained: bool = False  # fine-tuned on conversations (Pretrained.chat_trained)
    steering: Steering | None = None  # added to every forward pass while the app runs
    engine: Engine = field(default_factory=Engine)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def check_context(self, ids: Sequence[int], param: str) -> None:
        if len(ids) > self.block_size:
            raise APIError(f"'{param}' is {len(ids)} tokens, longer than this model's context "
                           f"of {self.block_size} tokens", param, "context_length_exceeded")

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise APIError(f"'{param}' holds token id {bad[0]}, outside the vocabulary "
                           f"(0..{self.tokenizer.vocab_size - 1})", param, "invalid_value")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(f"the model {name!r} does not exist; this server serves "
                           f"{self.model_id!r} (GET /v1/models)", "model", "model_not_found",
                           404)


def get_served(request: Request) -> Served:
    return request.app.state.served


# An endpoint's parameter `served: ServedModel` is the served model (FastAPI's Depends).
ServedModel = Annotated[Served, Depends(get_served)]
