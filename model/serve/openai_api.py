"""The OpenAI-compatible API: POST /v1/completions, GET /v1/models, and vLLM's tokenizer
endpoints (GET /tokenizer_info, POST /tokenize, POST /detokenize).

A completion request is checked whole before any work starts, so a bad field is a 4xx naming
it, never an error in the middle of a stream. Each prompt (a string or token ids) becomes the
token ids `generate` continues, and model.serve.completions runs the job: `n` samples per
prompt, answered whole or streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from model.data.tokenizer import EOT_TEXT
from model.inference.sampling import Step
from model.inference.scoring import TokenLogprob, prompt_logprobs
from model.serve.completions import Choice, CompletionJob, finite, logprob
from model.serve.http_errors import in_thread
from model.serve.prompts import encode
from model.serve.protocol import (
    ERRORS,
    STREAMED,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check,
    limit,
)
from model.serve.state import Served, ServedModel

router = APIRouter(responses=ERRORS)


@dataclass
class Prompt:
    ids: list[int]  # what the model continues (the end-of-text token for an empty prompt)
    text: str  # what `echo` repeats
    echo_ids: list[int]  # the tokens `echo` scores (none for an empty prompt)


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


@dataclass
class Listed:
    """A token in a choice's logprobs: one entry of OpenAI's four parallel lists."""

    text: str
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: dict[str, float | None] | None  # the alternatives, always with the token itself
    offset: int  # where its text starts, counting the texts of the tokens listed before it


def top_dict(pairs: list[tuple[str, float]], text: str,
             logprob: float | None) -> dict[str, float | None]:
    """OpenAI's top_logprobs: the alternatives, always with the chosen token."""
    top = dict(pairs)
    top.setdefault(text, logprob)
    return top


class Completion(CompletionJob):
    """A completion request: each prompt's choices start with the prompt itself under `echo`,
    its tokens scored when logprobs are asked for."""

    id_prefix, object, chunk_object, path = (
        "cmpl", "text_completion", "text_completion", "/v1/completions")

    def __init__(self, req: CompletionRequest, served: Served, prompts: list[Prompt]) -> None:
        super().__init__(req, served, [p.ids for p in prompts], logprobs=req.logprobs is not None,
                         show_top=req.logprobs or 0, stop=req.stops())
        self.req: CompletionRequest = req
        self.given = prompts

    async def score(self, p: int) -> list[TokenLogprob]:
        """Prompt p's tokens with their logprobs, when `echo` lists them."""
        prompt = self.given[p]
        if not (self.logprobs and prompt.echo_ids):
            return []
        model, tokenizer, k = self.served.model, self.served.tokenizer, self.req.logprobs
        return await self.served.engine.call(
            lambda: prompt_logprobs(model, tokenizer, prompt.echo_ids, k))

    async def begin(self, p: int) -> list[dict[str, Any]]:
        """With `echo`: the choices start with the prompt's text and, with logprobs, its tokens'
        scores; a stream sends them first."""
        if not self.req.echo:
            return []
        scored = await self.score(p)
        for choice in self.of_prompt(p):
            choice.text = self.given[p].text
            for tok in scored:
                first = tok.logprob is None
                lp = None if first else finite(tok.logprob)
                top = None if first else top_dict([(t, finite(v)) for t, v in tok.top],
                                                  tok.text, lp)
                choice.logprobs.append(self.listed_token(choice, tok.text, lp, top))
        return [{"text": c.text, "index": c.index, "finish_reason": None,
                 "logprobs": self.listed(c)} for c in self.of_prompt(p)]

    @staticmethod
    def listed_token(choice: Choice, text: str, lp: float | None,
                     top: dict[str, float | None] | None) -> Listed:
        """The entry of a token listed after the choice's last one."""
        last = choice.logprobs[-1] if choice.logprobs else None
        return Listed(text, lp, top, last.offset + len(last.text) if last else 0)

    def entry(self, choice: Choice, step: Step) -> Listed:
        lp = logprob(step.prob)
        top = top_dict([(text, logprob(p)) for _, text, p in step.top], step.text, lp)
        return self.listed_token(choice, step.text, lp, top)

    def logprobs_json(self, choice: Choice, start: int) -> dict[str, list]:
        entries = choice.logprobs[start:]
        return {"tokens": [e.text for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [e.top for e in entries],
                "text_offset": [e.offset for e in entries]}

    def choice_json(self, choice: Choice) -> dict[str, Any]:
        return {"text": choice.text, "index": choice.index, "logprobs": self.listed(choice),
                "finish_reason": choice.finish_reason}

    def delta_json(self, choice: Choice, delta: str, logprobs: Any) -> dict[str, Any]:
        return {"text": delta, "index": choice.index, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}


@router.post("/v1/completions", responses=STREAMED)
async def completions(req: CompletionRequest, request: Request,
                      served: ServedModel) -> Any:
    """OpenAI's completions: text (or token ids) in, continuations out; `stream` sends them as
    server-sent events, `echo` with `logprobs` scores the prompt itself."""
    check(req, served)
    job = Completion(req, served, await read_prompts(req, served))
    return await job.respond(request)


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
