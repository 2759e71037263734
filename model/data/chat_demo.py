"""The offline chat demo set: questions about the embedded plays whose answers can be checked.

Built on the fly, deterministically, from the plays shipped in the package (model/data/corpus.py),
so it needs no download and no extra file. Three tasks, each a short conversation:

    play      "Which play is this from: Othello; Macbeth; Pericles or Cymbeline?" + two lines
              -> the title (one of 4 options: chance 1/4)
    speaker   "Who speaks this line: BANQUO; MACBETH; ROSS or LENNOX?" + a line
              -> the speaker's name (one of 4 speakers of that play: chance 1/4)
    continue  "Continue this speech:" + a line -> the line that follows it (free text: chance ~0)

Every third conversation has a system prompt, and every fifth asks a second question in a
second turn (the speaker of the passage whose play was just named), so multi-turn conversations
are part of the set. The last tenth of each play's speeches is held out ("val"): the evaluation
command (model/inference/chat_eval.py) scores replies to those. Records are {"messages": [...]}
plus what checking needs: "tasks" and "options" (one per assistant turn; options [] for free
text).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from model.data.corpus import Shakespeare

DEMO_SOURCE = "shakespeare-chat"
DEMO_VERSION = 1  # bump when the records change, so prepared caches rebuild
HELD_OUT = 0.1  # the last tenth of each play's speeches
SYSTEM = "You answer questions about Shakespeare's plays with a name or a line."
MAX_LINE = 90  # characters: passages stay short, so a conversation fits a 128-token context
OPTIONS = 4
SPEAKER = re.compile(r"[A-Z][A-Za-z'.-]*( [A-Za-z'.-]+)*")


@dataclass(frozen=True)
class Speech:
    speaker: str
    lines: tuple[str, ...]


def parse_play(text: str) -> tuple[str, list[Speech]]:
    """The title (the first line) and the speeches: blocks "NAME:" followed by verse lines."""
    title, speeches = text.split("\n", 1)[0].strip(), []
    for block in text.split("\n\n"):
        head, _, body = block.strip("\n").partition("\n")
        if not (head.endswith(":") and 1 < len(head) < 40 and head.count(":") == 1 and body):
            continue  # a title, act and scene headings, stage directions
        # Bracketed lines ("[Aside]", "[Reads]") are stage directions, not verse.
        lines = tuple(line.strip() for line in body.split("\n")
                      if line.strip() and not line.lstrip().startswith("["))
        if lines and SPEAKER.fullmatch(head[:-1].strip()):
            speeches.append(Speech(head[:-1].strip(), lines))
    # A verse line that happens to end in a colon looks like a heading: real speakers recur.
    counts = Counter(s.speaker for s in speeches)
    return title, [s for s in speeches if counts[s.speaker] >= 3]


def _choices(rng: random.Random, answer: str, pool: list[str]) -> list[str]:
    others = rng.sample([p for p in pool if p != answer], OPTIONS - 1)
    options = [answer, *others]
    rng.shuffle(options)
    return options


def _listed(options: list[str]) -> str:
    # Semicolons: some titles hold a comma ("Henry VI, Part 1").
    return "; ".join(options[:-1]) + " or " + options[-1]


def _short(lines: tuple[str, ...], count: int) -> list[str] | None:
    picked = [line for line in lines[:count]]
    return picked if all(len(line) <= MAX_LINE for line in picked) else None


def demo_records(split: str | None = None) -> Iterator[dict[str, Any]]:
    """Every demo conversation, train then val within each play, or only `split`'s."""
    plays = [parse_play(doc.text()) for doc in Shakespeare().documents()]
    titles = [title for title, _ in plays]
    for title, speeches in plays:
        speakers = sorted({s.speaker for s in speeches})
        if len(speakers) < OPTIONS:
            continue
        held_from = int(len(speeches) * (1 - HELD_OUT))
        # Seeded by the title: the same records on every machine and every run.
        rng = random.Random(hashlib.sha256(title.encode()).digest())
        for index, speech in enumerate(speeches):
            which = "val" if index >= held_from else "train"
            record = _record(rng, index, speech, title=title, titles=titles, speakers=speakers)
            if record is not None and split in (None, which):
                yield {**record, "split": which}


def _record(rng: random.Random, index: int, speech: Speech, *, title: str, titles: list[str],
            speakers: list[str]) -> dict[str, Any] | None:
    """The conversation about the play's speech number `index` (None when its lines are too
    long); `titles` are every play's, `speakers` this play's."""
    kind = ("play", "speaker", "continue")[index % 3]
    messages: list[dict[str, str]] = []
    if index % 3 == 1 and rng.random() < 0.5 or index % 9 == 0:
        messages.append({"role": "system", "content": SYSTEM})
    if kind == "continue":
        if len(speech.lines) < 2 or not _short(speech.lines, 2):
            return None
        messages += [{"role": "user", "content": f"Continue this speech:\n\n{speech.lines[0]}"},
                     {"role": "assistant", "content": speech.lines[1]}]
        return {"messages": messages, "tasks": ["continue"], "options": [[]]}
    if kind == "play":
        passage = _short(speech.lines, 2)
        if passage is None:
            return None
        options = _choices(rng, title, titles)
        messages += [{"role": "user", "content": f"Which play is this from: {_listed(options)}?"
                                                 "\n\n" + "\n".join(passage)},
                     {"role": "assistant", "content": title}]
        record = {"messages": messages, "tasks": ["play"], "options": [options]}
        if index % 5 == 0:  # a second turn about the same passage
            who = _choices(rng, speech.speaker, speakers)
            messages += [{"role": "user", "content": f"And who speaks it: {_listed(who)}?"},
                         {"role": "assistant", "content": speech.speaker}]
            record = {"messages": messages, "tasks": ["play", "speaker"],
                      "options": [options, who]}
        return record
    line = _short(speech.lines, 1)
    if line is None:
        return None
    options = _choices(rng, speech.speaker, speakers)
    messages += [{"role": "user", "content": f"Who speaks this line: {_listed(options)}?\n\n"
                                             f"{line[0]}"},
                 {"role": "assistant", "content": speech.speaker}]
    return {"messages": messages, "tasks": ["speaker"], "options": [options]}
