"""One prediction walked through the network, with the numbers of the model in hand, from one
forward pass (`run_with_cache`):

    tokens -> embedding (a row of W_E) -> position -> per layer: attention, then MLP
           -> unembedding (final norm, W_U) -> softmax (temperature) -> sample

`walk` returns a Walk: a dataclass per stage, in that order, each with `stage` (its name),
`caption` (what the step does, with this model's numbers) and, where the step uses weights,
`params`: their shapes and counts beside the same part of GPT-3 (model.inference.tally). The
page (POST /api/walk) and `python -m model.explore walk` show the same data.

How the numbers are read. Attention: head h's weights are the last row of `hook_pattern`; the
layer's output at the last position is exactly the sum over sources j and heads h of
pattern[h, j] * v[j, h] @ W_O[h], plus the output bias, so "what token j wrote" is that term.
MLP: a neuron writes its activation times its row of W_out; the tokens it promotes are those
whose logits that vector raises most directly (the final norm held at its scale, then W_U). The
logit lens after a step reads the stream there as if it were the last (final norm, W_U). A
logit is the normalized final vector's dot product with the token's row of W_U scaled by the
norm's weight, plus the norm's bias term (TransformerLens's folded form).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from model.errors import SamplingError
from model.gpt import GPTConfig, rope_tables
from model.inference.analysis import Scored, _check_index, _check_k, embedding_matrix, nearest
from model.inference.sampling import (
    Distribution,
    SamplingParams,
    distribution_from_logits,
    encode_prompt,
    sample_next,
    without_padding,
)
from model.inference.tally import COMPONENTS, TallyRow, parameter_tally

if TYPE_CHECKING:
    from model.data.tokenizer import Tokenizer
    from model.gpt import GPT


# -- what a stage holds ---------------------------------------------------------------------------
@dataclass
class Token:
    id: int
    text: str  # tokenizer.token_text


@dataclass
class Params:  # the weights a step uses, beside the same part of GPT-3 (the tally's rows)
    name: str  # by TransformerLens's names: "W_E", "W_Q, W_K, W_V, W_O", ...
    component: str  # the tally's row, e.g. "attention"
    shapes: list[list[int]]  # this model's tensors: one layer's, for a part of a block
    count: int  # parameters this step uses (one layer's); 0 where the tensor is another's
    layers: int  # how many such steps the network has: n_layer for a block's part, else 1
    gpt3_shapes: list[list[int]]
    gpt3_count: int
    gpt3_layers: int
    tied_to: str | None = None  # the component whose tensor this is (a tied W_U)
    gpt3_tied_to: str | None = None


@dataclass
class TokensStage:
    stage: str = field(default="tokens", init=False)
    caption: str
    tokens: list[Token]
    text: str  # the tokens decoded, a first end-of-text token (a document's start) left out


@dataclass
class EmbeddingStage:
    stage: str = field(default="embedding", init=False)
    caption: str
    token: Token
    row: list[float]  # W_E[token]: n_embd numbers
    nearest: list[Scored]  # score: cosine similarity with the row
    one_hot_equals_row: bool  # one_hot(token) @ W_E, computed, equals the row looked up
    params: list[Params]


@dataclass
class Rotation:  # one pair of a query's numbers, turned by rotary positions
    pair: int  # numbers pair and pair + head_dim / 2 turn together
    frequency: float  # radians per position
    angle: float  # radians: position * frequency
    before: list[float]
    after: list[float]


@dataclass
class PositionStage:
    stage: str = field(default="position", init=False)
    caption: str
    kind: str  # "learned" or "rope"
    position: int  # the last token's
    row: list[float] | None  # learned: W_pos[position]
    rotations: list[Rotation]  # rope: layer 0's query of the chosen head
    entering: list[float]  # the vector entering block 0
    params: list[Params]


@dataclass
class Source:
    position: int
    token: str
    weight: float  # the chosen head's attention to this token
    size: float  # |what all heads wrote from this token| into the last position


@dataclass
class AttentionStage:
    stage: str = field(default="attention", init=False)
    caption: str
    layer: int
    head: int  # asked for, or the head that wrote the most
    pattern: list[list[float]]  # (n_head, T): each head's weights for the last token
    written: list[list[float]]  # (n_head, T): |what head h wrote from token j|
    sources: list[Source]  # the k tokens that wrote the most, largest first
    update_norm: float  # |the layer's output at the last position|
    lens: list[Scored]  # the logit lens after this attention: score = probability
    params: list[Params]


@dataclass
class Neuron:
    index: int
    activation: float
    promotes: list[Scored]  # score: how much its write raises the token's logit directly


@dataclass
class MLPStage:
    stage: str = field(default="mlp", init=False)
    caption: str
    layer: int
    width: int  # neurons
    neurons: list[Neuron]  # the k most active (by |activation|), most active first
    update_norm: float
    lens: list[Scored]  # the logit lens after this MLP (after the last: the model's output)
    params: list[Params]


@dataclass
class LogitTerm:
    id: int
    token: str
    logit: float
    dot: float  # normalized final vector . (W_U row * the final norm's weight)
    bias: float  # the final norm's bias . W_U row (0 without a bias): logit = dot + bias


@dataclass
class UnembeddingStage:
    stage: str = field(default="unembedding", init=False)
    caption: str
    scale: float  # the final norm divided the vector by this
    final: list[float]  # the normalized final vector (before the norm's weight and bias)
    top: list[LogitTerm]  # the k highest logits
    params: list[Params]


@dataclass
class SoftmaxStage:
    stage: str = field(default="softmax", init=False)
    caption: str
    temperature: float  # the sample's
    distribution: Distribution  # the k likeliest at each of the temperatures asked for


@dataclass
class SampleStage:
    stage: str = field(default="sample", init=False)
    caption: str
    token: Token
    prob: float  # in the distribution it was drawn from
    temperature: float
    seed: int | None


@dataclass
class Walk:
    stages: list[Any]  # the *Stage dataclasses, in the order of the module docstring
    n_params: int
    gpt3_params: int


# -- parameters beside GPT-3's -------------------------------------------------------------------
@functools.cache
def _gpt3() -> tuple[dict[str, TallyRow], int]:
    """GPT-3's tally (built on the meta device, no memory) by component, and its layers."""
    config = GPTConfig.from_preset("gpt3")
    return {r.component: r for r in parameter_tally(config)}, config.n_layer


