"""The server's protocol: every request body as a pydantic model, and the one path that checks a
request before any work starts.

A request is checked in two steps, the same for the OpenAI endpoints and the page's:
1. pydantic, against the model declared here (types and every range that does not depend on
   the served model). FastAPI reads these models, so /openapi.json and /docs show each body
   with its limits; a failure is a 400 naming the field (http_errors.validation_error,
   in the words of FIELD_HELP where pydantic's say little).
2. `check(req, served)`, against the served model: its name, the server's max_tokens, the
   vocabulary, layers and heads. `openapi_for(schema, served)` writes the same limits into the
   published schema, so a request the schema allows is one the server accepts. The one limit a
   JSON schema cannot state is a sum: the tokens of a text (or of a whole conversation) must
   fit the context; that is a 400 with code "context_length_exceeded".

Strict types: "1" is not a number and true is not 1. Unknown fields are ignored, as vLLM does,
so clients that send options a small model has no use for (user, ...) keep working.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Union

from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from model.data.chat import ROLE_ALIASES, ROLES
from model.data.tokenizer import EOT_TEXT, CharTokenizer
from model.serve.http_errors import APIError
from model.serve.state import Served

MAX_N = 16  # samples per prompt: generated side by side, each with its own KV cache
MAX_PROMPTS = 64  # prompts in one completion request (generated one after another)
MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5 for completions)
MAX_STOPS = 16
MAX_MESSAGES = 256
MAX_K = 100  # alternatives or neighbours in one answer of the page's endpoints
MAX_TEMPERATURES = 64
MAX_WORDS = 200
MAX_WALK_K = 20  # tokens per list in a walk: each MLP step ranks k neurons over the vocabulary
SEEDS = 1 << 64  # torch.Generator.manual_seed takes [-2**63, 2**64): a seed is taken modulo this

# What a field must be, for the fields whose pydantic errors (one per branch of a union) say
# little on their own: model.serve.http_errors.validation_error says this instead.
FIELD_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of lists of "
              "token ids (each within the limits in /openapi.json)",
    "stop": f"must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
    "top_k": "must be an integer >= 1, or -1 (or null) for no limit",
    "content": "must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
    "words": "must be a list of words or a string of words separated by spaces",
}


def integral(value: Any) -> Any:
    """JSON Schema's integer: 2.0 is one (a client's JSON library may write it so); 2.5 is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**constraints: Any) -> Any:
    """An integer type with pydantic Field constraints: strict (true and "2" are not integers),
    but 2.0 is. (The constraints come before the validator, so the schema shows them.)"""
    return Annotated[int, Field(**constraints), BeforeValidator(integral)]


def limit(kind: str) -> dict[str, str]:
    """Marks a field whose bound depends on the served model; openapi_for fills it in."""
    return {"x-smallgpt": kind}


# Field types shared by the endpoints: each range is stated once, here.
Temperature = Annotated[float, Field(ge=0, le=2, description="0 is greedy decoding")]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = integer(ge=1)
# Any integer: torch's seeds are 64 bits, so a seed is taken modulo 2**64 (which keeps every
# seed torch takes as it is: torch itself reads -1 as 2**64 - 1).
Seed = Annotated[integer(description="any integer: the same seed, the same text"),
                 AfterValidator(lambda seed: seed % SEEDS)]
TokenId = integer(ge=0, json_schema_extra=limit("token_id"))
Text = Annotated[str, Field(json_schema_extra=limit("text"))]  # must encode with the tokenizer
PromptText = Annotated[str, Field(json_schema_extra=limit("prompt"))]  # ... and fit the context
Word = Annotated[str, Field(min_length=1, json_schema_extra=limit("word"))]  # not just spaces
StopText = Annotated[str, Field(min_length=1)]
MaxTokens = integer(ge=0, json_schema_extra=limit("max_tokens"),
                    description="new tokens at most (up to the server's limit)")
Zero = Annotated[float, Field(ge=0, le=0, description="only 0: not supported")]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """What OpenAI's completions and chat completions share."""

    model: str | None = Field(None, json_schema_extra=limit("model"))
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: Union[TopK, Literal[-1], None] = Field(  # noqa: UP007 (pydantic keeps the order)
        None, description="vLLM's extension; -1 or null: no limit")
    n: integer(ge=1, le=MAX_N) = 1
    stop: Union[StopText, Annotated[list[StopText], Field(max_length=MAX_STOPS)],  # noqa: UP007
                None] = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields a plain sampler cannot honour: accepted only at their neutral values.
    presence_penalty: Zero | None = None
    frequency_penalty: Zero | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_k_or_none(self) -> int | None:
        return None if self.top_k in (None, -1) else self.top_k

    def new_tokens(self, served: Served) -> int:
        """How many tokens to generate at most (each endpoint has its own default)."""
        raise NotImplementedError


