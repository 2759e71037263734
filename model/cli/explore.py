"""Look inside a trained GPT: embedding neighbours, analogies and directions, the next-token
distribution, attention maps, and the logit lens. Works on any model `--checkpoint` names: a
smallgpt run, gpt2 (and its larger sizes), or a Hugging Face GPT-2 directory.

    python -m model.explore neighbors king --checkpoint out/small
    python -m model.explore analogy king man woman
    python -m model.explore direction cats cat --words "dog dogs house houses"
    python -m model.explore params --preset gpt3
    python -m model.explore next "The cat sat on the" --temperatures 0.5 1 2
    python -m model.explore attention "The cat sat on the mat" --layer 0 --head 1
    python -m model.explore lens "The cat sat on the" --checkpoint gpt2
    python -m model.explore walk "The cat sat on the" --temperature 0.8 --seed 1

A word is looked up in its leading-space form (" king") when that is one token, as BPE models
meet it mid-sentence; the output names the form used, and a word of several tokens is the mean
of their vectors (see model/inference/analysis.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model.cli.common import load_named_model, run_cli
from model.gpt import GPTConfig
from model.inference.analysis import (
    Analogy,
    AttentionMap,
    Direction,
    Lens,
    Neighbors,
    NextToken,
    Scored,
    WordVector,
    analogy,
    attention,
    direction,
    logit_lens,
    neighbors,
    next_token,
    to_jsonable,
)
from model.inference.plots import plot_attention, plot_next_token
from model.inference.tally import TallyRow, parameter_tally
from model.inference.walk import Params, Walk, walk


# -- text output ---------------------------------------------------------------------------------
def describe_word(w: WordVector) -> str:
    """One line naming the form used and, if the word is several tokens, the pieces."""
    if w.multi_token:
        pieces = " + ".join(repr(p) for p in w.pieces)
        return (f"{w.word!r} as {w.form!r} is {len(w.ids)} tokens, {pieces}: "
                "using the mean of their vectors")
    return f"{w.word!r} as {w.form!r} is one token (id {w.ids[0]})"


def _table(rows: list[Scored], label: str) -> list[str]:
    lines = [f"  {'rank':>4}  {'token':<20}{'id':>8}  {label}"]
    for rank, s in enumerate(rows, 1):
        lines.append(f"  {rank:>4}  {s.token!r:<20}{s.id:>8}  {s.score:+.4f}")
    return lines


def format_neighbors(r: Neighbors) -> str:
    return "\n".join([describe_word(r.query), "nearest tokens by cosine similarity of W_E rows:",
                      *_table(r.neighbors, "cosine")])


def format_analogy(r: Analogy) -> str:
    a, b, c = r.words
    head = [describe_word(w) for w in r.words if w.multi_token]
    head.append(f"{a.form!r} - {b.form!r} + {c.form!r} is nearest to (A, B, C left out):")
    return "\n".join([*head, *_table(r.answers, "cosine")])


def format_direction(r: Direction) -> str:
    lines = [describe_word(w) for w in (r.positive, r.negative) if w.multi_token]
    lines.append(f"direction {r.positive.form!r} - {r.negative.form!r} (length {r.norm:.4f}); "
                 "words by dot product with it, most towards the first word at the top:")
    lines.append(f"  {'word':<20}{'dot':>10}{'cosine':>10}  tokens")
    for p in r.projections:
        note = " + ".join(repr(t) for t in p.word.pieces)
        note += " (mean)" if p.word.multi_token else ""
        lines.append(f"  {p.word.form!r:<20}{p.dot:>+10.4f}{p.cosine:>+10.4f}  {note}")
    return "\n".join(lines)


def format_next(r: NextToken) -> str:
    temps = "".join(f"{'p@T=' + format(t, 'g'):>10}" for t in r.temperatures)
    lines = [f"prompt tokens: {' '.join(repr(t) for t in r.prompt)}",
             f"  {'rank':>4}  {'token':<20}{'id':>8}{'logit':>10}{temps}"]
    for i, s in enumerate(r.top):
        probs = "".join(f"{r.probs[j][i]:>10.4f}" for j in range(len(r.temperatures)))
        lines.append(f"  {i + 1:>4}  {s.token!r:<20}{s.id:>8}{s.score:>10.3f}{probs}")
    rest = "".join(f"{o:>10.4f}" for o in r.other)
    lines.append(f"  {'':>4}  {'(all other tokens)':<28}{'':>10}{rest}")
    return "\n".join(lines)


def format_attention(r: AttentionMap, top: int = 3) -> str:
    which = f"head {r.head}" if r.head is not None else f"mean of {r.n_heads} heads"
    lines = [f"layer {r.layer}, {which}; each token and the tokens it attends to most:"]
    for q, (token, row) in enumerate(zip(r.tokens, r.weights)):
        best = sorted(range(q + 1), key=lambda j: row[j], reverse=True)[:top]
        seen = ", ".join(f"{r.tokens[j]!r}@{j} {row[j]:.2f}" for j in best)
        lines.append(f"  {q:>3} {token!r:<16} -> {seen}")
    return "\n".join(lines)


def format_lens(r: Lens) -> str:
    lines = ["logit lens: the likeliest next tokens read from each layer (final norm, then W_U)"]
    for pos, token in enumerate(r.tokens):
        lines.append(f"after {token!r} (position {pos}):")
        for name, layer in zip(r.layers, r.top):
            guesses = ", ".join(f"{s.token!r} {s.score:.2f}" for s in layer[pos])
            lines.append(f"  {name:<12} {guesses}")
    return "\n".join(lines)


def format_tally(rows: list[TallyRow]) -> str:
    """A plain-text table with counts, share of the total, and shapes."""
    total = sum(r.count for r in rows)
    lines = [f"{'component':<24}{'parameters':>18}{'share':>8}  shapes"]
    for r in rows:
        shapes = ", ".join("x".join(str(d) for d in s) for s in r.shapes)
        share = f"{100 * r.count / total:.1f}%" if total else "-"
        count = f"{r.count:,}"
        if r.shared_with:
            count, share = "0", "tied"
            shapes += f" (shared with {r.shared_with})"
        lines.append(f"{r.component:<24}{count:>18}{share:>8}  {shapes}")
    lines.append(f"{'total':<24}{total:>18,}{'100%':>8}")
    return "\n".join(lines)


def _vector(values: list[float], shown: int = 8) -> str:
    """The first numbers of a vector, and its size and length."""
    head = " ".join(f"{v:+.3f}" for v in values[:shown])
    more = " ..." if len(values) > shown else ""
    length = sum(v * v for v in values) ** 0.5
    return f"[{head}{more}] ({len(values)} numbers, length {length:.3f})"


def _scored(rows: list[Scored], digits: int = 3) -> str:
    return ", ".join(f"{s.token!r} {s.score:.{digits}f}" for s in rows)


def _shapes(shapes: list[list[int]]) -> str:
    return ", ".join("x".join(str(d) for d in s) for s in shapes) or "none"


def _uses(p: Params) -> list[str]:
    """What a step's parameters are here and in GPT-3."""
    def side(count: int, shapes: list[list[int]], layers: int, tied: str | None) -> str:
        if tied:
            return f"tied to its {tied} ({_shapes(shapes)})"
        if not count:
            return "none (rotary positions are computed, not learned)"
        return f"{_shapes(shapes)} = {count:,}" + (f" per layer x {layers}" if layers > 1 else "")
    label = p.component if p.name in p.component else f"{p.name} ({p.component})"
    return [f"  uses {label}",
            f"    this model: {side(p.count, p.shapes, p.layers, p.tied_to)}",
            f"    GPT-3:      {side(p.gpt3_count, p.gpt3_shapes, p.gpt3_layers, p.gpt3_tied_to)}"]


