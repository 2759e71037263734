"""model.inference.analysis: the mathematics on hand-set embeddings, and attention, the logit
lens and the next-token distribution checked against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from model.cli.explore import describe_word
from model.errors import ConfigError, SamplingError, TokenizerError
from model.gpt import GPT, GPTConfig
from model.inference.analysis import (
    analogy,
    attention,
    direction,
    logit_lens,
    neighbors,
    next_token,
    to_jsonable,
    word_vector,
)


class WordTokenizer:
    """A test double with the Tokenizer interface: greedy longest match over a fixed list."""

    name = "bpe"

    def __init__(self, vocab: list[str]) -> None:
        self.vocab, self.vocab_size, self.eot_id = vocab, len(vocab), 0

    def encode(self, text: str) -> list[int]:
        ids = []
        while text:
            match = max((t for t in self.vocab[1:] if text.startswith(t)), key=len, default=None)
            if match is None:
                raise TokenizerError(f"cannot encode {text!r}")
            ids.append(self.vocab.index(match))
            text = text[len(match):]
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def token_text(self, i: int) -> str:
        return self.vocab[i]


# Axes: royal, male, female, animal, plural, canine, fruit. king - man + woman = queen exactly.
ROWS = {
    "<eot>": [0, 0, 0, 0, 0, 0, 0],
    " king": [1, 1, 0, 0, 0, 0, 0],
    " queen": [1, 0, 1, 0, 0, 0, 0],
    " man": [0, 1, 0, 0, 0, 0, 0],
    " woman": [0, 0, 1, 0, 0, 0, 0],
    " cat": [0, 0, 0, 1, 0, 0, 0],
    " cats": [0, 0, 0, 1, 1, 0, 0],
    " dog": [0, 0, 0, 1, 0, 0.5, 0],
    " dogs": [0, 0, 0, 1, 1, 0.5, 0],
    " apples": [0, 0, 0, 0, 0.5, 0, 1],
    "cat": [0, 0, 0, -1, 0, 0, 0],  # the no-space form: a different token, pointing elsewhere
    "dom": [1, -1, 0, 0, 0, 0, 0],
}


@pytest.fixture
def handset() -> tuple[GPT, WordTokenizer]:
    tok = WordTokenizer(list(ROWS))
    model = GPT(GPTConfig(vocab_size=len(ROWS), n_embd=7, n_head=1, n_layer=1, block_size=8))
    with torch.no_grad():
        model.tok_emb.weight.copy_(torch.tensor(list(ROWS.values()), dtype=torch.float32))
    return model.eval(), tok


def test_neighbors_order_and_similarities_are_known(handset):
    model, tok = handset
    r = neighbors(model, tok, "cat", k=3)
    assert r.query.form == " cat" and not r.query.multi_token  # leading-space form preferred
    assert [s.token for s in r.neighbors] == [" dog", " cats", " dogs"]
    expected = [1 / 1.25 ** 0.5, 1 / 2 ** 0.5, 1 / 2.25 ** 0.5]
    assert [s.score for s in r.neighbors] == pytest.approx(expected, abs=1e-6)


def test_word_falls_back_to_the_form_as_typed(handset):
    model, tok = handset
    wv = word_vector(model, tok, "dom")  # " dom" cannot be encoded: no space token
    assert wv.form == "dom" and wv.ids == [tok.vocab.index("dom")]


def test_multi_token_word_is_flagged_and_uses_the_mean(handset):
    model, tok = handset
    r = neighbors(model, tok, "kingdom", k=1)
    assert r.query.multi_token and r.query.pieces == [" king", "dom"]
    assert torch.equal(r.query.vector, torch.tensor([1.0, 0, 0, 0, 0, 0, 0]))
    # own pieces are left out; queen = (1,0,1) is the nearest at cos 1/sqrt(2)
    assert r.neighbors[0].token == " queen"
    assert r.neighbors[0].score == pytest.approx(2 ** -0.5, abs=1e-6)
    assert "2 tokens" in describe_word(r.query) and "mean" in describe_word(r.query)


def test_analogy_king_man_woman_is_queen(handset):
    model, tok = handset
    r = analogy(model, tok, "king", "man", "woman", k=3)
    assert r.answers[0].token == " queen"
    assert r.answers[0].score == pytest.approx(1.0, abs=1e-6)
    assert not {" king", " man", " woman"} & {s.token for s in r.answers}


def test_direction_dot_products_are_known(handset):
    model, tok = handset
    r = direction(model, tok, "cats", "cat", ["dog", "apples", "dogs"])
    assert [p.word.form for p in r.projections] == [" dogs", " apples", " dog"]
    assert [p.dot for p in r.projections] == pytest.approx([1.0, 0.5, 0.0])
    assert r.projections[0].cosine == pytest.approx(1 / 2.25 ** 0.5)
    assert r.norm == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="empty"):
        direction(model, tok, "cats", "cat", [])


def test_unknown_and_empty_words_are_errors(handset):
    model, tok = handset
    with pytest.raises(TokenizerError, match="xyz"):
        word_vector(model, tok, "xyz")
    with pytest.raises(TokenizerError, match="empty"):
        word_vector(model, tok, " ")


@pytest.fixture
def random_model() -> tuple[GPT, WordTokenizer]:
    torch.manual_seed(0)
    tok = WordTokenizer(list(ROWS))
    cfg = GPTConfig(vocab_size=len(ROWS), n_embd=16, n_head=2, n_layer=3, block_size=8)
    return GPT(cfg).eval(), tok


def test_attention_rows_sum_to_one_and_are_causal(random_model):
    model, tok = random_model
    prompt = " king man woman cat dog"
    for head in (None, 0, 1):
        r = attention(model, tok, prompt, layer=1, head=head)
        w = torch.tensor(r.weights)
        assert w.shape == (5, 5)
        assert torch.allclose(w.sum(-1), torch.ones(5), atol=1e-6)
        assert torch.all(w.triu(diagonal=1) == 0)
    with pytest.raises(ConfigError, match="layers 0 to 2"):
        attention(model, tok, prompt, layer=3)
    with pytest.raises(ConfigError, match="heads 0 to 1"):
        attention(model, tok, prompt, head=2)


def test_logit_lens_last_layer_is_the_model_output(random_model):
    model, tok = random_model
    r = logit_lens(model, tok, " king man woman", k=2)
    idx = torch.tensor([tok.encode(" king man woman")])
    assert r.logits.shape == (4, 3, len(ROWS)) and len(r.layers) == 4
    assert torch.equal(r.logits[-1], model(idx)[0][0])
    # the first row reads W_U straight off the embeddings (token + position)
    embedded = model.tok_emb(idx) + model.pos_emb(torch.arange(3))
    assert torch.allclose(r.logits[0], model.lm_head(model.norm_f(embedded))[0])
    assert r.top[-1][-1][0].id == model(idx)[0][0, -1].argmax().item()


def test_logit_lens_with_rotary_positions_and_untied_head():
    torch.manual_seed(1)
    tok = WordTokenizer(list(ROWS))
    cfg = GPTConfig(vocab_size=len(ROWS), n_embd=16, n_head=2, n_layer=2, block_size=8,
                    pos_emb="rope", norm="rmsnorm", tie_embeddings=False)
    model = GPT(cfg).eval()
    r = logit_lens(model, tok, " cat dog cats")
    assert torch.equal(r.logits[-1], model(torch.tensor([tok.encode(" cat dog cats")]))[0][0])


def test_next_token_probabilities_at_each_temperature(random_model):
    model, tok = random_model
    r = next_token(model, tok, " king man", temperatures=[0.5, 1, 2], k=4)
    logits = model(torch.tensor([tok.encode(" king man")]))[0][0, -1]
    assert [s.id for s in r.top] == logits.topk(4).indices.tolist()
    assert r.probs[1] == pytest.approx(logits.softmax(-1).topk(4).values.tolist(), abs=1e-6)
    for probs, other in zip(r.probs, r.other):
        assert sum(probs) + other == pytest.approx(1.0, abs=1e-5)
    assert r.probs[0][0] > r.probs[1][0] > r.probs[2][0]  # higher temperature, flatter
    with pytest.raises(SamplingError):
        next_token(model, tok, " king", temperatures=[0])
    with pytest.raises(ConfigError, match="context size"):
        next_token(model, tok, " king" * 9)


def test_results_become_plain_data_for_json(handset):
    model, tok = handset
    data = to_jsonable(neighbors(model, tok, "kingdom", k=2))
    assert data["query"] == {"word": "kingdom", "form": " kingdom", "ids": [1, 11],
                             "pieces": [" king", "dom"], "multi_token": True}
    assert len(data["neighbors"]) == 2 and data["neighbors"][0]["token"] == " queen"
    assert set(data["neighbors"][0]) == {"id", "token", "score"}
    lens = to_jsonable(logit_lens(model, tok, " king man"))
    assert "logits" not in lens and len(lens["top"]) == 2  # the tensor is left out
