"""Configuration as validated data.

Three dataclasses hold every setting: GPTConfig (the network's shape), DataConfig (corpus and
tokenizer) and TrainConfig (the optimisation loop). `load_config` reads a YAML file with the
sections `model`, `data` and `train`, applies `section.key=value` overrides, and validates the
result before any work starts. Every error names the offending key and, for unknown keys, the
closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu2", "swiglu")
TOKENIZERS = ("gpt2", "char", "bpe")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}")


@dataclass
class GPTConfig:
    """The shape of the network. Defaults are a small GPT that trains on a CPU."""

    vocab_size: int | None = 50257  # None: taken from the tokenizer when training starts
    block_size: int = 256  # context size: the most tokens the model sees at once
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int | None = None  # fewer key/value heads than query heads (GQA); None = n_head
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * n_embd
    pos_emb: str = "learned"  # "learned" absolute positions or "rope" rotary
    rope_base: float = 10000.0
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"  # "gelu", "gelu_tanh", "relu2" or "swiglu"
    qk_norm: bool = False  # normalise queries and keys per head before attention
    bias: bool = True  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # W_U shares its tensor with W_E

    def __post_init__(self) -> None:
        self.validate("model")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.n_embd)

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue  # resolved from the tokenizer before the model is built
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{prefix}.{name}: must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"{prefix}.n_embd: {self.n_embd} is not divisible by {prefix}.n_head={self.n_head}"
            )
        if self.n_kv_head is not None:
            if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
                raise ConfigError(
                    f"{prefix}.n_kv_head: {self.n_kv_head} must be >= 1 and divide "
                    f"{prefix}.n_head={self.n_head}"
                )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"{prefix}.n_embd: rotary positions need an even head size, "
                f"got {self.n_embd}/{self.n_head}={self.head_dim}"
            )
        _check_choice(f"{prefix}.pos_emb", self.pos_emb, POS_EMBS)
        _check_choice(f"{prefix}.norm", self.norm, NORMS)
        _check_choice(f"{prefix}.activation", self.activation, ACTIVATIONS)
        _check_positive(f"{prefix}.mlp_ratio", self.mlp_ratio)
        _check_positive(f"{prefix}.norm_eps", self.norm_eps)
        _check_positive(f"{prefix}.rope_base", self.rope_base)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden < 1:
            raise ConfigError(f"{prefix}.mlp_ratio: gives an MLP width of {self.mlp_hidden}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl or gpt3 (175B)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# GPT-2 shapes from Radford et al. 2019 (Table 2); GPT-3 175B from Brown et al. 2020 (Table 2.1).
_GPT2_STYLE = dict(
    vocab_size=50257, pos_emb="learned", norm="layernorm", activation="gelu_tanh", bias=True,
    tie_embeddings=True, qk_norm=False, dropout=0.0, mlp_ratio=4.0, norm_eps=1e-5,
)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2_STYLE, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(_GPT2_STYLE, n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(_GPT2_STYLE, n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(_GPT2_STYLE, n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    "gpt3": dict(_GPT2_STYLE, n_layer=96, n_head=96, n_embd=12288, block_size=2048),
}


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    # "shakespeare" (the embedded corpus), a .txt file, a directory, a glob, or "hf:NAME"
    source: str = "shakespeare"
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

    def validate(self, prefix: str = "data") -> None:
        _check_choice(f"{prefix}.tokenizer", self.tokenizer, TOKENIZERS)
        if self.tokenizer == "bpe" and self.bpe_vocab_size < 257:
            raise ConfigError(
                f"{prefix}.bpe_vocab_size: {self.bpe_vocab_size} is too small; it needs at least "
                "257 (256 bytes plus end-of-text)"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{prefix}.val_fraction: must be in (0, 1), got {self.val_fraction}")
        _check_positive(f"{prefix}.bpe_sample_mb", self.bpe_sample_mb)
        if self.num_proc < 1:
            raise ConfigError(f"{prefix}.num_proc: must be >= 1, got {self.num_proc}")
        if not self.source:
            raise ConfigError(f"{prefix}.source: must name a corpus")


@dataclass
class TrainConfig:
    """The optimisation loop, evaluation, logging and checkpoints."""

    out_dir: str | None = None  # default: out/<config name>
    max_steps: int = 1000
    time_budget_s: float | None = None  # stop after this much training wall-clock (benchmarks)
    batch_size: int = 12  # sequences per micro-step (per process)
    grad_accum: int = 1  # micro-steps per optimizer step
    optimizer: str = "adamw"  # "adamw", or "muon" for hidden matrices with AdamW for the rest
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" decay, or "wsd" (warmup, stable, linear cool-down)
    cooldown_fraction: float = 0.2  # wsd only: final fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    eval_interval: int = 250
    eval_steps: int = 20  # validation batches per evaluation
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: checkpoint at every evaluation
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA when supported, else float32
    compile: bool = False
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    resume: bool = False
    peak_flops: float | None = None  # for MFU; None looks the GPU up in a table
    wandb: bool = False
    wandb_project: str = "smallgpt"
    tensorboard: bool = False

    def validate(self, prefix: str = "train") -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_steps",
                     "log_interval"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1, got {value}")
        for name in ("warmup_steps", "checkpoint_interval"):
            _check_positive(f"{prefix}.{name}", getattr(self, name), allow_zero=True)
        for name in ("lr", "muon_lr"):
            _check_positive(f"{prefix}.{name}", getattr(self, name))
        for name in ("min_lr", "weight_decay", "grad_clip"):
            _check_positive(f"{prefix}.{name}", getattr(self, name), allow_zero=True)
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr: {self.min_lr} is above {prefix}.lr={self.lr}")
        for name in ("beta1", "beta2", "muon_momentum"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{prefix}.{name}: must be in [0, 1), got {value}")
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ConfigError(
                f"{prefix}.cooldown_fraction: must be in [0, 1], got {self.cooldown_fraction}"
            )
        if self.time_budget_s is not None:
            _check_positive(f"{prefix}.time_budget_s", self.time_budget_s)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{prefix}.threads: must be >= 1, got {self.threads}")
        _check_choice(f"{prefix}.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        _check_choice(f"{prefix}.device", self.device, DEVICES)
        _check_choice(f"{prefix}.dtype", self.dtype, DTYPES)


@dataclass
class Config:
    """A whole run: model shape, data and training settings, and the config's name."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or Path("out") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")