def _uses(rows: dict[str, TallyRow], part: str, name: str, layers: int) -> Params:
    """The step's share of the tally's `part`: one layer's, when the part is per layer."""
    gpt3, gpt3_layers = _gpt3()
    component = COMPONENTS[part]
    ours, theirs = rows.get(component), gpt3[component]
    per_layer = part in ("attn", "mlp")
    return Params(name, component, [list(s) for s in ours.shapes] if ours else [],
                  ours.count // (layers if per_layer else 1) if ours else 0,
                  layers if per_layer else 1, [list(s) for s in theirs.shapes],
                  theirs.count // (gpt3_layers if per_layer else 1),
                  gpt3_layers if per_layer else 1, ours.shared_with if ours else None,
                  theirs.shared_with)


# -- the walk -----------------------------------------------------------------------------------
def _hook_names(model: GPT) -> set[str]:
    """What the walk reads, of the hook points this model has (rotary models have no
    hook_pos_embed, learned ones no hook_rot_q)."""
    names = {"hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre",
             "blocks.0.attn.hook_rot_q", "ln_final.hook_scale", "ln_final.hook_normalized"}
    names |= {f"blocks.{layer}.{name}" for layer in range(model.config.n_layer) for name in (
        "attn.hook_v", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out",
        "hook_resid_post")}
    return names & set(model.hook_dict)


def _top(values: torch.Tensor, k: int, tokenizer: Tokenizer) -> list[Scored]:
    top = values.topk(min(k, values.numel()))
    return [Scored(i, tokenizer.token_text(i), v)
            for i, v in zip(top.indices.tolist(), top.values.tolist())]


