"""train(cfg): the training loop, with evaluation, logging, checkpoints, resume and DDP.

One optimizer step = grad_accum micro-batches per process; under torchrun the global batch is
world_size * grad_accum * batch_size sequences of block_size tokens. Each micro-batch's loss is
the mean next-token cross-entropy over every position.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import runtime
from .batches import BatchSampler, eval_windows
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
from .config import Config
from .errors import CheckpointError, ConfigError, TrainingError
from .gpt import GPT
from .monitor import RunLog, gpu_peak_flops
from .optim import build_optimizer, set_lr
from .prepare import PreparedData, prepare_data


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


def check_writable(run_dir: Path, model_bytes: int) -> None:
    """Fail before training if the run directory cannot hold a few checkpoints."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"cannot write to output directory {str(run_dir)!r} ({exc.strerror}); "
                            "set train.out_dir to a writable place") from None
    free = shutil.disk_usage(run_dir).free
    # latest + best + a temporary copy, each with weights and two Adam moments.
    needed = 3 * 3 * model_bytes
    if free < needed:
        raise TrainingError(f"only {free / 2**20:.0f} MiB free under {str(run_dir)!r}, checkpoints "
                            f"need about {needed / 2**20:.0f} MiB; free space or change out_dir")


def resolve_vocab(cfg: Config, vocab_size: int) -> None:
    """model.vocab_size comes from the tokenizer unless set; if set it must cover it."""
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {vocab_size} tokens; remove it to use the tokenizer's")


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]],
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


