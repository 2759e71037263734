"""Reading corpora: a source name becomes a stream of documents, never the whole corpus at once.

    "shakespeare"       the embedded plays (package data), one document each
    a .txt file         one document, read in chunks
    a directory / glob  every .txt file under it (sorted), one document per file
    hf:NAME             rows of a Hugging Face dataset, streamed: a hub name, a local dataset
                        directory, or data files (.parquet, .json, .jsonl, .csv, .txt; globs too)

`open_corpus` reads no text: a corpus knows its `state()` (what decides whether a cache of its
tokens is still current) and `sizes()` (characters per document: a checking pass over local
files, None for hub streams) before `documents()` reads it. A document's text comes as chunks of
bounded size, to be consumed before the next document is asked for.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gc
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from model.errors import DataError, first_line

SHAKESPEARE = "shakespeare"
SHAKESPEARE_ASSET = "assets/shakespeare.jsonl.gz"
HF_PREFIX = "hf:"
CHUNK = 1 << 20  # characters (or bytes) per read: memory stays flat however large a file is
HF_BATCH = 256  # hub rows fetched at a time
DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv",
                      ".txt": "text"}


@dataclass(frozen=True)
class Document:
    """One unit of text: a file, a play or a hub row. Never split across train and val (unless
    the corpus is a single document). `chunks` is read lazily, once, in order."""

    name: str
    chunks: Iterable[str]

    def text(self) -> str:
        """The whole text at once: for small documents and tests."""
        return "".join(self.chunks)


class Corpus:
    """A source opened for reading; see the module docstring."""

    label: str  # a short name for the cache directory, e.g. "tinyshakespeare"
    # The start of every document name that says where the corpus lives. The split hashes
    # names without it, so a corpus moved or copied elsewhere keeps its validation set.
    root: str = ""

    def state(self) -> Any:
        """A cheap, JSON-serializable description of the contents: equal state, equal text."""
        raise NotImplementedError

    def sizes(self, progress: Callable[[int], object] | None = None,
              ) -> list[tuple[str, int]] | None:
        """(name, characters) of every document in order, or None for a stream of unknown size.
        May read the corpus once, calling progress(bytes) as it goes (local files are checked
        for valid UTF-8 here)."""
        return None

    def total_bytes(self) -> int | None:
        """About how many bytes of text `documents()` yields, for progress bars; None: unknown."""
        return None

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError


def open_corpus(source: str, hf_config: str | None = None, hf_split: str = "train",
                text_column: str = "text") -> Corpus:
    """The corpus a source names; raises DataError when it does not exist. Reads no text."""
    if source == SHAKESPEARE:
        return Shakespeare()
    if source.startswith(HF_PREFIX):
        return HubDataset(source[len(HF_PREFIX):], hf_config, hf_split, text_column)
    return TextFiles(source)


def _is_glob(text: str) -> bool:
    """Whether a source (or one part of its path) holds a wildcard, as glob reads them."""
    return any(c in text for c in "*?[")


def source_label(source: str) -> str:
    """A short name for a source's cache directory: its last plain path part, e.g.
    "tinyshakespeare" for data/tinyshakespeare.txt ("corpus" when nothing is left)."""
    plain = [part for part in Path(source).parts if not _is_glob(part)]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(plain[-1]).stem if plain else "")[:40]
    return label.strip("._") or "corpus"


# ---------------------------------------------------------------------------------------------
# Local text files


def local_files(source: str) -> list[Path]:
    """The files a local source names: the file itself, *.txt under a directory, or a glob."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"corpus directory {source!r} holds no .txt files; add some or "
                            "point data.source at a file")
        return files
    if _is_glob(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"corpus glob {source!r} matches no files; check the pattern")
        return files
    raise DataError(f"corpus {source!r} not found: give a .txt file, a directory or glob of them, "
                    f"{SHAKESPEARE!r}, or hf:NAME for a Hugging Face dataset")


def _corpus_root(source: str) -> str:
    """The directory a directory or glob source names its files under, ending in a separator;
    "" for a single file (one document: the split cuts it, it hashes nothing)."""
    path = Path(source).expanduser()
    if path.is_file():
        return ""
    if not path.is_dir():  # a glob: the parts before the first wildcard
        path = Path(*itertools.takewhile(lambda part: not _is_glob(part), path.parts))
    return os.path.join(str(path), "")


def _read_error(path: Path, exc: OSError) -> DataError:
    return DataError(f"cannot read corpus file {str(path)!r}: {exc.strerror or exc}")


def count_bad_utf8(path: Path) -> int:
    """How many bytes of the file are not valid UTF-8."""
    # surrogateescape turns each undecodable byte into one lone surrogate: count those.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    bad = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            bad += len(re.findall("[\udc80-\udcff]", decoder.decode(chunk)))
    return bad + len(re.findall("[\udc80-\udcff]", decoder.decode(b"", final=True)))