class CompletionRequest(Sampling):
    prompt: Union[PromptText,  # noqa: UP007
                  Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenId], Field(min_length=1, json_schema_extra=limit("ids"))],
                  Annotated[list[Annotated[list[TokenId], Field(json_schema_extra=limit("ids"))]],
                            Field(min_length=1, max_length=MAX_PROMPTS)]] = EOT_TEXT
    max_tokens: MaxTokens | None = Field(None, description="default 16 (or the server's limit, "
                                         "if lower)")
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool = False
    best_of: integer(ge=1, le=1) | None = Field(None, description="not supported: 1 (or n)")
    suffix: str | None = Field(None, max_length=0, description="not supported")

    def new_tokens(self, served: Served) -> int:
        return min(16, served.max_tokens) if self.max_tokens is None else self.max_tokens


# The roles a request may name: model.data.chat's, each followed by its aliases.
Role = Literal[tuple(name for role in ROLES for name in
                     (role, *(alias for alias, same in ROLE_ALIASES.items() if same == role)))]


# The wire schema of a message, for /openapi.json and the first check; the conversation itself
# is read, checked and rendered by model.data.chat (model.serve.prompts.chat_prompt).
class TextPart(Body):
    type: Literal["text"]
    text: Text


class Message(Body):
    role: Role
    content: Union[Text, Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]]  # noqa: UP007
    name: str | None = None


Messages = Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class ChatCompletionRequest(Sampling):
    messages: Messages
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="alternatives per token, with logprobs=true")

    def new_tokens(self, served: Served) -> int:
        """max_completion_tokens (OpenAI's newer name) or max_tokens; none: the server's limit."""
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return served.max_tokens


class TokenizeRequest(Body):
    model: str | None = Field(None, json_schema_extra=limit("model"))
    prompt: Text
    add_special_tokens: bool = False  # no tokenizer here adds any: accepted, changes nothing


class DetokenizeRequest(Body):
    model: str | None = Field(None, json_schema_extra=limit("model"))
    tokens: list[TokenId]


class GenerateRequest(Body):
    """The page's generation: a prompt, or (chat mode) messages the template turns into one."""

    prompt: PromptText = ""
    messages: Messages | None = Field(None, description="chat mode: replaces the prompt")
    max_tokens: MaxTokens | None = Field(None, description="default 100 (or the server's limit, "
                                         "if lower)")
    temperature: Temperature = 0.8
    top_k: TopK | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    k: integer(ge=1, le=MAX_K) = Field(10, description="alternatives reported per token")

    def new_tokens(self, served: Served) -> int:
        return min(100, served.max_tokens) if self.max_tokens is None else self.max_tokens


class DistributionRequest(Body):
    tokens: Annotated[list[TokenId], Field(json_schema_extra=limit("ids"),
                                           description="the distribution is of the next token")]
    temperatures: list[Temperature] = Field([1.0], min_length=1, max_length=MAX_TEMPERATURES)
    k: integer(ge=1, le=MAX_K) = 10
    top_k: TopK | None = None
    top_p: TopP | None = None
    include: list[TokenId] = Field([], max_length=MAX_K,
                                   description="tokens to report even outside the k likeliest")


class AttentionRequest(Body):
    prompt: Annotated[str, Field(min_length=1, json_schema_extra=limit("prompt"))]
    layer: integer(ge=0, json_schema_extra=limit("layer")) | None = Field(
        None, description="default: the last")
    head: integer(ge=0, json_schema_extra=limit("head")) | None = Field(
        None, description="null: the mean over heads")


class NeighborsRequest(Body):
    word: Word
    k: integer(ge=1, le=MAX_K) = 10


class AnalogyRequest(Body):
    a: Word
    b: Word
    c: Word
    k: integer(ge=1, le=MAX_K) = 10


class DirectionRequest(Body):
    positive: Word
    negative: Word
    words: Union[Annotated[list[Word], Field(min_length=1, max_length=MAX_WORDS)],  # noqa: UP007
                 Annotated[str, Field(json_schema_extra=limit("words"))]] = Field(
        description="a list, or one string split on whitespace")


