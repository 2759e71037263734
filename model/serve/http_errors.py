"""Errors as OpenAI's API reports them: an HTTP status and
`{"error": {"message", "type", "param", "code"}}`, naming the field that is wrong.

Every bad request ends here as a 4xx: malformed JSON, a field of the wrong type, a value out of
range, a prompt the tokenizer cannot encode. Only a bug in the server itself gives a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SmallGPTError
from .engine import EngineStopped

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused before it is parsed
log = logging.getLogger("smallgpt.serve")


class APIError(Exception):
    """A request the server will not serve, with OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = (
            message, param, code, status, type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_library(exc: SmallGPTError, param: str | None) -> APIError:
    """A library error (bad text for the tokenizer, a sampling argument out of range) as a 400
    about `param`, which the message names first."""
    return APIError(f"'{param}': {exc}" if param else str(exc), param)


async def in_thread(fn: Callable[..., T], arg: Any, param: str) -> T:
    """`fn(arg)` on a worker thread (encoding a long text must not hold up the event loop); a
    library error (text the tokenizer cannot encode, an unknown id) becomes a 400 about `param`."""
    try:
        return await run_in_threadpool(fn, arg)
    except SmallGPTError as exc:
        raise from_library(exc, param) from exc


def internal_error(exc: Exception) -> APIError:
    """A bug in the server, said without its details (the log has the traceback)."""
    return APIError(f"internal server error ({type(exc).__name__}); please report it", None,
                    "internal_error", 500, "server_error")


def shutting_down(exc: EngineStopped) -> APIError:
    return APIError(str(exc), None, "server_shutting_down", 503, "server_error")


def stream_error(exc: Exception, path: str) -> APIError:
    """What a stream sends when it fails after its 200 went out, so the client learns why it
    ended. A request was checked before its stream began, so none of these should happen; the
    server shutting down is the one expected case. Anything else is logged with its traceback."""
    if isinstance(exc, EngineStopped):
        log.warning("a stream on %s ended: %s", path, exc)
        return shutting_down(exc)
    if isinstance(exc, SmallGPTError):
        log.warning("a stream on %s ended with a library error: %s", path, exc)
        return from_library(exc, None)
    log.error("internal error in the stream of %s", path, exc_info=exc)
    return internal_error(exc)


# Messages for fields whose pydantic errors (one per branch of a union) say little on their own.
FIELD_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of lists of "
              "token ids",
    "stop": "must be a string or a list of strings",
    "tokens": "must be a list of token ids (integers)",
}


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body validated against `model`, or an APIError naming what is wrong."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(f"the request body is larger than {MAX_BODY_BYTES} bytes", None,
                       "request_too_large", status=413)
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(f"the request body is larger than {MAX_BODY_BYTES} bytes", None,
                           "request_too_large", status=413)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(f"the request body is not valid JSON: {exc}", None, "invalid_json"
                       ) from exc
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def validation_error(exc: ValidationError) -> APIError:
    """The first field pydantic rejected, named, with what was expected and what came."""
    first = exc.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "missing":
        return APIError(f"'{param}' is required", param, "missing_field")
    expected = FIELD_HELP.get(param or "", first["msg"].replace("Input should", "should"))
    given = json.dumps(first.get("input"), default=str)
    given = given if len(given) <= 60 else given[:57] + "..."
    return APIError(f"'{param}' {expected}; got {given}", param, "invalid_type")


def install_handlers(app: FastAPI) -> None:
    """Every error leaves the server in OpenAI's format; none stops it."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (f"no such endpoint: {request.method} {request.url.path}"
                   if exc.status_code in (404, 405) else str(exc.detail))
        return APIError(message, None, code, exc.status_code).response()

    @app.exception_handler(EngineStopped)
    async def stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return shutting_down(exc).response()  # a request that came in as the server stops

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return internal_error(exc).response()
