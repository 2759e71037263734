"""The completion job both OpenAI endpoints run. /v1/completions (text in) and
/v1/chat/completions (messages in) differ only in their prompts, in a token's logprobs entry
and in how a choice looks in JSON; each supplies those in a subclass of `CompletionJob`.

A job holds one or more prompts (token ids) and `n` choices per prompt: choice `p * n + s` is
sample s of prompt p, as in OpenAI's API. All of them are generated side by side in one batch
(`generate` with a list of prompts: one forward pass per step), each prompt's choices what it
alone would get. Run whole, the job fills its choices and `body()` is the answer. Streamed,
`events()` sends OpenAI's server-sent events: each prompt's opening chunk (if the endpoint has
one), a chunk per generated token (its text may be empty while a UTF-8 character or a possible
stop string is incomplete) with the finish_reason on the last, and per prompt a "length" chunk
for choices that generated nothing (max_tokens 0); then the usage if asked for, then
`data: [DONE]`. Token chunks of different prompts interleave, position by position; every
chunk names its choice's `index`, as OpenAI's streams do.
"""

from __future__ import annotations

import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from model.inference.sampling import Step, generate
from model.serve.http_errors import stream_error
from model.serve.protocol import Sampling, event_stream, sse
from model.serve.state import Served

LOGPROB_FLOOR = -1e4  # JSON has no -inf: a probability that underflows reports this instead
DISCONNECT_CHECK = 16  # steps between a running job's checks that its client is still there


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def logprob(p: float) -> float:
    """log p of a probability `generate` reports (model.inference.sampling.Step: from the
    distribution the token was drawn from), within JSON's numbers."""
    return finite(math.log(p)) if p > 0 else LOGPROB_FLOOR


@dataclass
class Choice:
    """One choice as it is built."""

    index: int
    text: str = ""
    logprobs: list[Any] = field(default_factory=list)  # the endpoint's entry per listed token
    finish_reason: str | None = None
    generated: int = 0  # tokens drawn, the one that ends the turn too: the usage counts them


