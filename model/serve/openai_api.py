"""The OpenAI-compatible API: POST /v1/completions, GET /v1/models, and vLLM's tokenizer
endpoints (GET /tokenizer_info, POST /tokenize, POST /detokenize).

A completion request is checked whole before any work starts, so a bad field is a 4xx naming
it, never an error in the middle of a stream. Each prompt (a string or token ids) becomes the
token ids `generate` continues; `n` samples of one prompt are generated side by side in one
batch, and choice `i * n + s` is sample s of prompt i, as in OpenAI's API.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse

from model.data.tokenizer import EOT_TEXT
from model.inference.sampling import Step, generate
from model.serve.compute import TokenLogprob, finite, prompt_logprobs
from model.serve.http_errors import in_thread, stream_error
from model.serve.protocol import (
    ERRORS,
    STREAMED,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check,
    limit,
    sse,
)
from model.serve.state import Served, ServedModel

router = APIRouter(responses=ERRORS)


@dataclass
class Prompt:
    ids: list[int]  # what the model continues (the end-of-text token for an empty prompt)
    text: str  # what `echo` repeats
    echo_ids: list[int]  # the tokens `echo` scores (none for an empty prompt)


@dataclass
class Choice:
    """One choice as it is built: text and, with logprobs, OpenAI's four parallel lists."""

    index: int
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0  # where the next token's text starts
    finish_reason: str | None = None
    generated: int = 0

    def add(self, text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def logprobs_since(self, start: int) -> dict[str, list]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:],
                "text_offset": self.text_offset[start:]}


async def encode(served: Served, text: str, param: str) -> list[int]:
    """`text` as token ids, checked against the context: a text the tokenizer cannot encode or
    that does not fit is a 400 about `param`. Shared by every endpoint that takes a text."""
    ids = await in_thread(served.tokenizer.encode, text, param)
    served.check_context(ids, param)
    return ids


async def read_prompts(req: CompletionRequest, served: Served) -> list[Prompt]:
    """The request's prompts as token ids, each checked against the vocabulary and context."""
    raw = req.prompt  # pydantic made sure it is one of the four forms, none empty
    many = raw if isinstance(raw, list) and not isinstance(raw[0], int) else [raw]
    tokenizer = served.tokenizer
    prompts = []
    for one in many:
        if isinstance(one, str):
            text = "" if one == EOT_TEXT else one  # OpenAI's default prompt: start a document
            ids = await encode(served, text, "prompt")
        else:  # check() has checked the ids against the vocabulary
            ids = list(one)
            served.check_context(ids, "prompt")  # text or token ids: the same limit
            text = tokenizer.decode(ids)
        prompts.append(Prompt(ids or [tokenizer.eot_id], text, ids))
    return prompts


def top_dict(pairs: list[tuple[str, float]], text: str, logprob: float) -> dict[str, float]:
    """OpenAI's top_logprobs: the alternatives, always with the chosen token."""
    top = dict(pairs)
    top.setdefault(text, logprob)
    return top


def step_logprob(step: Step) -> tuple[float, dict[str, float]]:
    """log p of the generated token and of its alternatives, from the distribution it was drawn
    from (model.sampling.Step: after temperature, top-k and top-p; greedy: the plain softmax)."""
    logprob = finite(math.log(step.prob)) if step.prob > 0 else -1e4
    pairs = [(text, finite(math.log(p))) for _, text, p in step.top]
    return logprob, top_dict(pairs, step.text, logprob)


