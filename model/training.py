"""train(cfg): the training loop, with evaluation, logging, checkpoints, resume and DDP.

train() reads top to bottom in the order of a run: data, model, optimizer, resume, wrap
(compile, then DDP), and the loop: step, log, evaluate, checkpoint. The helpers below it each
do one of those things and take what they need as arguments.

One optimizer step = grad_accum micro-batches per process; under torchrun the global batch is
world_size * grad_accum * batch_size sequences of block_size tokens. Each micro-batch's loss is
the mean next-token cross-entropy over every position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import runtime
from .batches import BatchSampler, eval_windows
from .chat_batches import ChatBatchSampler, chat_eval_batches
from .chat_data import ChatData
from .checkpoint import (
    copy_checkpoint,
    load_optimizer_state,
    load_state,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import Config, TrainConfig
from .errors import CheckpointError, ConfigError, TrainingError
from .files import ensure_writable_dir
from .finetune import adopt_source, load_source, model_from_source
from .gpt import GPT
from .monitor import RunLog, gpu_peak_flops
from .optim import Optimizer, build_optimizer, set_lr
from .prepare import PreparedData, prepare_data
from .tokenizer import Tokenizer


@dataclass
class TrainResult:
    """What a run did; `losses` holds the training loss of every step this call ran."""

    run_dir: Path
    steps: int  # total optimizer steps done, counting those before a resume
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall-clock of each step run
    val_loss: float | None = None  # nats/token on the fixed validation windows
    val_bpb: float | None = None  # bits per byte of text
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    interrupted: bool = False


def train(cfg: Config, progress: bool = True) -> TrainResult:
    """Train the model described by `cfg` (already validated; it is not modified) and return
    what the run did. The config saved with checkpoints is `cfg` with the vocabulary resolved."""
    t = cfg.train
    runtime.configure_threads(t.threads or runtime.training_threads())
    with runtime.distributed_job(runtime.pick_device(t.device)) as ctx:
        device = ctx.device
        dtype = runtime.pick_dtype(t.dtype, device)
        runtime.configure_backends(device)
        # Each rank its own dropout masks; DDP copies rank 0's initial weights to the others.
        runtime.seed_everything(t.seed + ctx.rank)
        run_dir = cfg.out_dir

        # Pretrained weights to start from, if any: they decide the shape and the tokenizer.
        source = load_source(cfg)
        if source is not None:
            cfg = adopt_source(cfg, source)

        # Data: token files (prepared once), the training batches and the validation windows.
        data = prepare_data_once(cfg, ctx, progress, source.tokenizer if source else None)
        cfg = resolve_vocab(cfg, data.tokenizer.vocab_size)
        if cfg.data.format == "chat":  # whole conversations per row, loss on replies only
            sampler, val_windows = chat_batches(data, cfg, ctx, device)
        else:
            sampler = BatchSampler(data.train_path, cfg.model.block_size, t.batch_size, t.seed,
                                   rank=ctx.rank, world_size=ctx.world_size, device=device)
            val_windows = eval_windows(data.val_path, cfg.model.block_size, t.batch_size,
                                       t.eval_steps)

        # Model and optimizer; a resumed run then loads weights, moments and the loop's state.
        if source is None:
            model = GPT(cfg.model)
        else:  # the source's own tensors, not a random init with a copy of them on top
            model, loaded = model_from_source(cfg.model, source)
            source = None  # the model now holds the weights; the source must not use them
            if ctx.is_main:
                tqdm.write(loaded)
        model.to(device)
        if ctx.is_main:
            check_writable(run_dir, 4 * model.num_params())
        optimizer = build_optimizer(model, t, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        start_step, best_val = 0, math.inf
        if t.resume:
            start_step, best_val = resume(run_dir, model, optimizer, sampler, ctx,
                                          t.threads is not None)

        # Wrap from outside: compile, then DDP; checkpoints always store the plain `model`.
        forward_model = wrap(model, t.compile, ctx)

        log = (RunLog(run_dir, cfg.to_dict(), resume_step=start_step if t.resume else None,
                      use_wandb=t.wandb, wandb_project=t.wandb_project,
                      use_tensorboard=t.tensorboard) if ctx.is_main else None)
        peak = t.peak_flops or (gpu_peak_flops(torch.cuda.get_device_name(device))
                                if device.type == "cuda" else None)
        tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum * ctx.world_size
        flops_per_step = model.flops_per_token() * tokens_per_step
        bar = tqdm(total=t.max_steps, initial=start_step, disable=not (progress and ctx.is_main),
                   dynamic_ncols=True, desc=cfg.name)

        result = TrainResult(run_dir=run_dir, steps=start_step)
        if t.init_from != "scratch" and start_step == 0 and ctx.is_main:
            # Where fine-tuning starts: the pretrained model's own loss on this validation split.
            validate(model, val_windows, data, device, dtype, 0, log, bar)
        pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet copied to the host
        grad_norm: torch.Tensor | float = 0.0
        compile_seconds = 0.0
        t0 = time.perf_counter()
        with runtime.GracefulStop() as stop:
            try:
                for step in range(start_step, t.max_steps):
                    # Step. Under torchrun each rank's dropout masks come from (seed, rank,
                    # step), so a resumed job draws the same ones without gathering every rank's
                    # generator state into the checkpoint.
                    step_start = time.perf_counter()
                    if ctx.enabled:
                        runtime.seed_everything(runtime.derived_seed(t.seed, ctx.rank, step))
                    loss, norm = train_step(forward_model, model, optimizer, scaler, sampler, t,
                                            step, dtype, ctx.enabled)
                    done = step + 1
                    pending.append((done, loss))
                    if norm is not None:
                        grad_norm = norm

                    # Log. Reading a loss waits for the GPU, so on GPUs only every log_interval.
                    # The wait counts in the step's time: the GPU ran the queued steps meanwhile.
                    if done % t.log_interval == 0 or done == t.max_steps or device.type == "cpu":
                        result.losses += settle_losses(pending, ctx, run_dir)
                    step_time = time.perf_counter() - step_start
                    if step == start_step and t.compile:
                        compile_seconds = step_time  # the first call compiles
                    result.steps = done
                    result.train_seconds += step_time
                    result.step_seconds.append(step_time)
                    # Speed over the last log_interval steps: on a GPU one step's time says when
                    # the host waited for it, not how long the GPU worked.
                    recent = result.step_seconds[-t.log_interval:]
                    seconds_per_step = sum(recent) / len(recent)
                    if done % t.log_interval == 0 and log is not None:
                        record = {"step": done, "loss": result.losses[-1],
                                  "lr": optimizer.param_groups[0]["lr"],
                                  "grad_norm": float(grad_norm),
                                  "tokens_per_s": tokens_per_step / seconds_per_step,
                                  "elapsed_s": time.perf_counter() - t0}
                        if peak:
                            record["mfu"] = flops_per_step / seconds_per_step / peak
                        log.log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.losses[-1]:.3f}" if result.losses else "-",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    tok_s=f"{tokens_per_step / seconds_per_step:,.0f}")

                    # Stop? Ranks must agree, or the others would wait for them forever.
                    out_of_time = (t.time_budget_s is not None
                                   and result.train_seconds >= t.time_budget_s)
                    out_of_time, stop.requested = runtime.all_agree(ctx, out_of_time,
                                                                    stop.requested)
                    last = done == t.max_steps or out_of_time or stop.requested
                    evaluate_now = done % t.eval_interval == 0 or last
                    save_now = done % (t.checkpoint_interval or t.eval_interval) == 0 or last
                    if evaluate_now or save_now:
                        # Every rank settles (a collective), and no checkpoint ever holds
                        # weights that came from a non-finite step.
                        result.losses += settle_losses(pending, ctx, run_dir)

                    # Evaluate (rank 0 only: the model is the same on every rank).
                    if evaluate_now and ctx.is_main:
                        result.val_loss, result.val_bpb = validate(
                            model, val_windows, data, device, dtype, done, log, bar)

                    # Checkpoint: latest/ always, best/ when validation improved.
                    if save_now and ctx.is_main:
                        improved = result.val_loss is not None and result.val_loss < best_val
                        if improved:
                            best_val = result.val_loss
                        state = run_state(done, best_val, sampler, device, result)
                        latest = save_checkpoint(run_dir / "latest", model, cfg,
                                                 data.tokenizer.spec(), optimizer, state)
                        if improved:
                            copy_checkpoint(latest, run_dir / "best")

                    if out_of_time:
                        break
                    if stop.requested:
                        result.interrupted = True
                        if ctx.is_main:
                            bar.write(f"interrupted: checkpoint saved at step {done} in "
                                      f"{run_dir / 'latest'}; resume with train.resume=true")
                        break
            finally:
                bar.close()
                if log is not None:
                    log.close()
                forward_model = None  # DDP goes before its process group (distributed_job)
        # Throughput leaves out the first step when it compiled the model.
        timed_steps = result.steps - start_step - (1 if compile_seconds else 0)
        timed_seconds = result.train_seconds - compile_seconds
        if timed_steps > 0 and timed_seconds > 0:
            result.tokens_per_second = tokens_per_step * timed_steps / timed_seconds
        return result


# -- data and model ---------------------------------------------------------------------------


def prepare_data_once(cfg: Config, ctx: runtime.Distributed, progress: bool,
                      tokenizer: Tokenizer | None = None) -> PreparedData:
    """Rank 0 prepares the token files while the others wait. Then the first process of each
    other machine finds them on shared storage, or prepares its own copy; then the rest read.
    So no two processes ever write the same cache."""
    data = None
    if ctx.is_main:
        data = prepare_data(cfg.data, cfg.model.block_size, progress, tokenizer)
    runtime.barrier(ctx)
    if ctx.local_rank == 0 and not ctx.is_main:
        data = prepare_data(cfg.data, cfg.model.block_size, False, tokenizer)
    runtime.barrier(ctx)
    if data is None:
        data = prepare_data(cfg.data, cfg.model.block_size, False, tokenizer)
    return data


def chat_batches(data: ChatData, cfg: Config, ctx: runtime.Distributed, device: torch.device,
                 ) -> tuple[ChatBatchSampler, list[tuple[torch.Tensor, torch.Tensor]]]:
    """data.format "chat": the training sampler and validation batches over conversations."""
    t = cfg.train
    sampler = ChatBatchSampler(data, cfg.model.block_size, t.batch_size, t.seed, rank=ctx.rank,
                               world_size=ctx.world_size, device=device)
    return sampler, chat_eval_batches(data, cfg.model.block_size, t.batch_size, t.eval_steps)


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


def resume(run_dir: Path, model: GPT, optimizer: Optimizer, sampler: BatchSampler,
           ctx: runtime.Distributed, threads_chosen: bool) -> tuple[int, float]:
    """Load the run's latest checkpoint into `model`, `optimizer` and `sampler`; return the step
    it was taken at and the best validation loss so far. Unless train.threads is set, the run
    goes on with the thread count it had (sums split over threads round differently)."""
    try:
        ckpt = resolve_checkpoint(run_dir)
    except CheckpointError as exc:
        raise TrainingError(f"train.resume is set but {str(run_dir)!r} holds no checkpoint; "
                            "start without train.resume=true") from exc
    load_weights(model, ckpt, ctx.device)
    opt_state = load_optimizer_state(ckpt)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    state = load_state(ckpt)
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    # A single process goes on with its generators' saved state; a multi-process job seeds
    # every step from (seed, rank, step) instead (see train()).
    if "rng" in state and not ctx.enabled:
        set_rng_state(state["rng"], ctx.device)
    if not threads_chosen and state.get("threads"):
        runtime.configure_threads(state["threads"])
    return state.get("step", 0), state.get("best_val_loss", math.inf)


def wrap(model: GPT, compile: bool, ctx: runtime.Distributed) -> nn.Module:
    """The module the loop calls: `model` compiled if asked, inside DDP under torchrun."""
    forward_model: nn.Module = model
    if compile:
        forward_model = torch.compile(model)
    if ctx.enabled:
        on_gpu = ctx.device.type == "cuda"
        forward_model = DistributedDataParallel(
            forward_model, device_ids=[ctx.device.index] if on_gpu else None)
    return forward_model


# -- the loop's steps -------------------------------------------------------------------------


def train_step(forward_model: nn.Module, model: GPT, optimizer: Optimizer,
               scaler: torch.amp.GradScaler, sampler: BatchSampler, t: TrainConfig, step: int,
               dtype: torch.dtype, ddp: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over grad_accum micro-batches. Returns the step's loss and the
    gradient norm before clipping (None without clipping), both still on the device."""
    set_lr(optimizer, step, t)
    loss_sum = torch.zeros((), device=sampler.device)
    for micro in range(t.grad_accum):
        x, y = sampler.next_batch()
        # DDP all-reduces gradients only on the last micro-step; the others accumulate.
        last_micro = micro == t.grad_accum - 1
        sync = (contextlib.nullcontext() if last_micro or not ddp
                else forward_model.no_sync())
        with sync:
            with runtime.autocast(sampler.device, dtype):
                _, loss = forward_model(x, y)
            loss = loss / t.grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    norm = None
    if t.grad_clip > 0:
        if scaler.is_enabled():  # clip the true gradients, not the scaled ones
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip,
                                              foreach=True)  # one norm kernel for all
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


