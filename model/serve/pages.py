"""The JSON endpoints the page uses (documented in the README, usable by any client):

    GET  /api/info          the model: name, context size, layers, heads, vocabulary, limits,
                            and the steering vector when one is on (else null)
    POST /api/generate      server-sent events: the prompt's tokens (or, given messages, the
                            conversation through the chat template), then every generated token
                            with its probability, the alternatives and where its context began,
                            then "done" (or "error" if generation failed on the way)
    POST /api/distribution  the next-token distribution after given tokens, at several
                            temperatures (the page's live temperature slider)
    POST /api/attention     one layer's attention over a prompt, for a head or the mean of heads
    POST /api/neighbors, /api/analogy, /api/direction: the embedding explorations
    POST /api/walk          one prediction walked through the network, stage by stage

All model work runs on the engine thread, between the steps of other requests. Requests are
checked as the OpenAI endpoints' are (model.serve.protocol: pydantic, then check()).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from model.data.chat import TURN_STOPS
from model.errors import SmallGPTError
from model.inference import analysis  # the explorations, as in python -m model.explore
from model.inference.sampling import distribution, generate, window_start
from model.inference.walk import walk
from model.serve.http_errors import from_library, stream_error
from model.serve.prompts import chat_prompt, encode
from model.serve.protocol import (
    ERRORS,
    STREAMED,
    AnalogyRequest,
    AttentionRequest,
    DirectionRequest,
    DistributionRequest,
    GenerateRequest,
    NeighborsRequest,
    WalkRequest,
    check,
    event_stream,
    sse,
)
from model.serve.state import Served, ServedModel

router = APIRouter(prefix="/api", responses=ERRORS)
T = TypeVar("T")


async def on_model(served: Served, fn: Callable[[], T], param: str | None) -> T:
    """`fn()` on the engine thread; a library error (a word the tokenizer cannot encode, a prompt
    longer than the context) becomes a 400 about `param`."""
    try:
        return await served.engine.call(fn)
    except SmallGPTError as exc:
        raise from_library(exc, param) from exc


@router.get("/info")
async def info(served: ServedModel) -> dict[str, Any]:
    c = served.model.config
    return {"model": served.model_id, "description": served.description,
            "block_size": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_embd": c.n_embd, "vocab_size": served.tokenizer.vocab_size,
            "tokenizer": served.tokenizer.name, "max_tokens": served.max_tokens,
            "chat_trained": served.chat_trained,
            "steering": served.steering.describe() if served.steering else None}


@router.post("/generate", response_class=StreamingResponse, responses=STREAMED)
async def generate_page(req: GenerateRequest,
                        served: ServedModel) -> StreamingResponse:
    """Server-sent events: "prompt" (the tokens the model continues: in chat mode, the
    conversation through the template), a "token" per generated token, then "done"."""
    check(req, served)
    tokenizer = served.tokenizer
    if req.messages is not None:  # chat mode: the reply ends with its turn
        ids, stop = await chat_prompt(served, req.messages), list(TURN_STOPS)
    else:
        ids, stop = await encode(served, req.prompt, "prompt"), []
    ids = ids or [tokenizer.eot_id]  # an empty prompt starts a document, as in generate

    async def events() -> AsyncIterator[str]:
        yield sse({"type": "prompt", "block_size": served.block_size,
                   "tokens": [{"id": i, "text": tokenizer.token_text(i)} for i in ids]})
        steps = served.engine.stream(lambda: generate(
            served.model, tokenizer, ids, max_new_tokens=req.new_tokens(served),
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
            stop=stop, show_top=req.k))
        try:
            async for step in steps:
                start = window_start(len(ids), step.index, served.block_size)
                yield sse({"type": "token", **step.to_dict(top_id="id", with_sample=False),
                           "context_start": start})
        except Exception as exc:  # the 200 is out: say why the stream ends (stream_error logs)
            error = stream_error(exc, "/api/generate")
            yield sse({"type": "error", "message": error.message, "code": error.code})
            return
        yield sse({"type": "done"})

    return event_stream(events())


@router.post("/distribution")
async def distribution_page(req: DistributionRequest,
                            served: ServedModel) -> dict[str, Any]:
    check(req, served)
    ids = req.tokens or [served.tokenizer.eot_id]
    served.check_context(ids, "tokens")
    result = await on_model(served, lambda: distribution(
        served.model, served.tokenizer, ids, temperatures=req.temperatures, k=req.k,
        top_k=req.top_k, top_p=req.top_p, include=req.include), "tokens")
    return analysis.to_jsonable(result)


@router.post("/attention")
async def attention_page(req: AttentionRequest,
                         served: ServedModel) -> dict[str, Any]:
    check(req, served)
    result = await on_model(served, lambda: analysis.attention(
        served.model, served.tokenizer, req.prompt, req.layer, req.head), "prompt")
    return analysis.to_jsonable(result)


@router.post("/neighbors")
async def neighbors_page(req: NeighborsRequest,
                         served: ServedModel) -> dict[str, Any]:
    check(req, served)
    result = await on_model(served, lambda: analysis.neighbors(
        served.model, served.tokenizer, req.word, req.k), "word")
    return analysis.to_jsonable(result)


@router.post("/analogy")
async def analogy_page(req: AnalogyRequest,
                       served: ServedModel) -> dict[str, Any]:
    check(req, served)
    result = await on_model(served, lambda: analysis.analogy(
        served.model, served.tokenizer, req.a, req.b, req.c, k=req.k), "a")
    return analysis.to_jsonable(result)


@router.post("/direction")
async def direction_page(req: DirectionRequest,
                         served: ServedModel) -> dict[str, Any]:
    check(req, served)
    words = req.words.split() if isinstance(req.words, str) else req.words
    result = await on_model(served, lambda: analysis.direction(
        served.model, served.tokenizer, req.positive, req.negative, words), "words")
    return analysis.to_jsonable(result)


@router.post("/walk")
async def walk_page(req: WalkRequest, served: ServedModel) -> dict[str, Any]:
    """The stages of one prediction, from `tokens` if given, else from `prompt`."""
    check(req, served)
    if req.tokens is not None:
        served.check_context(req.tokens, "tokens")
        ids, param = req.tokens, "tokens"
    else:
        ids, param = await encode(served, req.prompt, "prompt"), "prompt"
    result = await on_model(served, lambda: walk(
        served.model, served.tokenizer, ids, temperature=req.temperature,
        temperatures=req.temperatures, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
        head=req.head, k=req.k), param)
    return analysis.to_jsonable(result)