def _stage_lines(s: Any, tokens: list[str]) -> list[str]:
    """The numbers of one stage, below its caption."""
    if s.stage == "tokens":
        return ["  " + " ".join(f"{t.text!r}={t.id}" for t in s.tokens)]
    if s.stage == "embedding":
        V, C = s.params[0].shapes[0][0], len(s.row)  # W_E: (V, C)
        check = "equal, computed" if s.one_hot_equals_row else "NOT equal"
        return [f"  one_hot({s.token.id}) [1 x {V}] @ W_E [{V} x {C}] = W_E[{s.token.id}]: {check}",
                f"  W_E[{s.token.id}] = {_vector(s.row)}",
                f"  nearest rows (cosine): {_scored(s.nearest)}"]
    if s.stage == "position":
        lines = [f"  W_pos[{s.position}] = {_vector(s.row)}"] if s.kind == "learned" else [
            f"  layer 0's query at position {s.position}, pair by pair:",
            f"    {'pair':>6}{'rad/position':>14}{'angle':>10}  before -> after"]
        for r in s.rotations:
            lines.append(f"    {r.pair:>6}{r.frequency:>14.4g}{r.angle:>10.3f}  "
                         f"({r.before[0]:+.3f}, {r.before[1]:+.3f}) -> "
                         f"({r.after[0]:+.3f}, {r.after[1]:+.3f})")
        return [*lines, f"  entering block 0: {_vector(s.entering)}"]
    if s.stage == "attention":
        row = s.pattern[s.head]
        order = sorted(range(len(row)), key=lambda j: row[j], reverse=True)[:8]
        return [f"  head {s.head}'s weights: " + ", ".join(
                    f"{tokens[j]!r}@{j} {row[j]:.2f}" for j in order),
                "  wrote the most (all heads): " + ", ".join(
                    f"{src.token!r}@{src.position} {src.size:.3f}" for src in s.sources),
                f"  logit lens after it: {_scored(s.lens, 2)}"]
    if s.stage == "mlp":
        lines = [f"  {'neuron':>8}{'activation':>12}  promotes"]
        for n in s.neurons:
            lines.append(f"  {n.index:>8}{n.activation:>+12.3f}  " +
                         " ".join(repr(p.token) for p in n.promotes))
        return [*lines, f"  logit lens after it: {_scored(s.lens, 2)}"]
    if s.stage == "unembedding":
        lines = [f"  final vector / {s.scale:.3f} = {_vector(s.final)}",
                 f"  {'token':<16}{'dot':>10}{'+ bias':>10}{'= logit':>10}"]
        return lines + [f"  {t.token!r:<16}{t.dot:>10.3f}{t.bias:>10.3f}{t.logit:>10.3f}"
                        for t in s.top]
    if s.stage == "softmax":
        d = s.distribution
        temps = "".join(f"{'p@T=' + format(t, 'g'):>10}" for t in d.temperatures)
        lines = [f"  {'token':<16}{'logit':>10}{temps}"]
        for i, c in enumerate(d.tokens):
            lines.append(f"  {c.text!r:<16}{c.logit:>10.3f}" +
                         "".join(f"{p[i]:>10.4f}" for p in d.probs))
        return lines + [f"  {'(all others)':<26}" + "".join(f"{r:>10.4f}" for r in d.rest)]
    return [f"  drawn: {s.token.text!r} (id {s.token.id}), probability {s.prob:.4f}"]