def settle_losses(pending: list[tuple[int, torch.Tensor]], ctx: runtime.Distributed,
                  run_dir: Path) -> list[float]:
    """Copy the pending (step, loss) pairs to the host in one sync, averaged over ranks, and
    empty `pending`; a non-finite loss stops the run. Every rank must call this together."""
    if not pending:
        return []
    losses = runtime.mean_over_ranks(ctx, torch.stack([loss for _, loss in pending]))
    values = losses.tolist()
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at step {step}; the last good checkpoint is kept in "
                f"{str(run_dir / 'latest')!r}; lower train.lr and resume or restart")
    pending.clear()
    return values


def validate(model: nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]],
             data: PreparedData, device: torch.device, dtype: torch.dtype, step: int,
             log: RunLog | None, bar: tqdm) -> tuple[float, float]:
    """Evaluate, log and print the validation loss at `step`: (nats/token, bits/byte)."""
    val_loss = evaluate(model, windows, device, dtype)
    bpb = val_loss / math.log(2) / data.bytes_per_token("val")
    if log is not None:
        log.log({"step": step, "val_loss": val_loss, "val_bpb": bpb})
        log.plot()
    bar.write(f"step {step}: val loss {val_loss:.4f} nats/token, {bpb:.4f} bits/byte")
    return val_loss, bpb


@torch.no_grad()
def evaluate(model: nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss in nats/token over fixed validation windows."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in windows:
        with runtime.autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    model.train(was_training)
    return (total / len(windows)).item()


def run_state(step: int, best_val: float, sampler: BatchSampler, device: torch.device,
              result: TrainResult) -> dict[str, Any]:
    """What a checkpoint needs besides weights and optimizer to continue the run exactly."""
    return {"step": step, "best_val_loss": best_val, "sampler": sampler.state_dict(),
            "rng": rng_state(device), "val_loss": result.val_loss, "val_bpb": result.val_bpb,
            "threads": torch.get_num_threads()}
