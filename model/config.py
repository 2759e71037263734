"""Configuration as validated data.

Three dataclasses hold every setting: GPTConfig (the network's shape, defined beside the model
in model/gpt.py), DataConfig (corpus and tokenizer, beside the data in model/data/config.py) and
TrainConfig (the optimisation loop).
Each checks its values once, when it is constructed, so a Config that exists is valid.
`load_config` reads a YAML file with the sections `model`, `data` and `train` and applies
`section.key=value` overrides before building them. Every error names the offending key and,
for unknown keys, the closest valid one.
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

from model import runtime
from model.data.config import DataConfig
from model.errors import ConfigError, check_choice, check_positive, first_line
from model.gpt import GPTConfig
from model.network.lora import LoRAConfig

# The shipped YAML files: configs/ in a source checkout, installed as the package `model.configs`
# (pyproject.toml maps one onto the other), so they are found with or without `pip install -e`.
PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", *runtime.DTYPES)


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
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs that compute it natively
    compile: bool = False
    threads: int | None = None  # CPU threads; None: the cores not busy when the run starts
    resume: bool = False
    # "scratch" (random weights), or a model to fine-tune: gpt2, gpt2-medium, gpt2-large,
    # gpt2-xl, a Hugging Face GPT-2 directory, or a smallgpt run/checkpoint
    # (model/training/finetune.py)
    init_from: str = "scratch"
    # LoRA (model/network/lora.py): train low-rank adapters beside init_from's frozen weights.
    lora_rank: int | None = None  # None: fine-tune every weight; >= 1: adapters of this rank
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05  # dropout on the adapters' input
    lora_targets: str = "all"  # comma-separated q, k, v, attn_out, mlp_in, mlp_out, or all
    peak_flops: float | None = None  # for MFU; None looks the GPU up in a table
    wandb: bool = False
    wandb_project: str = "smallgpt"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        prefix = "train"
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_steps",
                     "log_interval"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1, got {value}")
        for name in ("warmup_steps", "checkpoint_interval"):
            check_positive(f"{prefix}.{name}", getattr(self, name), allow_zero=True)
        for name in ("lr", "muon_lr"):
            check_positive(f"{prefix}.{name}", getattr(self, name))
        for name in ("min_lr", "weight_decay", "grad_clip"):
            check_positive(f"{prefix}.{name}", getattr(self, name), allow_zero=True)
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
            check_positive(f"{prefix}.time_budget_s", self.time_budget_s)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{prefix}.threads: must be >= 1, got {self.threads}")
        if not self.init_from:
            raise ConfigError(f"{prefix}.init_from: must be scratch or name a model, e.g. gpt2")
        check_choice(f"{prefix}.optimizer", self.optimizer, OPTIMIZERS)
        self._check_lora()
        check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        check_choice(f"{prefix}.device", self.device, DEVICES)
        check_choice(f"{prefix}.dtype", self.dtype, DTYPES)

    def _check_lora(self) -> None:
        # LoRAConfig checks rank, alpha, dropout and targets (also when LoRA is off: a typo in a
        # target should not wait until the rank is set).
        rank = 1 if self.lora_rank is None else self.lora_rank
        LoRAConfig(rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
        if self.lora_rank is None:
            return
        if self.init_from == "scratch":
            raise ConfigError("train.lora_rank: LoRA adapts pretrained weights; set "
                              "train.init_from (e.g. gpt2) or remove train.lora_rank")
        if self.optimizer != "adamw":
            raise ConfigError(f"train.optimizer: {self.optimizer} does not train LoRA adapters "
                              "(train.lora_rank); use adamw")

    @property
    def lora(self) -> LoRAConfig | None:
        """The adapters' settings, or None when every weight is fine-tuned."""
        if self.lora_rank is None:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)


@dataclass
class Config:
    """A whole run: model shape, data and training settings, and the config's name."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"
    # The "section.key" names its file and overrides spelled out, so fine-tuning can tell a
    # value the user chose from a default. None: built in Python, where that is not known.
    # Not a setting: neither compared nor saved.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or Path("out") / self.name)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a nested dict (what checkpoints save); config_from_dict reads it."""
        settings = dataclasses.asdict(self)
        del settings["given"]
        return settings


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
    return cls(**kwargs)  # each section checks its own values on construction


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
    # A config saved with a checkpoint spells out every key, so all of them count as given:
    # it states the shape and tokenizer its run had.
    given = frozenset(f"{section}.{key}" for section in SECTIONS
                      for key in (raw.get(section) or {}))
    return Config(name=name, given=given, **parts)


def shipped_config_dir() -> Path | None:
    """Where the shipped configs are: the installed package's, else the checkout's configs/.

    The installed copy comes first: installed, the "checkout" directory is site-packages/configs,
    which another distribution may own.
    """
    for directory in (PACKAGED_CONFIG_DIR, CONFIG_DIR):
        if directory.is_dir() and any(directory.glob("*.yaml")):
            return directory
    return None


def resolve_config_path(path: str | Path) -> Path:
    """An existing file, else a bare name such as `small.yaml` (or `small`) looked up in
    ./configs, then among the shipped configs."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = shipped_config_dir()
    if candidate.parent == Path("."):
        for directory in (Path("configs"), shipped):
            for name in (candidate.name, f"{candidate.name}.yaml"):
                if directory is not None and (directory / name).is_file():
                    return directory / name
    available = sorted(p.name for p in shipped.glob("*.yaml")) if shipped else []
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
        raise ConfigError(
            f"config file {str(resolved)!r} is not valid YAML: {first_line(exc)}") from exc
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