@torch.inference_mode()
def walk(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int] = "", *,
         temperature: float = 1.0, temperatures: Sequence[float] | None = None,
         top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
         head: int | None = None, k: int = 5) -> Walk:
    """Walk the prediction of the token after `prompt` (text or token ids; empty: the
    end-of-text token) through `model`, in one forward pass.

    The sample is drawn as `generate` draws its first token (temperature, top_k, top_p, seed;
    temperature 0 takes the likeliest); the softmax stage reports the distribution at each of
    `temperatures` (default: `temperature`, and 1). `head` picks the head each attention stage
    shows (default: in each layer the head that wrote the most into the last position). `k`
    is the length of every list: nearest tokens, sources, neurons, promoted tokens, lens.
    Like the other analyses, a prompt longer than the context is an error, not cropped."""
    c = model.config
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    temperatures = list(temperatures) if temperatures is not None else sorted({temperature, 1.0})
    for t in temperatures:
        if not 0 <= t < float("inf"):
            raise SamplingError(f"temperatures: each must be a number >= 0, got {t}")
    _check_k(k)
    if head is not None:
        _check_index("head", head, c.n_head)
    ids = encode_prompt(tokenizer, prompt, c.block_size, on_overflow="error")
    was_training = model.training
    model.eval()  # as generation predicts: no dropout
    try:
        return _walk(model, tokenizer, ids, params, temperatures=temperatures, head=head, k=k)
    finally:
        model.train(was_training)


def _walk(model: GPT, tokenizer: Tokenizer, ids: list[int], params: SamplingParams, *,
          temperatures: list[float], head: int | None, k: int) -> Walk:
    idx = torch.tensor([ids], dtype=torch.long, device=model.W_E.device)
    last_rows: dict[int, torch.Tensor] = {}

    def keep_last_row(pattern: torch.Tensor, hook: Any) -> None:
        # (B, H, T, T): only the last token's row is shown, so only it is kept.
        last_rows[hook.layer()] = pattern[0, :, -1].float()

    names = _hook_names(model)
    with model.hooks([(lambda name: name.endswith("attn.hook_pattern"), keep_last_row)]):
        logits, cache = model.run_with_cache(idx, names_filter=lambda name: name in names)
    logits = without_padding(logits[:, -1].float(), tokenizer.vocab_size)  # (1, V)

    rows = {r.component: r for r in parameter_tally(model)}
    text = [tokenizer.token_text(i) for i in ids]
    lens = _lens(model, tokenizer, cache, k)
    attention, mlp = _blocks(model, tokenizer, cache, last_rows, head=head, k=k, text=text,
                             lens=lens, rows=rows)
    stages: list[Any] = [_tokens(model, tokenizer, ids),
                         _embedding(model, tokenizer, cache, ids[-1], k=k, rows=rows),
                         _position(model, cache, attention[0].head, rows)]
    for pair in zip(attention, mlp):
        stages.extend(pair)
    stages.append(_unembedding(model, tokenizer, cache, logits[0], k=k, rows=rows))
    dist = distribution_from_logits(logits[0], tokenizer, temperatures=temperatures, k=k,
                                    top_k=params.top_k, top_p=params.top_p)
    stages.append(_softmax(dist, params.temperature, tokenizer.vocab_size))
    stages.append(_sample(tokenizer, logits, params))
    return Walk(stages, sum(r.count for r in rows.values()),
                sum(r.count for r in _gpt3()[0].values()))


def _tokens(model: GPT, tokenizer: Tokenizer, ids: list[int]) -> TokensStage:
    tokens = [Token(i, tokenizer.token_text(i)) for i in ids]
    caption = (f"The text is cut into {len(ids)} token{'s' * (len(ids) != 1)} of a vocabulary "
               f"of {tokenizer.vocab_size} ({tokenizer.name} tokenizer), at most "
               f"{model.config.block_size} at once. The model predicts a next token at every "
               f"position; this walk follows the last one, {tokens[-1].text!r} (id {ids[-1]}).")
    start = 1 if ids[0] == tokenizer.eot_id else 0
    return TokensStage(caption, tokens, tokenizer.decode(ids[start:]))