def check_text_file(path: Path) -> int | tuple[int, int]:
    """Characters the file reads as (after a BOM is dropped and newlines become "\\n"), or, when
    it is not valid UTF-8, (number of bad bytes, offset of the first). Reads in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    chars = crlf = offset = 0
    last = ""
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last read
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    return count_bad_utf8(path), offset - pending + exc.start
                if offset == 0 and text.startswith("\ufeff"):
                    chars -= 1  # utf-8-sig drops a leading byte-order mark
                # "\r\n" reads as one "\n"; a lone "\r" as "\n", one character either way.
                crlf += text.count("\r\n") + (last == "\r" and text[:1] == "\n")
                chars += len(text)
                last = text[-1:] or last
                offset += len(chunk)
                if not chunk:
                    return chars - crlf
    except OSError as exc:
        raise _read_error(path, exc) from exc


class TextFiles(Corpus):
    """A .txt file, or the .txt files under a directory or matching a glob: one document each."""

    def __init__(self, source: str) -> None:
        self.paths = local_files(source)
        self.label = source_label(source)
        self.root = _corpus_root(source)

    def state(self) -> Any:
        # Paths, sizes and modification times (as make does): deciding reuse reads no text.
        files = []
        for path in self.paths:
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        return {"files": files}

    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.paths)

    def sizes(self, progress: Callable[[int], object] | None = None) -> list[tuple[str, int]]:
        """Checks every file before any work: the user needs the file and the number of bad
        bytes, not a decoder's "invalid start byte" an hour in. Nothing is dropped or replaced."""
        sizes, problems = [], []
        for path in self.paths:
            checked = check_text_file(path)
            if isinstance(checked, tuple):
                problems.append(_utf8_problem(path, *checked))
            else:
                sizes.append((str(path), checked))
            if progress:
                progress(path.stat().st_size)
        if problems:
            more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
            raise DataError(f"corpus file {problems[0]}{more}; {_CONVERT}")
        return sizes

    def documents(self) -> Iterator[Document]:
        for path in self.paths:
            yield Document(str(path), _read_chunks(path))


def _read_chunks(path: Path) -> Iterator[str]:
    # Text mode reads as the datasets "text" builder did: universal newlines, BOM dropped.
    try:
        with open(path, encoding="utf-8-sig") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except OSError as exc:
        raise _read_error(path, exc) from exc
    except UnicodeDecodeError as exc:
        checked = check_text_file(path)
        problem = _utf8_problem(path, *checked) if isinstance(checked, tuple) else str(path)
        raise DataError(f"corpus file {problem}; {_CONVERT}") from exc


_CONVERT = "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"


def _utf8_problem(path: Path, bad: int, first: int) -> str:
    what = "byte that is" if bad == 1 else "bytes that are"
    return f"{str(path)!r} has {bad} {what} not valid UTF-8 (the first at byte {first})"


# ---------------------------------------------------------------------------------------------
# The embedded corpus


class Shakespeare(Corpus):
    """The embedded corpus: 38 of Shakespeare's plays as plain text in tiny-shakespeare's style
    (about 5 MB), one document each, shipped inside the package.

    A gzipped JSON-lines file, {"name": "tragedies/hamlet", "text": ...} per play: zlib is in
    every Python that can install packages, and package data needs no other distribution.
    """

    label = SHAKESPEARE

    def __init__(self) -> None:
        self.asset = resources.files(__package__).joinpath(SHAKESPEARE_ASSET)
        if not self.asset.is_file():
            raise DataError(f"the embedded shakespeare corpus ({SHAKESPEARE_ASSET}) is missing "
                            "from the installed package; reinstall smallgpt, or set data.source "
                            "to a text file")

    def state(self) -> Any:
        return {"asset": SHAKESPEARE_ASSET,
                "sha256": hashlib.sha256(self.asset.read_bytes()).hexdigest()}

    def sizes(self, progress: Callable[[int], object] | None = None,
              ) -> list[tuple[str, int]]:
        return [(doc.name, len(doc.text())) for doc in self.documents()]

    def documents(self) -> Iterator[Document]:
        try:
            with self.asset.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
                for line in lines:
                    play = json.loads(line)
                    yield Document(play["name"], (play["text"],))
        except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"the embedded shakespeare corpus ({SHAKESPEARE_ASSET}) is damaged "
                            f"({type(exc).__name__}); reinstall smallgpt") from exc


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


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


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the datasets library's bars and logs, then restore them."""
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


