"""The ASGI application: the OpenAI-compatible API, the page's JSON endpoints and the page.

`create_app(pretrained)` builds it around one model, chosen when the server starts; no request
can name a file or load anything else. With a steering vector (model.weights.steering) every
forward pass the app runs is steered, generation, scoring and the page's views alike, so that
what the page shows is the model that generates; /api/info says so. The engine's worker thread
lives as long as the app (FastAPI's lifespan), so an app can be served by uvicorn or driven
in-process by a test client. /openapi.json describes every endpoint with the served model's
limits; /docs shows it (Swagger UI from the swagger-ui-bundle package, so the page works
offline)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from model.serve import chat_api, openai_api, pages
from model.serve.http_errors import install_handlers
from model.serve.protocol import FIELD_HELP, openapi_for
from model.serve.state import DEFAULT_MAX_TOKENS, Served
from model.weights.loading import Pretrained
from model.weights.steering import Steering

STATIC = Path(__file__).parent / "static"


def model_id(pretrained: Pretrained, name: str | None = None) -> str:
    """The id clients send as `model`: the name the server was started with, else the path."""
    return name or str(pretrained.path)


def create_app(pretrained: Pretrained, name: str | None = None,
               max_tokens: int = DEFAULT_MAX_TOKENS, *,
               steering: Steering | None = None) -> FastAPI:
    """The app serving `pretrained` (from model.weights.loading.load_model) under the id
    `name`, steered by `steering` (model.weights.steering.load_steering) if given: its hook is
    on the model while the app runs (its lifespan) and removed when it stops."""
    served = Served(model=pretrained.model.eval(), tokenizer=pretrained.tokenizer,
                    model_id=model_id(pretrained, name), description=pretrained.description,
                    max_tokens=max_tokens, chat_trained=pretrained.chat_trained,
                    steering=steering)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        steered = served.model.hooks(steering.hooks()) if steering else nullcontext()
        with steered:
            served.engine.start()
            try:
                yield
            finally:
                served.engine.stop()

    # FastAPI's own /docs loads Swagger UI from a CDN; this server serves a local copy instead.
    # A JSON body sent without a Content-Type (curl -d) is read too, as FastAPI did before it
    # had the strict_content_type option.
    lenient = ({"strict_content_type": False}
               if "strict_content_type" in inspect.signature(FastAPI).parameters else {})
    app = FastAPI(title="smallgpt", summary=f"serving {served.model_id}", lifespan=lifespan,
                  docs_url=None, redoc_url=None, **lenient)
    app.state.served = served
    install_handlers(app, FIELD_HELP)
    app.include_router(openai_api.router)
    app.include_router(chat_api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_for(FastAPI.openapi(app), served)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    docs_assets(app)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def docs_assets(app: FastAPI) -> None:
    """/docs: Swagger UI over /openapi.json, from the swagger-ui-bundle package's files (no
    network); without that package, a page that says how to get it."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if swagger_ui_path is None:
            return HTMLResponse("<p>The API documentation page needs the swagger-ui-bundle-v2 "
                                "package (pip install -e '.[serve]'); the schema itself is at "
                                "<a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="smallgpt API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