def _embedding(model: GPT, tokenizer: Tokenizer, cache: Any, token: int, *, k: int,
               rows: dict[str, TallyRow]) -> EmbeddingStage:
    table = embedding_matrix(model)[:tokenizer.vocab_size]  # (V, C): padding rows have no text
    row = cache["hook_embed"][0, -1].float()
    one_hot = F.one_hot(torch.tensor(token, device=table.device), table.size(0)).to(table.dtype)
    found = nearest(table, row, k, {token}, tokenizer)
    V, C = table.shape
    caption = (f"Token {token} picks row {token} of W_E, a table of {V} rows of {C} numbers: "
               f"the product of a one-hot vector ({V} numbers, all 0 but a 1 at {token}) with "
               f"W_E, which the model computes by looking the row up. Tokens whose rows point "
               f"the same way are what the model treats as alike; here {found[0].token!r} "
               f"is nearest.")
    return EmbeddingStage(caption, Token(token, tokenizer.token_text(token)), row.tolist(),
                          found, bool(torch.equal(one_hot @ table, row)),
                          [_uses(rows, "embed", "W_E", 1)])


def _position(model: GPT, cache: Any, head: int, rows: dict[str, TallyRow]) -> PositionStage:
    c = model.config
    entering = cache["resid_pre", 0][0, -1].float()
    T = cache["resid_pre", 0].size(1)
    params = [_uses(rows, "pos_embed", "W_pos", 1)]
    if c.pos_emb == "learned":
        caption = (f"W_E says which token this is, not where. A learned table W_pos "
                   f"({c.block_size} positions x {c.n_embd}) adds its row {T - 1}; the sum "
                   f"is the vector that enters block 0.")
        return PositionStage(caption, "learned", T - 1,
                             cache["hook_pos_embed"][0, -1].float().tolist(), [],
                             entering.tolist(), params)
    table = rope_tables(c.head_dim, max(T, 2), c.rope_base)  # (2, T, D/2): cos, sin
    frequency = torch.atan2(table[1, 1], table[0, 1])  # position 1's angle, below pi
    cos, sin = table[0, T - 1], table[1, T - 1]
    q = cache["blocks.0.attn.hook_rot_q"][0, -1, head].float().cpu()  # (D,), rotated
    half = c.head_dim // 2
    a, b = q[:half], q[half:]
    before = (a * cos + b * sin, b * cos - a * sin)  # turned back by the same angle
    rotations = [Rotation(i, frequency[i].item(), (T - 1) * frequency[i].item(),
                          [before[0][i].item(), before[1][i].item()], [a[i].item(), b[i].item()])
                 for i in sorted({0, 1, half // 2, half - 1})]
    caption = (f"Rotary positions add nothing to the vector, and have no parameters: in every "
               f"attention layer each head's query and key are turned, {half} pairs of numbers "
               f"each by position x its frequency (here position {T - 1}), so a query meets "
               f"each key at an angle that depends on how far apart they are. The W_E row "
               f"itself enters block 0.")
    return PositionStage(caption, "rope", T - 1, None, rotations, entering.tolist(), params)


def _lens(model: GPT, tokenizer: Tokenizer, cache: Any, k: int) -> list[list[Scored]]:
    """The logit lens at the last position after each attention and each MLP, in order."""
    stream = torch.stack([cache[name, layer][0, -1] for layer in range(model.config.n_layer)
                          for name in ("resid_mid", "resid_post")])  # (2L, C)
    probs = without_padding(model.unembed(stream).float(), tokenizer.vocab_size).softmax(-1)
    return [_top(p, k, tokenizer) for p in probs]


def _blocks(model: GPT, tokenizer: Tokenizer, cache: Any, last_rows: dict[int, torch.Tensor], *,
            head: int | None, k: int, text: list[str], lens: list[list[Scored]],
            rows: dict[str, TallyRow]) -> tuple[list[AttentionStage], list[MLPStage]]:
    c = model.config
    names = ("W_Q, W_K, W_V, W_O", "W_gate, W_in, W_out" if c.activation == "swiglu"
             else "W_in, W_out")
    attention, mlp, neurons = [], [], []
    for layer in range(c.n_layer):
        pattern = last_rows[layer]  # (H, T)
        v = cache["v", layer][0].float()  # (T, H_kv, D)
        v = v.repeat_interleave(c.n_head // v.size(1), dim=1)  # each query head's values
        z = pattern.T[:, :, None] * v  # (T, H, D): what head h takes from token j
        wrote = model.head_results(layer, z[None])[0].float()  # (T, H, C)
        h = head if head is not None else int(wrote.sum(0).norm(dim=-1).argmax())
        size = wrote.sum(1).norm(dim=-1)  # (T,): all heads
        order = size.topk(min(k, size.numel())).indices.tolist()
        sources = [Source(j, text[j], pattern[h, j].item(), size[j].item()) for j in order]
        update = cache["attn_out", layer][0, -1].float().norm().item()
        seen = lens[2 * layer][0]
        caption = (f"Layer {layer}: the last token's query meets the keys of all {len(text)} "
                   f"tokens; head {h}'s weights say how much of each token's value it takes "
                   f"(the most, {pattern[h].max().item():.0%}, from "
                   f"{text[int(pattern[h].argmax())]!r}). "
                   f"The {c.n_head} heads' outputs, through W_O, add a vector of size "
                   f"{update:.2f}, most of it from {sources[0].token!r}. Stopped here, the "
                   f"model would predict {seen.token!r} ({seen.score:.0%}).")
        attention.append(AttentionStage(
            caption, layer, h, pattern.tolist(), wrote.norm(dim=-1).T.tolist(), sources, update,
            lens[2 * layer], [_uses(rows, "attn", names[0], c.n_layer)]))
        post = cache["post", layer][0, -1].float()  # (d_mlp,)
        active = post.abs().topk(min(k, post.numel())).indices
        neurons.append((active, _neuron_writes(model, layer, post, active)))
    promotes = _promotions(model, tokenizer, cache, torch.cat([w for _, w in neurons]), k)
    for layer, (active, _) in enumerate(neurons):
        post = cache["post", layer][0, -1].float()
        found = [Neuron(i, post[i].item(), promotes.pop(0)) for i in active.tolist()]
        seen = lens[2 * layer + 1][0]
        caption = (f"Layer {layer}: the MLP widens the vector to {post.numel()} neurons, "
                   f"applies {c.activation}, and projects back, on this position alone. The "
                   f"most active neuron, {found[0].index} ({found[0].activation:+.2f}), pushes "
                   f"towards {', '.join(repr(s.token) for s in found[0].promotes[:3])}. "
                   f"Stopped here: {seen.token!r} ({seen.score:.0%}).")
        mlp.append(MLPStage(caption, layer, post.numel(), found,
                            cache["mlp_out", layer][0, -1].float().norm().item(),
                            lens[2 * layer + 1], [_uses(rows, "mlp", names[1], c.n_layer)]))
    return attention, mlp


def _neuron_writes(model: GPT, layer: int, post: torch.Tensor,
                   neurons: torch.Tensor) -> torch.Tensor:
    """(k, C): what each neuron writes on its own, its activation times its row of W_out. The
    layer's MLP runs on k + 1 rows whose activations (hook_post) are replaced, row i by neuron
    i's alone and the last by zeros, whose output (the bias) is taken away: this reads k rows
    of W_out, where the W_out view would copy every layer's."""
    acts = post.new_zeros(len(neurons) + 1, post.numel())
    acts[torch.arange(len(neurons), device=post.device), neurons] = post[neurons]
    mlp = model.components()["mlp"][layer]
    with model.hooks([(f"blocks.{layer}.mlp.hook_post", lambda x, hook: acts.to(x.dtype))]):
        out = mlp(model.W_E.new_zeros(len(acts), model.config.n_embd)).float()
    return out[:-1] - out[-1]


def _after_final_norm(model: GPT, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (N, V) that vectors (N, C) in the final norm's normalized space give through
    the norm's weight and W_U, and the norm's bias term (V,): the final norm and W_U run with
    their normalized stream (hook_normalized) replaced by the vectors and a row of zeros, whose
    logits are the bias term's. (tokens_to_residual_directions would copy W_U for every token.)"""
    rows = torch.cat([vectors, vectors.new_zeros(1, vectors.size(1))])
    with model.hooks([("ln_final.hook_normalized", lambda x, hook: rows.to(x.dtype))]):
        logits = model.unembed(rows.to(model.W_E.dtype)).float()  # the input sets the shape
    return logits[:-1] - logits[-1], logits[-1]


def _promotions(model: GPT, tokenizer: Tokenizer, cache: Any, written: torch.Tensor,
                k: int) -> list[list[Scored]]:
    """For each vector written at the last position (N, C), the k tokens whose logits it
    raises most directly: through the final norm at its cached scale, then W_U."""
    scaled = cache.apply_ln_to_stack(written[:, None].to(cache["ln_final.hook_scale"].dtype),
                                     pos_slice=-1)[:, 0].float()  # (N, C)
    effect = _after_final_norm(model, scaled)[0][:, :tokenizer.vocab_size]
    return [_top(row, k, tokenizer) for row in effect]


def _unembedding(model: GPT, tokenizer: Tokenizer, cache: Any, logits: torch.Tensor, *, k: int,
                 rows: dict[str, TallyRow]) -> UnembeddingStage:
    c = model.config
    final = cache["ln_final.hook_normalized"][0, -1].float()  # (C,)
    scale = cache["ln_final.hook_scale"][0, -1, 0].item()
    top = logits.topk(min(k, tokenizer.vocab_size))
    dots, bias = _after_final_norm(model, final[None])
    terms = [LogitTerm(i, tokenizer.token_text(i), z, dots[0, i].item(), bias[i].item())
             for i, z in zip(top.indices.tolist(), top.values.tolist())]
    tied = c.tie_embeddings
    how = "standard deviation" if c.norm == "layernorm" else "root mean square"
    caption = (f"The final norm divides the vector by its {how}, {scale:.2f}. Then each of the "
               f"{tokenizer.vocab_size} tokens gets a logit: the dot product of the vector with "
               f"its row of W_U{' (tied: the same numbers as its row of W_E)' if tied else ''}"
               f", scaled by the norm's weights. Highest: {terms[0].token!r}, "
               f"{terms[0].logit:.2f}.")
    return UnembeddingStage(caption, scale, final.tolist(), terms,
                            [_uses(rows, "unembed", "W_U", 1)])


def _softmax(dist: Distribution, temperature: float, vocab_size: int) -> SoftmaxStage:
    j = dist.temperatures.index(temperature) if temperature in dist.temperatures else 0
    t = dist.temperatures[j]
    at = "At T = 0 (greedy: the plain softmax)" if t == 0 else f"At T = {t:g}"
    caption = (f"Softmax turns the {vocab_size} logits into probabilities that add up to 1: "
               f"p = exp(logit / T) / the sum over all tokens. {at}: "
               f"{dist.tokens[0].text!r} gets {dist.probs[j][0]:.1%}. A lower temperature T "
               f"sharpens the distribution, a higher one flattens it.")
    return SoftmaxStage(caption, temperature, dist)


def _sample(tokenizer: Tokenizer, logits: torch.Tensor, params: SamplingParams) -> SampleStage:
    generator = torch.Generator(device=logits.device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    token, probs = sample_next(logits, params.temperature, params.top_k, params.top_p,
                               generator)
    chosen = token.item()
    drawn = Token(chosen, tokenizer.token_text(chosen))
    prob = probs[0, chosen].item()
    if params.temperature == 0:
        how = f"At temperature 0 the likeliest token is taken: {drawn.text!r} ({prob:.1%})."
    else:
        seeded = f", seed {params.seed}" if params.seed is not None else ""
        how = (f"One token is drawn at random from that distribution (T = "
               f"{params.temperature:g}{seeded}): {drawn.text!r}, which had {prob:.1%}.")
    caption = how + " Appended to the text, it is the last token of the next prediction."
    return SampleStage(caption, drawn, prob, params.temperature, params.seed)
