"""A request's text as the token ids the model continues, checked against the served model: a
text (a completion's prompt, the page's prompt) or a conversation through the chat template.
Every endpoint that takes text turns it into ids here; text the tokenizer cannot encode, a
malformed conversation, or ids longer than the context are a 400 about the field they came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.data.chat import render_chat
from model.serve.http_errors import in_thread
from model.serve.state import Served


async def encode(served: Served, text: str, param: str) -> list[int]:
    """`text` as token ids, checked against the context: a text the tokenizer cannot encode or
    that does not fit is a 400 about `param`."""
    ids = await in_thread(served.tokenizer.encode, text, param)
    served.check_context(ids, param)
    return ids


async def chat_prompt(served: Served, messages: Sequence[Any]) -> list[int]:
    """The conversation through the chat template (model.data.chat.render_chat, which reads
    the request's messages as they are: role and content, text parts with type and text),
    ending with the assistant's header: the ids the reply continues. A malformed message is a
    400 naming its field (messages[1].content[0]); text the tokenizer cannot encode, or a
    conversation longer than the context, a 400 about 'messages'."""
    ids = await in_thread(lambda ms: render_chat(ms, served.tokenizer), messages, "messages")
    served.check_context(ids, "messages")
    return ids
