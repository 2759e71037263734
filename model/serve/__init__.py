"""The serve wing: the web playground and the OpenAI-compatible API over one model.

    from model.serve import create_app
    app = create_app(load_model("out/small"))   # an ASGI app, for uvicorn or a test client

`python sample.py --serve` and `python -m model.serve` load a model and serve the app until
Ctrl-C (model/cli/serve.py). Nothing here is imported until used: FastAPI and uvicorn are the
optional `serve` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from model.weights.loading import Pretrained


def create_app(pretrained: Pretrained, name: str | None = None, **limits: Any) -> FastAPI:
    """See model.serve.app.create_app."""
    from model.serve.app import create_app as create

    return create(pretrained, name, **limits)
