"""Training logs: one JSON line per logged step, a PNG loss curve, optional wandb/TensorBoard.

wandb and TensorBoard are used only when enabled in the config and installed; neither is a
dependency. Only rank 0 of a distributed job creates a RunLog.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

# Peak dense bf16 tensor-core FLOP/s from the vendors' data sheets, for the MFU estimate.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12,
    "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
    "T4": 65e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    """Look a GPU's peak FLOP/s up by name (e.g. 'NVIDIA H100 80GB HBM3'); None if unknown."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "A10G" before "A10"
        if key in device_name:
            return PEAK_FLOPS[key]
    return None


class RunLog:
    """Writes `metrics.jsonl` and `loss.png` into the run directory."""

    def __init__(self, run_dir: Path, config: dict[str, Any], *, resume_step: int | None = None,
                 use_wandb: bool = False, wandb_project: str = "smallgpt",
                 use_tensorboard: bool = False) -> None:
        self.metrics_path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        if resume_step is not None and self.metrics_path.exists():
            self._drop_after(resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run in an old directory starts a fresh log
        self.wandb = self.tensorboard = None
        if use_wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config,
                                        name=run_dir.name, resume="allow")
            except ImportError:
                warnings.warn("train.wandb is on but wandb is not installed; skipping it",
                              stacklevel=2)
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("train.tensorboard is on but tensorboard is not installed; "
                              "skipping it",
                              stacklevel=2)

    def _drop_after(self, step: int) -> None:
        """On resume from a checkpoint taken after `step` steps, forget the lines of later steps:
        the resumed run redoes them."""
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def plot(self) -> Path | None:
        """Train and validation loss against step, as a PNG next to the metrics."""
        try:
            from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
        except ImportError:
            return None
        records = [json.loads(line) for line in
                   self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        tmp.replace(self.plot_path)
        return self.plot_path

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