def format_walk(r: Walk) -> str:
    tokens = [t.text for t in r.stages[0].tokens]
    lines = [f"one prediction, step by step ({r.n_params:,} parameters; GPT-3 has "
             f"{r.gpt3_params:,})"]
    for i, s in enumerate(r.stages, 1):
        where = f", layer {s.layer}" if s.stage in ("attention", "mlp") else ""
        lines += ["", f"[{i}/{len(r.stages)}] {s.stage}{where}", f"  {s.caption}",
                  *_stage_lines(s, tokens)]
        for p in getattr(s, "params", []):
            lines += _uses(p)
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="NAME",
                        help="a run or checkpoint dir, gpt2[-medium|-large|-xl], or a Hugging "
                             "Face GPT-2 dir (default: the newest checkpoint under out/)")
    source.add_argument("--hf-gpt2", metavar="DIR", dest="checkpoint",
                        help="GPT-2 weights in the Hugging Face layout (same as --checkpoint)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    plot = argparse.ArgumentParser(add_help=False)
    plot.add_argument("--out", metavar="FILE.png", help="where to write the plot")

    parser = argparse.ArgumentParser(prog="python -m model.explore", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("neighbors", parents=[common], help="nearest tokens in W_E")
    p.add_argument("word")
    p.add_argument("-k", type=int, default=10)
    p = sub.add_parser("analogy", parents=[common], help="A - B + C, e.g. king man woman")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("c")
    p.add_argument("-k", type=int, default=5)
    p = sub.add_parser("direction", parents=[common], help="project words on E(POS) - E(NEG)")
    p.add_argument("positive")
    p.add_argument("negative")
    p.add_argument("--words", required=True, help='words separated by spaces: "dog dogs house"')
    p = sub.add_parser("params", parents=[common], help="parameter count by component")
    p.add_argument("--preset", help="a named shape such as gpt2 or gpt3 (no memory allocated)")
    p = sub.add_parser("next", parents=[common, plot], help="next-token distribution")
    p.add_argument("prompt")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("-k", type=int, default=10)
    p = sub.add_parser("attention", parents=[common, plot], help="attention heatmap")
    p.add_argument("prompt")
    p.add_argument("--layer", type=int, help="default: the last layer")
    p.add_argument("--head", type=int, help="default: the mean over heads")
    p = sub.add_parser("lens", parents=[common], help="the logit lens")
    p.add_argument("prompt")
    p.add_argument("-k", type=int, default=3)
    p = sub.add_parser("walk", parents=[common],
                       help="one prediction, step by step through the network")
    p.add_argument("prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="the sample's; 0 is greedy")
    p.add_argument("--seed", type=int, help="the same seed draws the same token")
    p.add_argument("--head", type=int, help="default: in each layer the head that wrote most")
    p.add_argument("-k", type=int, default=5, help="tokens, sources and neurons per step")
    return parser


def _params(args: argparse.Namespace) -> tuple[Any, str]:
    if args.preset:
        target = GPTConfig.from_preset(args.preset)  # tallied on the meta device: no memory
    else:
        target = load_named_model(args.checkpoint, args.device).model
    rows = parameter_tally(target)
    data = {"rows": [asdict(r) for r in rows], "total": sum(r.count for r in rows)}
    return data, format_tally(rows)


def run(argv: list[str] | None = None) -> int:
    """Parse, compute, print; user errors raise SmallGPTError (see `main`)."""
    args = build_parser().parse_args(argv)
    if args.command == "params":
        data, text = _params(args)
        print(json.dumps(data, indent=2) if args.json else text)
        return 0
    loaded = load_named_model(args.checkpoint, args.device)
    model, tok = loaded.model, loaded.tokenizer
    # Plots go beside a smallgpt run's checkpoints; GPT-2 weights have no run, so the cwd.
    run_dir = loaded.path.parent if loaded.kind == "smallgpt" else Path(".")
    png = None
    if args.command == "neighbors":
        result = neighbors(model, tok, args.word, args.k)
        text = format_neighbors(result)
    elif args.command == "analogy":
        result = analogy(model, tok, args.a, args.b, args.c, k=args.k)
        text = format_analogy(result)
    elif args.command == "direction":
        result = direction(model, tok, args.positive, args.negative, args.words.split())
        text = format_direction(result)
    elif args.command == "next":
        result = next_token(model, tok, args.prompt, args.temperatures, args.k)
        text = format_next(result)
        png = plot_next_token(result, Path(args.out or run_dir / "next.png"))
    elif args.command == "attention":
        result = attention(model, tok, args.prompt, args.layer, args.head)
        text = format_attention(result)
        png = plot_attention(result, Path(args.out or run_dir / "attention.png"))
    elif args.command == "walk":
        result = walk(model, tok, args.prompt, temperature=args.temperature, seed=args.seed,
                      head=args.head, k=args.k)
        text = format_walk(result)
    else:
        result = logit_lens(model, tok, args.prompt, args.k)
        text = format_lens(result)
    if args.json:
        data = to_jsonable(result)
        if png is not None:
            data["png"] = str(png)
        print(json.dumps(data, indent=2))
    else:
        print(text)
        if png is not None:
            print(f"plot written to {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(argv))
