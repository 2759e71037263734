"""Starting a run from pretrained weights (train.init_from) instead of random ones.

The network's shape and the tokenizer come from the weights, not from the config:
  - a `model.*` key the config gives that contradicts them is an error naming the key, except
    block_size (a smaller one crops the position table, as nanoGPT's crop_block_size) and
    dropout; a key the config does not give takes the pretrained value, block_size included;
  - GPT-2 weights bring GPT-2's tokenizer; a smallgpt checkpoint brings its own, and the new
    corpus is encoded with it (never a newly trained one).
The optimizer, the schedule and the step count start afresh; the run writes to its own out_dir.
The model itself is built from the source's tensors by `pretrained.model_from_source`.
"""

from __future__ import annotations

import dataclasses

from model.config import Config, DataConfig
from model.errors import ConfigError
from model.gpt import GPTConfig
from model.weights.loading import Pretrained, load_model

# Keys a fine-tuning config may set freely: block_size can only shrink (checked below).
FREE_KEYS = ("block_size", "dropout")


def load_source(cfg: Config) -> Pretrained | None:
    """The pretrained model named by train.init_from (on the CPU), or None for "scratch"."""
    if cfg.train.init_from == "scratch":
        return None
    source = load_model(cfg.train.init_from, "cpu")
    run_dir = cfg.out_dir.resolve()
    if run_dir == source.path.resolve() or run_dir in source.path.resolve().parents:
        raise ConfigError(f"train.out_dir: {str(cfg.out_dir)!r} holds the checkpoint that "
                          "train.init_from starts from; write the new run somewhere else")
    return source


def adopt_source(cfg: Config, source: Pretrained) -> Config:
    """`cfg` with the source's shape (block_size cropped if asked) and tokenizer settings; a new
    Config, the caller's is left as it was."""
    loaded, default = source.model.config, GPTConfig()
    shape = {}
    for field in dataclasses.fields(GPTConfig):
        mine, theirs = getattr(cfg.model, field.name), getattr(loaded, field.name)
        if field.name in FREE_KEYS or mine == theirs:
            continue
        if _chosen(cfg, f"model.{field.name}", mine != getattr(default, field.name)):
            raise ConfigError(
                f"model.{field.name}: {mine!r} contradicts the weights of "
                f"{cfg.train.init_from!r}, which have {theirs!r}; remove the key (the shape "
                "comes from the weights)")
        shape[field.name] = theirs
    block_size = cfg.model.block_size
    chosen = _chosen(cfg, "model.block_size", block_size != default.block_size)
    if cfg.given is not None and not chosen:
        block_size = loaded.block_size  # unset: the source's whole context, not the default's
    elif block_size > loaded.block_size:
        if chosen:
            raise ConfigError(
                f"model.block_size: {block_size} is larger than the {loaded.block_size} "
                f"positions of {cfg.train.init_from!r}; it can only be cropped")
        block_size = loaded.block_size
    model = dataclasses.replace(loaded, **{**shape, "block_size": block_size,
                                           "dropout": cfg.model.dropout})
    return dataclasses.replace(cfg, model=model, data=_adopt_tokenizer(cfg, source))


def _chosen(cfg: Config, key: str, differs_from_default: bool) -> bool:
    """Whether the user set `key`: the config's file or overrides name it. A Config built in
    Python does not record that; there a value other than the default counts as chosen."""
    return key in cfg.given if cfg.given is not None else differs_from_default


def _adopt_tokenizer(cfg: Config, source: Pretrained) -> DataConfig:
    wanted, theirs = cfg.data.tokenizer, source.tokenizer.name
    if wanted != theirs and _chosen(cfg, "data.tokenizer", wanted != DataConfig().tokenizer):
        raise ConfigError(
            f"data.tokenizer: {wanted!r} cannot be used with {cfg.train.init_from!r}, whose "
            f"tokenizer is {theirs!r}; remove the key (the pretrained tokenizer is used)")
    return dataclasses.replace(cfg.data, tokenizer=theirs)
