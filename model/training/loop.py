"""train(cfg): the training loop, with evaluation, logging, checkpoints, resume and DDP.

train() is the loop: step, report, evaluate, checkpoint, stop. What comes before it (data,
model, optimizer, resume, wrapping) is `start_run`, which returns a `Run` holding those parts;
its methods and the functions below each do one thing and take what they need as arguments.

One optimizer step = grad_accum micro-batches per process; under torchrun the global batch is
world_size * grad_accum * batch_size sequences of block_size tokens. Each micro-batch's loss is
the mean next-token cross-entropy over every position.

Your own model and code in the loop (model/callbacks.py has the protocol):

    train(cfg, model=MyGPT(config), callbacks=[EarlyStop()])

`model` is a GPT subclass or any nn.Module with GPT's forward contract: forward(idx, targets)
returns (logits, loss). It is moved to the run's device and trained in place; a module with a
GPTConfig in `.config` is saved with that config, so `load_model(run, model_class=MyGPT)`
rebuilds it. Weight decay follows model/optim.py's rule, which reads only shapes.

Process state: while it runs, train() sets torch's CPU thread count (train.threads), allows TF32
matmuls on CUDA, and seeds Python's and torch's global generators from train.seed (+ rank). On
return it puts the caller's thread count, TF32 flags and CPU generators back; CUDA generators
keep the state the run left them in.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from model import runtime
from model.config import Config, TrainConfig
from model.data.batches import BatchSampler, eval_windows
from model.data.chat_batches import ChatBatchSampler
from model.data.prepare import PreparedData
from model.errors import TrainingError
from model.gpt import GPT
from model.network import lora
from model.training.callbacks import Callback, TrainingState
from model.training.finetune import adopt_source, load_source
from model.training.monitor import RunLog, gpu_peak_flops
from model.training.optim import Optimizer, build_optimizer, set_lr
from model.training.setup import (
    adopt_model,
    chat_batches,
    check_writable,
    count_params,
    flops_per_token,
    prepare_data_once,
    resolve_vocab,
    resume,
    wrap,
)
from model.weights.checkpoint import copy_checkpoint, rng_state, save_checkpoint
from model.weights.loading import lora_base_record, model_from_source


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
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM
    model: nn.Module | None = None  # the trained plain module, on the run's device


def train(cfg: Config, *, progress: bool = True, model: nn.Module | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train `model` (None: a GPT built from cfg.model, or train.init_from's weights) as `cfg`
    says; `cfg` is validated and left unchanged. Returns what the run did."""
    t = cfg.train
    with (process_settings(t.threads or runtime.training_threads()),
          runtime.distributed_job(runtime.pick_device(t.device)) as ctx):
        run = start_run(cfg, ctx, model, progress, settle_every_step=bool(callbacks))
        state = run.state
        with run, runtime.GracefulStop() as signals:
            for step in range(run.start_step, t.max_steps):
                step_started = time.perf_counter()
                loss, grad_norm = run.step(step)
                state.step = step + 1
                run.pending.append((state.step, loss))
                if (run.settle_every_step or state.step % t.log_interval == 0
                        or state.step == t.max_steps):
                    run.settle()
                run.count_time(time.perf_counter() - step_started)
                run.report(grad_norm)
                for callback in callbacks:
                    callback.after_step(state)

                evaluated = state.step % t.eval_interval == 0
                if evaluated:
                    run.evaluate(callbacks)
                stop = run.stop_reason(signals)  # every rank agrees on it
                if stop and not evaluated:
                    run.evaluate(callbacks)
                if stop or state.step % (t.checkpoint_interval or t.eval_interval) == 0:
                    run.save(callbacks)
                if stop:
                    run.stopped(stop)
                    break
        return run.result


@contextlib.contextmanager
def process_settings(threads: int) -> Iterator[None]:
    """Run the block with torch using `threads` CPU threads; afterwards put back what train()
    changes process-wide: the thread count, the CUDA TF32 flags (runtime.configure_backends),
    and torch's and Python's CPU generators (seeded by the run)."""
    saved_threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    runtime.configure_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.set_rng_state(torch_rng)
        random.setstate(python_rng)


# -- the run: everything the loop works with ----------------------------------------------------


