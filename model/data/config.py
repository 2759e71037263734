"""The data settings of a run (the `data:` section of a config): where the text comes from and
how it becomes tokens. Checked once, when built, like every section of model/config.py."""

from __future__ import annotations

from dataclasses import dataclass

from model.data.tokenizer import MIN_BPE_VOCAB, TOKENIZER_NAMES
from model.errors import ConfigError, check_choice, check_positive

DATA_FORMATS = ("text", "chat")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    # "shakespeare" (the embedded corpus), a .txt file, a directory, a glob, or "hf:NAME";
    # with format "chat": JSON-lines records, a directory of them, "hf:NAME", or
    # "shakespeare-chat" (the offline demo set, model/data/chat_demo.py)
    source: str = "shakespeare"
    # "text": documents, loss on every token; "chat": conversations ({"messages": [...]} or
    # Alpaca records), loss on the assistant's replies only (model/data/chat_data.py)
    format: str = "text"
    hf_config: str | None = None  # hub datasets only: the dataset's config name
    hf_split: str = "train"
    text_column: str = "text"
    tokenizer: str = "gpt2"  # "gpt2", "char" or "bpe"
    bpe_vocab_size: int = 4096  # only for tokenizer "bpe": 256 bytes + merges + end-of-text
    # bpe only: merges are learned from this many MB (millions of characters) of training text,
    # spread evenly over it (a hub stream: its first part). Counting memory grows with this,
    # not with the corpus; 32 takes tiny-shakespeare and the embedded corpus whole.
    bpe_sample_mb: float = 32.0
    val_fraction: float = 0.1
    cache_dir: str = "out/data"  # token bins and meta.json live here, keyed by a fingerprint
    num_proc: int = 2  # tokenizer threads (tiktoken releases the GIL: one per core)

    def __post_init__(self) -> None:
        check_choice("data.tokenizer", self.tokenizer, TOKENIZER_NAMES)
        check_choice("data.format", self.format, DATA_FORMATS)
        if self.tokenizer == "bpe" and self.bpe_vocab_size < MIN_BPE_VOCAB:
            raise ConfigError(
                f"data.bpe_vocab_size: {self.bpe_vocab_size} is too small; it needs at least "
                f"{MIN_BPE_VOCAB} (256 bytes plus end-of-text)"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        check_positive("data.bpe_sample_mb", self.bpe_sample_mb)
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc: must be >= 1, got {self.num_proc}")
        if not self.source:
            raise ConfigError("data.source: must name a corpus")
