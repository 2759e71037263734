"""The chat demo's evaluation: turn-ending rate, free-reply accuracy against chance, and the
likeliest-option accuracy, on stand-in models whose answers are known in advance."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from model.data.tokenizer import train_tokenizer
from model.inference import chat_eval
from model.inference.chat_eval import ChatScore, normalise, report, score_chat

OPTIONS = ["Macbeth", "Othello", "Pericles", "Cymbeline"]
RECORDS = [
    {"messages": [{"role": "user", "content": "Which play is this from: ...?"},
                  {"role": "assistant", "content": "Othello"}],
     "tasks": ["play"], "options": [OPTIONS]},
    {"messages": [{"role": "user", "content": "Continue this speech: ..."},
                  {"role": "assistant", "content": "And so on."}],
     "tasks": ["continue"], "options": [[]]},
]


@pytest.fixture(scope="module")
def chars():
    return train_tokenizer("char", ["".join(OPTIONS) + "Which play is this from: ...? "
                                    "Continue this speech: And so on. User: Assistant:\n"])


class Unigram(nn.Module):
    """GPT's forward contract with a model that ignores its input: every position predicts
    the same distribution, so the likelihood of each option is known in advance."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.config = SimpleNamespace(block_size=256, vocab_size=len(logits))

    def forward(self, idx, targets=None):
        return self.logits.expand(*idx.shape, -1), None


def favouring(tokenizer, text: str) -> Unigram:
    logits = torch.zeros(tokenizer.vocab_size)
    logits[tokenizer.encode(text)] = 5.0
    logits[tokenizer.eot_id] = 5.0
    return Unigram(logits)


def replying(monkeypatch, *replies: tuple[str, str | None]) -> None:
    """generate() answers with these (text, how it finished), one per prompt, in order."""
    queue = list(replies)

    def fake(model, tokenizer, prompt, **kw):
        text, finished = queue.pop(0)
        return [SimpleNamespace(delta=text, finished=finished)]
    monkeypatch.setattr(chat_eval, "generate", fake)


def test_free_replies_count_turn_endings_and_matches_against_chance(chars, monkeypatch):
    replying(monkeypatch, (" othello.\nmore", "eot"), (" And so", "length"))
    score = score_chat(favouring(chars, "Othello"), chars, RECORDS)
    assert (score.replies, score.ended, score.correct) == (2, 1, 1)
    assert score.by_task == {"play": [1, 1], "continue": [0, 1]}
    assert score.chance_accuracy == pytest.approx(0.25 / 2)  # 1/4, and ~0 for free text
    assert normalise("  The  Tempest!\nExit.") == "the tempest"


@pytest.mark.parametrize("favoured, chosen", [("Othello", 1), ("Pericles", 0)])
def test_the_likeliest_listed_option_is_the_models_choice(chars, monkeypatch, favoured,
                                                           chosen):
    replying(monkeypatch, (" Hamlet", "eot"), (" And so", "eot"))  # not among the options
    score = score_chat(favouring(chars, favoured), chars, RECORDS)
    assert score.correct == 0 and (score.choices, score.chosen) == (1, chosen)
    assert score.choice_accuracy == chosen and score.choice_chance == 0.25
    assert f"likeliest of the listed options {chosen:.1%} of 1 (chance 25.0%)" in report(score)


def test_an_empty_score_reports_zeros():
    assert "0 replies" in report(ChatScore("m")) and ChatScore("m").choice_accuracy == 0


@pytest.mark.parametrize("block_size", [64, 24])  # 24: prompt + option need sliding windows
def test_options_scored_together_score_as_each_alone(chars, block_size):
    """Padding the shorter options changes nothing that a causal model sees before it."""
    from model.gpt import GPT, GPTConfig
    from model.inference.chat_eval import option_logprobs
    from model.inference.scoring import score_tokens

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=chars.vocab_size, block_size=block_size, n_layer=1,
                          n_head=2, n_embd=16)).eval()
    prompt = chars.encode("Which play is this from: ...?")
    options = ["Othello", "Cymbeline", "Macbeth", "Pericles"]
    together = option_logprobs(model, chars, prompt, options)
    for option, logprob in zip(options, together):
        reply = chars.encode(" " + option) + [chars.eot_id]
        alone = score_tokens(model, prompt + reply).logprobs[-len(reply):].sum()
        assert logprob == pytest.approx(float(alone), abs=1e-4)
    assert len(set(together)) == 4
