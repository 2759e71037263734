"""The ASGI application: the OpenAI-compatible API, the page's JSON endpoints and the page.

`create_app(pretrained)` builds it around one model, chosen when the server starts; no request
can name a file or load anything else. The engine's worker thread lives as long as the app
(FastAPI's lifespan), so an app can be served by uvicorn or driven in-process by a test client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..gpt import GPT
from ..pretrained import Pretrained
from ..tokenizer import Tokenizer
from .engine import Engine
from .http_errors import APIError, install_handlers

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 1024  # the most new tokens one request may ask for


@dataclass
class Served:
    """The one model this server runs, with its limits; every endpoint reads it from here."""

    model: GPT
    tokenizer: Tokenizer
    model_id: str  # what /v1/models lists and requests may name
    description: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    engine: Engine = field(default_factory=Engine)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def check_context(self, ids: Sequence[int], param: str) -> None:
        if len(ids) > self.block_size:
            raise APIError(f"'{param}' is {len(ids)} tokens, longer than this model's context "
                           f"of {self.block_size} tokens", param, "context_length_exceeded")


def model_id(pretrained: Pretrained, name: str | None = None) -> str:
    """The id clients send as `model`: the name the server was started with, else the path."""
    return name or str(pretrained.path)


def create_app(pretrained: Pretrained, name: str | None = None,
               max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The app serving `pretrained` (from model.pretrained.load_model) under the id `name`."""
    from . import openai_api, pages  # FastAPI and pydantic load only when a server is made

    served = Served(pretrained.model.eval(), pretrained.tokenizer,
                    model_id(pretrained, name), pretrained.description, max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    # No /docs or /redoc: their pages load scripts from a CDN, and this server works offline.
    app = FastAPI(title="smallgpt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    install_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
