"""Preparing token files: documents -> train.bin / val.bin + meta.json, cached by fingerprint.

    corpus -> plan_split (sizes: whole documents held out, or the last part of a lone one)
           -> train_tokenizer (bpe: a sample of the training text; char: every character)
           -> write_tokens: pieces cut at safe boundaries, encoded on worker threads, written in
              order -> <cache_dir>/<fingerprint>/{train.bin, val.bin, meta.json}

Memory stays flat however large the corpus: text streams through in pieces of TASK_CHARS, with
at most 4 tasks per worker in flight; only per-document sizes (and names) are kept. Each
document ends with the end-of-text token. The cache directory is named by a fingerprint of the
source's state and every setting that changes the tokens, so a re-run reuses it without reading
the corpus, and any change rebuilds it; the cache's protocol (meta.json last, staged files,
reopen checks) is model/data/token_cache.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from model.data.chat_data import ChatData, prepare_chat
from model.data.config import DataConfig
from model.data.corpus import HF_PREFIX, Corpus, Document, open_corpus
from model.data.token_cache import (
    SPLITS,
    TokenCache,
    digest,
    find_cache,
    finish_cache,
    hashed_split,
    read_meta,
    start_cache,
    token_dtype,
    tokenizer_meta,
)
from model.data.tokenizer import Tokenizer, safe_pieces, tokenizer_from_spec, train_tokenizer
from model.errors import DataError
from model.files import staged_files
from model.progress import Advance, Progress, silent

FORMAT_VERSION = 1  # bump when a change here alters the token files, so old caches rebuild
TASK_CHARS = 1 << 18  # text per tokenisation task: enough tasks for both cores and a live bar
Route = tuple[str, str, Iterable[str]]  # (split, document name, its text chunks)


# ---------------------------------------------------------------------------------------------
# Train / validation split


@dataclass(frozen=True)
class SplitPlan:
    """Which text is held out for validation.

    Known sizes: whole documents (`val`), or the last part of a lone document (`cut`: its first
    `chars` characters train). A stream of unknown size (hub datasets): a document is held out
    when the hash of its name falls below `by_hash`, so the split needs no second pass.
    """

    val: frozenset[int] = frozenset()
    cut: tuple[int, int] | None = None  # (document index, characters for training)
    by_hash: float | None = None
    root: str = ""  # the corpus's location, left out of the names hashed

    def route(self, index: int, name: str) -> str:
        if self.by_hash is not None:
            return hashed_split(_name_key(name, self.root), self.by_hash)
        return "val" if index in self.val else "train"


def _name_key(name: str, root: str) -> bytes:
    """What the split hashes of a document: its name less the corpus's location."""
    return name.removeprefix(root).encode()


def plan_split(sizes: Sequence[tuple[str, int]], val_fraction: float,
               root: str = "") -> SplitPlan:
    """Hold out about `val_fraction` of the characters for validation, deterministically.

    One document: its last part is validation, as nanoGPT splits tiny-shakespeare, so figures
    compare. Several: whole documents are held out, so no validation text is seen in training.
    They are visited in the order of a hash of their names less the corpus's `root` (a fixed
    shuffle, so not all from one genre or directory, and the same wherever the corpus lies) and
    taken while they fit under the target; if none fits, the one closest to it is taken. Empty
    documents take no part.
    """
    nonempty = [i for i, (_, chars) in enumerate(sizes) if chars]
    if len(nonempty) == 1:
        only = nonempty[0]
        return SplitPlan(cut=(only, int(sizes[only][1] * (1.0 - val_fraction))))
    target = val_fraction * sum(chars for _, chars in sizes)
    order = sorted(nonempty, key=lambda i: hashlib.sha256(_name_key(sizes[i][0], root)).digest())
    held: set[int] = set()
    held_chars = 0
    for i in order:
        if held_chars + sizes[i][1] <= target:
            held.add(i)
            held_chars += sizes[i][1]
    if not held and order:
        held.add(min(order, key=lambda i: abs(sizes[i][1] - target)))
    return SplitPlan(val=frozenset(held))


