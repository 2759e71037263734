"""What a training run sets up before its first step, each piece a function loop.py's
`start_run` calls in order: token files prepared once per machine, the config adopted from a
caller's model and the tokenizer's vocabulary, a writable output directory, the resumed state,
and the model wrapped for compiling and DDP.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model import runtime
from model.config import Config
from model.data.batches import BatchSampler
from model.data.chat_batches import ChatBatchSampler, chat_eval_batches
from model.data.chat_data import ChatData
from model.data.prepare import PreparedData, prepare_data
from model.data.tokenizer import Tokenizer
from model.errors import CheckpointError, ConfigError, TrainingError
from model.files import ensure_writable_dir
from model.gpt import GPTConfig, count_parameters
from model.network import lora
from model.progress import Progress, silent
from model.training import distributed
from model.training.distributed import Distributed
from model.training.optim import Optimizer
from model.weights.checkpoint import (
    load_optimizer_state,
    load_state,
    load_weights,
    read_lora_base,
    resolve_checkpoint,
    set_rng_state,
)


def prepare_data_once(cfg: Config, job: Distributed, progress: Progress = silent,
                      tokenizer: Tokenizer | None = None) -> PreparedData:
    """Rank 0 prepares the token files while the others wait, reporting to `progress`. Then the
    first process of each other machine finds them on shared storage, or prepares its own copy;
    then the rest read. So no two processes ever write the same cache."""
    data = None
    if job.is_main:
        data = prepare_data(cfg.data, cfg.model.block_size, progress, tokenizer)
    distributed.barrier(job)
    if job.local_rank == 0 and not job.is_main:
        data = prepare_data(cfg.data, cfg.model.block_size, silent, tokenizer)
    distributed.barrier(job)
    if data is None:
        data = prepare_data(cfg.data, cfg.model.block_size, silent, tokenizer)
    return data


def adopt_model(cfg: Config, model: nn.Module) -> Config:
    """`cfg` describing a model passed to train(): a GPTConfig in `model.config` replaces
    cfg.model, so checkpoints hold the shape that rebuilds it. A new Config."""
    if cfg.train.init_from != "scratch":
        raise ConfigError(f"train.init_from: {cfg.train.init_from!r} cannot start a model passed "
                          "to train(); load the weights into that model, or pass none")
    config = getattr(model, "config", None)
    return dataclasses.replace(cfg, model=config) if isinstance(config, GPTConfig) else cfg


def flops_per_token(model: nn.Module) -> float:
    """The model's own estimate (GPT.flops_per_token), else 6 per parameter (Kaplan et al.,
    2020), which leaves out attention's share."""
    own = getattr(model, "flops_per_token", None)
    return own() if callable(own) else 6 * count_parameters(model)


def chat_batches(data: ChatData, cfg: Config, job: Distributed,
                 ) -> tuple[ChatBatchSampler, list[tuple[torch.Tensor, torch.Tensor]]]:
    """data.format "chat": the training sampler and validation batches over conversations."""
    settings, block_size = cfg.train, cfg.model.block_size
    sampler = ChatBatchSampler(data, block_size, settings.batch_size, settings.seed,
                               rank=job.rank, world_size=job.world_size, device=job.device)
    return sampler, chat_eval_batches(data, block_size, settings.batch_size,
                                      settings.eval_steps)


def resolve_vocab(cfg: Config, vocab_size: int) -> Config:
    """`cfg` with model.vocab_size from the tokenizer unless set; if set it must cover it.
    A new Config: the caller's is left as it was."""
    if cfg.model.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                  vocab_size=vocab_size))
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {vocab_size} tokens; remove it to use the tokenizer's")
    return cfg


def check_writable(run_dir: Path, model_bytes: int) -> None:
    """Fail before training if the run directory cannot hold a few checkpoints."""
    try:
        ensure_writable_dir(run_dir)
    except OSError as exc:
        raise TrainingError(f"cannot write to output directory {str(run_dir)!r} ({exc.strerror}); "
                            "set train.out_dir to a writable place") from exc
    free = shutil.disk_usage(run_dir).free
    # latest + best + a temporary copy, each with weights and two Adam moments.
    needed = 3 * 3 * model_bytes
    if free < needed:
        raise TrainingError(f"only {free / 2**20:.0f} MiB free under {str(run_dir)!r}, checkpoints "
                            f"need about {needed / 2**20:.0f} MiB; free space or change out_dir")


def resume(run_dir: Path, model: nn.Module, optimizer: Optimizer, sampler: BatchSampler,
           job: Distributed, *, threads_chosen: bool,
           lora_base: dict[str, str] | None = None) -> tuple[int, float]:
    """Load the run's latest checkpoint into `model`, `optimizer` and `sampler`; return the step
    it was taken at and the best validation loss so far. Unless train.threads is set, the run
    goes on with the thread count it had (sums split over threads round differently)."""
    try:
        ckpt = resolve_checkpoint(run_dir)
    except CheckpointError as exc:
        raise TrainingError(f"train.resume is set but {str(run_dir)!r} holds no checkpoint; "
                            "start without train.resume=true") from exc
    if lora_base is not None:  # the adapters go on only with the base they were trained on
        lora.check_base(read_lora_base(ckpt), lora_base["digest"],
                        lora_base.get("path") or lora_base["name"], str(ckpt))
    load_weights(model, ckpt, job.device)
    opt_state = load_optimizer_state(ckpt)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    state = load_state(ckpt)
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    # A single process goes on with its generators' saved state; a multi-process job seeds
    # every step from (seed, rank, step) instead (see train()).
    if "rng" in state and not job.enabled:
        set_rng_state(state["rng"], job.device)
    if not threads_chosen and state.get("threads"):
        runtime.configure_threads(state["threads"])
    return state.get("step", 0), state.get("best_val_loss", math.inf)


def wrap(model: nn.Module, compile: bool, job: Distributed) -> nn.Module:
    """The module the loop calls: `model` compiled if asked, inside DDP under torchrun."""
    forward_model: nn.Module = model
    if compile:
        forward_model = torch.compile(model)
    if job.enabled:
        on_gpu = job.device.type == "cuda"
        forward_model = DistributedDataParallel(
            forward_model, device_ids=[job.device.index] if on_gpu else None)
    return forward_model
