"""POST /v1/chat/completions, as OpenAI defines it: messages in, the assistant's reply out.

The server applies the chat template (model.chat.render_chat) with the model's own tokenizer
and generates until the reply ends its turn (the end-of-text token: finish_reason "stop"), a
stop string, or max_tokens ("length"). A model that was never fine-tuned on conversations
still answers: the template's role headers are plain text it reads as a dialogue, and the stop
string the template names (a new "User:" turn) ends a reply that runs on into the next turn.
/v1/models says which kind of model this is (`chat_trained`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.data.chat import TURN_STOPS, render_chat
from model.inference.sampling import Step, generate
from model.serve.compute import LOGPROB_FLOOR, finite
from model.serve.http_errors import in_thread, stream_error
from model.serve.openai_api import event_stream
from model.serve.protocol import ERRORS, STREAMED, ChatCompletionRequest, Message, check, sse
from model.serve.state import Served, ServedModel
from model.weights.loading import Pretrained

router = APIRouter(responses=ERRORS)


def chat_trained(pretrained: Pretrained) -> bool:
    """Whether the checkpoint was fine-tuned on conversations: its run's config says the data
    was chat data (data.format "chat", which the chat configs set)."""
    data = getattr(pretrained.config, "data", None)
    return getattr(data, "format", None) == "chat"


async def chat_prompt(served: Served, messages: list[Message]) -> list[int]:
    """The conversation through the template, ending with the assistant's header: the ids the
    reply continues. Text the tokenizer cannot encode, or a conversation longer than the
    context, is a 400 about 'messages'."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    ids = await in_thread(lambda ms: render_chat(ms, served.tokenizer), plain, "messages")
    served.check_context(ids, "messages")
    return ids


def logprob(p: float) -> float:
    """log p from the distribution the token was drawn from (after temperature, top-k and
    top-p; greedy: the plain softmax); JSON has no -inf."""
    return finite(math.log(p)) if p > 0 else LOGPROB_FLOOR


def token_entry(served: Served, token: int, text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob,
            "bytes": list(served.tokenizer.decode_bytes([token]))}


@dataclass
class Reply:
    """One choice as it is built."""

    index: int
    content: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    generated: int = 0


class ChatCompletion:
    """The work of one chat request: n replies to one conversation, generated side by side."""

    def __init__(self, req: ChatCompletionRequest, served: Served, ids: list[int]) -> None:
        self.req, self.served, self.ids = req, served, ids
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.replies = [Reply(i) for i in range(req.n)]
        self.top = (req.top_logprobs or 0) if req.logprobs else 0

    def steps(self) -> AsyncIterator[Step]:
        req, served = self.req, self.served
        return served.engine.stream(lambda: generate(
            served.model, served.tokenizer, self.ids, max_new_tokens=req.new_tokens(served),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k_or_none(), top_p=req.top_p, seed=req.seed,
            stop=[*req.stops(), *TURN_STOPS], num_samples=req.n, show_top=self.top))

    def take(self, step: Step) -> tuple[Reply, dict[str, Any] | None]:
        """Add a generated token to its reply; its logprobs entry, when asked for. The token
        that ends the turn is not part of the reply, so it is not listed either."""
        reply = self.replies[step.sample]
        reply.content += step.delta
        reply.generated += 1
        entry = None
        if self.req.logprobs and step.finished != "eot":
            entry = token_entry(self.served, step.token, step.text, logprob(step.prob))
            entry["top_logprobs"] = [token_entry(self.served, t, text, logprob(p))
                                     for t, text, p in step.top]
            reply.logprobs.append(entry)
        if step.finished:
            reply.finish_reason = "length" if step.finished == "length" else "stop"
        return reply, entry

    def usage(self) -> dict[str, int]:
        done = sum(r.generated for r in self.replies)
        return {"prompt_tokens": len(self.ids), "completion_tokens": done,
                "total_tokens": len(self.ids) + done}

    def body(self) -> dict[str, Any]:
        choices = [{"index": r.index,
                    "message": {"role": "assistant", "content": r.content, "refusal": None},
                    "logprobs": {"content": r.logprobs} if self.req.logprobs else None,
                    "finish_reason": r.finish_reason or "length"} for r in self.replies]
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.served.model_id, "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                                "created": self.created, "model": self.served.model_id,
                                "choices": choices}
        if self.req.stream_options and self.req.stream_options.include_usage:
            body["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return sse(body)

    async def run(self, request: Request) -> None:
        async with aclosing(self.steps()) as steps:
            async for step in steps:
                self.take(step)
                if step.index % 16 == 15 and await request.is_disconnected():
                    return  # nobody is waiting for the answer: stop generating it

    async def events(self) -> AsyncIterator[str]:
        """OpenAI's chunks: the role first, then a chunk per token (its content may be empty
        while a UTF-8 character or a possible stop string is incomplete), the finish_reason
        with the last, the usage if asked for, then `data: [DONE]`."""
        try:
            yield self.chunk([{"index": r.index, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}
                              for r in self.replies])
            async for step in self.steps():
                reply, entry = self.take(step)
                if not (step.delta or step.finished or entry):
                    continue
                yield self.chunk([{
                    "index": reply.index,
                    "delta": {"content": step.delta} if step.delta else {},
                    "logprobs": {"content": [entry] if entry else []}
                    if self.req.logprobs else None,
                    "finish_reason": reply.finish_reason}])
            unfinished = [r for r in self.replies if r.finish_reason is None]  # max_tokens 0
            if unfinished:
                yield self.chunk([{"index": r.index, "delta": {}, "logprobs": None,
                                   "finish_reason": "length"} for r in unfinished])
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self.chunk([], self.usage())
        except Exception as exc:  # stream_error logs it; the client is told why, then [DONE]
            yield sse(stream_error(exc, "/v1/chat/completions").body())
        yield sse("[DONE]")


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           served: ServedModel) -> Any:
    """OpenAI's chat completions: the template is applied here, on the server."""
    check(req, served)
    job = ChatCompletion(req, served, await chat_prompt(served, req.messages))
    if req.stream:
        return event_stream(job.events())
    await job.run(request)
    return JSONResponse(job.body())
