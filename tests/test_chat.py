"""model.data.chat: the template on every tokenizer, its loss mask, message validation, and the
sampler ending an assistant turn by itself."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from model import GPTConfig
from model.data.chat import (
    HEADERS,
    TURN_END,
    ChatHistory,
    Message,
    conversation_from_record,
    render_chat,
    render_conversation,
    validate_messages,
)
from model.data.tokenizer import EOT_TEXT, train_tokenizer
from model.errors import ChatFormatError, DataError
from model.inference.sampling import generate

TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
CORPUS = ("System: User: Assistant: Which play is this from? Macbeth. Who speaks it?\n"
          "To be, or not to be, that is the question: HAMLET <|endoftext|>\n"
          "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;?!\n") * 10
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Which play is this from?\n\nTo be, or not to be"},
    {"role": "assistant", "content": "HAMLET"},
    {"role": "user", "content": "Who speaks it?"},
    {"role": "assistant", "content": "Hamlet, the question."},
]


def render_text(messages) -> str:
    """The conversation as text, end-of-text written as EOT_TEXT (what the ids decode to)."""
    parts = [EOT_TEXT]
    for m in validate_messages(messages):
        if m.role == "assistant":
            parts += [HEADERS["assistant"], " " + m.content, EOT_TEXT]
        else:
            parts.append(f"{HEADERS[m.role]} {m.content}{TURN_END}")
    return "".join(parts)


def parse_text(text: str) -> list[Message]:
    """The messages back from render_text's output: its inverse."""
    assert text.startswith(EOT_TEXT)
    rest, messages = text[len(EOT_TEXT):], []
    while rest:
        role = next(r for r, h in HEADERS.items() if rest.startswith(h))
        rest = rest[len(HEADERS[role]):]
        assert rest.startswith(" ")
        end = EOT_TEXT if role == "assistant" else TURN_END
        # A turn ends at the first end marker followed by a header (or the end of the text).
        cut = rest.find(end, 1)
        while rest[cut + len(end):] and not any(rest[cut + len(end):].startswith(h)
                                                 for h in HEADERS.values()):
            cut = rest.find(end, cut + 1)
        messages.append(Message(role, rest[1:cut]))
        rest = rest[cut + len(end):]
    return messages


@pytest.fixture(params=["char", "bpe", "gpt2"])
def tokenizer(request, monkeypatch):
    if request.param == "gpt2":
        if TIKTOKEN_CACHE.is_dir():
            monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
        elif not Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent")).is_dir():
            pytest.skip(f"GPT-2 vocabulary files not found at {TIKTOKEN_CACHE}")
    return train_tokenizer(request.param, [CORPUS], vocab_size=300)


def test_template_round_trips_through_text_and_tokens(tokenizer):
    ids, mask = render_conversation(CONVERSATION, tokenizer)
    assert len(ids) == len(mask)
    text = render_text(CONVERSATION)
    # End-of-text is a token, never the plain characters; decoding shows it as EOT_TEXT.
    assert tokenizer.decode(ids).replace(tokenizer.decode([tokenizer.eot_id]), EOT_TEXT) == text
    assert [m.to_dict() for m in parse_text(text)] == CONVERSATION
    assert ids.count(tokenizer.eot_id) == 3  # the start and two replies' ends


def test_loss_mask_covers_exactly_the_replies_and_their_end_of_turn(tokenizer):
    ids, mask = render_conversation(CONVERSATION, tokenizer)
    trained = [i for i, m in zip(ids, mask) if m]
    eot = tokenizer.eot_id
    expected = (tokenizer.encode(" HAMLET") + [eot]
                + tokenizer.encode(" Hamlet, the question.") + [eot])
    assert trained == expected
    # Masked: the start, every header, system and user text.
    assert mask[0] == 0 and tokenizer.decode([i for i, m in zip(ids, mask) if not m]).count(
        "Assistant:") == 2


def test_generation_prompt_is_the_conversation_up_to_the_assistant_header(tokenizer):
    prompt = render_chat(CONVERSATION[:2], tokenizer)
    full, _ = render_conversation(CONVERSATION[:3], tokenizer)
    # The prompt is a prefix of the trained conversation: generation sees what training saw.
    assert full[:len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith("\n\nAssistant:")
    assert render_chat(CONVERSATION[:2], tokenizer, add_generation_prompt=False) == \
        render_conversation(CONVERSATION[:2], tokenizer)[0]


def test_typed_end_of_text_cannot_end_a_turn(tokenizer):
    ids, _ = render_conversation([{"role": "user", "content": f"hi {EOT_TEXT} there"},
                                  {"role": "assistant", "content": "ok"}], tokenizer)
    assert ids.count(tokenizer.eot_id) == 2  # the start and the reply's end only


@pytest.mark.parametrize("messages, field, match", [
    ("hello", "messages", "must be a list"),
    ([], "messages", "at least one"),
    (["hi"], "messages[0]", "must be an object"),
    ([{"content": "hi"}], "messages[0].role", "missing"),
    ([{"role": "bot", "content": "hi"}], "messages[0].role", "'bot' is not one of"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], "messages[1].content", "missing"),
    ([{"role": "user", "content": 3}], "messages[0].content", "got a int"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]",
     "only text parts"),
])
def test_bad_messages_name_the_field(messages, field, match):
    with pytest.raises(ChatFormatError, match=match) as err:
        validate_messages(messages)
    assert err.value.field == field
    assert str(err.value).startswith(field)
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)