class WalkRequest(Body):
    """One prediction walked through the network (model.inference.walk)."""

    prompt: PromptText = Field("", description="the text whose next token is walked; empty: "
                               "the end-of-text token")
    tokens: Annotated[list[TokenId], Field(json_schema_extra=limit("ids"))] | None = Field(
        None, description="token ids instead of the prompt")
    temperature: Temperature = Field(1.0, description="the sample's; 0 takes the likeliest")
    temperatures: Annotated[list[Temperature], Field(min_length=1,
                                                     max_length=MAX_TEMPERATURES)] | None = Field(
        None, description="the softmax step's distribution at each; default: temperature, 1")
    top_k: TopK | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    head: integer(ge=0, json_schema_extra=limit("head")) | None = Field(
        None, description="the head each attention step shows; null: the one that wrote most")
    k: integer(ge=1, le=MAX_WALK_K) = Field(5, description="tokens, sources and neurons "
                                            "listed per step")


def check(req: Body, served: Served) -> None:
    """The rules that depend on the served model, for any request, after pydantic's: each
    failure is an APIError naming its field."""
    if getattr(req, "model", None) is not None:
        served.check_model(req.model)
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name, None)
        if value is not None and value > served.max_tokens:
            raise APIError(f"'{name}' must be between 0 and this server's limit "
                           f"{served.max_tokens}, got {value}", name, "invalid_value")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1, req.n):
            raise APIError("'best_of' is not supported (it must equal n)", "best_of",
                           "unsupported")
        if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], str):
            many = req.prompt if isinstance(req.prompt[0], list) else [req.prompt]
            for ids in many:
                served.check_ids(ids, "prompt")
    for name in ("tokens", "include"):
        if isinstance(getattr(req, name, None), list):
            served.check_ids(getattr(req, name), name)
    if isinstance(req, (AttentionRequest, WalkRequest)):
        c = served.model.config
        for name, count in (("layer", c.n_layer), ("head", c.n_head)):
            value = getattr(req, name, None)
            if value is not None and value >= count:
                raise APIError(f"'{name}' must be between 0 and {count - 1}, got {value}", name,
                               "invalid_value")


def openapi_for(schema: dict[str, Any], served: Served) -> dict[str, Any]:
    """`schema` (FastAPI's) with the served model's limits filled in where check() applies
    them, and FastAPI's 422 replaced by the 400 this server sends."""
    c, tokenizer = served.model.config, served.tokenizer
    chars = None
    if isinstance(tokenizer, CharTokenizer):  # a text must use the vocabulary's characters
        chars = tokenizer.chars
    text: dict[str, dict[str, Any]] = {"word": {"pattern": r"\S"}, "words": {"pattern": r"\S"}}
    if chars is not None:
        every, visible = char_set(chars), char_set("".join(ch for ch in chars if not ch.isspace()))
        words = {"pattern": f"^{every}*{visible}{every}*$"}
        text = {"text": {"pattern": f"^{every}*$"}, "word": words, "words": words,
                # One token per character: here the context is a length.
                "prompt": {"pattern": f"^{every}*$", "maxLength": served.block_size}}
    bounds: dict[str, dict[str, Any]] = {
        "model": {"enum": [served.model_id]},
        "max_tokens": {"maximum": served.max_tokens},
        "token_id": {"maximum": tokenizer.vocab_size - 1},
        "ids": {"maxItems": served.block_size},
        "layer": {"maximum": c.n_layer - 1},
        "head": {"maximum": c.n_head - 1},
        **{kind: text.get(kind, {}) for kind in ("text", "word", "words", "prompt")},
    }

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            kind = node.pop("x-smallgpt", None)
            if kind is not None:
                for target in node.get("anyOf", [node]):
                    if target.get("type") != "null":
                        target.update(bounds[kind])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def char_set(chars: str) -> str:
    """A regular expression's class of `chars` (as \\uXXXX escapes, which both JSON Schema's
    ECMA-262 dialect and Python's re read)."""
    return "[" + "".join(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else ch for ch in chars) + "]"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "A malformed request: the message names the "
          "field (param) and what it must be; code context_length_exceeded when a text does "
          "not fit the model's context"},
    404: {"model": ErrorResponse, "description": "No such model (or path)"},
    413: {"model": ErrorResponse, "description": "The request body is too large"},
    503: {"model": ErrorResponse, "description": "The server is shutting down"},
}


# What a generating endpoint answers: JSON, or with "stream": true server-sent events.
STREAMED: dict[int | str, dict[str, Any]] = {200: {
    "description": "JSON; with \"stream\": true (always, for /api/generate) server-sent events, "
                   "one `data: <json>` per chunk",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (OpenAI's and the page's framing)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """The response that sends `events` (sse() strings) as they come."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
