"""model.explore: the mathematics on hand-set embeddings, then every command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import Config, GPTConfig
from model.errors import ConfigError, SamplingError, TokenizerError
from model.explore import (
    analogy,
    attention,
    direction,
    logit_lens,
    main,
    neighbors,
    next_token,
    word_vector,
)
from model.gpt import GPT
from model.hf import save_hf_gpt2
from model.tally import parameter_tally


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
    assert "2 tokens" in r.query.describe() and "mean" in r.query.describe()


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


@pytest.mark.parametrize("tie", [True, False])
def test_tally_matches_parameter_count(tie):
    model = GPT(GPTConfig(vocab_size=50, n_embd=16, n_head=2, n_layer=2, block_size=8,
                          tie_embeddings=tie))
    total = sum(p.numel() for p in model.parameters())
    assert sum(r.count for r in parameter_tally(model)) == total


def test_tally_of_a_preset_matches_the_model_on_the_meta_device():
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.from_preset("gpt2"))
    total = sum(r.count for r in parameter_tally(GPTConfig.from_preset("gpt2")))
    assert total == sum(p.numel() for p in gpt2.parameters()) == 124_439_808


# -- end to end on a tiny trained checkpoint ---------------------------------------------------
TEXT = "the cat sat on the mat. the dog sat on the log. the cats and the dogs sat. " * 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from model.checkpoint import save_checkpoint
    from model.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer("char", [TEXT])
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_embd=32, n_head=4, n_layer=2, block_size=32)
    model = GPT(cfg)
    data = torch.tensor(tok.encode(TEXT))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        starts = torch.randint(0, len(data) - 33, (8,))
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("explore") / "run"
    save_checkpoint(run / "latest", model, Config(model=cfg, name="t"), tok.spec())
    return run


def explore(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_command_end_to_end(run_dir, capsys):
    ck = ["--checkpoint", str(run_dir)]
    code, out, _ = explore(capsys, "neighbors", "cat", "-k", "3", *ck)
    assert code == 0 and "3 tokens" in out and "mean" in out and "cosine" in out
    code, out, _ = explore(capsys, "analogy", "d", "o", "c", *ck)
    assert code == 0 and "'d' - 'o' + 'c'" in out
    code, out, _ = explore(capsys, "direction", "s", "t", "--words", "a c d", *ck)
    assert code == 0 and out.count("\n") == 5
    code, out, _ = explore(capsys, "params", *ck)
    assert code == 0 and "token embedding (W_E)" in out and "total" in out
    png = run_dir / "n.png"
    code, out, _ = explore(capsys, "next", "the ca", "--temperatures", "0.5", "2", "--out",
                           str(png), *ck)
    assert code == 0 and "p@T=0.5" in out and "p@T=2" in out and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = explore(capsys, "attention", "the cat", "--layer", "0", "--head", "3", *ck)
    assert code == 0 and "layer 0, head 3" in out
    assert (run_dir / "attention.png").read_bytes()[:4] == b"\x89PNG"  # default: the run dir
    code, out, _ = explore(capsys, "lens", "the c", "-k", "2", *ck)
    assert code == 0 and "embeddings" in out and "block 1" in out


def test_json_output(run_dir, capsys):
    ck = ["--checkpoint", str(run_dir), "--json"]
    code, out, _ = explore(capsys, "neighbors", "cat", "-k", "2", *ck)
    data = json.loads(out)
    assert code == 0 and data["query"]["multi_token"] and data["query"]["pieces"] == ["c", "a", "t"]
    assert len(data["neighbors"]) == 2 and -1 <= data["neighbors"][0]["score"] <= 1
    code, out, _ = explore(capsys, "next", "the", "-k", "3", "--out", str(run_dir / "j.png"), *ck)
    data = json.loads(out)
    assert len(data["top"]) == 3 and len(data["probs"]) == 3 and data["png"].endswith("j.png")
    code, out, _ = explore(capsys, "lens", "the", *ck)
    assert len(json.loads(out)["top"]) == 3  # embeddings + 2 blocks
    code, out, _ = explore(capsys, "attention", "the", "--out", str(run_dir / "a.png"), *ck)
    assert json.loads(out)["layer"] == 1  # default: the last layer


def test_params_preset_gpt3_needs_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/ here
    code, out, _ = explore(capsys, "params", "--preset", "gpt3", "--json")
    data = json.loads(out)
    assert code == 0 and 174e9 < data["total"] < 176e9
    emb = next(r for r in data["rows"] if r["component"].startswith("token embedding"))
    assert emb["count"] == 50257 * 12288 == 617_558_016


def test_default_checkpoint_is_the_newest_under_out(run_dir, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(run_dir / "latest", tmp_path / "out" / "t" / "latest")
    monkeypatch.chdir(tmp_path)
    code, out, err = explore(capsys, "neighbors", "a", "-k", "1")
    assert code == 0 and "using the newest checkpoint" in err
    code, _, err = explore(capsys, "neighbors", "a", "--checkpoint", "missing")
    assert code == 2 and "missing" in err


@pytest.mark.parametrize("argv, message", [
    (["neighbors", "Zebra"], "word 'Zebra': text has 3 characters"),
    (["direction", "s", "t", "--words", " "], "empty"),
    (["attention", "the", "--layer", "2"], "layers 0 to 1"),
    (["attention", "the", "--head", "-1"], "heads 0 to 3"),
    (["lens", "the cat sat on the mat. the dog sat"], "context size"),
    (["next", "the", "--temperatures", "0"], "temperatures"),
])
def test_bad_input_is_a_one_line_error(run_dir, capsys, argv, message):
    code, out, err = explore(capsys, *argv, "--checkpoint", str(run_dir))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_hf_gpt2_weights_are_explored_with_the_gpt2_tokenizer(tmp_path, monkeypatch, capsys):
    from model import tokenizer as tokenizer_module
    from model.tokenizer import train_tokenizer

    char = train_tokenizer("char", [TEXT])
    asked = []

    def fake_gpt2(spec):  # tiktoken's gpt2 files need a download; any tokenizer fits the wiring
        asked.append(spec)
        return char

    monkeypatch.setattr(tokenizer_module, "tokenizer_from_spec", fake_gpt2)
    torch.manual_seed(0)
    save_hf_gpt2(GPT(GPTConfig(vocab_size=char.vocab_size, n_embd=16, n_head=2, n_layer=1,
                               block_size=16, activation="gelu_tanh")), tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    code, out, _ = explore(capsys, "lens", "the", "--hf-gpt2", str(tmp_path / "hf"))
    assert code == 0 and "block 0" in out and asked == [{"name": "gpt2"}]
    code, out, _ = explore(capsys, "attention", "the", "--hf-gpt2", str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "attention.png").exists()  # no run dir: the cwd