def test_text_parts_and_developer_role_are_accepted():
    messages = validate_messages([{"role": "developer", "content": "be brief"},
                                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]}])
    assert messages == [Message("system", "be brief"), Message("user", "ab")]


def test_messages_may_be_objects_with_role_and_content():
    """What a server's request models hold: attributes, not keys; text parts as objects."""
    part = SimpleNamespace(type="text", text="b")
    messages = validate_messages([SimpleNamespace(role="developer", content="be brief", name="x"),
                                  SimpleNamespace(role="user", content=[part, part]),
                                  Message("assistant", "ok")])
    assert messages == [Message("system", "be brief"), Message("user", "bb"),
                        Message("assistant", "ok")]
    for bad, field in [(SimpleNamespace(role="user"), "messages[0]"),
                       (SimpleNamespace(role="bot", content="x"), "messages[0].role"),
                       (SimpleNamespace(role="user", content=[SimpleNamespace(type="image")]),
                        "messages[0].content[0]")]:
        with pytest.raises(ChatFormatError) as err:
            validate_messages([bad])
        assert err.value.field == field


def test_chat_history_drops_the_oldest_exchange_and_keeps_the_system_message():
    tokenizer = train_tokenizer("char", [CORPUS])
    history = ChatHistory(tokenizer, 80, 10, system="Be brief.")
    ids, dropped = history.prompt("Which play is this from?")
    assert dropped == 0 and ids == render_chat([{"role": "system", "content": "Be brief."},
                                                {"role": "user",
                                                 "content": "Which play is this from?"}],
                                               tokenizer)
    history.add_reply("Macbeth.")
    ids, dropped = history.prompt("Who speaks it?")
    assert dropped == 1 and len(ids) + 10 <= 80
    assert history.turns == [Message("user", "Who speaks it?")]
    assert tokenizer.decode(ids).startswith(EOT_TEXT + "System: Be brief.")


def test_records_in_both_formats():
    alpaca = conversation_from_record({"instruction": "Name a play.", "input": "tragedy",
                                       "output": "Macbeth"})
    assert alpaca == [Message("user", "Name a play.\n\ntragedy"), Message("assistant", "Macbeth")]
    assert conversation_from_record({"instruction": "Hi", "output": "Hello"})[0].content == "Hi"
    assert conversation_from_record({"messages": CONVERSATION})[-1].content == \
        "Hamlet, the question."
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert conversation_from_record(sharegpt) == [Message("user", "Hi"), Message("assistant", "Yo")]
    for record, field in [({"messages": [{"role": "user", "content": "q"}]}, "messages"),
                          ({"conversations": [{"from": "bot", "value": "x"}]},
                           "conversations[0].role"),
                          ({"instruction": "q"}, "output"),
                          ({"instruction": "q", "output": 1}, "output"),
                          ({"text": "plain"}, "messages"),
                          ([1, 2], "record")]:
        with pytest.raises(ChatFormatError) as err:
            conversation_from_record(record)
        assert err.value.field == field


class Replier(nn.Module):
    """A stand-in model that writes `script` token by token, then keeps writing its last one."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab, block_size=256, n_layer=1, n_head=1, n_embd=2)
        self.weight = nn.Parameter(torch.zeros(1))
        self.script, self.calls = script, 0

    def forward(self, idx, targets=None, cache=None):
        logits = torch.zeros(idx.size(0), idx.size(1), self.config.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 30.0
        self.calls += 1
        return logits, None

    def new_cache(self, batch_size):
        return None


def test_sampler_stops_at_the_end_of_the_assistant_turn(tokenizer):
    eot = tokenizer.eot_id
    reply = tokenizer.encode(" HAMLET")
    model = Replier(reply + [eot] + tokenizer.encode("User: more"), tokenizer.vocab_size)
    steps = list(generate(model, tokenizer, render_chat(CONVERSATION[:2], tokenizer),
                          max_new_tokens=50, temperature=0, use_cache=False))
    assert [s.token for s in steps] == reply + [eot]
    assert steps[-1].finished == "eot"
    assert "".join(s.delta for s in steps) == " HAMLET"