class CompletionJob(ABC):
    """The work of one request. A subclass names its objects and supplies what differs between
    the endpoints: `entry`, `logprobs_json`, `choice_json`, `delta_json` and, where a stream
    opens with something or a prompt needs work first, `begin`."""

    id_prefix: str  # of the answer's id: "cmpl", "chatcmpl"
    object: str  # OpenAI's object names: of the answer and of a streamed chunk
    chunk_object: str
    path: str  # the endpoint, for the log
    usage_on_every_chunk = False  # "usage": null on every chunk but the last, when asked for

    def __init__(self, req: Sampling, served: Served, prompts: list[list[int]], *,
                 logprobs: bool, show_top: int, stop: Sequence[str]) -> None:
        self.req, self.served, self.prompts = req, served, prompts
        self.logprobs, self.show_top, self.stop = logprobs, show_top, list(stop)
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice(i) for i in range(len(prompts) * req.n)]

    # -- what an endpoint supplies ---------------------------------------------------------------
    async def begin(self, p: int) -> list[dict[str, Any]]:
        """Start prompt p's choices; the choices of the chunk a stream opens the prompt with
        (none: no such chunk)."""
        return []

    @abstractmethod
    def entry(self, choice: Choice, step: Step) -> Any:
        """The logprobs entry of a generated token, appended to choice.logprobs."""

    @abstractmethod
    def logprobs_json(self, choice: Choice, start: int) -> Any:
        """The choice's logprobs entries from `start` on, as the endpoint writes them."""

    @abstractmethod
    def choice_json(self, choice: Choice) -> dict[str, Any]:
        """A choice in the whole answer."""

    @abstractmethod
    def delta_json(self, choice: Choice, delta: str, logprobs: Any) -> dict[str, Any]:
        """A choice in a streamed chunk: the text it adds and its new logprobs entries."""

    # -- the job ---------------------------------------------------------------------------------
    def of_prompt(self, p: int) -> list[Choice]:
        return self.choices[p * self.req.n:(p + 1) * self.req.n]

    def listed(self, choice: Choice, start: int = 0) -> Any:
        """The choice's logprobs from entry `start` on, or None when they were not asked for."""
        return self.logprobs_json(choice, start) if self.logprobs else None

    def steps(self) -> AsyncIterator[Step]:
        """Every prompt's steps, from one batch."""
        req, served = self.req, self.served
        return served.engine.stream(lambda: generate(
            served.model, served.tokenizer, self.prompts,
            max_new_tokens=req.new_tokens(served),
            temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
            top_k=req.top_k_or_none(), top_p=req.top_p, seed=req.seed, stop=self.stop,
            num_samples=req.n, show_top=self.show_top))

    def take(self, step: Step) -> tuple[Choice, int]:
        """Add a generated token to its choice: the choice, and where the token's logprobs
        entries start. The end-of-text token ends the text and is not part of it, so it is
        not listed either."""
        choice = self.choices[step.prompt * self.req.n + step.sample]
        start = len(choice.logprobs)
        choice.text += step.delta
        choice.generated += 1
        if self.logprobs and step.finished != "eot":
            choice.logprobs.append(self.entry(choice, step))
        if step.finished:
            choice.finish_reason = "length" if step.finished == "length" else "stop"
        return choice, start

    def finish(self, p: int) -> list[Choice]:
        """Prompt p's choices that generated nothing (max_tokens 0), now ended by "length"."""
        unfinished = [c for c in self.of_prompt(p) if c.finish_reason is None]
        for choice in unfinished:
            choice.finish_reason = "length"
        return unfinished

    def usage(self) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.prompts)
        done = sum(c.generated for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}

    @property
    def include_usage(self) -> bool:
        options = self.req.stream_options
        return options is not None and options.include_usage

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.served.model_id,
                "choices": [self.choice_json(c) for c in self.choices], "usage": self.usage()}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": self.chunk_object,
                                "created": self.created, "model": self.served.model_id,
                                "choices": choices}
        if usage is not None or (self.usage_on_every_chunk and self.include_usage):
            body["usage"] = usage
        return sse(body)

    async def run(self, request: Request) -> None:
        """Every prompt's choices, whole. A client that goes away stops the job: nobody is
        waiting for the answer."""
        if await request.is_disconnected():  # before any work: short jobs never check later
            return
        for p in range(len(self.prompts)):
            await self.begin(p)
        async with aclosing(self.steps()) as steps:
            taken = 0
            async for step in steps:
                self.take(step)
                taken += 1
                if taken % DISCONNECT_CHECK == 0 and await request.is_disconnected():
                    return
        for p in range(len(self.prompts)):
            self.finish(p)

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of the job, as the module docstring lists them. (A client
        that goes away closes this generator, which stops the generation.)"""
        try:
            for p in range(len(self.prompts)):
                opening = await self.begin(p)
                if opening:
                    yield self.chunk(opening)
            async for step in self.steps():
                choice, start = self.take(step)
                if step.delta or step.finished or self.logprobs:
                    yield self.chunk([self.delta_json(choice, step.delta,
                                                      self.listed(choice, start))])
            for p in range(len(self.prompts)):
                unfinished = self.finish(p)
                if unfinished:
                    yield self.chunk([self.delta_json(c, "", None) for c in unfinished])
            if self.include_usage:
                yield self.chunk([], self.usage())
        except Exception as exc:  # stream_error logs it; the client is told why, then [DONE]
            yield sse(stream_error(exc, self.path).body())
        yield sse("[DONE]")

    async def respond(self, request: Request) -> Response:
        """The answer: with "stream": true server-sent events, else JSON once the job is done."""
        if self.req.stream:
            return event_stream(self.events())
        await self.run(request)
        return JSONResponse(self.body())
