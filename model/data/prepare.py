"""Preparing token files: documents -> train.bin / val.bin + meta.json, cached by fingerprint.

    corpus -> plan_split (sizes: whole documents held out, or the last part of a lone one)
           -> train_tokenizer (bpe: a sample of the training text; char: every character)
           -> write_tokens: pieces cut at safe boundaries, encoded on worker threads, written in
              order -> <cache_dir>/<fingerprint>/{train.bin, val.bin, meta.json}

Memory stays flat however large the corpus: text streams through in pieces of TASK_CHARS, with
at most 4 tasks per worker in flight; only per-document sizes (and names) are kept. Each
document ends with the end-of-text token. The cache directory is named by a fingerprint of the
source's state and every setting that changes the tokens, so a re-run reuses it without reading
the corpus, and any change rebuilds it. meta.json is written last, by rename, and marks the cache
complete; a cache without it (an interrupted run) is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model.config import DataConfig
from model.data.chat_data import ChatData, prepare_chat
from model.data.corpus import HF_PREFIX, Corpus, Document, open_corpus
from model.data.token_cache import SPLITS, token_dtype
from model.data.tokenizer import Tokenizer, safe_pieces, tokenizer_from_spec, train_tokenizer
from model.errors import DataError
from model.files import ensure_writable_dir, fsync_dir, write_json_atomic

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
            digest = _name_hash(name, self.root)
            return "val" if int.from_bytes(digest[:8], "big") < self.by_hash * 2**64 else "train"
        return "val" if index in self.val else "train"


def _name_hash(name: str, root: str) -> bytes:
    return hashlib.sha256(name.removeprefix(root).encode()).digest()


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
    order = sorted(nonempty, key=lambda i: _name_hash(sizes[i][0], root))
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


def write_tokens(tokenizer: Tokenizer, stream: Iterable[Route], paths: dict[str, Path],
                 num_workers: int = 2, progress: Callable[[int], object] | None = None,
                 ) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Write each split's tokens to paths[split], each document followed by end-of-text.

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
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(paths[split], "wb")) for split in SPLITS}
        pool = stack.enter_context(ThreadPoolExecutor(max(1, num_workers)))
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
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    return totals, val_names


# ---------------------------------------------------------------------------------------------
# The cache


@dataclass
class PreparedData:
    """A complete cache directory: token files, their meta.json, and the tokenizer they used."""

    dir: Path
    train_path: Path
    val_path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    reused: bool = False  # True when an existing cache was found; False when just built

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token, for bits per byte = nats/token / ln 2 / this."""
        stats = self._split(split)
        return stats["bytes"] / stats["tokens"]

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
        return self.meta["splits"][split]


