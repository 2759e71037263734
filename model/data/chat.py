"""Conversations: the messages format, the chat template, and the loss mask.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}.
The template turns it into tokens with the model's own tokenizer, using plain-text role headers
and the tokenizer's end-of-text token, so it needs no new tokens:

    <|endoftext|>System: Answer in one word.\\n\\n
    User: Which play is this from?\\n\\n
    Assistant: Macbeth<|endoftext|>
    User: And who speaks it?\\n\\n
    Assistant: LADY MACBETH<|endoftext|>

  - The conversation starts with end-of-text, where every pretraining document starts.
  - System and user turns are "Role: content" followed by a blank line.
  - An assistant turn is the header "Assistant:", then " " + content, then end-of-text. The
    space belongs to the reply (GPT-2 BPE attaches a leading space to the word after it), so a
    prompt ends in "Assistant:" and the model writes " Macbeth" as it would in running text.

Why this shape: GPT-2's vocabulary (and our char and bpe vocabularies) gain no tokens, so a
fine-tuned GPT-2 keeps its embedding shape and still loads in `transformers` after export; the
reply ends with the one token every smallgpt tokenizer has and the sampler already stops at, so
generation ends the turn by itself; and the headers are ordinary text that a base model reads
as a dialogue, so the template also works (less well) before any chat training, where the
stop string "\\n\\nUser:" ends a reply that runs into the next turn (`TURN_STOPS`).

A literal "<|endoftext|>" typed in a message is encoded as plain characters
(model/data/tokenizer.py), so a user cannot end the assistant's turn, or fake one, from inside
their text.

Training trains the assistant's reply tokens and its closing end-of-text: `render_conversation`
returns a loss mask alongside the ids, 1 where the token is a target to learn. Everything else
(headers, system and user text) is context only.

`Message` and `validate_messages` are the one message type and the one validation: chat data,
sample.py's --chat (`ChatHistory`) and the server's request models all go through them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.data.tokenizer import Tokenizer
from model.errors import ChatFormatError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system instructions
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
TURN_END = "\n\n"  # after a system or user turn; an assistant turn ends with end-of-text
# Text a model that was never chat-trained tends to write when it runs on into the next turn.
TURN_STOPS = ("\n\nUser:",)


@dataclass(frozen=True)
class Message:
    """One checked message: role is one of ROLES, content plain text."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _get(item: Any, key: str) -> Any:
    """A key of a mapping, or an attribute of an object (a pydantic model, a Message)."""
    return item.get(key) if isinstance(item, Mapping) else getattr(item, key, None)


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts
    (mappings or objects with those fields)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            text = _get(part, "text")
            if not (_get(part, "type") == "text" and isinstance(text, str)):
                raise ChatFormatError(f"{where}.content[{i}]: only text parts "
                                      '({"type": "text", "text": ...}) are supported',
                                      f"{where}.content[{i}]")
            texts.append(text)
        return "".join(texts)
    got = "missing" if value is None else f"a {type(value).__name__}"
    raise ChatFormatError(f"{where}.content: must be a string, got {got}", f"{where}.content")


def validate_messages(messages: Any, field: str = "messages",
                      need_assistant: bool = False) -> list[Message]:
    """Messages checked and normalised; a ChatFormatError names the first bad field, e.g.
    "messages[1].role: 'bot' is not one of system, user, assistant", in its text and `field`.

    Each message is a mapping or an object with `role` and `content` (a Message, a request
    model); ROLE_ALIASES are accepted ("developer" becomes "system"), and content may be a
    list of text parts, which are joined.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"{field}: must be a list of messages, got "
                              f"{type(messages).__name__}", field)
    if not messages:
        raise ChatFormatError(f"{field}: must hold at least one message", field)
    checked = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not (isinstance(message, Mapping)
                or hasattr(message, "role") and hasattr(message, "content")):
            raise ChatFormatError(f"{where}: must be an object with role and content, got "
                                  f"{type(message).__name__}", where)
        role = _get(message, "role")
        if role is None:
            raise ChatFormatError(f"{where}.role: missing; use one of {', '.join(ROLES)}",
                                  f"{where}.role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ChatFormatError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}",
                                  f"{where}.role")
        checked.append(Message(role, _content(_get(message, "content"), where)))
    if need_assistant and not any(m.role == "assistant" for m in checked):
        raise ChatFormatError(f"{field}: has no assistant message, so there is nothing to "
                              "train on", field)
    return checked


# ---------------------------------------------------------------------------------------------
# The template


def render_conversation(messages: Sequence[Message | Mapping[str, Any]], tokenizer: Tokenizer,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a loss mask of the same length: 1 for each assistant
    reply token and the end-of-text that closes it (the tokens training learns), else 0.

    Each piece (a header, a reply) is encoded on its own, so a reply's tokens are the same
    whether it is a training target or generated after the prompt `render_chat` gives.
    """
    eot = tokenizer.eot_id  # the token that ends an assistant turn
    ids, mask = [eot], [0]
    for m in validate_messages(messages):
        if m.role == "assistant":
            header = tokenizer.encode(HEADERS["assistant"])
            reply = tokenizer.encode(" " + m.content) + [eot]
            ids += header + reply
            mask += [0] * len(header) + [1] * len(reply)
        else:
            turn = tokenizer.encode(f"{HEADERS[m.role]} {m.content}{TURN_END}")
            ids += turn
            mask += [0] * len(turn)
    if add_generation_prompt:
        header = tokenizer.encode(HEADERS["assistant"])
        ids += header
        mask += [0] * len(header)
    return ids, mask


