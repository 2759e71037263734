"""Look inside a trained GPT: embedding neighbours, analogies and directions, the next-token
distribution, attention maps, and the logit lens. Works on any smallgpt checkpoint and on GPT-2
weights imported with `GPT.from_hf_gpt2`.

    python -m model.explore neighbors king --checkpoint out/small
    python -m model.explore analogy king man woman
    python -m model.explore direction cats cat --words "dog dogs house houses"
    python -m model.explore params --preset gpt3
    python -m model.explore next "The cat sat on the" --temperatures 0.5 1 2
    python -m model.explore attention "The cat sat on the mat" --layer 0 --head 1
    python -m model.explore lens "The cat sat on the"

Words. BPE tokenizers (gpt2, bpe) spell a word in the middle of a sentence with its leading
space (" king"), and that form is what the model saw most often. So a word is looked up as
" word" when that is one token, else as typed when that is one token, else in whichever form
needs fewer tokens; the output names the form used. A word that is several tokens is the mean
of its tokens' W_E rows, and the output says so and lists the pieces.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import CheckpointError, ConfigError, SamplingError, TokenizerError

if TYPE_CHECKING:
    from .gpt import GPT
    from .tokenizer import Tokenizer


# -- words and their vectors ---------------------------------------------------------------------
@dataclass
class WordVector:
    """A word as the model sees it: the text encoded, its token ids and pieces, and W_E's vector."""

    word: str  # as the user typed it
    form: str  # the text that was encoded, e.g. " king"
    ids: list[int]
    pieces: list[str]
    vector: torch.Tensor = field(repr=False)  # (n_embd,): the W_E row, or the mean of the rows

    @property
    def multi_token(self) -> bool:
        return len(self.ids) > 1

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "form": self.form, "ids": self.ids, "pieces": self.pieces,
                "multi_token": self.multi_token}

    def describe(self) -> str:
        """One line for the text output, naming the form used and, if several, the pieces."""
        if self.multi_token:
            pieces = " + ".join(repr(p) for p in self.pieces)
            return (f"{self.word!r} as {self.form!r} is {len(self.ids)} tokens, {pieces}: "
                    "using the mean of their vectors")
        return f"{self.word!r} as {self.form!r} is one token (id {self.ids[0]})"


def embedding_matrix(model: GPT) -> torch.Tensor:
    """W_E as float32 (V, n_embd): row i is token i's vector."""
    return model.tok_emb.weight.detach().float()


def _encode(tokenizer: Tokenizer, text: str) -> list[int] | None:
    try:
        return tokenizer.encode(text)
    except TokenizerError:
        return None


def word_vector(model: GPT, tokenizer: Tokenizer, word: str) -> WordVector:
    """Tokenize `word` (preferring its leading-space form, see the module docstring) and return
    its W_E row, or the mean of its rows when it is several tokens."""
    if not word.strip():
        raise TokenizerError("a word is empty; give a word such as king")
    forms = [word] if word[0].isspace() else [" " + word, word]
    encoded = {form: ids for form in forms if (ids := _encode(tokenizer, form))}
    if not encoded:
        try:
            tokenizer.encode(word)  # to report the tokenizer's own reason (unknown characters)
        except TokenizerError as exc:
            raise TokenizerError(f"word {word!r}: {exc}") from exc
        raise TokenizerError(f"word {word!r} encodes to no tokens")
    singles = [form for form in forms if len(encoded.get(form, ())) == 1]
    form = singles[0] if singles else min(encoded, key=lambda f: len(encoded[f]))
    ids = encoded[form]
    vector = embedding_matrix(model)[ids].mean(dim=0)
    return WordVector(word, form, ids, [tokenizer.token_text(i) for i in ids], vector)


@dataclass
class Scored:
    """A token and a number: a similarity, a dot product, a logit or a probability."""

    id: int
    token: str
    score: float


def nearest(matrix: torch.Tensor, query: torch.Tensor, k: int, exclude: set[int],
            tokenizer: Tokenizer) -> list[Scored]:
    """The k rows of `matrix` with the highest cosine similarity to `query`, skipping `exclude`."""
    if k < 1:
        raise ConfigError(f"-k: must be >= 1, got {k}")
    sims = F.cosine_similarity(matrix, query[None, :], dim=-1)  # (V,)
    if exclude:
        sims[list(exclude)] = float("-inf")
    k = min(k, matrix.size(0) - len(exclude))
    top = sims.topk(k)
    return [Scored(i, tokenizer.token_text(i), s)
            for i, s in zip(top.indices.tolist(), top.values.tolist())]


