"""Look inside a GPT: embedding neighbours, analogies and directions, the next-token distribution,
attention maps and the logit lens. Each function returns a dataclass; `python -m model.explore`
prints them and the web playground serves them.

Words. BPE tokenizers (gpt2, bpe) spell a word in the middle of a sentence with its leading
space (" king"), and that form is what the model saw most often. So a word is looked up as
" word" when that is one token, else as typed when that is one token, else in whichever form
needs fewer tokens; the result names the form used. A word that is several tokens is the mean
of its tokens' W_E rows, and the result lists the pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from model.errors import ConfigError, SamplingError, TokenizerError
from model.inference.sampling import distribution, encode_prompt, without_padding

if TYPE_CHECKING:
    from model.data.tokenizer import Tokenizer
    from model.gpt import GPT


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


def embedding_matrix(model: GPT) -> torch.Tensor:
    """W_E as float32 (V, n_embd): row i is token i's vector."""
    return model.W_E.detach().float()


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


def _check_k(k: int) -> None:
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")


def nearest(matrix: torch.Tensor, query: torch.Tensor, k: int, exclude: set[int],
            tokenizer: Tokenizer) -> list[Scored]:
    """The k rows of `matrix` with the highest cosine similarity to `query`, skipping `exclude`."""
    _check_k(k)
    # One matrix-vector product: F.cosine_similarity would broadcast the query over all V rows
    # (several times slower for GPT-2's 50257 x 768).
    sims = (matrix @ query) / (matrix.norm(dim=-1) * query.norm()).clamp_min(1e-8)  # (V,)
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


def analogy(model: GPT, tokenizer: Tokenizer, a: str, b: str, c: str, *, k: int = 5) -> Analogy:
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
        raise ConfigError('words: the word list is empty; give words, e.g. "dog dogs"')
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
def _prompt_ids(model: GPT, tokenizer: Tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) token ids. Unlike generation, analysis never crops: the result is about every
    token of the prompt, so a prompt longer than the context is an error."""
    ids = encode_prompt(tokenizer, prompt, model.config.block_size, on_overflow="error")
    return torch.tensor([ids], dtype=torch.long, device=model.W_E.device)


def _pieces(tokenizer: Tokenizer, idx: torch.Tensor) -> list[str]:
    return [tokenizer.token_text(i) for i in idx[0].tolist()]


@dataclass
class NextToken:
    prompt: list[str]  # the prompt's tokens
    temperatures: list[float]
    top: list[Scored]  # score: the logit; the k highest, which are the most likely at any T
    probs: list[list[float]]  # probs[j][i]: top[i]'s probability at temperatures[j]
    other: list[float]  # other[j]: the probability of every token not shown, at temperatures[j]


def next_token(model: GPT, tokenizer: Tokenizer, prompt: str,
               temperatures: tuple[float, ...] | list[float] = (0.5, 1.0, 2.0),
               k: int = 10) -> NextToken:
    """The distribution over the token after `prompt`: the logits, then softmax(logits / T)
    for each temperature T (sampling.distribution). Dividing by T < 1 sharpens the
    distribution, T > 1 flattens it."""
    _check_k(k)
    for t in temperatures:
        if t <= 0:
            raise SamplingError(f"temperatures: each must be > 0, got {t}")
    ids = encode_prompt(tokenizer, prompt, model.config.block_size, on_overflow="error")
    found = distribution(model, tokenizer, ids, temperatures=temperatures, k=k)
    top = [Scored(c.id, c.text, c.logit) for c in found.tokens]
    return NextToken([tokenizer.token_text(i) for i in ids], found.temperatures, top,
                     found.probs, found.rest)


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
            f"{kind} {value} is out of range; this model has {kind}s 0 to {count - 1}")


@torch.no_grad()
def attention(model: GPT, tokenizer: Tokenizer, prompt: str, layer: int | None = None,
              head: int | None = None) -> AttentionMap:
    """Attention weights of one layer (default: the last) for one head or averaged over heads.

    Read from the hook point `blocks.{layer}.attn.hook_pattern`: hooking it makes that layer
    compute the (T, T) matrix explicitly, which the fused kernel used otherwise never stores."""
    c = model.config
    layer = c.n_layer - 1 if layer is None else layer
    _check_index("layer", layer, c.n_layer)
    if head is not None:
        _check_index("head", head, c.n_head)
    idx = _prompt_ids(model, tokenizer, prompt)
    name = f"blocks.{layer}.attn.hook_pattern"
    weights = model.run_with_cache(idx, names_filter=name)[1][name][0].float()  # (H, T, T)
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

    The residual streams are the hook points `hook_resid_pre` of each block and the last
    `hook_resid_post`, so the last row is the model's own output."""
    _check_k(k)
    idx = _prompt_ids(model, tokenizer, prompt)
    _, cache = model.run_with_cache(idx, names_filter=lambda name: "hook_resid_p" in name)
    # Before each block, then the last: one entry at a time, as the forward pass computes it,
    # so the last row is bit-exact.
    logits = cache.logit_lens(positions=None).values[:, 0]  # (L+1, T, V)
    probs = without_padding(logits.float(), tokenizer.vocab_size).softmax(dim=-1)
    values, indices = probs.topk(min(k, tokenizer.vocab_size), dim=-1)  # (L+1, T, k)
    top = [[[Scored(i, tokenizer.token_text(i), v) for i, v in zip(ids, vals)]
            for ids, vals in zip(layer_ids, layer_vals)]
           for layer_ids, layer_vals in zip(indices.tolist(), values.tolist())]
    names = ["embeddings"] + [f"block {i}" for i in range(model.config.n_layer)]
    return Lens(_pieces(tokenizer, idx), names, top, logits)


def to_jsonable(result: Any) -> Any:
    """A result as plain dicts and lists (for JSON): tensors are left out, and each WordVector
    says whether it is several tokens."""
    if isinstance(result, WordVector):
        return result.to_dict()
    if hasattr(result, "__dataclass_fields__"):
        return {f: to_jsonable(getattr(result, f)) for f in result.__dataclass_fields__
                if not isinstance(getattr(result, f), torch.Tensor)}
    if isinstance(result, list):
        return [to_jsonable(x) for x in result]
    return result