class Completion:
    """The work of one request: echo, scoring and generation per prompt, filling choices."""

    def __init__(self, req: CompletionRequest, served: Served, prompts: list[Prompt]) -> None:
        self.req, self.served, self.prompts = req, served, prompts
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice(i) for i in range(len(prompts) * req.n)]

    def echo(self, p: int, scored: list[TokenLogprob] | None) -> None:
        """Start prompt p's choices with its text and, with logprobs, its tokens' scores."""
        for s in range(self.req.n):
            choice = self.choices[p * self.req.n + s]
            choice.text = self.prompts[p].text
            for tok in scored or []:
                top = None if tok.top is None else top_dict(tok.top, tok.text, tok.logprob)
                choice.add(tok.text, tok.logprob, top)

    async def score(self, p: int) -> list[TokenLogprob] | None:
        prompt = self.prompts[p]
        if not (self.req.echo and self.req.logprobs is not None and prompt.echo_ids):
            return None
        model, tokenizer, k = self.served.model, self.served.tokenizer, self.req.logprobs
        return await self.served.engine.call(
            lambda: prompt_logprobs(model, tokenizer, prompt.echo_ids, k))

    def steps(self, p: int) -> AsyncIterator[Step]:
        req, served = self.req, self.served
        return served.engine.stream(lambda: generate(
            served.model, served.tokenizer, self.prompts[p].ids,
            max_new_tokens=req.new_tokens(served),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k_or_none(), top_p=req.top_p, seed=req.seed, stop=req.stops(),
            num_samples=req.n, show_top=req.logprobs or 0))

    def take(self, p: int, step: Step) -> Choice:
        """Add a generated token to its choice. The end-of-text token ends the text and is not
        part of it, so it is not listed among the tokens either."""
        choice = self.choices[p * self.req.n + step.sample]
        choice.text += step.delta
        choice.generated += 1
        if self.req.logprobs is not None and step.finished != "eot":
            choice.add(step.text, *step_logprob(step))
        if step.finished:
            choice.finish_reason = "length" if step.finished == "length" else "stop"
        return choice

    async def run_prompt(self, p: int, request: Request) -> bool:
        """Prompt p's choices, whole; False if the client went away meanwhile."""
        if self.req.echo:
            self.echo(p, await self.score(p))
        async with aclosing(self.steps(p)) as steps:
            async for step in steps:
                self.take(p, step)
                if step.index % 16 == 15 and await request.is_disconnected():
                    return False  # nobody is waiting for the answer: stop generating it
        for s in range(self.req.n):  # max_tokens 0: nothing was generated
            self.choices[p * self.req.n + s].finish_reason = (
                self.choices[p * self.req.n + s].finish_reason or "length")
        return True

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p.ids) for p in self.prompts)
        done = sum(c.generated for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion",
                                "created": self.created, "model": self.served.model_id,
                                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    def body(self) -> dict[str, Any]:
        logprobs = self.req.logprobs is not None
        choices = [{"text": c.text, "index": c.index,
                    "logprobs": c.logprobs_since(0) if logprobs else None,
                    "finish_reason": c.finish_reason} for c in self.choices]
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.served.model_id, "choices": choices, "usage": self.usage()}

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's format: a chunk per token (its text may be empty while
        a UTF-8 character or a possible stop string is incomplete), then `data: [DONE]`."""
        logprobs = self.req.logprobs is not None
        try:
            for p in range(len(self.prompts)):
                if self.req.echo:
                    self.echo(p, await self.score(p))
                    yield self.chunk([
                        {"text": c.text, "index": c.index, "finish_reason": None,
                         "logprobs": c.logprobs_since(0) if logprobs else None}
                        for c in self.choices[p * self.req.n:(p + 1) * self.req.n]])
                async for step in self.steps(p):
                    choice = self.take(p, step)
                    if not (step.delta or step.finished or logprobs):
                        continue
                    listed = logprobs and step.finished != "eot"
                    yield self.chunk([{
                        "text": step.delta, "index": choice.index,
                        "logprobs": choice.logprobs_since(-1) if listed else (
                            {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                             "text_offset": []} if logprobs else None),
                        "finish_reason": choice.finish_reason}])
                if self.req.max_tokens == 0:
                    yield self.chunk([{"text": "", "index": c.index, "logprobs": None,
                                       "finish_reason": "length"}
                                      for c in self.choices[p * self.req.n:(p + 1) * self.req.n]])
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self.chunk([], self.usage())
        except Exception as exc:  # stream_error logs it; the client is told why, then [DONE]
            yield sse(stream_error(exc, "/v1/completions").body())
        yield sse("[DONE]")


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions", responses=STREAMED)
async def completions(req: CompletionRequest, request: Request,
                      served: ServedModel) -> Any:
    """OpenAI's completions: text (or token ids) in, continuations out; `stream` sends them as
    server-sent events, `echo` with `logprobs` scores the prompt itself."""
    check(req, served)
    job = Completion(req, served, await read_prompts(req, served))
    if req.stream:
        return event_stream(job.events())
    for p in range(len(job.prompts)):
        # Between prompts too: short prompts never reach run_prompt's own check.
        if await request.is_disconnected() or not await job.run_prompt(p, request):
            break  # the client is gone: what was done goes nowhere, stop here
    return JSONResponse(job.body())


def model_card(served: Served) -> dict[str, Any]:
    """OpenAI's model object, with vLLM's max_model_len and whether the model was fine-tuned
    on conversations (chat_trained; /v1/chat/completions serves either kind)."""
    return {"id": served.model_id, "object": "model", "created": served.created,
            "owned_by": "smallgpt", "max_model_len": served.block_size,
            "chat_trained": served.chat_trained}


@router.get("/v1/models")
async def models(served: ServedModel) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(served)]}


@router.get("/v1/models/{name:path}")
async def model(name: Annotated[str, Path(json_schema_extra=limit("model"))],
                served: ServedModel) -> dict[str, Any]:
    served.check_model(name)
    return model_card(served)


@router.get("/tokenizer_info")
async def tokenizer_info(served: ServedModel) -> dict[str, Any]:
    tokenizer = served.tokenizer
    return {"tokenizer_name": tokenizer.name, "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size, "eos_token": EOT_TEXT,
            "eos_token_id": tokenizer.eot_id, "model_max_length": served.block_size}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, served: ServedModel) -> dict[str, Any]:
    """vLLM's: a text as token ids (however long: no context check here)."""
    check(req, served)
    tokens = await in_thread(served.tokenizer.encode, req.prompt, "prompt")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.block_size}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest,
                     served: ServedModel) -> dict[str, Any]:
    check(req, served)
    return {"prompt": await in_thread(served.tokenizer.decode, req.tokens, "tokens")}