def _settings(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Every setting that changes the token files (block_size does not: windows are cut later).
    A given tokenizer (fine-tuning keeps the checkpoint's) counts by its full spec."""
    settings: dict[str, Any] = {"format": FORMAT_VERSION, "source": cfg.source,
                                "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction}
    if tokenizer is not None:
        spec = json.dumps(tokenizer.spec(), sort_keys=True)
        settings["tokenizer"] = {"given": hashlib.sha256(spec.encode()).hexdigest()}
    elif cfg.tokenizer == "bpe":
        settings.update(bpe_vocab_size=cfg.bpe_vocab_size, bpe_sample_mb=cfg.bpe_sample_mb)
    if cfg.source.startswith(HF_PREFIX):
        settings.update(hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                        text_column=cfg.text_column)
    return settings


def fingerprint(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer | None = None) -> str:
    """A readable, unique cache name, e.g. shakespeare-bpe4096-1f3a9c0e5d7b2a64."""
    blob = json.dumps({"settings": _settings(cfg, tokenizer), "source": corpus.state()},
                      sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    if tokenizer is not None:
        return f"{corpus.label}-{tokenizer.name}{tokenizer.vocab_size}-{digest}"
    vocab = str(cfg.bpe_vocab_size) if cfg.tokenizer == "bpe" else ""
    return f"{corpus.label}-{cfg.tokenizer}{vocab}-{digest}"


def _check_windows(data: PreparedData, block_size: int) -> None:
    for split in SPLITS:
        tokens = data.num_tokens(split)
        if tokens < block_size + 1:
            name = "training" if split == "train" else "validation"
            raise DataError(
                f"the {name} split has only {tokens} tokens, fewer than one window of block_size "
                f"+ 1 = {block_size + 1}; use a larger corpus, a smaller model.block_size, or "
                "change data.val_fraction")


def prepare_data(cfg: DataConfig, block_size: int, progress: bool = True,
                 tokenizer: Tokenizer | None = None) -> PreparedData | ChatData:
    """Tokenize cfg.source into <cfg.cache_dir>/<fingerprint>/, or reuse a complete cache there.

    The tokenizer is cfg.tokenizer's (trained on the corpus for char and bpe) unless one is
    given: fine-tuning encodes the new corpus with the pretrained model's own tokenizer.
    Raises DataError / TokenizerError with a one-line message for every bad input.
    data.format "chat" prepares conversations with a loss mask instead (model/chat_data.py).
    """
    if cfg.format == "chat":
        return prepare_chat(cfg, block_size, progress, tokenizer)
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    corpus = open_corpus(cfg.source, cfg.hf_config, cfg.hf_split, cfg.text_column)
    directory = Path(cfg.cache_dir).expanduser() / fingerprint(cfg, corpus, tokenizer)
    data = None
    if (directory / "meta.json").exists():
        try:
            data = load_prepared(directory)
            data.reused = True
        except DataError:
            data = None  # damaged or half-written: never used, rebuilt below
    if data is None:
        data = _build_cache(cfg, directory, corpus, progress, tokenizer)
    _check_windows(data, block_size)
    return data


def _bar(desc: str, total: int | None, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                disable=not progress, dynamic_ncols=True)


def _build_cache(cfg: DataConfig, directory: Path, corpus: Corpus, progress: bool,
                 tokenizer: Tokenizer | None = None) -> PreparedData:
    try:
        ensure_writable_dir(directory)
    except OSError as exc:
        raise DataError(f"the data cache directory {str(Path(cfg.cache_dir))!r} is not "
                        f"writable ({exc.strerror or exc}); set data.cache_dir to a writable "
                        "folder") from exc
    # The old marker goes first, so a crash during the rebuild cannot pair it with new files;
    # leftovers of interrupted runs go too.
    (directory / "meta.json").unlink(missing_ok=True)
    for leftover in directory.glob("*.tmp-*"):
        leftover.unlink(missing_ok=True)

    total = corpus.total_bytes()
    with _bar("checking", total, progress and total is not None) as bar:
        sizes = corpus.sizes(bar.update)
    if sizes is not None and not any(chars for _, chars in sizes):
        raise DataError(f"corpus {cfg.source!r} is empty: it holds no text")
    plan = SplitPlan(by_hash=cfg.val_fraction, root=corpus.root) if sizes is None else (
        plan_split(sizes, cfg.val_fraction, corpus.root))
    given = tokenizer
    if tokenizer is None:
        learns = cfg.tokenizer != "gpt2"
        texts = training_text(cfg, corpus, sizes, plan) if learns else ()
        with _bar(f"reading for {cfg.tokenizer}", None, progress and learns) as bar:
            tokenizer = train_tokenizer(cfg.tokenizer, _counted(texts, bar.update),
                                        cfg.bpe_vocab_size)

    tmp = {split: directory / f"{split}.bin.tmp-{os.getpid()}" for split in SPLITS}
    try:
        with _bar("tokenizing", total, progress) as bar:
            counts, val_names = write_tokens(
                tokenizer, routes(corpus, sizes, plan, cfg.val_fraction), tmp, cfg.num_proc,
                bar.update)
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    splits = {}
    for split, stats in counts.items():
        os.replace(tmp[split], directory / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", **stats,
                         "bytes_per_token": stats["bytes"] / max(1, stats["tokens"])}
    fsync_dir(directory)

    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": directory.name,
        "settings": _settings(cfg, given),
        "tokenizer": tokenizer.spec(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": splits,
        "val_documents": val_names,
    }
    write_json_atomic(directory / "meta.json", meta)
    fsync_dir(directory)
    return PreparedData(directory, directory / "train.bin", directory / "val.bin", meta, tokenizer)


def _counted(texts: Iterable[str], update: Callable[[int], object]) -> Iterator[str]:
    for text in texts:
        update(len(text.encode("utf-8")))  # the bars count bytes, not characters
        yield text


def load_prepared(directory: str | Path) -> PreparedData:
    """Reopen a cache directory; a missing marker or a short token file is a DataError."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{str(directory)!r} holds no meta.json: it is not a prepared data cache, "
                        "or its preparation was interrupted; prepare the data again")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        version, itemsize = meta["format_version"], np.dtype(meta["dtype"]).itemsize
        expected = {s: int(meta["splits"][s]["tokens"]) * itemsize for s in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{str(meta_path)!r} is damaged ({type(exc).__name__}); delete "
                        f"{str(directory)!r} and prepare the data again") from exc
    if version != FORMAT_VERSION:
        raise DataError(f"{str(directory)!r} was prepared by another version (format {version}, "
                        f"this is {FORMAT_VERSION}); prepare the data again")
    for split in SPLITS:
        path = directory / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != expected[split]:
            raise DataError(f"{str(path)!r} has {size} bytes, expected {expected[split]}: the "
                            "cache is incomplete (an interrupted run?); prepare the data again")
    tokenizer = tokenizer_from_spec(meta["tokenizer"])
    return PreparedData(directory, directory / "train.bin", directory / "val.bin", meta, tokenizer)