# -- neighbours, analogies, directions -----------------------------------------------------------
@dataclass
class Neighbors:
    query: WordVector
    neighbors: list[Scored]  # score: cosine similarity


def neighbors(model: GPT, tokenizer: Tokenizer, word: str, k: int = 10) -> Neighbors:
    """The k tokens whose W_E rows point most nearly the same way as the word's (cosine
    similarity), leaving out the word's own tokens, which would trivially come first."""
    query = word_vector(model, tokenizer, word)
    found = nearest(embedding_matrix(model), query.vector, k, set(query.ids), tokenizer)
    return Neighbors(query, found)


@dataclass
class Analogy:
    words: list[WordVector]  # A, B, C
    answers: list[Scored]  # score: cosine similarity to E(A) - E(B) + E(C)


def analogy(model: GPT, tokenizer: Tokenizer, a: str, b: str, c: str, k: int = 5) -> Analogy:
    """A is to B as ? is to C: the tokens nearest to E(A) - E(B) + E(C), excluding the three
    words' own tokens (otherwise A or C usually wins: the offset B -> C is small)."""
    wa, wb, wc = (word_vector(model, tokenizer, w) for w in (a, b, c))
    target = wa.vector - wb.vector + wc.vector
    exclude = set(wa.ids) | set(wb.ids) | set(wc.ids)
    return Analogy([wa, wb, wc], nearest(embedding_matrix(model), target, k, exclude, tokenizer))


@dataclass
class Projection:
    word: WordVector
    dot: float  # E(word) . (E(POS) - E(NEG))
    cosine: float  # the same, with both vectors scaled to length 1


@dataclass
class Direction:
    positive: WordVector
    negative: WordVector
    norm: float  # |E(POS) - E(NEG)|
    projections: list[Projection]  # sorted, highest dot product first


def direction(model: GPT, tokenizer: Tokenizer, positive: str, negative: str,
              words: list[str]) -> Direction:
    """The direction E(POS) - E(NEG) (cats - cat: "plural") and each word's dot product with it:
    the higher, the more the word leans towards POS."""
    if not words:
        raise ConfigError('--words: the word list is empty; give words, e.g. --words "dog dogs"')
    pos, neg = word_vector(model, tokenizer, positive), word_vector(model, tokenizer, negative)
    d = pos.vector - neg.vector
    projections = []
    for w in words:
        wv = word_vector(model, tokenizer, w)
        cos = F.cosine_similarity(wv.vector, d, dim=0).item()
        projections.append(Projection(wv, (wv.vector @ d).item(), cos))
    projections.sort(key=lambda p: p.dot, reverse=True)
    return Direction(pos, neg, d.norm().item(), projections)


# -- prompts: next token, attention, logit lens --------------------------------------------------
def encode_prompt(model: GPT, tokenizer: Tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) token ids; an empty prompt is the end-of-text token, where documents start."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    if len(ids) > model.config.block_size:
        raise ConfigError(
            f"the prompt is {len(ids)} tokens, longer than the context size "
            f"model.block_size={model.config.block_size}; shorten it")
    return torch.tensor([ids], dtype=torch.long, device=model.tok_emb.weight.device)


def _pieces(tokenizer: Tokenizer, idx: torch.Tensor) -> list[str]:
    return [tokenizer.token_text(i) for i in idx[0].tolist()]


@dataclass
class NextToken:
    prompt: list[str]  # the prompt's tokens
    temperatures: list[float]
    top: list[Scored]  # score: the logit; the k highest, which are the most likely at any T
    probs: list[list[float]]  # probs[j][i]: top[i]'s probability at temperatures[j]
    other: list[float]  # other[j]: the probability of every token not shown, at temperatures[j]


