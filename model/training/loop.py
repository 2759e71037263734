"""train(cfg): the training loop, with evaluation, logging, checkpoints, resume and DDP.

train() is the loop: step, report, evaluate, checkpoint, stop. What comes before it (data,
model, optimizer, resume, wrapping) is `start_run`, which returns a `Run` holding those parts;
its methods and the functions below each do one thing and take what they need as arguments.

One optimizer step = grad_accum micro-batches per process; under torchrun the global batch is
world_size * grad_accum * batch_size sequences of block_size tokens. Each micro-batch's loss is
the mean next-token cross-entropy over every position.

Your own model and code in the loop (model/training/callbacks.py has the protocol):

    train(cfg, model=MyGPT(config), callbacks=[EarlyStop()])

`model` is a GPT subclass or any nn.Module with GPT's forward contract: forward(idx, targets)
returns (logits, loss). It is moved to the run's device and trained in place; a module with a
GPTConfig in `.config` is saved with that config, so `load_model(run, model_class=MyGPT)`
rebuilds it. Weight decay follows model/training/optim.py's rule, which reads only shapes.

train() prints nothing: what a run says (its notes, each step, each validation loss, why it
stopped) reaches the callbacks, and the data preparation reports to `progress`. The command
line (model/cli/train.py) draws both on the terminal.

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
from torch.nn.parallel import DistributedDataParallel

from model import runtime
from model.config import Config, TrainConfig
from model.data.batches import BatchSampler, eval_windows
from model.data.chat_batches import ChatBatchSampler
from model.data.prepare import PreparedData
from model.errors import TrainingError
from model.gpt import GPT, count_parameters
from model.network import lora
from model.progress import Progress, silent
from model.training import distributed
from model.training.callbacks import Callback, TrainingState, describe_validation
from model.training.distributed import Distributed
from model.training.finetune import adopt_source, load_source
from model.training.monitor import RunLog, gpu_peak_flops
from model.training.optim import Optimizer, build_optimizer, set_lr
from model.training.setup import (
    adopt_model,
    chat_batches,
    check_writable,
    flops_per_token,
    prepare_data_once,
    resolve_vocab,
    resume,
    wrap,
)
from model.weights.checkpoint import copy_checkpoint, rng_state, save_checkpoint
from model.weights.loading import lora_base_record, model_from_source

Sampler = BatchSampler | ChatBatchSampler


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


def train(cfg: Config, *, model: nn.Module | None = None, callbacks: Sequence[Callback] = (),
          progress: Progress | bool = silent) -> TrainResult:
    """Train `model` (None: a GPT built from cfg.model, or train.init_from's weights) as `cfg`
    says; `cfg` is validated and left unchanged. Returns what the run did. `callbacks` hear
    how it goes (model/training/callbacks.py); `progress` how far the data preparation is
    (True or False, the switch this parameter once was, report nothing)."""
    if isinstance(progress, bool):
        progress = silent
    settings = cfg.train
    with (process_settings(settings.threads or runtime.default_threads()),
          distributed.distributed_job(runtime.pick_device(settings.device)) as job):
        each_loss = any(callback.wants_each_loss for callback in callbacks)
        run, notes = start_run(cfg, job, model, progress, settle_every_step=each_loss)
        state = run.state
        with run.reporting(callbacks, notes), distributed.GracefulStop() as signals:
            for step in range(state.step, settings.max_steps):
                step_started = time.perf_counter()
                loss, grad_norm = run.step(step)
                state.step = step + 1
                run.pending.append((state.step, loss))
                if (run.settle_every_step or state.step % settings.log_interval == 0
                        or state.step == settings.max_steps):
                    run.settle()
                run.speed.count(time.perf_counter() - step_started)
                run.report(grad_norm)
                for callback in callbacks:
                    callback.after_step(state)

                evaluated = state.step % settings.eval_interval == 0
                if evaluated:
                    run.evaluate(callbacks)
                stop = run.stop_reason(signals)  # every rank agrees on it
                if stop and not evaluated:
                    run.evaluate(callbacks)
                if stop or state.step % (settings.checkpoint_interval
                                         or settings.eval_interval) == 0:
                    run.save(callbacks)
                if stop:
                    state.stop_reason = stop
                    break
        return run.result()


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
class Speed:
    """How fast a run goes: each step's wall-clock seconds. Reading a loss waits for the GPU,
    so the wait counts in the step's time: the GPU ran the queued steps meanwhile."""

    tokens_per_step: int  # over all ranks
    flops_per_token: float
    peak_flops: float | None  # of this GPU, for the MFU estimate
    compiles: bool  # the first step compiles the model, so the run's speed leaves it out
    step_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def count(self, seconds: float) -> None:
        self.step_seconds.append(seconds)
        self.total_seconds += seconds

    def tokens_per_second(self, last: int | None = None) -> float:
        """Over the `last` steps, or over the whole run but the step that compiled. On a GPU
        one step's time says when the host waited for it, not how long the GPU worked: only a
        span of steps measures the speed."""
        seconds = self.step_seconds[-last:] if last else self.step_seconds[int(self.compiles):]
        total = sum(seconds)
        return self.tokens_per_step * len(seconds) / total if total > 0 else 0.0

    def model_flops_utilization(self, tokens_per_second: float) -> float | None:
        """The share of the GPU's peak FLOP/s the model's arithmetic used; None off a GPU."""
        if not self.peak_flops:
            return None
        return self.flops_per_token * tokens_per_second / self.peak_flops


@dataclass
class Run:
    """One training run's parts, built by `start_run`; the loop calls its methods. The run's
    progress is kept once: in `state`, what callbacks see (step, loss, validation loss, why it
    stopped), in `losses` and in `speed`; `result()` reads them at the end."""

    cfg: Config  # with the vocabulary (and a pretrained source's shape) resolved
    job: Distributed
    dtype: torch.dtype
    model: nn.Module  # the plain module: what checkpoints store
    forward_model: nn.Module | None  # what the loop calls: `model` compiled and/or in DDP
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    sampler: Sampler
    val_windows: list[tuple[torch.Tensor, torch.Tensor]]
    data: PreparedData
    log: RunLog | None  # rank 0 only
    state: TrainingState
    speed: Speed
    best_val_loss: float
    settle_every_step: bool  # copy each loss to the host at once (CPU runs, callbacks)
    lora_base: dict[str, str] | None = None  # a LoRA run's base, recorded with its adapters
    losses: list[float] = field(default_factory=list)  # every step this call ran, settled
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, loss)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step: (loss, gradient norm), both still on the device. Under torchrun
        each rank's dropout masks come from (seed, rank, step), so a resumed job draws the
        same ones without gathering every rank's generator state into the checkpoint."""
        if self.job.enabled:
            distributed.seed_everything(
                distributed.derived_seed(self.cfg.train.seed, self.job.rank, step))
        return train_step(self.model, self.optimizer, self.sampler, step, self.cfg.train,
                          dtype=self.dtype, scaler=self.scaler, forward_model=self.forward_model)

    def settle(self) -> None:
        """Copy the pending losses to the host (one sync; every rank together)."""
        self.losses += settle_losses(self.pending, self.job, self.state.run_dir)

    def report(self, grad_norm: torch.Tensor | None) -> None:
        """Update the callbacks' view, and every log_interval steps the metrics. Speed is over
        the last log_interval steps."""
        state, log_interval = self.state, self.cfg.train.log_interval
        state.lr = self.optimizer.param_groups[0]["lr"]
        state.loss = self.losses[-1] if self.losses else None
        if not self.pending:  # settled: reading the norm costs nothing more
            state.grad_norm = float(grad_norm) if grad_norm is not None else None
        state.tokens_per_second = self.speed.tokens_per_second(last=log_interval)
        if state.step % log_interval == 0 and self.log is not None:
            record = {"step": state.step, "loss": state.loss, "lr": state.lr,
                      "grad_norm": state.grad_norm if state.grad_norm is not None else 0.0,
                      "tokens_per_s": state.tokens_per_second,
                      "elapsed_s": time.perf_counter() - self.speed.started}
            mfu = self.speed.model_flops_utilization(state.tokens_per_second)
            if mfu is not None:
                record["mfu"] = mfu
            self.log.log(record)

    def stop_reason(self, signals: distributed.GracefulStop) -> str | None:
        """Why the run ends after this step ("time_budget", "signal", "callback",
        "max_steps"), or None. Ranks must agree, or the others would wait forever."""
        settings, state = self.cfg.train, self.state
        out_of_time = (settings.time_budget_s is not None
                       and self.speed.total_seconds >= settings.time_budget_s)
        out_of_time, signalled, asked = distributed.all_agree(
            self.job, out_of_time, signals.requested, state.stop_requested)
        reasons = {"time_budget": out_of_time, "signal": signalled, "callback": asked,
                   "max_steps": state.step == settings.max_steps}
        return next((reason for reason, applies in reasons.items() if applies), None)

    def validate(self) -> tuple[float, float]:
        """The validation loss now, (nats/token, bits/byte), logged to the metrics (rank 0)."""
        val_loss = evaluate(self.model, self.val_windows, self.job.device, self.dtype)
        val_bpb = val_loss / math.log(2) / self.data.bytes_per_token("val")
        if self.log is not None:
            self.log.log({"step": self.state.step, "val_loss": val_loss, "val_bpb": val_bpb})
            self.log.plot()
        return val_loss, val_bpb

    def evaluate(self, callbacks: Sequence[Callback]) -> None:
        """Validation loss on rank 0 (the model is the same on every rank), then callbacks."""
        self.settle()  # every rank (a collective); a non-finite loss stops before evaluating
        if not self.job.is_main:
            return
        self.state.val_loss, self.state.val_bpb = self.validate()
        for callback in callbacks:
            callback.after_evaluation(self.state)

    def save(self, callbacks: Sequence[Callback]) -> None:
        """latest/ always, best/ when validation improved; then callbacks. No checkpoint ever
        holds weights that came from a non-finite step: the losses are settled first."""
        self.settle()
        if not self.job.is_main:
            return
        state = self.state
        improved = state.val_loss is not None and state.val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = state.val_loss
        saved = run_state(state, self.best_val_loss, self.sampler, self.job.device)
        state.checkpoint = save_checkpoint(
            state.run_dir / "latest", self.model, self.cfg, self.data.tokenizer.spec(),
            optimizer=self.optimizer, state=saved, lora_base=self.lora_base)
        if improved:
            copy_checkpoint(state.checkpoint, state.run_dir / "best")
        for callback in callbacks:
            callback.at_checkpoint(state)

    @contextlib.contextmanager
    def reporting(self, callbacks: Sequence[Callback], notes: list[str]) -> Iterator[None]:
        """The loop's lifetime: callbacks hear it start with `notes` and end however it ends;
        the logs close and DDP goes (before its process group: distributed_job)."""
        try:
            for callback in callbacks:
                callback.at_start(self.state, notes)
            yield
        finally:
            if self.log is not None:
                self.log.close()
            self.forward_model = None
            for callback in callbacks:
                callback.at_end(self.state)

    def result(self) -> TrainResult:
        state, speed = self.state, self.speed
        return TrainResult(
            run_dir=state.run_dir, steps=state.step, losses=self.losses,
            step_seconds=speed.step_seconds, val_loss=state.val_loss, val_bpb=state.val_bpb,
            train_seconds=speed.total_seconds, tokens_per_second=speed.tokens_per_second(),
            interrupted=state.stop_reason == "signal", model=self.model)


