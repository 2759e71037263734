"""Chat data: records of conversations -> token files with a loss mask, cached by fingerprint.

    source -> records (a JSONL file or directory, an hf: dataset streamed, or the demo set)
           -> conversation_from_record (messages or Alpaca; errors name file, line and field)
           -> render_conversation with the model's tokenizer: ids + loss mask
           -> <cache_dir>/<fingerprint>/{train,val}.{bin,mask,index} + meta.json

Per split: `.bin` the token ids (conversations one after another), `.mask` one byte per token
(1: a target training learns, an assistant reply token or the end-of-text closing it), `.index`
int64 rows (start, length, end of the first reply: the position of its end-of-text) per
conversation. Records stream through one at a time and the files are written as they come, so
memory does not grow with the data. Train and validation: the demo set brings its own split;
other records go to validation when a hash of their content falls below data.val_fraction (so
a duplicate never straddles the split). The cache's protocol is model/data/token_cache.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from model.data.chat import conversation_from_record, render_conversation
from model.data.chat_demo import DEMO_SOURCE, DEMO_VERSION, demo_records
from model.data.config import DataConfig
from model.data.corpus import HF_PREFIX, HubDataset, Shakespeare, source_label
from model.data.token_cache import (
    SPLITS,
    TokenCache,
    digest,
    find_cache,
    finish_cache,
    hashed_split,
    memmap_tokens,
    read_meta,
    start_cache,
    token_dtype,
    tokenizer_meta,
)
from model.data.tokenizer import GPT2Tokenizer, Tokenizer
from model.errors import ChatFormatError, DataError, TokenizerError
from model.files import staged_files
from model.progress import Progress, silent

CHAT_FORMAT_VERSION = 2
KINDS = ("bin", "mask", "index")  # the files of a split: tokens, loss mask, conversation rows
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


def _hub(cfg: DataConfig) -> HubDataset:
    return HubDataset(cfg.source[len(HF_PREFIX):], cfg.hf_config, cfg.hf_split, "messages")


def _hub_records(cfg: DataConfig) -> Iterator[Record]:
    """Rows of a Hugging Face dataset, streamed: memory holds one batch of rows."""
    for row, record in enumerate(_hub(cfg).rows()):
        yield f"{cfg.source} row {row}", record, None


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
        return _hub(cfg).state()
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                      for p in chat_files(cfg.source)]}


def split_of(record: Any, val_fraction: float) -> str:
    """"val" for about val_fraction of records, decided by their content."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashed_split(blob, val_fraction)


# ---------------------------------------------------------------------------------------------
# Preparing


class ChatData(TokenCache):
    """A complete chat cache: per split the tokens, loss mask and conversation index."""

    def path(self, split: str, kind: str) -> Path:
        return self.dir / f"{split}.{kind}"

    def tokens(self, split: str) -> np.ndarray:
        return memmap_tokens(self.path(split, "bin"), self.meta["dtype"])

    def mask(self, split: str) -> np.ndarray:
        return memmap_tokens(self.path(split, "mask"), np.uint8)

    def index(self, split: str) -> np.ndarray:
        """(conversations, 3) int64: start, length, and the position (from the start) of the
        end-of-text that closes the first reply."""
        return memmap_tokens(self.path(split, "index"), np.int64).reshape(-1, 3)

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of reply text per trained token: bits per byte are over replies too."""
        stats = self.split_stats(split)
        return max(1, stats["reply_bytes"]) / max(1, stats["trained_tokens"])


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
    """A readable, unique cache name, e.g. chat-shakespeare-chat-gpt250257-0b61f93df80d4a97."""
    settings = {"format": CHAT_FORMAT_VERSION, "source": cfg.source,
                "tokenizer": digest(tokenizer.spec()), "val_fraction": cfg.val_fraction,
                "state": source_state(cfg)}
    if cfg.source.startswith(HF_PREFIX):
        settings.update(hf_config=cfg.hf_config, hf_split=cfg.hf_split)
    label = DEMO_SOURCE if cfg.source == DEMO_SOURCE else source_label(cfg.source.removeprefix(
        HF_PREFIX))
    return f"chat-{label}-{tokenizer.name}{tokenizer.vocab_size}-{digest(settings)[:16]}"


def prepare_chat(cfg: DataConfig, block_size: int, progress: Progress = silent,
                 tokenizer: Tokenizer | None = None) -> ChatData:
    """Encode cfg.source's conversations into <cache_dir>/<fingerprint>/, or reuse them;
    `progress` hears of each conversation written."""
    tokenizer = chat_tokenizer(cfg, tokenizer)
    directory = Path(cfg.cache_dir).expanduser() / chat_fingerprint(cfg, tokenizer)
    data = find_cache(directory, lambda found: load_chat(found, tokenizer))
    if data is None:
        data = _build(cfg, directory, tokenizer, progress)
    for split in SPLITS:
        if not data.meta["splits"][split]["conversations"]:
            name = "training" if split == "train" else "validation"
            raise DataError(f"the chat data {cfg.source!r} has no {name} conversations; add "
                            "records or change data.val_fraction")
    return data


def _build(cfg: DataConfig, directory: Path, tokenizer: Tokenizer, progress: Progress,
           ) -> ChatData:
    start_cache(directory, cfg.cache_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    stats = {s: dict.fromkeys(("conversations", "tokens", "trained_tokens", "reply_bytes"), 0)
             for s in SPLITS}
    names = [f"{split}.{kind}" for split in SPLITS for kind in KINDS]
    with staged_files(directory, names) as files, progress("conversations", unit="") as advance:
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
            files[f"{split}.bin"].write(np.asarray(ids, dtype=dtype).tobytes())
            files[f"{split}.mask"].write(bytes(mask))
            files[f"{split}.index"].write(np.array([s["tokens"], len(ids), first_end],
                                                   dtype=np.int64).tobytes())
            s["conversations"] += 1
            s["tokens"] += len(ids)
            s["trained_tokens"] += sum(mask)
            s["reply_bytes"] += sum(len(m.content.encode()) for m in messages
                                    if m.role == "assistant")
            advance(1)
    meta = {"format_version": CHAT_FORMAT_VERSION, "format": "chat",
            "fingerprint": directory.name, "source": cfg.source, **tokenizer_meta(tokenizer),
            "splits": stats}
    finish_cache(directory, meta)
    return ChatData(directory, meta, tokenizer)


def load_chat(directory: Path, tokenizer: Tokenizer) -> ChatData:
    """Reopen a chat cache; anything missing or short is a DataError (the caller rebuilds)."""

    def file_sizes(meta: dict[str, Any]) -> dict[str, int]:
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes = {}
        for split in SPLITS:
            s = meta["splits"][split]
            sizes.update({f"{split}.bin": s["tokens"] * itemsize, f"{split}.mask": s["tokens"],
                          f"{split}.index": s["conversations"] * 24})  # 3 int64 per row
        return sizes

    return ChatData(directory, read_meta(directory, CHAT_FORMAT_VERSION, file_sizes), tokenizer)
