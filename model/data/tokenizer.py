"""Tokenizers: text <-> token ids, behind one small interface.

    gpt2  tiktoken's GPT-2 BPE (50257 tokens); offline once TIKTOKEN_CACHE_DIR holds its files
    char  one token per character of the training text; the characters live in the spec
    bpe   a byte-level BPE trained here, stored as tiktoken ranks and run by tiktoken.Encoding

Every tokenizer has an end-of-text token (the last id) that separates documents, and a
JSON-serializable `spec()` from which `tokenizer_from_spec` rebuilds it, so a checkpoint needs no
other files. `encode` treats its input as plain text: a literal "<|endoftext|>" in the text is
encoded as ordinary characters, never as the special token.
"""

from __future__ import annotations

import base64
import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import regex

from model.errors import TokenizerError, first_line

if TYPE_CHECKING:
    import torch

TOKENIZER_NAMES = ("gpt2", "char", "bpe")
EOT_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenization: contractions, letter runs, digit runs, other symbols, whitespace.
# A leading space stays with the word after it; BPE merges never cross these chunks.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MIN_BPE_VOCAB = 257  # 256 single bytes plus end-of-text
LONGEST_UNCUT = 1 << 22  # characters without a safe cut before safe_pieces cuts anyway


class Tokenizer:
    """The interface every tokenizer implements; ids run from 0 to vocab_size - 1."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids`; may end inside a UTF-8 character (streaming printers wait)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        # Byte-level tokens can split a character; show the broken part as U+FFFD, not an error.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, id: int) -> str:
        """One token as text, for display."""
        return self.decode([id])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """The ids as a numpy array, for writing token files."""
        return np.asarray(self.encode(text), dtype=dtype)

    def to_tokens(self, text: str | Sequence[str], *, prepend_bos: bool = False,
                  padding_side: str = "right", return_mask: bool = False, device: Any = None
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids of a text or a list of texts. Texts of different lengths are padded
        with end-of-text on `padding_side` ("right" or "left"); return_mask=True also returns
        the (B, T) attention mask, 1 = token and 0 = padding, which GPT's forward takes. Left
        padding puts every text's last token in the last column (as generation wants).
        prepend_bos puts end-of-text first, as TransformerLens does for GPT-2 (our models were
        trained without it)."""
        import torch

        if padding_side not in ("right", "left"):
            raise TokenizerError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        rows = [[self.eot_id] * prepend_bos + ids for ids in self.encode_batch(texts)]
        width = max((len(row) for row in rows), default=0)
        tokens = torch.full((len(rows), width), self.eot_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            start = width - len(row) if padding_side == "left" else 0
            tokens[b, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, start:start + len(row)] = 1
        if return_mask:
            return tokens.to(device), mask.to(device)
        return tokens.to(device)

    def to_str_tokens(self, text_or_ids: str | Sequence[int] | torch.Tensor, *,
                      prepend_bos: bool = False) -> list[str]:
        """Each token of a text (or of ids) as text, in order."""
        import torch

        if isinstance(text_or_ids, str):
            ids = self.to_tokens(text_or_ids, prepend_bos=prepend_bos)[0].tolist()
        else:
            ids = torch.as_tensor(text_or_ids).flatten().tolist()
        return [self.token_text(i) for i in ids]

    def _check_ids(self, ids: Sequence[int]) -> None:
        if len(ids) and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is outside the {self.name} vocabulary "
                                 f"(0..{self.vocab_size - 1}); was the model trained with "
                                 "another tokenizer?")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class TiktokenTokenizer(Tokenizer):
    """gpt2 and bpe: both run through a tiktoken.Encoding (Rust, releases the GIL)."""

    def __init__(self, name: str, encoding: Any) -> None:
        self.name = name
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        # Straight into a numpy buffer, skipping a Python list: about 15% less CPU per MB. With
        # no special token allowed or disallowed, "<|endoftext|>" is plain text as in `encode`.
        ids = self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return ids.astype(dtype)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self.encoding.decode_bytes(ids)


