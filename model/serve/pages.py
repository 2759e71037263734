"""The JSON endpoints the page uses (documented in the README, usable by any client):

    GET  /api/info          the model: name, context size, layers, heads, vocabulary, limits
    POST /api/generate      server-sent events: the prompt's tokens, then every generated token
                            with its probability, the alternatives and where its context began,
                            then "done" (or "error" if generation failed on the way)
    POST /api/distribution  the next-token distribution after given tokens, at several
                            temperatures (the page's live temperature slider)
    POST /api/attention     one layer's attention over a prompt, for a head or the mean of heads
    POST /api/neighbors, /api/analogy, /api/direction: the embedding explorations

All model work runs on the engine thread, between the steps of other requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar, Union

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import analysis  # neighbours, analogy, direction, attention: as python -m model.explore
from ..errors import SmallGPTError
from ..sampling import check_sampling_args, generate
from .compute import distribution, window_start
from .http_errors import APIError, from_library, in_thread, parse_body, stream_error
from .openai_api import Strict, check_seed

if TYPE_CHECKING:
    from .app import Served

router = APIRouter(prefix="/api")
T = TypeVar("T")
MAX_K = 100  # alternatives or neighbours in one answer
MAX_TEMPERATURES = 64
MAX_WORDS = 200


class GenerateRequest(Strict):
    prompt: str = ""
    max_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    k: int = 10  # alternatives reported per token


class DistributionRequest(Strict):
    tokens: list[int]  # the context: the distribution is over the token after these
    temperatures: list[Union[float, int]] = [1.0]  # noqa: UP007
    k: int = 10
    top_k: int | None = None
    top_p: float | None = None
    include: list[int] = []  # tokens to report even outside the k likeliest (the picked one)


class AttentionRequest(Strict):
    prompt: str
    layer: int | None = None  # default: the last
    head: int | None = None  # None: the mean over heads


class NeighborsRequest(Strict):
    word: str
    k: int = 10


class AnalogyRequest(Strict):
    a: str
    b: str
    c: str
    k: int = 10


class DirectionRequest(Strict):
    positive: str
    negative: str
    words: Union[list[str], str]  # noqa: UP007 (a string is split on whitespace)


def check_k(k: int, param: str = "k") -> None:
    if not 1 <= k <= MAX_K:
        raise APIError(f"'{param}' must be between 1 and {MAX_K}, got {k}", param,
                       "invalid_value")


def check_ids(served: Served, ids: list[int], param: str) -> None:
    bad = [i for i in ids if not 0 <= i < served.tokenizer.vocab_size]
    if bad:
        raise APIError(f"'{param}' holds token id {bad[0]}, outside the vocabulary "
                       f"(0..{served.tokenizer.vocab_size - 1})", param, "invalid_value")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   max_tokens: int = 0, temperature_field: str = "temperature") -> None:
    """model.sampling's own checks, each failure named by the field it is about
    (`temperature_field`: the request's name for the temperature, e.g. "temperatures")."""
    for param, kwargs in ((temperature_field, {"temperature": temperature}),
                          ("top_k", {"top_k": top_k}), ("top_p", {"top_p": top_p}),
                          ("max_tokens", {"max_new_tokens": max_tokens})):
        try:
            check_sampling_args(**kwargs)
        except SmallGPTError as exc:
            raise from_library(exc, param) from exc
    if temperature > 2:
        raise APIError(f"'{temperature_field}' must be between 0 and 2, got {temperature}",
                       temperature_field, "invalid_value")


async def on_model(served: Served, fn: Callable[[], T], param: str | None) -> T:
    """`fn()` on the engine thread; a library error (a word the tokenizer cannot encode, a prompt
    longer than the context) becomes a 400 about `param`."""
    try:
        return await served.engine.call(fn)
    except SmallGPTError as exc:
        raise from_library(exc, param) from exc


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    c = served.model.config
    return {"model": served.model_id, "description": served.description,
            "block_size": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_embd": c.n_embd, "vocab_size": served.tokenizer.vocab_size,
            "tokenizer": served.tokenizer.name, "max_tokens": served.max_tokens}


@router.post("/generate")
async def generate_page(request: Request) -> StreamingResponse:
    served: Served = request.app.state.served
    req = await parse_body(request, GenerateRequest)
    if not 0 <= req.max_tokens <= served.max_tokens:
        raise APIError(f"'max_tokens' must be between 0 and {served.max_tokens}, got "
                       f"{req.max_tokens}", "max_tokens", "invalid_value")
    check_sampling(req.temperature, req.top_k, req.top_p, req.max_tokens)
    check_seed(req.seed)
    check_k(req.k)
    tokenizer = served.tokenizer
    ids = await in_thread(tokenizer.encode, req.prompt, "prompt")
    served.check_context(ids, "prompt")
    ids = ids or [tokenizer.eot_id]  # an empty prompt starts a document, as in generate

    async def events() -> AsyncIterator[str]:
        def send(record: dict[str, Any]) -> str:
            return f"data: {json.dumps(record, ensure_ascii=False)}\n\n"

        yield send({"type": "prompt", "block_size": served.block_size,
                    "tokens": [{"id": i, "text": tokenizer.token_text(i)} for i in ids]})
        steps = served.engine.stream(lambda: generate(
            served.model, tokenizer, ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
            req.seed, show_top=req.k))
        try:
            async for step in steps:
                yield send({"type": "token", "index": step.index, "token": step.token,
                            "text": step.text, "prob": step.prob, "delta": step.delta,
                            "finished": step.finished,
                            "context_start": window_start(len(ids), step.index,
                                                          served.block_size),
                            "top": [{"id": i, "text": t, "prob": p} for i, t, p in step.top]})
        except Exception as exc:  # the 200 is out: say why the stream ends (stream_error logs)
            error = stream_error(exc, "/api/generate")
            yield send({"type": "error", "message": error.message, "code": error.code})
            return
        yield send({"type": "done"})

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.post("/distribution")
async def distribution_page(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    req = await parse_body(request, DistributionRequest)
    ids = req.tokens or [served.tokenizer.eot_id]
    check_ids(served, ids, "tokens")
    check_ids(served, req.include, "include")
    served.check_context(ids, "tokens")
    check_k(req.k)
    if not 1 <= len(req.temperatures) <= MAX_TEMPERATURES:
        raise APIError(f"'temperatures' takes 1 to {MAX_TEMPERATURES} values", "temperatures",
                       "invalid_value")
    for t in req.temperatures:
        check_sampling(float(t), req.top_k, req.top_p, temperature_field="temperatures")
    temps = [float(t) for t in req.temperatures]
    result = await on_model(served, lambda: distribution(
        served.model, served.tokenizer, ids, temps, req.k, req.top_k, req.top_p,
        req.include[:MAX_K]), "tokens")
    return analysis.to_jsonable(result)


@router.post("/attention")
async def attention_page(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    req = await parse_body(request, AttentionRequest)
    c = served.model.config
    for param, value, count in (("layer", req.layer, c.n_layer), ("head", req.head, c.n_head)):
        if value is not None and not 0 <= value < count:
            raise APIError(f"'{param}' must be between 0 and {count - 1}, got {value}", param,
                           "invalid_value")
    result = await on_model(served, lambda: analysis.attention(
        served.model, served.tokenizer, req.prompt, req.layer, req.head), "prompt")
    return analysis.to_jsonable(result)


@router.post("/neighbors")
async def neighbors_page(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    req = await parse_body(request, NeighborsRequest)
    check_k(req.k)
    result = await on_model(served, lambda: analysis.neighbors(
        served.model, served.tokenizer, req.word, req.k), "word")
    return analysis.to_jsonable(result)


@router.post("/analogy")
async def analogy_page(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    req = await parse_body(request, AnalogyRequest)
    check_k(req.k)
    result = await on_model(served, lambda: analysis.analogy(
        served.model, served.tokenizer, req.a, req.b, req.c, req.k), "a")
    return analysis.to_jsonable(result)


@router.post("/direction")
async def direction_page(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    req = await parse_body(request, DirectionRequest)
    words = req.words.split() if isinstance(req.words, str) else req.words
    if not 1 <= len(words) <= MAX_WORDS:
        raise APIError(f"'words' takes 1 to {MAX_WORDS} words", "words", "invalid_value")
    result = await on_model(served, lambda: analysis.direction(
        served.model, served.tokenizer, req.positive, req.negative, words), "words")
    return analysis.to_jsonable(result)
