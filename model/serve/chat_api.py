"""POST /v1/chat/completions, as OpenAI defines it: messages in, the assistant's reply out.

The server applies the chat template (model.data.chat.render_chat) with the model's own tokenizer
and generates until the reply ends its turn (the end-of-text token: finish_reason "stop"), a
stop string, or max_tokens ("length"). A model that was never fine-tuned on conversations
still answers: the template's role headers are plain text it reads as a dialogue, and the stop
string the template names (a new "User:" turn) ends a reply that runs on into the next turn.
/v1/models says which kind of model this is (`chat_trained`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from model.data.chat import TURN_STOPS
from model.inference.sampling import Step
from model.serve.completions import Choice, CompletionJob, logprob
from model.serve.prompts import chat_prompt
from model.serve.protocol import ERRORS, STREAMED, ChatCompletionRequest, check
from model.serve.state import Served, ServedModel

router = APIRouter(responses=ERRORS)


class ChatCompletion(CompletionJob):
    """A chat request: n replies to one conversation. A stream opens with the role; a reply
    also ends where the template's next turn would begin (TURN_STOPS)."""

    id_prefix, object, chunk_object, path = (
        "chatcmpl", "chat.completion", "chat.completion.chunk", "/v1/chat/completions")
    usage_on_every_chunk = True  # as OpenAI sends it

    def __init__(self, req: ChatCompletionRequest, served: Served, ids: list[int]) -> None:
        asked = bool(req.logprobs)
        super().__init__(req, served, [ids], logprobs=asked,
                         show_top=(req.top_logprobs or 0) if asked else 0,
                         stop=[*req.stops(), *TURN_STOPS])

    async def begin(self, p: int) -> list[dict[str, Any]]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None} for c in self.of_prompt(p)]

    def token_entry(self, token: int, text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp,
                "bytes": list(self.served.tokenizer.decode_bytes([token]))}

    def entry(self, choice: Choice, step: Step) -> dict[str, Any]:
        entry = self.token_entry(step.token, step.text, logprob(step.prob))
        entry["top_logprobs"] = [self.token_entry(t, text, logprob(p)) for t, text, p in step.top]
        return entry

    def logprobs_json(self, choice: Choice, start: int) -> dict[str, Any]:
        return {"content": choice.logprobs[start:]}

    def choice_json(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": self.listed(choice), "finish_reason": choice.finish_reason}

    def delta_json(self, choice: Choice, delta: str, logprobs: Any) -> dict[str, Any]:
        return {"index": choice.index, "delta": {"content": delta} if delta else {},
                "logprobs": logprobs, "finish_reason": choice.finish_reason}


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           served: ServedModel) -> Any:
    """OpenAI's chat completions: the template is applied here, on the server."""
    check(req, served)
    job = ChatCompletion(req, served, await chat_prompt(served, req.messages))
    return await job.respond(request)
