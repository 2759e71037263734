"""Our tokenizers as Hugging Face tokenizer files, and back.

`save_hf_tokenizer(tokenizer, directory)` writes tokenizer.json (run by the `tokenizers`
library) and tokenizer_config.json, so that `transformers.AutoTokenizer.from_pretrained`
encodes and decodes as our tokenizer does:

    char  a WordLevel vocabulary of single characters; the text is split into code points.
          End-of-text doubles as the unknown token: a character outside the vocabulary
          becomes it there (ours refuses such a text), so that tools which tokenize any text,
          llama.cpp's converter among them, can run the tokenizer.
    bpe   a byte-level BPE: the token bytes spelled with GPT-2's byte-to-character table, our
          split pattern, and one merge per token in rank order (see `bpe_merges`).
    gpt2  GPT-2's own vocab.json and merges.txt besides tokenizer.json, as OpenAI's files have it.

End-of-text is the last id, marked as the eos token. Our `encode` reads "<|endoftext|>" in a
text as plain characters; tokenizer_config.json asks transformers for the same
(split_special_tokens). A chat-trained model's chat template goes into tokenizer_config.json
(model/weights/chat_template.py). `load_hf_tokenizer` reads a directory written here back into ours.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.data.tokenizer import (
    EOT_TEXT,
    GPT2_PATTERN,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
)
from model.errors import TokenizerError


def byte_to_char() -> dict[int, str]:
    """GPT-2's table from bytes to printable characters: a byte-level vocabulary stored as JSON
    strings. Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
    ...) are given the code points from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spell(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def _bpe(piece: bytes, ranks: dict[bytes, int], limit: int) -> list[bytes]:
    """tiktoken's rule on one piece, with only the tokens ranked below `limit`: merge the
    adjacent pair whose joined bytes rank lowest (leftmost on a tie) until none is ranked."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best, where = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, where = rank, i
        if where < 0:
            break
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return parts


def bpe_merges(tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """The merges, in rank order, that make a Hugging Face BPE encode as tiktoken does.

    tiktoken merges whichever adjacent pair's joined bytes rank lowest. When it forms the token
    of rank r, the bytes under it have already been merged exactly as running that rule on the
    token alone with the tokens ranked below r would (nothing outside can have touched them),
    so the pair it joins is always the one that run ends with. One merge per token, in rank
    order, thus replays tiktoken; a token no run reaches is only ever a whole pre-token,
    which the tokenizer looks up before merging (ignore_merges), as tiktoken does.
    """
    ranks = {token: rank for rank, token in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) < 2:
            continue
        parts = _bpe(token, ranks, rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _special_token(eot_id: int) -> dict[str, Any]:
    return {"id": eot_id, "content": EOT_TEXT, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def _split(pattern: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
            "invert": False}


def _char_json(tokenizer: CharTokenizer) -> dict[str, Any]:
    # WordLevel's unknown token must be in its vocabulary: end-of-text, at its own id.
    vocab = {c: i for i, c in enumerate(tokenizer.chars)} | {EOT_TEXT: tokenizer.eot_id}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_special_token(tokenizer.eot_id)],
        "normalizer": None,
        "pre_tokenizer": _split(r"[\s\S]"),  # every code point alone, newlines included
        "post_processor": None,
        "decoder": {"type": "Fuse"},  # join the characters back without separators
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": EOT_TEXT},
    }


def _bpe_json(ranks: Sequence[bytes], pattern: str, eot_id: int,
              ignore_merges: bool) -> dict[str, Any]:
    table = byte_to_char()
    vocab = {_spell(token, table): i for i, token in enumerate(ranks)}
    merges = [[_spell(a, table), _spell(b, table)] for a, b in bpe_merges(ranks)]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_special_token(eot_id)],
        "normalizer": None,
        # Our pattern cuts the text, then each piece's UTF-8 bytes are spelled with the table.
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            _split(pattern),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges},
    }


def _gpt2_ranks(tokenizer: GPT2Tokenizer) -> list[bytes]:
    encoding = tokenizer.encoding
    return [encoding.decode_single_token_bytes(i) for i in range(tokenizer.eot_id)]


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer.json document for one of our tokenizers."""
    if isinstance(tokenizer, CharTokenizer):
        return _char_json(tokenizer)
    if isinstance(tokenizer, BPETokenizer):
        return _bpe_json(tokenizer.ranks, tokenizer.pattern, tokenizer.eot_id, True)
    if isinstance(tokenizer, GPT2Tokenizer):
        # GPT-2's files as OpenAI ships them: its own pattern, merges only.
        document = _bpe_json(_gpt2_ranks(tokenizer), GPT2_PATTERN, tokenizer.eot_id, False)
        document["model"]["vocab"][EOT_TEXT] = tokenizer.eot_id  # GPT-2 lists it there too
        return document
    raise TokenizerError(f"no Hugging Face form for the {tokenizer.name} tokenizer")


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path,
                      max_length: int | None = None, chat_template: str | None = None
                      ) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json (GPT-2 also vocab.json and merges.txt),
    with `chat_template` (Jinja) when given; returns the paths written."""
    directory = Path(directory)
    document = tokenizer_json(tokenizer)
    paths = [directory / "tokenizer.json", directory / "tokenizer_config.json"]
    paths[0].write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer" if tokenizer.name == "gpt2" else
        "PreTrainedTokenizerFast",
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT if tokenizer.name == "char" else None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # else decode would drop spaces before "." etc.
        "split_special_tokens": True,  # "<|endoftext|>" in a text is text, as in our encode
        "model_max_length": max_length or 1_000_000_000_000,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    paths[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer.name == "gpt2":
        model = document["model"]
        paths.append(directory / "vocab.json")
        paths[-1].write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        paths.append(directory / "merges.txt")
        paths[-1].write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]),
                             encoding="utf-8")
    return paths


def load_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """Our tokenizer from a directory's tokenizer.json: a char or byte-level BPE one written
    by `save_hf_tokenizer`; GPT-2's vocabulary (or no tokenizer.json) gives GPT-2's."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return GPT2Tokenizer()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        model = document["model"]
        # GPT-2's own files also list end-of-text in the vocabulary.
        vocab = {t: i for t, i in model["vocab"].items() if t != EOT_TEXT}
        specials = {t["content"]: t["id"] for t in document.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(f"{str(path)!r} is not a tokenizer.json we can read "
                             f"({type(exc).__name__}: {exc})") from exc
    eot_id = specials.get(EOT_TEXT)
    by_id = sorted(vocab, key=vocab.__getitem__)
    if eot_id != len(vocab) or [vocab[t] for t in by_id] != list(range(len(vocab))):
        raise TokenizerError(f"{str(path)!r}: smallgpt needs ids 0..n-1 followed by "
                             f"{EOT_TEXT!r} as the last id")
    if model.get("type") == "WordLevel":
        return CharTokenizer("".join(by_id))
    if model.get("type") != "BPE":
        raise TokenizerError(f"{str(path)!r}: a {model.get('type')} tokenizer has no smallgpt "
                             "equivalent (char and byte-level BPE only)")
    table = {c: b for b, c in byte_to_char().items()}
    try:
        ranks = [bytes(table[c] for c in token) for token in by_id]
    except KeyError as exc:
        raise TokenizerError(f"{str(path)!r} is not a byte-level BPE") from exc
    if len(ranks) == 50256 and ranks[256:258] == [b" t", b" a"]:  # GPT-2's first merges
        gpt2 = GPT2Tokenizer()
        if _gpt2_ranks(gpt2) == ranks:
            return gpt2
    pretokenizers = document.get("pre_tokenizer", {}).get("pretokenizers", [])
    pattern = next((p["pattern"]["Regex"] for p in pretokenizers if p.get("type") == "Split"),
                   GPT2_PATTERN)
    return BPETokenizer(ranks, pattern)