class GPT2Tokenizer(TiktokenTokenizer):
    """OpenAI's GPT-2 vocabulary; the spec only names it, tiktoken supplies the ranks."""

    def __init__(self) -> None:
        import tiktoken

        try:
            encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # network errors, hash mismatches, missing cache files
            raise TokenizerError(
                f"the GPT-2 vocabulary could not be downloaded ({first_line(exc)[:120]}); set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files, or use tokenizer "
                "char or bpe") from exc
        super().__init__("gpt2", encoding)

    def spec(self) -> dict[str, Any]:
        return {"name": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class BPETokenizer(TiktokenTokenizer):
    """A byte-level BPE: ids 0..255 are bytes, then merges in rank order, then end-of-text."""

    def __init__(self, ranks: list[bytes], pattern: str = GPT2_PATTERN) -> None:
        import tiktoken

        if len(ranks) < 256 or sorted(ranks[:256]) != [bytes([b]) for b in range(256)]:
            raise TokenizerError("bpe spec is invalid: the first 256 ranks must be the 256 bytes; "
                                 "retrain the tokenizer")
        if len(set(ranks)) != len(ranks):
            raise TokenizerError("bpe spec is invalid: a token appears twice; "
                                 "retrain the tokenizer")
        vocab_size = len(ranks) + 1
        encoding = tiktoken.Encoding(
            name=f"smallgpt-bpe-{vocab_size}",
            pat_str=pattern,
            mergeable_ranks={token: rank for rank, token in enumerate(ranks)},
            special_tokens={EOT_TEXT: vocab_size - 1},
            explicit_n_vocab=vocab_size,
        )
        self.ranks, self.pattern = ranks, pattern
        super().__init__("bpe", encoding)

    def spec(self) -> dict[str, Any]:
        # Ranks are the token bytes in id order; base64 keeps arbitrary bytes valid JSON.
        return {"name": "bpe", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "pattern": self.pattern,
                "ranks": [base64.b64encode(token).decode("ascii") for token in self.ranks]}


class CharTokenizer(Tokenizer):
    """One id per character, in code point order; end-of-text is the id after the last one."""

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise TokenizerError("char spec is invalid: the characters must be non-empty, sorted "
                                 "and distinct; retrain the tokenizer")
        self.name = "char"
        self.chars = chars
        self.vocab_size = len(chars) + 1
        self.eot_id = len(chars)
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """Vectorised: numpy maps every character at once, with no Python loop per character."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == codes
        if not known.all():
            missing = sorted(set(chr(c) for c in codes[~known].tolist()))
            shown = ", ".join(repr(c) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise TokenizerError(
                f"text has {len(missing)} characters outside the char vocabulary: {shown}{more}; "
                "train the char tokenizer on text that includes them, or use bpe or gpt2")
        return ids.astype(dtype)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return "".join(EOT_TEXT if i == self.eot_id else self.chars[i] for i in ids)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def spec(self) -> dict[str, Any]:
        return {"name": "char", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "chars": self.chars}


# ---------------------------------------------------------------------------------------------
# BPE training


def _safe_cut(text: str, start: int) -> int:
    """The first index >= start where pre-tokenization always ends a chunk, or -1.

    Just before a newline followed by a non-space character: GPT-2's pattern always matches that
    newline on its own. Failing that, just before a single space between two non-space
    characters: only whitespace alternatives can hold a space, and they start at whitespace, so
    the chunk before ends there and the next one (" word", " 12", " ...") starts there.
    """
    cut = text.find("\n", start)
    while cut != -1 and (cut + 1 >= len(text) or text[cut + 1].isspace()):
        cut = text.find("\n", cut + 1)
    if cut != -1:
        return cut
    cut = text.find(" ", max(start, 1))
    while cut != -1 and (cut + 1 >= len(text) or text[cut - 1].isspace()
                         or text[cut + 1].isspace()):
        cut = text.find(" ", cut + 1)
    return cut


def safe_pieces(chunks: Iterable[str], size: int) -> Iterator[str]:
    """Re-cut text that arrives in chunks into pieces of about `size` characters that encode
    exactly as the whole text does: byte-level BPE tokens and char tokens never span a cut.

    Memory holds one chunk plus one piece. Text with no safe cut for LONGEST_UNCUT characters
    (no newline, no space: megabytes of CJK, say) is cut hard at `size`, the one place where
    the tokens may differ from encoding the whole at once.
    """
    carry = ""
    for chunk in chunks:
        carry = carry + chunk if carry else chunk
        start = 0
        while len(carry) - start > size:
            cut = _safe_cut(carry, start + size)
            if cut == -1:
                if len(carry) - start <= LONGEST_UNCUT:
                    break
                cut = start + size
            yield carry[start:cut]
            start = cut
        carry = carry[start:]
    if carry:
        yield carry


def count_chunks(texts: Iterable[str], piece_size: int = 1 << 20) -> Counter[bytes]:
    """How often each GPT-2 pre-token occurs, as UTF-8 bytes; merges are learned within them.

    Texts are matched a piece at a time, so memory holds the counts and one piece's matches,
    not a list of every match in a long document.
    """
    pattern = regex.compile(GPT2_PATTERN)
    counts: Counter[str] = Counter()
    for text in texts:
        for piece in safe_pieces((text,), piece_size):
            counts.update(pattern.findall(piece))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of `pair`, left to right."""
    out, i, n = [], 0, len(word)
    first, second = pair
    while i < n:
        if i < n - 1 and word[i] == first and word[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_bpe(chunk_counts: Counter[bytes] | dict[bytes, int], vocab_size: int) -> list[bytes]:
    """Learn merges until there are vocab_size - 1 tokens; returns the token bytes by rank.

    Works on unique chunks weighted by their counts. Pair counts and a pair -> chunks index are
    kept up to date, so each merge touches only the chunks that contain the merged pair. A heap
    with lazy deletion finds the most frequent pair; ties go to the smallest (left, right) ids,
    so training is deterministic. Stops early when no pair is left (every chunk is one token).
    """
    tokens = [bytes([b]) for b in range(256)]
    ids_of = {token: i for i, token in enumerate(tokens)}
    words = [list(chunk) for chunk in chunk_counts]
    weights = list(chunk_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, weight) in enumerate(zip(words, weights)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += weight
            pair_words[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(tokens) < vocab_size - 1:
        # Pop until the top entry still matches its pair's current count (others are stale).
        while heap and pair_counts.get(heap[0][1], 0) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            break
        _, pair = heapq.heappop(heap)
        merged = tokens[pair[0]] + tokens[pair[1]]
        # Two different merges can spell the same bytes; reuse the id so tiktoken's ranks stay
        # one per byte string.
        new_id = ids_of.get(merged)
        if new_id is None:
            new_id = len(tokens)
            tokens.append(merged)
            ids_of[merged] = new_id

        changed: dict[tuple[int, int], int] = defaultdict(int)
        for w in pair_words.pop(pair, ()):
            word, weight = words[w], weights[w]
            new_word = _merge_word(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # the index is a superset: this chunk lost the pair to an earlier merge
            for old in zip(word, word[1:]):
                changed[old] -= weight
            for new in zip(new_word, new_word[1:]):
                changed[new] += weight
                pair_words[new].add(w)
            words[w] = new_word
        pair_counts.pop(pair, None)
        for p, delta in changed.items():
            if delta == 0 or p == pair:
                continue
            count = pair_counts.get(p, 0) + delta
            if count > 0:
                pair_counts[p] = count
                heapq.heappush(heap, (-count, p))
            else:
                pair_counts.pop(p, None)
    return tokens


# ---------------------------------------------------------------------------------------------
# Building tokenizers


def check_tokenizer_choice(name: str, vocab_size: int | None = None) -> None:
    """Reject an unknown name or a bpe vocabulary too small to hold the bytes and end-of-text."""
    if name not in TOKENIZER_NAMES:
        raise TokenizerError(f"unknown tokenizer {name!r}; choose one of "
                             f"{', '.join(TOKENIZER_NAMES)}")
    if name == "bpe" and (vocab_size is None or vocab_size < MIN_BPE_VOCAB):
        raise TokenizerError(f"bpe vocabulary size {vocab_size} is too small; it needs at least "
                             f"{MIN_BPE_VOCAB} (256 bytes plus end-of-text)")


def train_tokenizer(name: str, texts: Iterable[str] | list[str],
                    vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer: gpt2 ignores the texts, char takes their characters, bpe learns merges.

    For bpe, `vocab_size` counts 256 bytes + merges + end-of-text; a small corpus may give fewer.
    """
    check_tokenizer_choice(name, vocab_size)
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise TokenizerError("cannot build a char tokenizer from empty text; "
                                 "give it the corpus")
        return CharTokenizer("".join(sorted(chars)))
    return BPETokenizer(learn_bpe(count_chunks(texts), vocab_size))


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer that `Tokenizer.spec()` described."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise TokenizerError("tokenizer spec is invalid: expected a mapping with a 'name'")
    name = spec["name"]
    check_tokenizer_choice(name, MIN_BPE_VOCAB)
    try:
        if name == "gpt2":
            tokenizer: Tokenizer = GPT2Tokenizer()
        elif name == "char":
            tokenizer = CharTokenizer(spec["chars"])
        else:
            ranks = [base64.b64decode(r, validate=True) for r in spec["ranks"]]
            tokenizer = BPETokenizer(ranks, spec.get("pattern", GPT2_PATTERN))
    except TokenizerError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenizerError(f"{name} tokenizer spec is invalid ({type(exc).__name__}: {exc}); "
                             "the checkpoint or meta.json may be damaged") from exc
    expected = spec.get("vocab_size", tokenizer.vocab_size)
    if expected != tokenizer.vocab_size:
        raise TokenizerError(f"{name} tokenizer spec says {expected} tokens but holds "
                             f"{tokenizer.vocab_size}; the checkpoint or meta.json may be damaged")
    return tokenizer


def to_tokens(tokenizer: Tokenizer, text: str | Sequence[str], prepend_bos: bool = False,
              device: Any = None, *, padding_side: str = "right",
              return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """tokenizer.to_tokens(text, ...): see Tokenizer.to_tokens."""
    return tokenizer.to_tokens(text, prepend_bos=prepend_bos, padding_side=padding_side,
                               return_mask=return_mask, device=device)


def to_str_tokens(tokenizer: Tokenizer, text: str | Sequence[int] | torch.Tensor,
                  prepend_bos: bool = False) -> list[str]:
    """tokenizer.to_str_tokens(text, ...): see Tokenizer.to_str_tokens."""
    return tokenizer.to_str_tokens(text, prepend_bos=prepend_bos)
