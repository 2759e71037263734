"""The web playground and the OpenAI-compatible API: `python sample.py --serve` or
`python -m model.serve --checkpoint NAME`.

    from model.serve import create_app, run
    app = create_app(load_model("out/small"))   # an ASGI app, for uvicorn or a test client
    run("out/small", host="127.0.0.1", port=8000)  # load, warn, serve until Ctrl-C

Nothing here is imported until used: FastAPI and uvicorn are the optional `serve` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..pretrained import Pretrained


def create_app(pretrained: Pretrained, name: str | None = None, **limits: Any) -> FastAPI:
    """See model.serve.app.create_app."""
    from .app import create_app as create

    return create(pretrained, name, **limits)


def run(name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
        device: str = "auto", **options: Any) -> int:
    """Load the model `name` (model.pretrained's names; None: the newest under out/) and serve
    it until Ctrl-C. See model.serve.__main__.run."""
    from .__main__ import run as serve

    return serve(name, host, port, device, **options)
