"""Chat data: records of conversations -> token files with a loss mask, cached by fingerprint.

    source -> records (a JSONL file or directory, an hf: dataset streamed, or the demo set)
           -> conversation_from_record (messages or Alpaca; errors name file, line and field)
           -> render_conversation with the model's tokenizer: ids + loss mask
           -> <cache_dir>/<fingerprint>/{train,val}.{bin,mask,index} + meta.json

Per split: `.bin` the token ids (conversations one after another), `.mask` one byte per token
(1: a target training learns, an assistant reply token or the end-of-text closing it), `.index`
int64 rows (start, length, end of the first reply: the position of its end-of-text) per
conversation. Records stream through
one at a time and the files are written as they come, so memory does not grow with the data.
Train and validation: the demo set brings its own split; other records go to validation when a
hash of their content falls below data.val_fraction (so a duplicate never straddles the split).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.config import DataConfig
from model.data.chat import conversation_from_record, render_conversation
from model.data.chat_demo import DEMO_SOURCE, DEMO_VERSION, demo_records
from model.data.corpus import HF_PREFIX, Shakespeare, _label
from model.data.token_cache import SPLITS, token_dtype
from model.data.tokenizer import GPT2Tokenizer, Tokenizer
from model.errors import ChatFormatError, DataError, TokenizerError
from model.files import ensure_writable_dir, fsync_dir, write_json_atomic

CHAT_FORMAT_VERSION = 2
RECORD_SUFFIXES = (".jsonl", ".json")
Record = tuple[str, Any, str | None]  # (where: "file:line" or "hf:name row N", record, split)


# ---------------------------------------------------------------------------------------------
# Reading records


def chat_files(source: str) -> list[Path]:
    """The JSON-lines files a local source names: the file, or *.jsonl / *.json under a folder."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in RECORD_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"chat data directory {source!r} holds no .jsonl or .json files")
        return files
    raise DataError(f"chat data {source!r} not found: give a JSON-lines file, a directory of "
                    f"them, hf:NAME for a Hugging Face dataset, or {DEMO_SOURCE!r}")


def _file_records(path: Path) -> Iterator[Record]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                    "chat data holds one JSON object per line") from None
                yield where, record, None
    except OSError as exc:
        raise DataError(f"cannot read chat data file {str(path)!r}: {exc.strerror or exc}"
                        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"chat data file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                        "convert it to UTF-8") from exc


def _hub_records(cfg: DataConfig) -> Iterator[Record]:
    """Rows of a Hugging Face dataset, streamed: memory holds one batch of rows."""
    import datasets

    from model.data.corpus import HubDataset

    hub = HubDataset(cfg.source[len(HF_PREFIX):], cfg.hf_config, cfg.hf_split, "messages")
    stream = hub._call(datasets.load_dataset, split=hub.split, streaming=True)
    try:
        for row, record in enumerate(stream):
            yield f"{cfg.source} row {row}", record, None
    except DataError:
        raise
    except Exception as exc:  # a bad file or a dropped connection, in the middle
        raise DataError(f"reading Hugging Face dataset {hub.name!r} failed: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from exc


def read_records(cfg: DataConfig) -> Iterator[Record]:
    """Every record of cfg.source, with where it came from and, for the demo set, its split."""
    if cfg.source == DEMO_SOURCE:
        for i, record in enumerate(demo_records()):
            yield f"{DEMO_SOURCE} record {i}", record, record["split"]
    elif cfg.source.startswith(HF_PREFIX):
        yield from _hub_records(cfg)
    else:
        for path in chat_files(cfg.source):
            yield from _file_records(path)


def source_state(cfg: DataConfig) -> Any:
    """What decides whether prepared chat data is still current, without reading records."""
    if cfg.source == DEMO_SOURCE:
        return {"demo": DEMO_VERSION, "plays": Shakespeare().state()}
    if cfg.source.startswith(HF_PREFIX):
        from model.data.corpus import HubDataset

        hub = HubDataset(cfg.source[len(HF_PREFIX):], cfg.hf_config, cfg.hf_split, "messages")
        return hub.state()
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                      for p in chat_files(cfg.source)]}


def split_of(record: Any, val_fraction: float) -> str:
    """"val" for about val_fraction of records, decided by their content."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
    digest = hashlib.sha256(blob).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


# ---------------------------------------------------------------------------------------------
# Preparing


@dataclass
class ChatData:
    """A complete chat cache: per split the tokens, loss mask and conversation index."""

    dir: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    reused: bool = False

    def path(self, split: str, kind: str) -> Path:
        return self.dir / f"{split}.{kind}"

    @property
    def train_path(self) -> Path:
        return self.path("train", "bin")

    @property
    def val_path(self) -> Path:
        return self.path("val", "bin")

    def tokens(self, split: str) -> np.ndarray:
        return _memmap(self.path(split, "bin"), self.meta["dtype"])

    def mask(self, split: str) -> np.ndarray:
        return _memmap(self.path(split, "mask"), np.uint8)

    def index(self, split: str) -> np.ndarray:
        """(conversations, 3) int64: start, length, and the position (from the start) of the
        end-of-text that closes the first reply."""
        return _memmap(self.path(split, "index"), np.int64).reshape(-1, 3)

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of reply text per trained token: bits per byte are over replies too."""
        stats = self.meta["splits"][split]
        return max(1, stats["reply_bytes"]) / max(1, stats["trained_tokens"])

    def num_tokens(self, split: str) -> int:
        return self.meta["splits"][split]["tokens"]