@torch.no_grad()
def next_token(model: GPT, tokenizer: Tokenizer, prompt: str,
               temperatures: tuple[float, ...] | list[float] = (0.5, 1.0, 2.0),
               k: int = 10) -> NextToken:
    """The distribution over the token after `prompt`: the logits, then softmax(logits / T)
    for each temperature T. Dividing by T < 1 sharpens the distribution, T > 1 flattens it."""
    if k < 1:
        raise ConfigError(f"-k: must be >= 1, got {k}")
    for t in temperatures:
        if t <= 0:
            raise SamplingError(f"--temperatures: each must be > 0, got {t}")
    idx = encode_prompt(model, tokenizer, prompt)
    logits, _ = model(idx)
    last = logits[0, -1].float()  # (V,): only the last position predicts the unseen next token
    top = last.topk(min(k, last.numel()))
    ids = top.indices.tolist()
    probs, other = [], []
    for t in temperatures:
        p = (last / t).softmax(dim=-1)
        probs.append(p[ids].tolist())
        other.append(max(0.0, 1.0 - p[ids].sum().item()))
    shown = [Scored(i, tokenizer.token_text(i), v) for i, v in zip(ids, top.values.tolist())]
    return NextToken(_pieces(tokenizer, idx), list(temperatures), shown, probs, other)


@dataclass
class AttentionMap:
    tokens: list[str]
    layer: int
    head: int | None  # None: the mean over heads
    n_heads: int
    weights: list[list[float]]  # (T, T): row = the attending position, column = attended


def _check_index(kind: str, value: int, count: int) -> None:
    if not 0 <= value < count:
        raise ConfigError(
            f"--{kind}: {value} is out of range; this model has {kind}s 0 to {count - 1}")


def attention(model: GPT, tokenizer: Tokenizer, prompt: str, layer: int | None = None,
              head: int | None = None) -> AttentionMap:
    """Attention weights of one layer (default: the last) for one head or averaged over heads.

    Computed explicitly by `GPT.trace`: training keeps the fused kernel, which never
    materialises the (T, T) matrix."""
    c = model.config
    layer = c.n_layer - 1 if layer is None else layer
    _check_index("layer", layer, c.n_layer)
    if head is not None:
        _check_index("head", head, c.n_head)
    idx = encode_prompt(model, tokenizer, prompt)
    weights = model.trace(idx).attention[layer][0].float()  # (H, T, T)
    matrix = weights.mean(dim=0) if head is None else weights[head]
    return AttentionMap(_pieces(tokenizer, idx), layer, head, c.n_head, matrix.tolist())


@dataclass
class Lens:
    tokens: list[str]
    layers: list[str]  # "embeddings", then "block 0" ... "block n-1"
    top: list[list[list[Scored]]]  # top[layer][position]: the k likeliest next tokens, score = p
    logits: torch.Tensor = field(repr=False)  # (layers, T, V): the lens logits


@torch.no_grad()
def logit_lens(model: GPT, tokenizer: Tokenizer, prompt: str, k: int = 3) -> Lens:
    """Read the residual stream after the embeddings and after each block as if it were the last:
    apply the final norm and W_U. The prediction forms layer by layer.

    The residual stream comes from `GPT.trace`, so the last row is the model's own output."""
    if k < 1:
        raise ConfigError(f"-k: must be >= 1, got {k}")
    idx = encode_prompt(model, tokenizer, prompt)
    stream = model.trace(idx).hidden
    logits = torch.stack([model.lm_head(model.norm_f(x))[0] for x in stream])  # (L+1, T, V)
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.size(-1)), dim=-1)  # (L+1, T, k)
    top = [[[Scored(i, tokenizer.token_text(i), v) for i, v in zip(ids, vals)]
            for ids, vals in zip(layer_ids, layer_vals)]
           for layer_ids, layer_vals in zip(indices.tolist(), values.tolist())]
    names = ["embeddings"] + [f"block {i}" for i in range(len(model.blocks))]
    return Lens(_pieces(tokenizer, idx), names, top, logits)


# -- loading -------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: GPT
    tokenizer: Tokenizer
    source: str  # what was loaded, for messages
    run_dir: Path  # where plots go by default