@dataclass
class Run:
    """One training run's parts, built by `start_run`; the loop calls its methods. Used as a
    context manager, it closes the progress bar and the logs however the loop ends."""

    cfg: Config  # with the vocabulary (and a pretrained source's shape) resolved
    ctx: runtime.Distributed
    dtype: torch.dtype
    model: nn.Module  # the plain module: what checkpoints store
    forward_model: nn.Module | None  # what the loop calls: `model` compiled and/or in DDP
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler | ChatBatchSampler
    val_windows: list[tuple[torch.Tensor, torch.Tensor]]
    data: PreparedData
    log: RunLog | None  # rank 0 only
    bar: tqdm
    state: TrainingState  # what callbacks see
    result: TrainResult
    start_step: int
    best_val_loss: float
    tokens_per_step: int  # over all ranks
    flops_per_step: float
    peak_flops: float | None  # of this GPU, for the MFU estimate
    settle_every_step: bool  # copy each loss to the host at once (CPU runs, callbacks)
    lora_base: dict[str, str] | None = None  # a LoRA run's base, recorded with its adapters
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, loss)
    grad_norm: torch.Tensor | float = 0.0  # the latest, for the logs
    compile_seconds: float = 0.0  # the first step's time when it compiled the model
    started: float = field(default_factory=time.perf_counter)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step: (loss, gradient norm), both still on the device. Under torchrun
        each rank's dropout masks come from (seed, rank, step), so a resumed job draws the
        same ones without gathering every rank's generator state into the checkpoint."""
        t = self.cfg.train
        if self.ctx.enabled:
            runtime.seed_everything(runtime.derived_seed(t.seed, self.ctx.rank, step))
        return train_step(self.forward_model, self.model, self.optimizer, self.scaler,
                          self.sampler, t, step, self.dtype, ddp=self.ctx.enabled)

    def settle(self) -> None:
        """Copy the pending losses to the host (one sync; every rank together)."""
        self.result.losses += settle_losses(self.pending, self.ctx, self.result.run_dir)

    def count_time(self, seconds: float) -> None:
        """Throughput bookkeeping for one step. Reading a loss waits for the GPU, so the wait
        counts in the step's time: the GPU ran the queued steps meanwhile."""
        if not self.result.step_seconds and self.cfg.train.compile:
            self.compile_seconds = seconds  # the first call compiles
        self.result.train_seconds += seconds
        self.result.step_seconds.append(seconds)
        self.result.steps = self.start_step + len(self.result.step_seconds)

    def report(self, grad_norm: torch.Tensor | None) -> None:
        """Update the callbacks' view, the progress bar, and every log_interval steps the
        metrics. Speed is over the last log_interval steps: on a GPU one step's time says when
        the host waited for it, not how long the GPU worked."""
        state, losses = self.state, self.result.losses
        if grad_norm is not None:
            self.grad_norm = grad_norm
        state.lr = self.optimizer.param_groups[0]["lr"]
        if not self.pending:  # settled: reading them costs nothing more
            state.loss = losses[-1]
            state.grad_norm = float(grad_norm) if grad_norm is not None else None
        recent = self.result.step_seconds[-self.cfg.train.log_interval:]
        seconds_per_step = sum(recent) / len(recent)
        tokens_per_s = self.tokens_per_step / seconds_per_step
        if state.step % self.cfg.train.log_interval == 0 and self.log is not None:
            record = {"step": state.step, "loss": losses[-1], "lr": state.lr,
                      "grad_norm": float(self.grad_norm), "tokens_per_s": tokens_per_s,
                      "elapsed_s": time.perf_counter() - self.started}
            if self.peak_flops:
                record["mfu"] = self.flops_per_step / seconds_per_step / self.peak_flops
            self.log.log(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-",
                             lr=f"{state.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")

    def stop_reason(self, signals: runtime.GracefulStop) -> str | None:
        """Why the run ends after this step ("time_budget", "signal", "callback",
        "max_steps"), or None. Ranks must agree, or the others would wait forever."""
        t, state = self.cfg.train, self.state
        out_of_time = t.time_budget_s is not None and self.result.train_seconds >= t.time_budget_s
        out_of_time, signalled, asked = runtime.all_agree(
            self.ctx, out_of_time, signals.requested, state.stop_requested)
        reasons = {"time_budget": out_of_time, "signal": signalled, "callback": asked,
                   "max_steps": state.step == t.max_steps}
        return next((reason for reason, applies in reasons.items() if applies), None)

    def evaluate(self, callbacks: Sequence[Callback]) -> None:
        """Validation loss on rank 0 (the model is the same on every rank), then callbacks."""
        self.settle()  # every rank (a collective); a non-finite loss stops before evaluating
        if not self.ctx.is_main:
            return
        state, result = self.state, self.result
        result.val_loss, result.val_bpb = validate(
            self.model, self.val_windows, self.data, self.device, self.dtype, state.step,
            self.log, self.bar)
        state.val_loss, state.val_bpb = result.val_loss, result.val_bpb
        for callback in callbacks:
            callback.after_evaluation(state)

    def save(self, callbacks: Sequence[Callback]) -> None:
        """latest/ always, best/ when validation improved; then callbacks. No checkpoint ever
        holds weights that came from a non-finite step: the losses are settled first."""
        self.settle()
        if not self.ctx.is_main:
            return
        state, val_loss = self.state, self.result.val_loss
        improved = val_loss is not None and val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        run_dir = self.result.run_dir
        saved = run_state(state.step, self.best_val_loss, self.sampler, self.device, self.result)
        state.checkpoint = save_checkpoint(run_dir / "latest", self.model, self.cfg,
                                           self.data.tokenizer.spec(), optimizer=self.optimizer,
                                           state=saved, lora_base=self.lora_base)
        if improved:
            copy_checkpoint(state.checkpoint, run_dir / "best")
        for callback in callbacks:
            callback.at_checkpoint(state)

    def stopped(self, reason: str) -> None:
        if reason == "signal":
            self.result.interrupted = True
            if self.ctx.is_main:
                self.bar.write(f"interrupted: checkpoint saved at step {self.state.step} in "
                               f"{self.result.run_dir / 'latest'}; resume with train.resume=true")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close the bar and the logs; the throughput leaves out the step that compiled."""
        self.bar.close()
        if self.log is not None:
            self.log.close()
        self.forward_model = None  # DDP goes before its process group (distributed_job)
        result = self.result
        timed_steps = len(result.step_seconds) - (1 if self.compile_seconds else 0)
        timed_seconds = result.train_seconds - self.compile_seconds
        if timed_steps > 0 and timed_seconds > 0:
            result.tokens_per_second = self.tokens_per_step * timed_steps / timed_seconds


def start_run(cfg: Config, ctx: runtime.Distributed, model: nn.Module | None, progress: bool,
              settle_every_step: bool) -> Run:
    """Set a run up in the order it needs: seeds, pretrained weights, data, model, optimizer,
    resume, wrapping (compile, then DDP), logs."""
    t, device = cfg.train, ctx.device
    precision = runtime.choose_dtype(t.dtype, device)
    dtype = precision.dtype
    if ctx.is_main and progress:
        tqdm.write(f"training in {runtime.training_precision(precision)}")
    runtime.configure_backends(device)
    # Each rank its own dropout masks; DDP copies rank 0's initial weights to the others.
    runtime.seed_everything(t.seed + ctx.rank)
    if model is not None:
        cfg = adopt_model(cfg, model)

    # Pretrained weights to start from, if any: they decide the shape and the tokenizer.
    source = load_source(cfg)
    if source is not None:
        cfg = adopt_source(cfg, source)
    # A LoRA run's checkpoints hold its adapters and this record of the base they adapt.
    lora_base = lora_base_record(t.init_from, source) if t.lora is not None else None

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
    if model is None and source is None:
        model = GPT(cfg.model)
    elif model is None:  # the source's own tensors, not a random init with a copy of them on top
        model, loaded = model_from_source(cfg.model, source)
        if ctx.is_main:
            tqdm.write(loaded)
    source = None  # the model now holds the weights; the source must not use them
    if t.lora is not None:  # adapters beside the frozen base: only they train
        lora.apply(model, t.lora, base_dtype=lora.frozen_dtype(dtype))
        if ctx.is_main:
            tqdm.write(lora.describe(model, t.lora))
    model.to(device)
    run_dir = cfg.out_dir
    if ctx.is_main:  # a LoRA checkpoint holds the adapters alone
        check_writable(run_dir, 4 * (lora.count_parameters(model)[0] if t.lora else
                                     count_params(model)))
    optimizer = build_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, best_val_loss = 0, math.inf
    if t.resume:
        start_step, best_val_loss = resume(run_dir, model, optimizer, sampler, ctx,
                                           threads_chosen=t.threads is not None,
                                           lora_base=lora_base)

    log = (RunLog(run_dir, cfg.to_dict(), resume_step=start_step if t.resume else None,
                  use_wandb=t.wandb, wandb_project=t.wandb_project,
                  use_tensorboard=t.tensorboard) if ctx.is_main else None)
    tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum * ctx.world_size
    peak_flops = t.peak_flops or (gpu_peak_flops(torch.cuda.get_device_name(device))
                                  if device.type == "cuda" else None)
    run = Run(
        cfg=cfg, ctx=ctx, dtype=dtype, model=model, forward_model=wrap(model, t.compile, ctx),
        optimizer=optimizer, scaler=scaler, sampler=sampler, val_windows=val_windows, data=data,
        log=log, bar=tqdm(total=t.max_steps, initial=start_step, dynamic_ncols=True,
                          disable=not (progress and ctx.is_main), desc=cfg.name),
        state=TrainingState(model=model, optimizer=optimizer, config=cfg, run_dir=run_dir,
                            rank=ctx.rank, step=start_step),
        result=TrainResult(run_dir=run_dir, steps=start_step, model=model),
        start_step=start_step, best_val_loss=best_val_loss, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_token(model) * tokens_per_step, peak_flops=peak_flops,
        settle_every_step=settle_every_step or device.type == "cpu", lora_base=lora_base)
    if t.init_from != "scratch" and start_step == 0 and ctx.is_main:
        # Where fine-tuning starts: the pretrained model's own loss on this validation split.
        validate(model, val_windows, data, device, dtype, 0, log, run.bar)
    return run


# -- the loop's steps -------------------------------------------------------------------------


def train_step(forward_model: nn.Module, model: nn.Module, optimizer: Optimizer,
               scaler: torch.amp.GradScaler, sampler: BatchSampler, t: TrainConfig, step: int,
               dtype: torch.dtype, *, ddp: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
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
