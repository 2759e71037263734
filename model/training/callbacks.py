"""Your code inside the training loop: `train(cfg, callbacks=[...])`.

A callback subclasses `Callback` and overrides any of its methods; each receives the run's
`TrainingState`, reads what it needs, and may call `state.request_stop()`:

    class StopWhenGood(Callback):
        def after_evaluation(self, state):
            if state.val_loss < 1.5:
                state.request_stop()

When they run:
  at_start          once, on every rank, before the first step, with the lines that describe
                    the run (its precision, the weights it starts from, LoRA's adapters);
                    `state.val_loss` is set if a fine-tune measured its pretrained model;
then per optimizer step, in this order:
  after_step        every step, on every rank, after the optimizer updated the weights;
  after_evaluation  when the validation loss was just measured (rank 0 only);
  at_checkpoint     when a checkpoint was just written to `state.checkpoint` (rank 0 only);
and last:
  at_end            once, on every rank, however the run ends (finished, stopped or failed);
                    `state.stop_reason` says why it stopped, None after an error.
A stop asked in after_step or after_evaluation ends the run at this step: it is evaluated (if it
was not) and saved, as a Ctrl-C would be. One asked at_checkpoint ends it after the next step.

Callbacks run in the training process between steps: the model is in training mode, on the
run's device, and `state.model` is the plain module (not compiled, not wrapped by DDP). Leave
its weights alone unless you mean to change training. A callback that draws from torch's global
generator changes the dropout masks that follow; give it a torch.Generator of its own. A
callback sees each step's loss in after_step, copied to the host at once (on a GPU, one sync
per step), unless it sets `wants_each_loss = False`: then `state.loss` is the latest loss the
loop copied anyway (every train.log_interval steps), which costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from model.config import Config


@dataclass
class TrainingState:
    """What a callback sees. The loop updates it; a callback reads it and may ask to stop."""

    model: nn.Module  # the plain module being trained
    optimizer: Any  # torch.optim.Optimizer, or model.training.optim.CombinedOptimizer for Muon
    config: Config  # the run's resolved config (vocabulary, pretrained shape)
    run_dir: Path
    rank: int  # this process's rank in a torchrun job; 0 in a single process
    step: int  # optimizer steps done, counting those before a resume
    loss: float | None = None  # the step's training loss, nats/token (mean over ranks)
    lr: float = 0.0  # the first parameter group's learning rate this step (the schedule's)
    grad_norm: float | None = None  # before clipping; None without clipping
    tokens_per_second: float = 0.0  # over all ranks, during the last log_interval steps
    val_loss: float | None = None  # the latest validation loss, nats/token
    val_bpb: float | None = None  # the same in bits per byte of text
    checkpoint: Path | None = None  # the checkpoint directory written last
    stop_requested: bool = False
    # Why the run ended: "max_steps", "time_budget", "signal" (Ctrl-C, SIGTERM) or "callback";
    # None while it runs.
    stop_reason: str | None = None

    def request_stop(self) -> None:
        """End the run: it is evaluated and saved, and train() returns normally."""
        self.stop_requested = True


class Callback:
    """Override the methods you need; the others do nothing."""

    wants_each_loss = True  # False: after_step may see an older loss, at no cost (see above)

    def at_start(self, state: TrainingState, notes: Sequence[str]) -> None:
        pass

    def after_step(self, state: TrainingState) -> None:
        pass

    def after_evaluation(self, state: TrainingState) -> None:
        pass

    def at_checkpoint(self, state: TrainingState) -> None:
        pass

    def at_end(self, state: TrainingState) -> None:
        pass


def describe_validation(step: int, val_loss: float, val_bpb: float) -> str:
    """A validation loss in words, as the command line shows it."""
    return f"step {step}: val loss {val_loss:.4f} nats/token, {val_bpb:.4f} bits/byte"