def start_run(cfg: Config, job: Distributed, model: nn.Module | None, progress: Progress, *,
              settle_every_step: bool) -> tuple[Run, list[str]]:
    """Set a run up in the order it needs: seeds, pretrained weights, data, model, optimizer,
    resume, wrapping (compile, then DDP), logs. Returns the run and the lines that describe
    it for the user."""
    settings, device = cfg.train, job.device
    precision = runtime.choose_dtype(settings.dtype, device)
    dtype = precision.dtype
    notes = [f"training in {runtime.training_precision(precision)}"]
    runtime.configure_backends(device)
    # Each rank its own dropout masks; DDP copies rank 0's initial weights to the others.
    distributed.seed_everything(settings.seed + job.rank)
    if model is not None:
        cfg = adopt_model(cfg, model)

    # Pretrained weights to start from, if any: they decide the shape and the tokenizer.
    source = load_source(cfg)
    if source is not None:
        cfg = adopt_source(cfg, source)
    # A LoRA run's checkpoints hold its adapters and this record of the base they adapt.
    lora_base = lora_base_record(settings.init_from, source) if settings.lora is not None else None

    # Data: token files (prepared once), the training batches and the validation windows.
    data = prepare_data_once(cfg, job, progress, source.tokenizer if source else None)
    cfg = resolve_vocab(cfg, data.tokenizer.vocab_size)
    block_size = cfg.model.block_size
    if cfg.data.format == "chat":  # whole conversations per row, loss on replies only
        sampler, val_windows = chat_batches(data, cfg, job)
    else:
        sampler = BatchSampler(data.train_path, block_size, settings.batch_size, settings.seed,
                               rank=job.rank, world_size=job.world_size, device=device)
        val_windows = eval_windows(data.val_path, block_size, settings.batch_size,
                                   settings.eval_steps)

    # Model and optimizer; a resumed run then loads weights, moments and the loop's state.
    if model is None and source is None:
        model = GPT(cfg.model)
    elif model is None:  # the source's own tensors, not a random init with a copy of them on top
        model, loaded = model_from_source(cfg.model, source)
        notes.append(loaded)
    del source  # the model now holds the weights; the source must not use them
    if settings.lora is not None:  # adapters beside the frozen base: only they train
        lora.apply(model, settings.lora, base_dtype=lora.frozen_dtype(dtype))
        notes.append(lora.describe(model, settings.lora))
    model.to(device)
    run_dir = cfg.out_dir
    if job.is_main:  # a LoRA checkpoint holds the adapters alone
        check_writable(run_dir, 4 * count_parameters(model, trainable_only=True))
    optimizer = build_optimizer(model, settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, best_val_loss = 0, math.inf
    if settings.resume:
        start_step, best_val_loss = resume(run_dir, model, optimizer, sampler, job,
                                           threads_chosen=settings.threads is not None,
                                           lora_base=lora_base)

    log = (RunLog(run_dir, cfg.to_dict(), resume_step=start_step if settings.resume else None,
                  use_wandb=settings.wandb, wandb_project=settings.wandb_project,
                  use_tensorboard=settings.tensorboard) if job.is_main else None)
    tokens_per_step = settings.batch_size * block_size * settings.grad_accum * job.world_size
    peak_flops = settings.peak_flops or (gpu_peak_flops(torch.cuda.get_device_name(device))
                                         if device.type == "cuda" else None)
    run = Run(
        cfg=cfg, job=job, dtype=dtype, model=model,
        forward_model=wrap(model, settings.compile, job), optimizer=optimizer, scaler=scaler,
        sampler=sampler, val_windows=val_windows, data=data, log=log,
        state=TrainingState(model=model, optimizer=optimizer, config=cfg, run_dir=run_dir,
                            rank=job.rank, step=start_step),
        speed=Speed(tokens_per_step=tokens_per_step, flops_per_token=flops_per_token(model),
                    peak_flops=peak_flops, compiles=settings.compile),
        best_val_loss=best_val_loss,
        settle_every_step=settle_every_step or device.type == "cpu", lora_base=lora_base)
    if settings.init_from != "scratch" and start_step == 0 and job.is_main:
        # Where fine-tuning starts: the pretrained model's own loss on this validation split.
        notes.append(describe_validation(0, *run.validate()))
    return run, notes


# -- the loop's steps -------------------------------------------------------------------------


def train_step(model: nn.Module, optimizer: Optimizer, sampler: Sampler, step: int,
               settings: TrainConfig, *, dtype: torch.dtype, scaler: torch.amp.GradScaler,
               forward_model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step of `model` over settings.grad_accum micro-batches, computing in
    `dtype`. `forward_model` is what computes the loss: `model` compiled and/or wrapped in DDP
    (default: `model` itself). Returns the step's loss and the gradient norm before clipping
    (None without clipping), both still on the device."""
    forward_model = model if forward_model is None else forward_model
    ddp = isinstance(forward_model, DistributedDataParallel)
    set_lr(optimizer, step, settings)
    loss_sum = torch.zeros((), device=sampler.device)
    for micro in range(settings.grad_accum):
        x, y = sampler.next_batch()
        # DDP all-reduces gradients only on the last micro-step; the others accumulate.
        last_micro = micro == settings.grad_accum - 1
        sync = (contextlib.nullcontext() if last_micro or not ddp
                else forward_model.no_sync())
        with sync:
            with runtime.autocast(sampler.device, dtype):
                _, loss = forward_model(x, y)
            loss = loss / settings.grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    norm = None
    if settings.grad_clip > 0:
        if scaler.is_enabled():  # clip the true gradients, not the scaled ones
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip,
                                              foreach=True)  # one norm kernel for all
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


def settle_losses(pending: list[tuple[int, torch.Tensor]], job: Distributed,
                  run_dir: Path) -> list[float]:
    """Copy the pending (step, loss) pairs to the host in one sync, averaged over ranks, and
    empty `pending`; a non-finite loss stops the run. Every rank must call this together."""
    if not pending:
        return []
    losses = distributed.mean_over_ranks(job, torch.stack([loss for _, loss in pending]))
    values = losses.tolist()
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at step {step}; the last good checkpoint is kept in "
                f"{str(run_dir / 'latest')!r}; lower train.lr and resume or restart")
    pending.clear()
    return values


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


def run_state(state: TrainingState, best_val_loss: float, sampler: Sampler,
              device: torch.device) -> dict[str, Any]:
    """What a checkpoint needs besides weights and optimizer to continue the run exactly."""
    return {"step": state.step, "best_val_loss": best_val_loss, "sampler": sampler.state_dict(),
            "rng": rng_state(device), "val_loss": state.val_loss, "val_bpb": state.val_bpb,
            "threads": torch.get_num_threads()}
