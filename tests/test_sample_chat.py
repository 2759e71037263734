"""sample.py --chat on tiny saved checkpoints: piped input, the template's prompts, history
dropped oldest first when the context is full, --show-probs, and base versus chat-trained."""

import io
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, Config, GPTConfig
from model.config import DataConfig
from model.data.chat import TURN_STOPS, ChatHistory, render_chat
from model.data.tokenizer import train_tokenizer
from model.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model.cli import sample  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;?!'\n"
BLOCK = 96


def save(run: Path, chat_trained: bool):
    tokenizer = train_tokenizer("char", [CHARS])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=1, n_head=2,
                       n_embd=16)
    data = DataConfig(format="chat" if chat_trained else "text")
    save_checkpoint(run / "latest", GPT(config), Config(model=config, data=data, name="t"),
                    tokenizer.spec())
    return tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_runs")
    tokenizer = save(root / "chat", True)
    save(root / "base", False)
    return root, tokenizer


@pytest.fixture
def chat(runs, monkeypatch, capsys):
    """sample.py --chat with generate spied on: returns (code, stdout, stderr, calls)."""
    root, _ = runs
    calls = []
    real = sample.generate

    def spy(model, tokenizer, prompt, **kwargs):
        steps = list(real(model, tokenizer, prompt, **kwargs))
        calls.append({"prompt": prompt, "stop": kwargs.get("stop"),
                      "reply": "".join(s.delta for s in steps)})
        return iter(steps)

    monkeypatch.setattr(sample, "generate", spy)

    def call(*args, run="chat", stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = sample.cli(["--checkpoint", str(root / run), "--chat", "--temperature", "0",
                           *args])
        out, err = capsys.readouterr()
        return code, out, err, calls

    return call


def test_piped_messages_get_replies_in_the_template(chat, runs):
    _, tokenizer = runs
    code, out, err, calls = chat("--max-new-tokens", "3", "--system", "Be brief.",
                                 stdin="Hello there.\n\nWho are you?\n")
    assert code == 0 and len(calls) == 2  # the blank line is not a message
    system = {"role": "system", "content": "Be brief."}
    first = [system, {"role": "user", "content": "Hello there."}]
    assert calls[0]["prompt"] == render_chat(first, tokenizer)
    reply = calls[0]["reply"].strip()
    second = first + [{"role": "assistant", "content": reply},
                      {"role": "user", "content": "Who are you?"}]
    assert calls[1]["prompt"] == render_chat(second, tokenizer)
    # One line per reply on stdout, without the space the template puts before a reply.
    assert out == "".join(c["reply"].lstrip(" ") + "\n" for c in calls)
    assert "dropped" not in err and "not chat-trained" not in err


def test_history_that_outgrows_the_context_is_dropped_oldest_first(chat, runs):
    _, tokenizer = runs
    messages = ["First question here.", "Second question here.", "Third question here."]
    code, _, err, calls = chat("--max-new-tokens", "8", "--system", "Sys.",
                               stdin="\n".join(messages) + "\n")
    assert code == 0 and len(calls) == 3
    assert "dropped the 1 oldest exchange" in err
    last = tokenizer.decode(calls[-1]["prompt"])
    assert "First question" not in last and "Third question" in last
    assert last.startswith("<|endoftext|>System: Sys.")  # the system message stays
    assert all(len(c["prompt"]) + 8 <= BLOCK for c in calls)


def test_show_probs_works_in_chat(chat):
    code, out, _, _ = chat("--max-new-tokens", "2", "--show-probs", "3", stdin="Hi.\n")
    assert code == 0 and "prob" in out and out.count("|") == 3  # header and two tokens


def test_a_base_model_also_stops_at_the_next_user_turn(chat):
    code, _, err, calls = chat("--max-new-tokens", "2", run="base", stdin="Hi.\n")
    assert code == 0 and "not chat-trained" in err
    assert tuple(calls[0]["stop"]) == TURN_STOPS
    code, _, err, calls = chat("--max-new-tokens", "2", "--stop", "x", stdin="Hi.\n")
    assert tuple(calls[-1]["stop"]) == ("x",)


@pytest.mark.parametrize("args, words", [
    (["--prompt", "x"], "--chat reads its prompts from stdin"),
    (["--interactive"], "choose --chat"),
    (["--num-samples", "2"], "--chat generates one reply"),
])
def test_bad_combinations_are_one_line_errors(chat, args, words):
    code, out, err, _ = chat(*args)
    assert code == 2 and out == "" and words in err and err.count("\n") == 1


def test_chat_history_keeps_the_newest_message_even_alone():
    tokenizer = train_tokenizer("char", [CHARS])
    history = ChatHistory(tokenizer, 40, 10)
    ids, dropped = history.prompt("a long message that does not fit in forty tokens at all")
    assert dropped == 0 and len(ids) > 40  # generation then keeps its end, with a warning
