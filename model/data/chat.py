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

A literal "<|endoftext|>" typed in a message is encoded as plain characters (model/tokenizer.py),
so a user cannot end the assistant's turn, or fake one, from inside their text.

Training trains the assistant's reply tokens and its closing end-of-text: `render_conversation`
returns a loss mask alongside the ids, 1 where the token is a target to learn. Everything else
(headers, system and user text) is context only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.data.tokenizer import EOT_TEXT, Tokenizer
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
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The token that ends an assistant turn: the tokenizer's end-of-text."""
    return tokenizer.eot_id


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ChatFormatError(f"{where}.content[{i}]: only text parts "
                                      '({"type": "text", "text": ...}) are supported',
                                      f"{where}.content[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    got = "missing" if value is None else f"a {type(value).__name__}"
    raise ChatFormatError(f"{where}.content: must be a string, got {got}", f"{where}.content")


def validate_messages(messages: Any, field: str = "messages",
                      need_assistant: bool = False) -> list[Message]:
    """Messages checked and normalised; a ChatFormatError names the first bad field, e.g.
    "messages[1].role: 'bot' is not one of system, user, assistant"."""
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"{field}: must be a list of messages, got "
                              f"{type(messages).__name__}", field)
    if not messages:
        raise ChatFormatError(f"{field}: must hold at least one message", field)
    checked = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if isinstance(message, Message):
            message = message.to_dict()
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"{where}: must be an object with role and content, got "
                                  f"{type(message).__name__}", where)
        role = message.get("role")
        if role is None:
            raise ChatFormatError(f"{where}.role: missing; use one of {', '.join(ROLES)}",
                                  f"{where}.role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ChatFormatError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}",
                                  f"{where}.role")
        checked.append(Message(role, _content(message.get("content"), where)))
    if need_assistant and not any(m.role == "assistant" for m in checked):
        raise ChatFormatError(f"{field}: has no assistant message, so there is nothing to "
                              "train on", field)
    return checked


# ---------------------------------------------------------------------------------------------
# The template


def render_text(messages: Sequence[Message | Mapping[str, Any]],
                add_generation_prompt: bool = False) -> str:
    """The conversation as text, end-of-text written as "<|endoftext|>": for display and
    tests. Encoding this string is NOT the same as rendering: there it is plain text."""
    parts = [EOT_TEXT]
    for m in validate_messages(messages):
        if m.role == "assistant":
            parts += [HEADERS["assistant"], " " + m.content, EOT_TEXT]
        else:
            parts.append(f"{HEADERS[m.role]} {m.content}{TURN_END}")
    if add_generation_prompt:
        parts.append(HEADERS["assistant"])
    return "".join(parts)


def render_conversation(messages: Sequence[Message | Mapping[str, Any]], tokenizer: Tokenizer,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a loss mask of the same length: 1 for each assistant
    reply token and the end-of-text that closes it (the tokens training learns), else 0.

    Each piece (a header, a reply) is encoded on its own, so a reply's tokens are the same
    whether it is a training target or generated after the prompt `render_chat` gives.
    """
    eot = end_of_turn_id(tokenizer)
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


def parse_text(text: str) -> list[Message]:
    """The messages back from `render_text`'s output (without a trailing generation prompt):
    the inverse of render_text, for round-trip tests and for reading rendered transcripts."""
    if not text.startswith(EOT_TEXT):
        raise ChatFormatError(f"a rendered conversation starts with {EOT_TEXT}", "text")
    rest, messages = text[len(EOT_TEXT):], []
    while rest:
        role = next((r for r, h in HEADERS.items() if rest.startswith(h)), None)
        if role is None:
            raise ChatFormatError(f"expected a role header at {rest[:30]!r}", "text")
        rest = rest[len(HEADERS[role]):]
        if not rest.startswith(" "):
            raise ChatFormatError(f"expected a space after {HEADERS[role]}", "text")
        end = EOT_TEXT if role == "assistant" else TURN_END
        # A turn ends at the first end marker followed by a header (or the end of the text).
        start = 1
        while True:
            cut = rest.find(end, start)
            if cut < 0:
                raise ChatFormatError(f"the {role} turn is not closed by {end!r}", "text")
            after = rest[cut + len(end):]
            if not after or any(after.startswith(h) for h in HEADERS.values()):
                break
            start = cut + 1
        messages.append(Message(role, rest[1:cut]))
        rest = after
    return messages


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