def _memmap(path: Path, dtype: Any) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def chat_tokenizer(cfg: DataConfig, tokenizer: Tokenizer | None) -> Tokenizer:
    """The tokenizer chat data is encoded with: the pretrained model's, or GPT-2's."""
    if tokenizer is not None:
        return tokenizer
    if cfg.tokenizer == "gpt2":
        return GPT2Tokenizer()
    raise DataError(f"chat data needs the tokenizer of the model it fine-tunes: set "
                    f"train.init_from (a checkpoint or gpt2), or data.tokenizer=gpt2; a new "
                    f"{cfg.tokenizer} tokenizer is never trained on conversations")


def chat_fingerprint(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    spec = hashlib.sha256(json.dumps(tokenizer.spec(), sort_keys=True).encode()).hexdigest()
    settings = {"format": CHAT_FORMAT_VERSION, "source": cfg.source, "tokenizer": spec,
                "val_fraction": cfg.val_fraction, "state": source_state(cfg)}
    if cfg.source.startswith(HF_PREFIX):
        settings.update(hf_config=cfg.hf_config, hf_split=cfg.hf_split)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    label = DEMO_SOURCE if cfg.source == DEMO_SOURCE else _label(cfg.source.removeprefix(
        HF_PREFIX))
    return f"chat-{label}-{tokenizer.name}{tokenizer.vocab_size}-{digest}"


def prepare_chat(cfg: DataConfig, block_size: int, progress: bool = True,
                 tokenizer: Tokenizer | None = None) -> ChatData:
    """Encode cfg.source's conversations into <cache_dir>/<fingerprint>/, or reuse them."""
    tokenizer = chat_tokenizer(cfg, tokenizer)
    directory = Path(cfg.cache_dir).expanduser() / chat_fingerprint(cfg, tokenizer)
    data = None
    if (directory / "meta.json").exists():
        with contextlib.suppress(DataError):
            data = load_chat(directory, tokenizer)
            data.reused = True
    if data is None:
        data = _build(cfg, directory, tokenizer, progress)
    for split in SPLITS:
        if not data.meta["splits"][split]["conversations"]:
            name = "training" if split == "train" else "validation"
            raise DataError(f"the chat data {cfg.source!r} has no {name} conversations; add "
                            "records or change data.val_fraction")
    return data


def _build(cfg: DataConfig, directory: Path, tokenizer: Tokenizer, progress: bool) -> ChatData:
    from tqdm import tqdm

    try:
        ensure_writable_dir(directory)
    except OSError as exc:
        raise DataError(f"the data cache directory {cfg.cache_dir!r} is not writable "
                        f"({exc.strerror or exc}); set data.cache_dir to a writable folder"
                        ) from exc
    (directory / "meta.json").unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = {(s, k): directory / f"{s}.{k}.tmp-{os.getpid()}" for s in SPLITS
           for k in ("bin", "mask", "index")}
    stats = {s: dict.fromkeys(("conversations", "tokens", "trained_tokens", "reply_bytes"), 0)
             for s in SPLITS}
    try:
        with contextlib.ExitStack() as stack:
            files = {key: stack.enter_context(open(path, "wb")) for key, path in tmp.items()}
            bar = stack.enter_context(tqdm(desc="conversations", unit="", disable=not progress,
                                           dynamic_ncols=True))
            for where, record, split in read_records(cfg):
                try:
                    messages = conversation_from_record(record)
                    ids, mask = render_conversation(messages, tokenizer)
                except ChatFormatError as exc:
                    raise ChatFormatError(f"{where}: {exc}", exc.field) from None
                except TokenizerError as exc:
                    raise TokenizerError(f"{where}: {exc}") from None
                split = split or split_of(record, cfg.val_fraction)
                s = stats[split]
                eot = tokenizer.eot_id
                first_end = next(i for i, (t, m) in enumerate(zip(ids, mask)) if m and t == eot)
                files[split, "bin"].write(np.asarray(ids, dtype=dtype).tobytes())
                files[split, "mask"].write(bytes(mask))
                files[split, "index"].write(np.array([s["tokens"], len(ids), first_end],
                                                     dtype=np.int64).tobytes())
                s["conversations"] += 1
                s["tokens"] += len(ids)
                s["trained_tokens"] += sum(mask)
                s["reply_bytes"] += sum(len(m.content.encode()) for m in messages
                                        if m.role == "assistant")
                bar.update(1)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    for (split, kind), path in tmp.items():
        os.replace(path, directory / f"{split}.{kind}")
    fsync_dir(directory)
    meta = {"format_version": CHAT_FORMAT_VERSION, "format": "chat",
            "fingerprint": directory.name, "source": cfg.source, "tokenizer": tokenizer.spec(),
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
            "dtype": dtype.name, "splits": stats}
    write_json_atomic(directory / "meta.json", meta)
    fsync_dir(directory)
    return ChatData(directory, meta, tokenizer)


def load_chat(directory: Path, tokenizer: Tokenizer) -> ChatData:
    """Reopen a chat cache; anything missing or short is a DataError (the caller rebuilds)."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes = {}
        for split in SPLITS:
            s = meta["splits"][split]
            sizes[split] = {"bin": s["tokens"] * itemsize, "mask": s["tokens"],
                            "index": s["conversations"] * 24}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{str(directory)!r} is damaged; prepare the data again") from exc
    if meta.get("format_version") != CHAT_FORMAT_VERSION:
        raise DataError(f"{str(directory)!r} was prepared by another version")
    for split, kinds in sizes.items():
        for kind, size in kinds.items():
            path = directory / f"{split}.{kind}"
            if not path.is_file() or path.stat().st_size != size:
                raise DataError(f"{str(path)!r} is incomplete; prepare the data again")
    return ChatData(directory, meta, tokenizer)
