"""Tokenizers: known GPT-2 ids, round trips, specs, the BPE trainer against a slow reference."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import regex

from model.data import tokenizer as tokenizer_module
from model.data.tokenizer import (
    GPT2_PATTERN,
    BPETokenizer,
    CharTokenizer,
    count_chunks,
    learn_bpe,
    safe_pieces,
    tokenizer_from_spec,
    train_tokenizer,
)
from model.errors import TokenizerError

TRICKY = [
    "", "Hello world", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\n",
    "naïve café — “quotes” ½", "你好，世界。我们在测试中文文本。", "emoji 🎉👍🏽👨‍👩‍👧 flags 🇬🇧",
    "<|endoftext|> is plain text here", "\x00\x01 control \u200b zero width", "Ω≈ç√∫˜µ≤≥÷",
]
CORPUS = ("To be, or not to be, that is the question:\n"
          "Whether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\n"
          "Or to take arms against a sea of troubles\n") * 20


def random_unicode(rng: random.Random, n: int) -> str:
    """Code points from every plane except surrogates, which a str cannot encode to UTF-8."""
    chars = []
    while len(chars) < n:
        cp = rng.randrange(0x110000)
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


@pytest.fixture
def gpt2(gpt2_vocabulary):
    return train_tokenizer("gpt2", [])


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_tokenizer("bpe", [CORPUS], vocab_size=320)


# ---- gpt2


def test_gpt2_known_ids(gpt2) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert (gpt2.vocab_size, gpt2.eot_id, gpt2.name) == (50257, 50256, "gpt2")
    assert gpt2.token_text(15496) == "Hello"


def test_gpt2_round_trips_and_keeps_endoftext_literal(gpt2) -> None:
    for text in TRICKY:
        ids = gpt2.encode(text)
        assert gpt2.decode(ids) == text
        assert gpt2.eot_id not in ids
    assert gpt2.decode([gpt2.eot_id]) == "<|endoftext|>"
    assert gpt2.encode_batch(TRICKY) == [gpt2.encode(t) for t in TRICKY]
    assert [gpt2.encode_array(t).tolist() for t in TRICKY] == [gpt2.encode(t) for t in TRICKY]


def test_gpt2_spec_rebuilds(gpt2) -> None:
    spec = json.loads(json.dumps(gpt2.spec()))
    again = tokenizer_from_spec(spec)
    assert again.encode("Hello world") == [15496, 995]


def test_gpt2_unavailable_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken

    def offline(name: str):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match="could not be downloaded.*TIKTOKEN_CACHE_DIR") as err:
        train_tokenizer("gpt2", [])
    assert "\n" not in str(err.value)


# ---- char


def test_char_vocabulary_is_sorted_characters_of_all_texts() -> None:
    tok = train_tokenizer("char", ["hello", "world!"])
    assert tok.chars == "!dehlorw"
    assert (tok.vocab_size, tok.eot_id) == (9, 8)
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(tok.encode("world!")) == "world!"
    assert tok.token_text(0) == "!"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_char_unknown_characters_are_named() -> None:
    tok = train_tokenizer("char", ["abc"])
    with pytest.raises(TokenizerError, match=r"2 characters outside.*'x', 'é'"):
        tok.encode("abxcé")


def test_char_round_trips_any_unicode_it_was_built_from() -> None:
    text = random_unicode(random.Random(0), 2000) + "".join(TRICKY)
    tok = train_tokenizer("char", [text])
    assert tok.decode(tok.encode(text)) == text
    again = tokenizer_from_spec(json.loads(json.dumps(tok.spec())))
    assert isinstance(again, CharTokenizer) and again.encode(text) == tok.encode(text)


def test_char_needs_text() -> None:
    with pytest.raises(TokenizerError, match="empty text"):
        train_tokenizer("char", [""])


# ---- bpe


def reference_bpe(counts: Counter[bytes], vocab_size: int) -> list[bytes]:
    """The textbook algorithm: recount every pair after every merge. Slow but obviously right."""
    words = {w: list(w) for w in counts}
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < vocab_size - 1:
        pairs: Counter[tuple[int, int]] = Counter()
        for w, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = tokens[best[0]] + tokens[best[1]]
        new_id = tokens.index(merged) if merged in tokens else len(tokens)
        if new_id == len(tokens):
            tokens.append(merged)
        for w, ids in words.items():
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[w] = out
    return tokens


def test_bpe_merges_match_the_reference_algorithm() -> None:
    rng = random.Random(1)
    words = ["aaaa", "abab", "the", "then", "there", "aa", "ba", "ab", "中文", "🎉"]
    text = " ".join(rng.choice(words) for _ in range(3000))
    counts = count_chunks([text, CORPUS])
    assert learn_bpe(counts, 360) == reference_bpe(counts, 360)


def test_chunks_are_counted_a_piece_at_a_time_as_the_whole() -> None:
    text = " ".join(["word", "words,", "'tis", "  spaced", "\n\nNew", "12 345"] * 500)
    whole = Counter(t.encode() for t in regex.findall(GPT2_PATTERN, text))
    assert count_chunks([text], piece_size=50) == whole


def test_safe_pieces_from_streamed_chunks_encode_as_the_whole(bpe, gpt2) -> None:
    rng = random.Random(3)
    text = "".join(rng.choice(["a", "b ", " ", "\n", "é", "  \n", "\t", "'s", "9", ".", "中"])
                   for _ in range(20_000))
    for size in (1, 10, 300):
        cuts = [0, *sorted(rng.sample(range(len(text)), 40)), len(text)]
        chunks = [text[a:b] for a, b in zip(cuts, cuts[1:])]
        pieces = list(safe_pieces(chunks, size))
        assert "".join(pieces) == text and len(pieces) > 5
        for tok in (bpe, gpt2):
            assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_safe_pieces_cut_at_spaces_and_hard_only_as_a_last_resort(
        monkeypatch: pytest.MonkeyPatch) -> None:
    line = "no newline here, only spaces " * 100
    pieces = list(safe_pieces([line.strip()], 100))
    assert len(pieces) > 5 and all(p[-1] != " " and p[0] == " " for p in pieces[1:-1])
    solid = "字" * 5000
    assert list(safe_pieces([solid], 100)) == [solid]  # no safe cut, and short enough: whole
    monkeypatch.setattr(tokenizer_module, "LONGEST_UNCUT", 1000)
    assert [len(p) for p in safe_pieces([solid], 100)][:2] == [100, 100]


def test_bpe_first_merge_is_the_most_frequent_pair() -> None:
    tok = train_tokenizer("bpe", ["ab ab ab cd"], vocab_size=258)
    assert tok.token_text(256) == "ab"
    assert (tok.vocab_size, tok.eot_id) == (258, 257)


def test_bpe_round_trips_any_unicode(bpe) -> None:
    rng = random.Random(2)
    for text in TRICKY + [random_unicode(rng, 500) for _ in range(5)]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert bpe.eot_id not in ids
        assert max(ids, default=0) < bpe.vocab_size
        assert bpe.encode_array(text).tolist() == ids


def test_bpe_layout_and_compression(bpe) -> None:
    assert (bpe.vocab_size, bpe.eot_id) == (320, 319)
    assert [bpe.token_text(i).encode("latin-1") for i in range(65, 68)] == [b"A", b"B", b"C"]
    assert bpe.decode([bpe.eot_id]) == "<|endoftext|>"
    assert len(bpe.encode(CORPUS)) < len(CORPUS.encode()) / 2  # merges were learned and used


def test_bpe_training_is_deterministic_and_spec_rebuilds(bpe) -> None:
    again = train_tokenizer("bpe", [CORPUS], vocab_size=320)
    assert again.spec() == bpe.spec()
    rebuilt = tokenizer_from_spec(json.loads(json.dumps(bpe.spec())))
    assert rebuilt.encode(CORPUS) == bpe.encode(CORPUS)


def test_bpe_decode_bytes_keeps_partial_characters() -> None:
    tok = train_tokenizer("bpe", ["plain ascii"], vocab_size=257)  # bytes only
    ids = tok.encode("é")
    assert len(ids) == 2 and tok.decode_bytes(ids[:1]) == "é".encode()[:1]
    assert tok.decode(ids[:1]) == "\ufffd"


def test_bpe_stops_when_no_pairs_are_left() -> None:
    tok = train_tokenizer("bpe", ["ab"], vocab_size=1000)
    assert tok.vocab_size == 258 and tok.decode(tok.encode("ab")) == "ab"


def test_bpe_vocabulary_must_hold_bytes_and_endoftext() -> None:
    with pytest.raises(TokenizerError, match="at least 257"):
        train_tokenizer("bpe", ["text"], vocab_size=256)


# ---- errors shared by all


def test_unknown_tokenizer_names_the_choices() -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer 'sentencepiece'.*gpt2, char, bpe"):
        train_tokenizer("sentencepiece", ["text"])


@pytest.mark.parametrize("spec", [
    {}, {"name": "char"}, {"name": "char", "chars": "ba"}, {"name": "bpe", "ranks": ["!!"]},
    {"name": "bpe", "ranks": []}, {"name": "wordpiece"}, {"name": "char", "chars": "ab",
                                                           "vocab_size": 5},
])
def test_bad_specs_are_rejected(spec) -> None:
    with pytest.raises(TokenizerError):
        tokenizer_from_spec(spec)


def test_out_of_range_ids_are_rejected(bpe) -> None:
    with pytest.raises(TokenizerError, match="outside the bpe vocabulary"):
        bpe.decode([1, bpe.vocab_size])
    with pytest.raises(TokenizerError, match="outside the char vocabulary"):
        train_tokenizer("char", ["ab"]).decode([-1])