def _cut(chunks: Iterable[str], at: int) -> tuple[Iterator[str], Iterator[str]]:
    """The text before and from character `at`; the first must be read before the second."""
    source, rest = iter(chunks), [""]

    def head() -> Iterator[str]:
        seen = 0
        for chunk in source:
            if seen + len(chunk) >= at:
                yield chunk[:at - seen]
                rest[0] = chunk[at - seen:]
                return
            seen += len(chunk)
            yield chunk

    def tail() -> Iterator[str]:
        yield rest[0]
        yield from source

    return head(), tail()


def _checked(chunks: Iterable[str], name: str, expected: int) -> Iterator[str]:
    """Pass the chunks through; a file that changed since it was sized is an error."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        yield chunk
    if seen != expected:
        raise DataError(f"corpus file {name!r} changed while it was prepared ({expected} "
                        f"characters, then {seen}); prepare the data again")


def routes(corpus: Corpus, sizes: list[tuple[str, int]] | None, plan: SplitPlan,
           val_fraction: float) -> Iterator[Route]:
    """Every non-empty document as (split, name, chunks), in corpus order; the cut document
    comes twice, its head for training and its tail for validation."""
    docs: Iterator[Document] = corpus.documents()
    if sizes is None:  # a stream: a lone document is cut like a single file
        head = list(itertools.islice(docs, 2))
        if not head:
            raise DataError("the corpus is empty: it holds no text")
        if len(head) == 1:
            text = head[0].text()
            plan = SplitPlan(cut=(0, int(len(text) * (1.0 - val_fraction))))
            head = [Document(head[0].name, (text,))]
        docs = itertools.chain(head, docs)
    for index, doc in enumerate(docs):
        chunks = doc.chunks if sizes is None else _checked(doc.chunks, doc.name, sizes[index][1])
        if plan.cut is not None and plan.cut[0] == index:
            train, val = _cut(chunks, plan.cut[1])
            yield "train", doc.name, train
            yield "val", doc.name, val
        elif sizes is None or sizes[index][1]:
            yield plan.route(index, doc.name), doc.name, chunks


def training_text(cfg: DataConfig, corpus: Corpus, sizes: list[tuple[str, int]] | None,
                   plan: SplitPlan) -> Iterator[str]:
    """What the tokenizer learns from: char needs every character of both splits; bpe counts
    the training text, or an evenly spread sample of data.bpe_sample_mb of it (the first part,
    for a stream of unknown size)."""
    with contextlib.closing(routes(corpus, sizes, plan, cfg.val_fraction)) as stream:
        if cfg.tokenizer == "char":
            for _, _, chunks in stream:
                yield from chunks
            return
        sample, total = cfg.bpe_sample_mb * 1e6, None
        if sizes is not None:
            total = sum(chars for i, (_, chars) in enumerate(sizes) if i not in plan.val)
            total -= sizes[plan.cut[0]][1] - plan.cut[1] if plan.cut is not None else 0
        seen = taken = 0
        for split, _, chunks in stream:
            if split == "val":
                continue  # its chunks are never asked for, so a file is never even opened
            for piece in safe_pieces(chunks, TASK_CHARS):
                if total is None and taken >= sample:
                    return  # a stream: its first part is the sample
                seen += len(piece)
                # Keep the share taken at or below sample / total all along: an even spread.
                if total is None or taken * total <= seen * sample:
                    taken += len(piece)
                    yield piece


# ---------------------------------------------------------------------------------------------
# Tokenisation


Task = tuple[str, list[str | None]]  # (split, pieces); None marks the end of a document


def _tasks(stream: Iterable[Route], val_names: list[str]) -> Iterator[Task]:
    """Group each split's pieces into tasks of about TASK_CHARS characters, in order."""
    open_tasks: dict[str, list[str | None]] = {split: [] for split in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    for split, name, chunks in stream:
        if split == "val" and len(val_names) < 100:
            val_names.append(name)
        task = open_tasks[split]
        for piece in safe_pieces(chunks, TASK_CHARS):
            task.append(piece)
            chars[split] += len(piece)
            if chars[split] >= TASK_CHARS:
                yield split, task
                task = open_tasks[split] = []
                chars[split] = 0
        task.append(None)
    for split in SPLITS:
        if open_tasks[split]:
            yield split, open_tasks[split]


def write_tokens(tokenizer: Tokenizer, stream: Iterable[Route], files: Mapping[str, BinaryIO],
                 num_workers: int = 2, progress: Advance | None = None,
                 ) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Write each split's tokens to files[split], each document followed by end-of-text.

    Threads, not processes: tiktoken's encoder releases the GIL, so two threads use two cores
    without copying text into worker processes. Results are written in order, with at most
    4 tasks per worker in flight, so memory stays flat on large corpora.
    Returns counts per split (tokens, bytes (UTF-8, end-of-text excluded), characters and
    documents) and the names of the first 100 validation documents.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    eot = np.array([tokenizer.eot_id], dtype=dtype)

    def encode(task: Task) -> tuple[str, np.ndarray, dict[str, int]]:
        split, pieces = task
        parts = [eot if p is None else tokenizer.encode_array(p, dtype) for p in pieces]
        texts = [p for p in pieces if p is not None]
        counts = {"bytes": sum(len(p.encode("utf-8")) for p in texts),
                  "characters": sum(len(p) for p in texts),
                  "documents": len(pieces) - len(texts)}
        return split, np.concatenate(parts), counts

    totals = {split: dict.fromkeys(("tokens", "bytes", "characters", "documents"), 0)
              for split in SPLITS}
    val_names: list[str] = []
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending: deque = deque()

        def write_oldest() -> None:
            split, ids, counts = pending.popleft().result()
            files[split].write(ids.tobytes())
            totals[split]["tokens"] += len(ids)
            for key, value in counts.items():
                totals[split][key] += value
            if progress:
                progress(counts["bytes"])

        for task in _tasks(stream, val_names):
            pending.append(pool.submit(encode, task))
            if len(pending) >= 4 * max(1, num_workers):
                write_oldest()
        while pending:
            write_oldest()
    return totals, val_names


# ---------------------------------------------------------------------------------------------
# The cache


class PreparedData(TokenCache):
    """A complete text cache: train.bin and val.bin, each document closed by end-of-text."""

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token, for bits per byte = nats/token / ln 2 / this."""
        stats = self.split_stats(split)
        return stats["bytes"] / stats["tokens"]


def _settings(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Every setting that changes the token files (block_size does not: windows are cut later).
    A given tokenizer (fine-tuning keeps the checkpoint's) counts by its full spec."""
    settings: dict[str, Any] = {"format": FORMAT_VERSION, "source": cfg.source,
                                "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction}
    if tokenizer is not None:
        settings["tokenizer"] = {"given": digest(tokenizer.spec())}
    elif cfg.tokenizer == "bpe":
        settings.update(bpe_vocab_size=cfg.bpe_vocab_size, bpe_sample_mb=cfg.bpe_sample_mb)
    if cfg.source.startswith(HF_PREFIX):
        settings.update(hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                        text_column=cfg.text_column)
    return settings


def fingerprint(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer | None = None) -> str:
    """A readable, unique cache name, e.g. shakespeare-bpe4096-1f3a9c0e5d7b2a64."""
    short = digest({"settings": _settings(cfg, tokenizer), "source": corpus.state()})[:16]
    if tokenizer is not None:
        return f"{corpus.label}-{tokenizer.name}{tokenizer.vocab_size}-{short}"
    vocab = str(cfg.bpe_vocab_size) if cfg.tokenizer == "bpe" else ""
    return f"{corpus.label}-{cfg.tokenizer}{vocab}-{short}"


def _check_windows(data: PreparedData, block_size: int) -> None:
    for split in SPLITS:
        tokens = data.num_tokens(split)
        if tokens < block_size + 1:
            name = "training" if split == "train" else "validation"
            raise DataError(
                f"the {name} split has only {tokens} tokens, fewer than one window of block_size "
                f"+ 1 = {block_size + 1}; use a larger corpus, a smaller model.block_size, or "
                "change data.val_fraction")


def prepare_data(cfg: DataConfig, block_size: int, progress: Progress = silent,
                 tokenizer: Tokenizer | None = None) -> PreparedData | ChatData:
    """Tokenize cfg.source into <cfg.cache_dir>/<fingerprint>/, or reuse a complete cache there.

    The tokenizer is cfg.tokenizer's (trained on the corpus for char and bpe) unless one is
    given: fine-tuning encodes the new corpus with the pretrained model's own tokenizer.
    `progress` hears of each stage (checking, reading for the tokenizer, tokenizing) in bytes.
    Raises DataError / TokenizerError with a one-line message for every bad input.
    data.format "chat" prepares conversations with a loss mask instead (model/data/chat_data.py).
    """
    if cfg.format == "chat":
        return prepare_chat(cfg, block_size, progress, tokenizer)
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    corpus = open_corpus(cfg.source, cfg.hf_config, cfg.hf_split, cfg.text_column)
    directory = Path(cfg.cache_dir).expanduser() / fingerprint(cfg, corpus, tokenizer)
    data = find_cache(directory, load_prepared)
    if data is None:
        data = _build_cache(cfg, directory, corpus, progress, tokenizer)
    _check_windows(data, block_size)
    return data


def _build_cache(cfg: DataConfig, directory: Path, corpus: Corpus, progress: Progress,
                 tokenizer: Tokenizer | None = None) -> PreparedData:
    start_cache(directory, cfg.cache_dir)
    total = corpus.total_bytes()
    # A stream of unknown size is not read here: no stage to show.
    with (progress if total is not None else silent)("checking", total) as advance:
        sizes = corpus.sizes(advance)
    if sizes is not None and not any(chars for _, chars in sizes):
        raise DataError(f"corpus {cfg.source!r} is empty: it holds no text")
    plan = SplitPlan(by_hash=cfg.val_fraction, root=corpus.root) if sizes is None else (
        plan_split(sizes, cfg.val_fraction, corpus.root))
    given = tokenizer
    if tokenizer is None:
        learns = cfg.tokenizer != "gpt2"
        texts = training_text(cfg, corpus, sizes, plan) if learns else ()
        with (progress if learns else silent)(f"reading for {cfg.tokenizer}") as advance:
            tokenizer = train_tokenizer(cfg.tokenizer, _counted(texts, advance),
                                        cfg.bpe_vocab_size)

    with staged_files(directory, [f"{split}.bin" for split in SPLITS]) as files:
        with progress("tokenizing", total) as advance:
            counts, val_names = write_tokens(
                tokenizer, routes(corpus, sizes, plan, cfg.val_fraction),
                {split: files[f"{split}.bin"] for split in SPLITS}, cfg.num_proc, advance)
    splits = {split: {"file": f"{split}.bin", **stats,
                      "bytes_per_token": stats["bytes"] / max(1, stats["tokens"])}
              for split, stats in counts.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": directory.name,
        "settings": _settings(cfg, given),
        **tokenizer_meta(tokenizer),
        "splits": splits,
        "val_documents": val_names,
    }
    finish_cache(directory, meta)
    return PreparedData(directory, meta, tokenizer)


def _counted(texts: Iterable[str], advance: Advance) -> Iterator[str]:
    for text in texts:
        advance(len(text.encode("utf-8")))  # the stages count bytes, not characters
        yield text


def load_prepared(directory: str | Path) -> PreparedData:
    """Reopen a cache directory; a missing marker or a short token file is a DataError."""
    directory = Path(directory)

    def file_sizes(meta: dict[str, Any]) -> dict[str, int]:
        itemsize = np.dtype(meta["dtype"]).itemsize
        return {f"{s}.bin": int(meta["splits"][s]["tokens"]) * itemsize for s in SPLITS}

    meta = read_meta(directory, FORMAT_VERSION, file_sizes)
    return PreparedData(directory, meta, tokenizer_from_spec(meta["tokenizer"]))
