"""The OpenAI-compatible API: POST /v1/completions, GET /v1/models, and vLLM's tokenizer
endpoints (GET /tokenizer_info, POST /tokenize, POST /detokenize).

A completion request is checked whole before any work starts, so a bad field is a 4xx naming
it, never an error in the middle of a stream. Each prompt (a string or token ids) becomes the
token ids `generate` continues; `n` samples of one prompt are generated side by side in one
batch, and choice `i * n + s` is sample s of prompt i, as in OpenAI's API.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..sampling import Step, generate
from ..tokenizer import EOT_TEXT
from .compute import TokenLogprob, finite, prompt_logprobs
from .http_errors import APIError, in_thread, parse_body, stream_error

if TYPE_CHECKING:
    from .app import Served

router = APIRouter()
MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5)
MAX_N = 16
MAX_CHOICES = 64  # prompts x n in one request: each choice holds its own KV cache
MAX_STOPS = 16
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
IDS = list[int]


class Strict(BaseModel):
    # Strict: "1" is not a number and true is not 1. Unknown fields are ignored, as vLLM does,
    # so clients that send options a small model has no use for (user, ...) keep working.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(Strict):
    model: str | None = None
    prompt: Union[str, list[str], IDS, list[IDS]] = EOT_TEXT  # noqa: UP007 (pydantic order)
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None  # vLLM's extension; None or -1: off
    n: int = 1
    stop: Union[str, list[str], None] = None  # noqa: UP007
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False
    # OpenAI fields a plain sampler cannot honour: accepted only at their neutral values.
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False  # no tokenizer here adds any: accepted, changes nothing


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: IDS


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


def check_model(served: Served, name: str | None) -> None:
    if name is not None and name != served.model_id:
        raise APIError(f"the model {name!r} does not exist; this server serves "
                       f"{served.model_id!r} (GET /v1/models)", "model", "model_not_found", 404)


def check_seed(seed: int | None) -> None:
    """A seed torch can take: out of range, manual_seed would fail on the engine thread, after
    the stream's 200 went out. Shared with the page's /api/generate."""
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise APIError(f"'seed' must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), "
                       f"got {seed}", "seed", "invalid_value")


def check_completion(req: CompletionRequest, served: Served) -> None:
    """Every range rule of the request, each failure naming its field."""
    check_model(served, req.model)
    limit = served.max_tokens
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if not 0 <= max_tokens <= limit:
        raise APIError(f"'max_tokens' must be between 0 and this server's limit {limit}, got "
                       f"{max_tokens}", "max_tokens", "invalid_value")
    t = 1.0 if req.temperature is None else req.temperature
    if not 0 <= t <= 2:  # `not` catches NaN as well
        raise APIError(f"'temperature' must be between 0 and 2 (0 is greedy), got {t}",
                       "temperature", "invalid_value")
    p = 1.0 if req.top_p is None else req.top_p
    if not 0 < p <= 1:
        raise APIError(f"'top_p' must be in (0, 1], got {p}", "top_p", "invalid_value")
    if req.top_k is not None and req.top_k != -1 and req.top_k < 1:
        raise APIError(f"'top_k' must be >= 1 (or -1 for no limit), got {req.top_k}", "top_k",
                       "invalid_value")
    if not 1 <= req.n <= MAX_N:
        raise APIError(f"'n' must be between 1 and {MAX_N}, got {req.n}", "n", "invalid_value")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}",
                       "logprobs", "invalid_value")
    stops = stop_list(req)
    if len(stops) > MAX_STOPS or any(s == "" for s in stops):
        raise APIError(f"'stop' takes at most {MAX_STOPS} non-empty strings", "stop",
                       "invalid_value")
    check_seed(req.seed)
    if req.best_of not in (None, req.n):
        raise APIError("'best_of' is not supported (it must equal n)", "best_of", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise APIError(f"'{name}' is not supported (it must be 0)", name, "unsupported")
    if req.logit_bias:
        raise APIError("'logit_bias' is not supported", "logit_bias", "unsupported")
    if req.suffix:
        raise APIError("'suffix' is not supported", "suffix", "unsupported")


def stop_list(req: CompletionRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


async def read_prompts(req: CompletionRequest, served: Served) -> list[Prompt]:
    """The request's prompts as token ids, each checked against the vocabulary and context."""
    raw = req.prompt
    if isinstance(raw, list) and not raw:
        raise APIError("'prompt' must not be an empty list", "prompt", "invalid_value")
    many = raw if isinstance(raw, list) and not isinstance(raw[0], int) else [raw]
    if len(many) * req.n > MAX_CHOICES:
        raise APIError(f"{len(many)} prompts x n={req.n} is more than {MAX_CHOICES} choices",
                       "prompt", "invalid_value")
    tokenizer = served.tokenizer
    prompts = []
    for one in many:
        if isinstance(one, str):
            text = "" if one == EOT_TEXT else one  # OpenAI's default prompt: start a document
            ids = await in_thread(tokenizer.encode, text, "prompt")
        else:
            ids = list(one)
            bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise APIError(f"'prompt' holds token id {bad[0]}, outside the vocabulary "
                               f"(0..{tokenizer.vocab_size - 1})", "prompt", "invalid_value")
            text = tokenizer.decode(ids)
        served.check_context(ids, "prompt")  # text or token ids: the same limit
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
        top_k = None if req.top_k in (None, -1) else req.top_k
        return served.engine.stream(lambda: generate(
            served.model, served.tokenizer, self.prompts[p].ids,
            max_new_tokens=16 if req.max_tokens is None else req.max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature, top_k=top_k,
            top_p=req.top_p, seed=req.seed, stop=stop_list(req), num_samples=req.n,
            show_top=req.logprobs or 0))

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
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

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
            yield f"data: {json.dumps(stream_error(exc, '/v1/completions').body())}\n\n"
        yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    served: Served = request.app.state.served
    req = await parse_body(request, CompletionRequest)
    check_completion(req, served)
    job = Completion(req, served, await read_prompts(req, served))
    if req.stream:
        return StreamingResponse(job.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    for p in range(len(job.prompts)):
        # Between prompts too: short prompts never reach run_prompt's own check.
        if await request.is_disconnected() or not await job.run_prompt(p, request):
            break  # the client is gone: what was done goes nowhere, stop here
    return JSONResponse(job.body())


def model_card(served: Served) -> dict[str, Any]:
    return {"id": served.model_id, "object": "model", "created": served.created,
            "owned_by": "smallgpt", "max_model_len": served.block_size}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(request.app.state.served)]}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    check_model(served, name)
    return model_card(served)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    tokenizer = served.tokenizer
    return {"tokenizer_name": tokenizer.name, "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size, "eos_token": EOT_TEXT,
            "eos_token_id": tokenizer.eot_id, "model_max_length": served.block_size}


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    req = await parse_body(request, TokenizeRequest)
    check_model(served, req.model)
    tokens = await in_thread(served.tokenizer.encode, req.prompt, "prompt")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.block_size}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    req = await parse_body(request, DetokenizeRequest)
    check_model(served, req.model)
    return {"prompt": await in_thread(served.tokenizer.decode, req.tokens, "tokens")}