class HubDataset(Corpus):
    """Rows of a Hugging Face dataset, streamed in batches: memory holds one batch of rows.

    NAME is a hub dataset ("karpathy/tiny_shakespeare"), a local folder in the hub layout, or
    data files (a path or glob ending in .parquet, .json, .jsonl, .csv or .txt). Its state is
    the dataset's revision as datasets resolves it (the hub commit; for local files their
    paths, sizes and times), so deciding whether a cache is current reads no rows.
    """

    def __init__(self, name: str, config: str | None, split: str, column: str) -> None:
        if not name:
            raise DataError("hf: needs a dataset name, e.g. hf:karpathy/tiny_shakespeare")
        self.name, self.config, self.split, self.column = name, config, split, column
        self.label = source_label(name)
        self.root = f"{name}/"  # rows are split alike wherever the dataset is read from
        self.local = Path(name).expanduser().exists() or _is_glob(name)
        suffix = Path(name.rstrip("/")).suffix.lower()
        if self.local and not Path(name).expanduser().is_dir():
            if suffix not in DATA_FILE_BUILDERS:
                raise DataError(f"hf:{name}: data files must end in "
                                f"{', '.join(DATA_FILE_BUILDERS)}; or give a dataset folder")
            self.args: dict[str, Any] = {"path": DATA_FILE_BUILDERS[suffix],
                                         "data_files": {split: str(Path(name).expanduser())}}
        else:
            self.args = {"path": str(Path(name).expanduser()) if self.local else name}
        self.args["name"] = config
        if not self.local and not (_env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")):
            problem = _hub_unreachable()
            if problem:
                raise DataError(f"the Hugging Face hub cannot be reached ({problem}); connect to "
                                "the network, or set HF_HUB_OFFLINE=1 to use a copy in the local "
                                "cache")

    def _call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Run a datasets call; its many error types become one DataError line."""
        quiet = _quiet_datasets() if self.local else contextlib.nullcontext()
        try:
            with quiet:
                return fn(**self.args, **kwargs)
        except ConnectionError as exc:
            raise DataError(f"the Hugging Face hub cannot be reached and {self.name!r} is not in "
                            f"the local cache ({first_line(exc)}); connect to the network and "
                            "try again") from exc
        except Exception as exc:  # datasets raises many types; the user needs the first line
            raise DataError(f"cannot load Hugging Face dataset {self.name!r} (config "
                            f"{self.config!r}, split {self.split!r}): {first_line(exc)}") from exc

    @functools.cached_property
    def builder(self) -> Any:
        import datasets

        return self._call(datasets.load_dataset_builder)

    def state(self) -> Any:
        builder = self.builder
        return {"builder": builder.name, "config": builder.config_id, "revision": builder.hash}

    def documents(self) -> Iterator[Document]:
        batches = self._parquet() if self.builder.name == "parquet" else self._stream()
        row = 0
        try:
            while (texts := self._next_texts(batches)) is not None:
                for text in texts:
                    if text:
                        yield Document(f"{self.name}/{self.split}/{row}", (text,))
                    row += 1
        finally:
            # An abandoned parquet reader left to interpreter exit can abort the process
            # ("terminate called without an active exception", apache/arrow#45214): close it
            # and collect the cycles that hold it now.
            batches.close()
            del batches
            gc.collect()

    def _parquet(self) -> Iterator[Any]:
        """Parquet files (local, or hf:// on the hub) read here, one at a time through an 8 MB
        buffered stream: the datasets library's Arrow scanner reads ahead on threads, and its
        memory grows with the shard when the tokenizer is the slower side."""
        import fsspec
        import pyarrow.parquet as pq

        files = (self.builder.config.data_files or {}).get(self.split)
        if not files:
            splits = ", ".join(map(str, self.builder.config.data_files or {})) or "none"
            raise DataError(f"Hugging Face dataset {self.name!r} has no split {self.split!r}; "
                            f"its splits are {splits}; set data.hf_split")
        for url in files:
            with fsspec.open(url, "rb") as f:
                parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=8 << 20)
                self._check_column(parquet.schema_arrow.names)
                yield from parquet.iter_batches(batch_size=HF_BATCH, columns=[self.column])

    def _stream(self) -> Iterator[Any]:
        """Other formats through datasets' streaming, as Arrow batches of one column (not rows
        as Python dicts: one column is all the text needs)."""
        import datasets

        stream = self._call(datasets.load_dataset, split=self.split, streaming=True)
        if stream.column_names is not None:
            self._check_column(stream.column_names)
        yield from stream.select_columns([self.column]).with_format("arrow").iter(HF_BATCH)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row as a dict of all its columns, streamed: what chat data reads, whole
        records where text reads one column."""
        import datasets

        stream = self._call(datasets.load_dataset, split=self.split, streaming=True)
        try:
            yield from stream
        except DataError:
            raise
        except Exception as exc:  # a bad file or a dropped connection, in the middle
            raise self._reading_failed(exc) from exc

    def _reading_failed(self, exc: Exception) -> DataError:
        return DataError(f"reading Hugging Face dataset {self.name!r} failed: {first_line(exc)}")

    def _check_column(self, columns: list[str]) -> None:
        if self.column not in columns:
            raise DataError(f"Hugging Face dataset {self.name!r} has no column {self.column!r}; "
                            f"its columns are {', '.join(columns)}; set data.text_column")

    def _next_texts(self, batches: Iterator[Any]) -> list[str | None] | None:
        import pyarrow as pa

        try:
            table = next(batches, None)
        except DataError:
            raise
        except Exception as exc:  # a bad file or a dropped connection, in the middle
            raise self._reading_failed(exc) from exc
        if table is None:
            return None
        column = table.column(0)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_null(column.type)):
            raise DataError(f"column {self.column!r} of {self.name!r} does not hold text; set "
                            f"data.text_column (it holds {column.type})")
        return column.to_pylist()