def render_chat(messages: Sequence[Message | Mapping[str, Any]], tokenizer: Tokenizer,
                add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for generating the assistant's next reply (ending with "Assistant:")."""
    return render_conversation(messages, tokenizer, add_generation_prompt)[0]


def conversation_from_alpaca(record: Mapping[str, Any], field: str = "") -> list[Message]:
    """An Alpaca-style record (instruction, optional input, output) as a user/assistant pair:
    the input, when present, follows the instruction after a blank line."""
    prefix = f"{field}." if field else ""
    values = {}
    for key in ("instruction", "input", "output"):
        value = record.get(key, "" if key == "input" else None)
        if value is None:
            raise ChatFormatError(f"{prefix}{key}: missing", f"{prefix}{key}")
        if not isinstance(value, str):
            raise ChatFormatError(f"{prefix}{key}: must be a string, got "
                                  f"{type(value).__name__}", f"{prefix}{key}")
        values[key] = value
    user = values["instruction"] + (f"\n\n{values['input']}" if values["input"].strip() else "")
    return [Message("user", user), Message("assistant", values["output"])]


def conversation_from_record(record: Any) -> list[Message]:
    """One record of chat data: {"messages": [...]} (or ShareGPT's "conversations"), or Alpaca's
    {"instruction", "input", "output"}. ChatFormatError names the bad field."""
    if not isinstance(record, Mapping):
        raise ChatFormatError(f"a record must be a JSON object, got {type(record).__name__}",
                              "record")
    if "messages" in record:
        return validate_messages(record["messages"], "messages", need_assistant=True)
    if "conversations" in record:  # ShareGPT's {"from": "human" | "gpt", "value": ...} too
        turns = record["conversations"]
        if isinstance(turns, list):
            turns = [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t.get("value")}
                     if isinstance(t, Mapping) and "from" in t and "role" not in t else t
                     for t in turns]
        return validate_messages(turns, "conversations", need_assistant=True)
    if "instruction" in record or "output" in record:
        return conversation_from_alpaca(record)
    keys = ", ".join(map(str, list(record)[:8])) or "none"
    raise ChatFormatError(f"record has neither 'messages' nor Alpaca's 'instruction'/'output' "
                          f"(its keys: {keys})", "messages")


# ---------------------------------------------------------------------------------------------
# A chat session


class ChatHistory:
    """The messages of a chat session (sample.py --chat), kept within the model's context.

    Before each reply the oldest exchanges (a user message and its reply) are dropped until
    the prompt leaves `reserve` tokens for the reply; the system message always stays.
    """

    def __init__(self, tokenizer: Tokenizer, block_size: int, reserve: int,
                 system: str | None = None) -> None:
        self.tokenizer, self.block_size, self.reserve = tokenizer, block_size, reserve
        self.system = [Message("system", system)] if system else []
        self.turns: list[Message] = []

    def prompt(self, user: str) -> tuple[list[int], int]:
        """Prompt ids for a reply to `user`, and how many earlier exchanges were dropped."""
        self.turns.append(Message("user", user))
        dropped = 0
        while True:
            ids = render_chat(self.system + self.turns, self.tokenizer)
            if len(ids) + self.reserve <= self.block_size or len(self.turns) == 1:
                return ids, dropped
            del self.turns[:2]
            dropped += 1

    def add_reply(self, reply: str) -> None:
        self.turns.append(Message("assistant", reply))
