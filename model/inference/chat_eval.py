"""Score a model on the held-out split of the offline chat demo set (the command line is
model/cli/chat_eval.py):

    python -m model.chat_eval out/small out/chat_small     # before and after

For every assistant turn of the held-out conversations (model/data/chat_demo.py), the model is
prompted with the conversation up to that turn (earlier replies as the data has them) and
answers greedily. Reported per model:
  - ended turn: the share of replies that end with end-of-text by themselves, within
    --max-new-tokens (no stop strings help);
  - accuracy: the share whose first line equals the expected answer (case, surrounding spaces
    and punctuation aside), per task and overall, beside chance: 1/4 for the four-option
    questions, about 0 for continuing a speech;
  - choice accuracy, for the four-option questions: how often the expected answer is the
    option the model finds likeliest as its whole reply (" option" + end-of-text, scored with
    model.inference.scoring), against chance 1/4. This is how evaluation harnesses score multiple
    choice, and it tells what a small model knows even when its free reply names something
    that is not among the options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from model.data.chat import render_chat
from model.data.chat_demo import demo_records
from model.data.tokenizer import Tokenizer
from model.inference.sampling import generate
from model.inference.scoring import score_tokens


@dataclass
class ChatScore:
    """What chat_eval measured for one model."""

    model: str
    replies: int = 0
    ended: int = 0  # replies that closed their turn with end-of-text
    cropped: int = 0  # prompts longer than the context, of which the model saw the end only
    correct: int = 0
    choices: int = 0  # replies that pick among listed options
    chosen: int = 0  # of those, where the expected option is the likeliest reply
    choice_chance: float = 0.0  # expected `chosen` when picking an option at random
    chance: float = 0.0  # expected correct replies when guessing among the options
    by_task: dict[str, list[int]] = field(default_factory=dict)  # task -> [correct, replies]
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first few replies

    @property
    def ended_share(self) -> float:
        return self.ended / max(1, self.replies)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.replies)

    @property
    def chance_accuracy(self) -> float:
        return self.chance / max(1, self.replies)

    @property
    def choice_accuracy(self) -> float:
        return self.chosen / max(1, self.choices)


def normalise(text: str) -> str:
    """The first line, lower case, inner spaces collapsed, outer spaces and punctuation off."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first).strip(" .,;:!?'\"").lower()


def held_out(limit: int | None) -> list[dict[str, Any]]:
    """`limit` held-out records spread evenly over the split (all of them with None)."""
    records = list(demo_records("val"))
    if limit is None or limit >= len(records):
        return records
    step = len(records) / limit
    return [records[int(i * step)] for i in range(limit)]


def option_logprobs(model: nn.Module, tokenizer: Tokenizer, prompt: list[int],
                    options: list[str]) -> list[float]:
    """log p(option | prompt) of each option as a whole assistant reply: its tokens as
    training renders them (" " + option) and the end-of-text that closes the turn. Where every
    option fits the context with its prompt, they go through the model together, each row
    padded on the right to the longest, which a causal model's earlier positions never see;
    longer ones are scored one by one, since padding would move their sliding windows."""
    end = tokenizer.eot_id
    replies = [tokenizer.encode(" " + option) + [end] for option in options]
    width = max(map(len, replies))
    start = len(prompt) - 1  # logprobs[:, t - 1] is log p(ids[t])
    if len(prompt) + width > model.config.block_size + 1:
        return [float(score_tokens(model, prompt + reply).logprobs[start:].sum())
                for reply in replies]
    rows = [prompt + reply + [end] * (width - len(reply)) for reply in replies]
    scored = score_tokens(model, rows, batch_size=len(rows)).logprobs
    return [float(scored[i, start:start + len(reply)].sum()) for i, reply in enumerate(replies)]


def score_chat(model: nn.Module, tokenizer: Tokenizer, records: list[dict[str, Any]], *,
               name: str = "model", max_new_tokens: int = 48, keep_examples: int = 5
               ) -> ChatScore:
    """Greedy replies to each assistant turn of `records`, scored as the module docstring says;
    `name` labels the result, and the first `keep_examples` replies are kept in it."""
    score = ChatScore(name)
    for record in records:
        messages = record["messages"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, task, options in zip(turns, record["tasks"], record["options"]):
            prompt = render_chat(messages[:turn], tokenizer)
            cropped: list[str] = []
            steps = list(generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                  temperature=0.0, show_top=0, warn=cropped.append))
            score.cropped += bool(cropped)
            reply = "".join(s.delta for s in steps)
            ended = bool(steps) and steps[-1].finished == "eot"
            expected = messages[turn]["content"]
            right = normalise(reply) == normalise(expected)
            if options:
                likelihoods = option_logprobs(model, tokenizer, prompt, options)
                picked = options[likelihoods.index(max(likelihoods))]
                score.choices += 1
                score.chosen += picked == expected
                score.choice_chance += 1 / len(options)
            score.replies += 1
            score.ended += ended
            score.correct += right
            score.chance += 1 / len(options) if options else 0.0
            tally = score.by_task.setdefault(task, [0, 0])
            tally[0] += right
            tally[1] += 1
            if len(score.examples) < keep_examples:
                score.examples.append({"task": task, "question": messages[turn - 1]["content"],
                                       "expected": expected, "reply": reply,
                                       "ended": ended})
    return score


def report(score: ChatScore) -> str:
    tasks = "  ".join(f"{task} {c}/{n}" for task, (c, n) in sorted(score.by_task.items()))
    return (f"{score.model}: {score.replies} replies, ended their turn {score.ended_share:.1%}, "
            f"accuracy {score.accuracy:.1%} (chance {score.chance_accuracy:.1%}; {tasks}); "
            f"likeliest of the listed options {score.choice_accuracy:.1%} of {score.choices} "
            f"(chance {score.choice_chance / max(1, score.choices):.1%})"
            + (f"; {score.cropped} prompts longer than the context were cropped"
               if score.cropped else ""))
