"""Errors as OpenAI's API reports them: an HTTP status and
`{"error": {"message", "type", "param", "code"}}`, naming the field that is wrong.

Every bad request ends here as a 4xx: malformed JSON, a field of the wrong type, a value out of
range, a prompt the tokenizer cannot encode. Only a bug in the server itself gives a 500.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import ChatFormatError, SmallGPTError
from model.serve.engine import EngineStopped

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
    about `param`, which the message names first. A malformed conversation names its own
    field, deeper inside `param` (messages[1].content[0])."""
    if isinstance(exc, ChatFormatError) and exc.field:
        return APIError(str(exc), exc.field)
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


def validation_error(errors: Sequence[Any], field_help: Mapping[str, str]) -> APIError:
    """The first field pydantic rejected (FastAPI's RequestValidationError.errors()), named,
    with what was expected (field_help's words for the field, else pydantic's) and what came."""
    first = errors[0]
    loc = [part for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(f"the request body is not valid JSON: {reason}", None, "invalid_json")
    if not loc or not isinstance(loc[0], str):
        if first["type"] == "missing":
            return APIError("the request needs a JSON object body", None, "invalid_json")
        return APIError("the request body must be a JSON object (sent as application/json)",
                        None, "invalid_json")
    param, field = path(loc), str(loc[0])
    if first["type"] == "missing":
        return APIError(f"'{param}' is required", param, "missing_field")
    leaf = next((str(x) for x in reversed(loc) if str(x) in field_help), field)
    expected = field_help.get(leaf, re.sub(r"^\w+ should", "should", first["msg"]).replace(
        " after validation", ""))
    given = json.dumps(first.get("input"), default=str)
    given = given if len(given) <= 60 else given[:57] + "..."
    wrong_type = first["type"].endswith("_type") or first["type"].endswith("_parsing")
    return APIError(f"'{param}' {expected}; got {given}", param,
                    "invalid_type" if wrong_type else "invalid_value")


def path(loc: Sequence[Any]) -> str:
    """OpenAI's way of naming a nested field: messages[0].content. pydantic's names of union
    branches (list[int], constrained-str...) are left out."""
    out = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list"):
            out += f".{part}"
        else:
            break  # a union branch: what follows is that branch's view
    return out


class BodyLimit:
    """ASGI middleware: a request body over MAX_BODY_BYTES is a 413, refused on its declared
    length before it is read, or as soon as a body without one grows past the limit."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            too_large = APIError(f"the request body is larger than {MAX_BODY_BYTES} bytes", None,
                                 "request_too_large", 413)
            return await too_large.response()(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:  # FastAPI passes an HTTPException from here through
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, counted, send)


def install_handlers(app: FastAPI, field_help: Mapping[str, str]) -> None:
    """Every error leaves the server in OpenAI's format; none stops it. `field_help` says what a
    field must be where pydantic's own words say little (see validation_error)."""
    app.add_middleware(BodyLimit)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors(), field_help).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path} (allowed: "
                        f"{(exc.headers or {}).get('Allow', '')})",
                   413: f"the request body is larger than {MAX_BODY_BYTES} bytes"}.get(
            exc.status_code, str(exc.detail))
        response = APIError(message, None, code, exc.status_code).response()
        response.headers.update(exc.headers or {})  # a 405's Allow: the methods that are
        return response

    @app.exception_handler(EngineStopped)
    async def stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return shutting_down(exc).response()  # a request that came in as the server stops

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return internal_error(exc).response()