def load_for_explore(checkpoint: str | None = None, hf_gpt2: str | None = None,
                     device: str = "cpu") -> Loaded:
    """A smallgpt checkpoint (default: the newest under out/), or GPT-2 weights in the Hugging
    Face layout with tiktoken's gpt2 tokenizer."""
    from .checkpoint import find_checkpoints, load_checkpoint
    from .hf import load_hf_gpt2
    from .runtime import pick_device
    from .tokenizer import tokenizer_from_spec

    dev = pick_device(device, setting="--device")
    if hf_gpt2 is not None:
        model = load_hf_gpt2(hf_gpt2).to(dev).eval()
        return Loaded(model, tokenizer_from_spec({"name": "gpt2"}), str(hf_gpt2), Path("."))
    if checkpoint is None:
        found = find_checkpoints("out")
        if not found:
            raise CheckpointError("no checkpoint under out/; train one (python train.py "
                                  "--config tiny.yaml) or pass --checkpoint or --hf-gpt2")
        checkpoint = str(found[0])
        print(f"using the newest checkpoint: {checkpoint}", file=sys.stderr)
    ckpt = load_checkpoint(checkpoint, dev)
    return Loaded(ckpt.model, ckpt.tokenizer, str(ckpt.path), ckpt.path.parent)


# -- text output ---------------------------------------------------------------------------------
def _table(rows: list[Scored], label: str) -> list[str]:
    lines = [f"  {'rank':>4}  {'token':<20}{'id':>8}  {label}"]
    for rank, s in enumerate(rows, 1):
        lines.append(f"  {rank:>4}  {s.token!r:<20}{s.id:>8}  {s.score:+.4f}")
    return lines


def format_neighbors(r: Neighbors) -> str:
    return "\n".join([r.query.describe(), "nearest tokens by cosine similarity of W_E rows:",
                      *_table(r.neighbors, "cosine")])


def format_analogy(r: Analogy) -> str:
    a, b, c = r.words
    head = [w.describe() for w in r.words if w.multi_token]
    head.append(f"{a.form!r} - {b.form!r} + {c.form!r} is nearest to (A, B, C left out):")
    return "\n".join([*head, *_table(r.answers, "cosine")])


def format_direction(r: Direction) -> str:
    lines = [w.describe() for w in (r.positive, r.negative) if w.multi_token]
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


def _jsonable(obj: Any) -> Any:
    """Dataclasses to dicts, dropping tensors and adding WordVector's multi_token flag."""
    if isinstance(obj, WordVector):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return {f: _jsonable(getattr(obj, f)) for f in obj.__dataclass_fields__
                if not isinstance(getattr(obj, f), torch.Tensor)}
    if isinstance(obj, list):
        return [_jsonable(x) for x in obj]
    return obj


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", help="checkpoint or run dir (default: newest in out/)")
    common.add_argument("--hf-gpt2", metavar="DIR", help="GPT-2 weights in the Hugging Face layout")
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
    return parser


def _params(args: argparse.Namespace) -> tuple[Any, str]:
    from .config import GPTConfig
    from .tally import format_tally, parameter_tally

    if args.preset:
        target = GPTConfig.from_preset(args.preset)  # tallied on the meta device: no memory
    else:
        target = load_for_explore(args.checkpoint, args.hf_gpt2, args.device).model
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
    loaded = load_for_explore(args.checkpoint, args.hf_gpt2, args.device)
    model, tok = loaded.model, loaded.tokenizer
    png = None
    if args.command == "neighbors":
        result = neighbors(model, tok, args.word, args.k)
        text = format_neighbors(result)
    elif args.command == "analogy":
        result = analogy(model, tok, args.a, args.b, args.c, args.k)
        text = format_analogy(result)
    elif args.command == "direction":
        result = direction(model, tok, args.positive, args.negative, args.words.split())
        text = format_direction(result)
    elif args.command == "next":
        from .plots import plot_next_token

        result = next_token(model, tok, args.prompt, args.temperatures, args.k)
        text = format_next(result)
        png = plot_next_token(result, Path(args.out or loaded.run_dir / "next.png"))
    elif args.command == "attention":
        from .plots import plot_attention

        result = attention(model, tok, args.prompt, args.layer, args.head)
        text = format_attention(result)
        png = plot_attention(result, Path(args.out or loaded.run_dir / "attention.png"))
    else:
        result = logit_lens(model, tok, args.prompt, args.k)
        text = format_lens(result)
    if args.json:
        data = _jsonable(result)
        if png is not None:
            data["png"] = str(png)
        print(json.dumps(data, indent=2))
    else:
        print(text)
        if png is not None:
            print(f"plot written to {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_cli

    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