class _GracefulStop:
    """Turn Ctrl-C (and SIGTERM from schedulers) into a flag checked between steps, so the loop
    can finish the step, save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _load_resume_state(run_dir: Path, model: GPT, optimizer: Any) -> dict[str, Any]:
    try:
        ckpt = resolve_checkpoint(run_dir)
    except CheckpointError:
        raise TrainingError(f"train.resume is set but {str(run_dir)!r} holds no checkpoint; "
                            "start without train.resume=true") from None
    load_weights(model, ckpt, next(model.parameters()).device)
    opt_state = load_optimizer_state(ckpt)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return load_state(ckpt)


def train(cfg: Config, progress: bool = True) -> TrainResult:
    """Train the model described by `cfg`; see the module docstring."""
    cfg.validate()
    t = cfg.train
    device = runtime.pick_device(t.device)
    with runtime.distributed_job(device) as ctx:
        device = runtime.local_device(device, ctx)
        dtype = runtime.pick_dtype(t.dtype, device)
        runtime.configure_backends(device, t.threads)
        runtime.seed_everything(t.seed)
        run_dir = cfg.out_dir

        # Rank 0 prepares the token files; the others wait, then read the same cache.
        if ctx.is_main:
            data = prepare_data(cfg.data, cfg.model.block_size, progress=progress)
        if ctx.enabled:
            dist.barrier()
        if not ctx.is_main:
            data = prepare_data(cfg.data, cfg.model.block_size, progress=False)
        resolve_vocab(cfg, data.tokenizer.vocab_size)

        model = GPT(cfg.model).to(device)
        if ctx.is_main:
            check_writable(run_dir, 4 * model.num_params())
        optimizer = build_optimizer(model, t, device)
        sampler = BatchSampler(data.train_path, cfg.model.block_size, t.batch_size, t.seed,
                               rank=ctx.rank, world_size=ctx.world_size, device=device)
        start_step, best_val = 0, math.inf
        if t.resume:
            state = _load_resume_state(run_dir, model, optimizer)
            start_step = state.get("step", 0)
            best_val = state.get("best_val_loss", math.inf)
            if "sampler" in state:
                sampler.load_state_dict(state["sampler"])
            if "rng" in state:
                set_rng_state(state["rng"])

        # Wrap from outside: compile, then DDP; checkpoints always store the plain `model`.
        forward_model: torch.nn.Module = model
        compile_seconds = 0.0
        if t.compile:
            forward_model = torch.compile(model)
        if ctx.enabled:
            forward_model = DistributedDataParallel(
                forward_model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        val_windows = eval_windows(data.val_path, cfg.model.block_size, t.batch_size,
                                   t.eval_steps)
        log = (RunLog(run_dir, cfg.to_dict(), resume_step=start_step if t.resume else None,
                      use_wandb=t.wandb, wandb_project=t.wandb_project,
                      use_tensorboard=t.tensorboard) if ctx.is_main else None)
        peak = t.peak_flops or (gpu_peak_flops(torch.cuda.get_device_name(device))
                                if device.type == "cuda" else None)
        tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum * ctx.world_size
        flops_per_step = model.flops_per_token() * tokens_per_step

        result = TrainResult(run_dir=run_dir, steps=start_step)
        trainer = _Loop(cfg, ctx, device, dtype, model, forward_model, optimizer, scaler,
                        sampler, data, val_windows, log, result, best_val)
        bar = tqdm(total=t.max_steps, initial=start_step, disable=not (progress and ctx.is_main),
                   dynamic_ncols=True, desc=cfg.name)
        trainer.bar = bar
        t0 = time.perf_counter()
        with _GracefulStop() as stop:
            try:
                for step in range(start_step, t.max_steps):
                    step_start = time.perf_counter()
                    trainer.train_step(step)
                    step_time = time.perf_counter() - step_start
                    if step == start_step and t.compile:
                        compile_seconds = step_time  # the first call compiles
                    result.train_seconds += step_time
                    result.step_seconds.append(step_time)
                    done = step + 1
                    result.steps = done
                    if done % t.log_interval == 0 or done == t.max_steps or device.type == "cpu":
                        trainer.flush_losses()
                    if done % t.log_interval == 0 and log is not None:
                        rate = tokens_per_step / step_time
                        record = {"step": done, "loss": result.losses[-1],
                                  "lr": optimizer.param_groups[0]["lr"],
                                  "grad_norm": trainer.last_grad_norm, "tokens_per_s": rate,
                                  "elapsed_s": time.perf_counter() - t0}
                        if peak:
                            record["mfu"] = flops_per_step / step_time / peak
                        log.log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.losses[-1]:.3f}" if result.losses else "-",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    tok_s=f"{tokens_per_step / step_time:,.0f}")
                    out_of_time = (t.time_budget_s is not None
                                   and result.train_seconds >= t.time_budget_s)
                    # Ranks must agree on stopping, or the others would wait for them forever.
                    out_of_time, stop.requested = _all_agree(ctx, out_of_time, stop.requested)
                    last = done == t.max_steps or out_of_time or stop.requested
                    if done % t.eval_interval == 0 or last:
                        trainer.evaluate_and_log(done)
                    ckpt_every = t.checkpoint_interval or t.eval_interval
                    if done % ckpt_every == 0 or last:
                        trainer.save(done)
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
        # Throughput leaves out the first step when it compiled the model.
        timed_steps = result.steps - start_step - (1 if compile_seconds else 0)
        timed_seconds = result.train_seconds - compile_seconds
        if timed_steps > 0 and timed_seconds > 0:
            result.tokens_per_second = tokens_per_step * timed_steps / timed_seconds
        return result


def _all_agree(ctx: runtime.Distributed, *flags: bool) -> tuple[bool, ...]:
    """Each flag becomes true on every rank if it is true on any rank."""
    if not ctx.enabled:
        return flags
    values = torch.tensor([float(f) for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


class _Loop:
    """The per-step work of train(); holds the objects the steps share."""

    def __init__(self, cfg: Config, ctx: runtime.Distributed, device: torch.device,
                 dtype: torch.dtype, model: GPT, forward_model: torch.nn.Module, optimizer: Any,
                 scaler: torch.amp.GradScaler, sampler: BatchSampler, data: PreparedData,
                 val_windows: list, log: RunLog | None, result: TrainResult,
                 best_val: float) -> None:
        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        self.model, self.forward_model, self.optimizer, self.scaler = (
            model, forward_model, optimizer, scaler)
        self.sampler, self.data, self.val_windows = sampler, data, val_windows
        self.log, self.result, self.best_val = log, result, best_val
        self.pending: list[tuple[int, torch.Tensor]] = []  # losses not yet copied to the host
        self.last_grad_norm = 0.0
        self.bar: Any = None

    def train_step(self, step: int) -> None:
        t = self.cfg.train
        set_lr(self.optimizer, step, t)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            x, y = self.sampler.next_batch()
            # DDP all-reduces gradients only on the last micro-step; the others accumulate.
            last_micro = micro == t.grad_accum - 1
            sync = (contextlib.nullcontext() if last_micro or not self.ctx.enabled
                    else self.forward_model.no_sync())
            with sync:
                with runtime.autocast(self.device, self.dtype):
                    _, loss = self.forward_model(x, y)
                loss = loss / t.grad_accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if t.grad_clip > 0:
            if self.scaler.is_enabled():  # clip the true gradients, not the scaled ones
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip,
                                                  foreach=True)  # one norm kernel for all
            self.last_grad_norm = norm
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append((step + 1, loss_sum))

    def flush_losses(self) -> None:
        """Copy pending losses to the host (one sync), averaged over ranks; stop on NaN/inf."""
        if not self.pending:
            return
        losses = torch.stack([loss for _, loss in self.pending])
        if self.ctx.enabled:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
        values = losses.tolist()
        for (step, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss became {value} at step {step}; the last good checkpoint is kept in "
                    f"{str(self.result.run_dir / 'latest')!r}; lower train.lr and resume or "
                    "restart")
        self.result.losses.extend(values)
        self.pending.clear()
        if isinstance(self.last_grad_norm, torch.Tensor):
            self.last_grad_norm = self.last_grad_norm.item()

    def evaluate_and_log(self, step: int) -> None:
        self.flush_losses()
        if not self.ctx.is_main:
            return
        val_loss = evaluate(self.model, self.val_windows, self.device, self.dtype)
        bpb = val_loss / math.log(2) / self.data.bytes_per_token("val")
        self.result.val_loss, self.result.val_bpb = val_loss, bpb
        if self.log is not None:
            self.log.log({"step": step, "val_loss": val_loss, "val_bpb": bpb})
            self.log.plot()
        if self.bar is not None:
            self.bar.write(f"step {step}: val loss {val_loss:.4f} nats/token, "
                           f"{bpb:.4f} bits/byte")

    def save(self, step: int) -> None:
        self.flush_losses()  # never checkpoint weights that came from a non-finite step
        if not self.ctx.is_main:
            return
        improved = self.result.val_loss is not None and self.result.val_loss < self.best_val
        if improved:
            self.best_val = self.result.val_loss
        state = {"step": step, "best_val_loss": self.best_val, "sampler": self.sampler.state_dict(),
                 "rng": rng_state(), "val_loss": self.result.val_loss,
                 "val_bpb": self.result.val_bpb}
        run_dir = self.result.run_dir
        latest = save_checkpoint(run_dir / "latest", self.model, self.cfg,
                                 self.data.tokenizer.spec(), self.optimizer, state)
        if improved:
            copy_checkpoint(latest, run_dir / "best")