SECTIONS: dict[str, type] = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(choices)}"


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation; ints are accepted where floats are expected."""
    hint = annotation
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: must not be empty")
    for option in options:
        if option is type(None):
            continue
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string, not a float
        if option is str and isinstance(value, str):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _build_section(section: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[section]
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: must be a mapping of keys to values, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{section}.{name}: unknown key{_suggest(name, sorted(known))}")
        kwargs[name] = _coerce(f"{section}.{name}", value, hints[name])
    if cls is GPTConfig:
        # GPTConfig validates itself on construction; build it without that so errors name keys.
        # An absent vocab_size means "whatever the tokenizer has".
        obj = cls.__new__(cls)
        for f in fields(cls):
            setattr(obj, f.name, kwargs.get(f.name, None if f.name == "vocab_size" else f.default))
        obj.validate(section)
        return obj
    obj = cls(**kwargs)
    obj.validate(section)
    return obj


def config_from_dict(raw: dict[str, Any], name: str = "run") -> Config:
    """Build and validate a Config from a nested dict such as a parsed YAML file."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping with sections model, data, train")
    raw = dict(raw)
    name = raw.pop("name", name)  # present in configs saved with checkpoints
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section{_suggest(section, list(SECTIONS))}")
    parts = {s: _build_section(s, raw.get(s) or {}) for s in SECTIONS}
    return Config(name=name, **parts)


def resolve_config_path(path: str | Path) -> Path:
    """`small.yaml` is looked up in configs/ when it is not an existing path."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for name in (candidate.name, f"{candidate.name}.yaml"):
        if (CONFIG_DIR / name).is_file() and candidate.parent == Path("."):
            return CONFIG_DIR / name
    available = sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    hint = f"; shipped configs: {', '.join(available)}" if available else ""
    raise ConfigError(f"config file {str(path)!r} not found{hint}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.max_steps=50' -> ('train', 'max_steps', 50); the value is parsed as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"override {text!r}: write it as section.key=value, e.g. train.max_steps=50")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    return section.strip(), key.strip(), value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (from configs/ when only a name is given), apply overrides, validate."""
    resolved = resolve_config_path(path)
    try:
        raw = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(
            f"config file {str(resolved)!r} is not valid YAML: {first_line}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(resolved)!r} must hold sections model, data, train")
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section{_suggest(section, list(SECTIONS))}")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return config_from_dict(raw, name=resolved.stem)
