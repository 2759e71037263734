"""Front: `python -m model.chat_eval MODEL [MODEL ...]` scores each model on the held-out chat
demo conversations and prints one line (or JSON object) per model."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from model.cli.common import load_named_model, run_cli, use_threads
from model.inference.chat_eval import held_out, report, score_chat
from model.runtime import pick_device


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m model.chat_eval",
        description="Held-out accuracy and turn-ending rate on the offline chat demo set.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="runs or checkpoints to score (e.g. the base model, then the chat-tuned)")
    p.add_argument("--limit", type=int, default=200,
                   help="held-out conversations to score, spread over the split (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.add_argument("--examples", type=int, default=0, help="print the first N replies")
    args = p.parse_args(argv)
    use_threads(None)
    device = pick_device(args.device, setting="--device")
    records = held_out(args.limit)
    for name in args.models:
        loaded = load_named_model(name, device)
        score = score_chat(loaded.model, loaded.tokenizer, records, name=name,
                           max_new_tokens=args.max_new_tokens, keep_examples=args.examples)
        if args.json:
            print(json.dumps({**asdict(score), "ended_share": score.ended_share,
                              "accuracy": score.accuracy, "chance": score.chance_accuracy,
                              "choice_accuracy": score.choice_accuracy}))
        else:
            print(report(score))
            for ex in score.examples:
                print(f"  [{ex['task']}] expected {ex['expected']!r}, replied {ex['reply']!r}"
                      f"{'' if ex['ended'] else ' (did not end its turn)'}")
    return 0
