"""Training: the loop learns, resumes bit for bit, survives kills, stops on NaN, and DDP matches."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from model.config import config_from_dict
from model.errors import CheckpointError, ConfigError, TrainingError
from model.gpt import GPT, GPTConfig
from model.training.callbacks import Callback, TrainingState
from model.training.loop import TrainResult, train
from model.training.optim import lr_at
from model.weights.loading import load_checkpoint
from train import main as train_main

ROOT = Path(__file__).resolve().parent.parent


def write_corpus(path: Path) -> Path:
    """~40 KB of deterministic, slightly varied text: enough windows for tiny models."""
    words = ["to", "be", "or", "not", "the", "question", "whether", "nobler", "mind", "suffer"]
    lines = []
    for i in range(2000):
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 5)) + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_raw(tmp_path: Path, **train_overrides) -> dict:
    corpus = write_corpus(tmp_path / "corpus.txt")
    train_cfg = dict(out_dir=str(tmp_path / "run"), max_steps=8, batch_size=4, lr=3e-3,
                     min_lr=3e-4, warmup_steps=2, eval_interval=4, eval_steps=2, log_interval=1,
                     seed=7, device="cpu", threads=1)
    train_cfg.update(train_overrides)
    return {
        "model": dict(block_size=16, n_layer=1, n_head=2, n_embd=32),
        "data": dict(source=str(corpus), tokenizer="char", cache_dir=str(tmp_path / "cache"),
                     num_proc=1),
        "train": train_cfg,
    }


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = config_from_dict({"train": dict(lr=1.0, min_lr=0.1, warmup_steps=10,
                                          max_steps=110)}).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    wsd = config_from_dict({"train": dict(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100,
                                          schedule="wsd", cooldown_fraction=0.2)}).train
    assert lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5)


def test_training_lowers_loss_and_writes_checkpoint_and_logs(tmp_path):
    cfg = config_from_dict(tiny_raw(tmp_path, max_steps=30, eval_interval=15), name="t")
    result = train(cfg)
    assert result.steps == 30 and len(result.losses) == 30
    assert result.losses[-1] < result.losses[0] - 0.5
    assert result.val_bpb is not None and math.isfinite(result.val_bpb)
    # The vocabulary comes from the tokenizer into the saved config; the caller's is untouched.
    assert cfg.model.vocab_size is None
    saved = load_checkpoint(result.run_dir)
    assert saved.config.model.vocab_size == saved.tokenizer.vocab_size
    for name in ("latest/model.safetensors", "latest/config.json", "latest/optimizer.pt",
                 "latest/state.json", "best/model.safetensors", "metrics.jsonl", "loss.png"):
        assert (result.run_dir / name).exists(), name
    ckpt = load_checkpoint(result.run_dir)
    assert ckpt.state["step"] == 30
    x = torch.arange(8)[None] % ckpt.model.config.vocab_size
    assert torch.isfinite(ckpt.model(x)[0]).all()


def test_resume_in_process_matches_uninterrupted(tmp_path):
    full = train(config_from_dict(tiny_raw(tmp_path / "a"), name="t"))
    # The same run, stopped after its step-4 checkpoint (as by kill -9), then resumed.
    first = tiny_raw(tmp_path / "b", max_steps=8)
    cfg = config_from_dict(first, name="t")
    cfg.train.time_budget_s = 1e-9  # stops after one step; the checkpoint is then at step 1
    train(cfg)
    resumed = train(config_from_dict(tiny_raw(tmp_path / "b", resume=True), name="t"))
    assert resumed.steps == 8
    assert step_losses(tmp_path / "b" / "run") == step_losses(tmp_path / "a" / "run")
    assert resumed.losses == full.losses[1:]


def _run_until(args: list[str], run_dir: Path, sig: int, min_step: int) -> None:
    """Start train.py, wait until metrics reach `min_step`, then send `sig`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        ready = (run_dir / "latest" / "state.json").exists() and metrics.exists()
        if ready and max(step_losses(run_dir), default=0) >= min_step:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 or sig == signal.SIGINT, out.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, sig):
    raw = tiny_raw(tmp_path, max_steps=60, eval_interval=20, checkpoint_interval=5)
    config_path = tmp_path / "cfg.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    _run_until(["--config", str(config_path), "--no-progress"], run_dir, sig, min_step=12)
    interrupted_at = load_checkpoint(run_dir).state["step"]
    assert 5 <= interrupted_at < 60
    assert train_main(["--config", str(config_path), "--no-progress", "train.resume=true"]) == 0
    resumed = step_losses(run_dir)

    reference = dict(raw, train=dict(raw["train"], out_dir=str(tmp_path / "ref")))
    train(config_from_dict(reference, name="ref"))
    assert resumed == step_losses(tmp_path / "ref")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = config_from_dict(tiny_raw(tmp_path, max_steps=4, eval_interval=2), name="t")
    train(cfg)
    good = (tmp_path / "run" / "latest" / "model.safetensors").read_bytes()
    boom = config_from_dict(tiny_raw(tmp_path, max_steps=8, eval_interval=2, lr=1e30,
                                     warmup_steps=0, resume=True, grad_clip=0.0), name="t")
    with pytest.raises(TrainingError, match=r"at step \d+.*lower train.lr"):
        train(boom)
    assert load_checkpoint(tmp_path / "run").state["step"] == 4
    assert (tmp_path / "run" / "latest" / "model.safetensors").read_bytes() == good


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    raw = tiny_raw(tmp_path)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    cfg = config_from_dict(dict(raw, train=dict(raw["train"], out_dir=str(blocked / "run"))))
    with pytest.raises(TrainingError, match="cannot write to output directory"):
        train(cfg)
    with pytest.raises(TrainingError, match="holds no checkpoint"):
        train(config_from_dict(tiny_raw(tmp_path / "fresh", resume=True)))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(config_from_dict(dict(raw, model=dict(raw["model"], vocab_size=3))))
    assert train_main(["--config", "no-such-config.yaml"]) == 2
    assert train_main(["--config", "tiny.yaml", "train.max_step=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: config file 'no-such-config.yaml' not found")
    assert err[1] == "error: train.max_step: unknown key; did you mean 'max_steps'?"


def test_every_shipped_config_loads_and_builds():
    from model.config import load_config
    from model.gpt import GPT

    names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert {"tiny.yaml", "small.yaml", "shakespeare_char.yaml", "gpt2_124m.yaml"} <= set(names)
    for name in names:
        cfg = load_config(name)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = 300
        with torch.device("meta"):
            model = GPT(cfg.model)
        assert model.num_params() > 0


def test_ddp_two_processes_match_single_process(tmp_path):
    pytest.importorskip("torch.distributed.run")
    raw = tiny_raw(tmp_path, max_steps=4, eval_interval=4, batch_size=2)
    import yaml

    ddp_cfg = tmp_path / "ddp.yaml"
    ddp_cfg.write_text(yaml.safe_dump(dict(raw, train=dict(raw["train"],
                                                            out_dir=str(tmp_path / "ddp")))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), "--config", str(ddp_cfg), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # One process with the same global batch: 2 ranks x 2 sequences = 4 sequences.
    single = dict(raw, train=dict(raw["train"], batch_size=4, out_dir=str(tmp_path / "one")))
    train(config_from_dict(single, name="one"))
    ddp, one = step_losses(tmp_path / "ddp"), step_losses(tmp_path / "one")
    assert ddp.keys() == one.keys() == {1, 2, 3, 4}
    for step in one:
        assert ddp[step] == pytest.approx(one[step], abs=1e-5)


# -- your own model and code in the loop --------------------------------------------------------


class StopAfter(Callback):
    """Ends the run after `step` steps, as a kill after that step's checkpoint would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, state: TrainingState) -> None:
        if state.step == self.step:
            state.request_stop()


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def after_step(self, state: TrainingState) -> None:
        self.events.append(("step", state.step, state.loss, state.lr))

    def after_evaluation(self, state: TrainingState) -> None:
        self.events.append(("eval", state.step, state.val_loss))

    def at_checkpoint(self, state: TrainingState) -> None:
        self.events.append(("checkpoint", state.step, state.checkpoint))


def test_callbacks_see_steps_evaluations_and_checkpoints_and_can_stop(tmp_path):
    recorder = Recorder()
    result = train(config_from_dict(tiny_raw(tmp_path, max_steps=8, eval_interval=3)),
                   callbacks=[recorder, StopAfter(5)])
    assert result.steps == 5 and not result.interrupted
    steps = [e for e in recorder.events if e[0] == "step"]
    assert [e[1] for e in steps] == [1, 2, 3, 4, 5]
    assert [e[2] for e in steps] == result.losses  # each step's loss, as the run records it
    # Evaluated and saved at the interval (3) and where the callback stopped the run (5).
    assert [e[:2] for e in recorder.events if e[0] != "step"] == [
        ("eval", 3), ("checkpoint", 3), ("eval", 5), ("checkpoint", 5)]
    assert recorder.events[-1][2] == tmp_path / "run" / "latest"
    assert load_checkpoint(tmp_path / "run").state["step"] == 5
    assert recorder.events[-2][2] == result.val_loss


def test_resume_with_dropout_matches_uninterrupted_run_bit_for_bit(tmp_path):
    """Dropout draws from torch's generator: a resumed run must go on with the saved state."""
    def raw(where: str, **overrides) -> dict:
        config = tiny_raw(tmp_path / where, max_steps=10, eval_interval=5, **overrides)
        return dict(config, model=dict(config["model"], dropout=0.2))

    train(config_from_dict(raw("full")))
    train(config_from_dict(raw("parts")), callbacks=[StopAfter(3)])
    train(config_from_dict(raw("parts", resume=True)))
    full, parts = step_losses(tmp_path / "full" / "run"), step_losses(tmp_path / "parts" / "run")
    assert len(full) == 10
    assert parts == full


class ScaleNorm(nn.Module):
    """x / ||x|| * g * sqrt(d): a norm GPT does not have (Nguyen & Salazar, 2019)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5)


class ScaleNormGPT(GPT):
    """A variant built the plain PyTorch way: a subclass that puts its own modules in place."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        for block in self.blocks:
            block.norm1, block.norm2 = ScaleNorm(config.n_embd), ScaleNorm(config.n_embd)
            block.mlp.act = lambda h: torch.nn.functional.leaky_relu(h, 0.1).square()
        self.norm_f = ScaleNorm(config.n_embd)


def test_own_model_trains_checkpoints_resumes_and_loads_with_its_class(tmp_path):
    shape = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)

    def run(where: str, **overrides) -> TrainResult:
        torch.manual_seed(0)
        cfg = config_from_dict(tiny_raw(tmp_path / where, max_steps=8, **overrides))
        stop = [StopAfter(3)] if where == "parts" and not overrides else []
        return train(cfg, model=ScaleNormGPT(shape), callbacks=stop)

    full = run("full")
    assert full.losses[-1] < full.losses[0]
    run("parts")
    run("parts", resume=True)
    assert step_losses(tmp_path / "parts" / "run") == step_losses(tmp_path / "full" / "run")

    loaded = load_checkpoint(tmp_path / "full" / "run", model_class=ScaleNormGPT)
    assert type(loaded.model) is ScaleNormGPT and loaded.config.model == shape
    x = torch.arange(16)[None] % 64
    full.model.eval()
    assert torch.equal(loaded.model(x)[0], full.model(x)[0])
    # A plain GPT cannot hold these weights: the error names the keys, not a corrupt file.
    with pytest.raises(CheckpointError, match=r"missing keys .*blocks\.0\.norm1\.weight.*"
                                              r"unexpected keys blocks\.0\.norm1\.g"):
        load_checkpoint(tmp_path / "full" / "run")


class Bigram(nn.Module):
    """Not a GPT at all: a table of next-token logits, with GPT's forward contract."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.table(idx)
        loss = None if targets is None else nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss


def test_any_module_with_gpts_forward_contract_trains_and_loads(tmp_path):
    cfg = config_from_dict(tiny_raw(tmp_path, max_steps=20, lr=3e-2))
    torch.manual_seed(0)  # the table's init: what the suite ran before must not matter
    result = train(cfg, model=Bigram(GPTConfig(vocab_size=40, block_size=16)))
    assert result.losses[-1] < result.losses[0] - 0.5
    loaded = load_checkpoint(result.run_dir, model_class=Bigram)
    assert torch.equal(loaded.model.table.weight, result.model.table.weight)
    with pytest.raises(ConfigError, match="train.init_from"):
        train(config_from_dict(tiny_raw(tmp_path / "b", init_from=str(result.run_dir))),
              model=Bigram(GPTConfig(vocab_size=40)))


def test_train_puts_back_the_process_state_it_changes(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(123)
    random.seed(5)
    expected_torch, expected_python = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(5)
    seen = []

    class Threads(Callback):
        def after_step(self, state: TrainingState) -> None:
            seen.append(torch.get_num_threads())

    train(config_from_dict(tiny_raw(tmp_path, max_steps=2, threads=2)), callbacks=[Threads()])
    assert seen == [2, 2]  # the run used train.threads ...
    assert torch.get_num_threads() == 1  # ... and the caller's count is back
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_python


def test_a_stop_asked_at_a_checkpoint_ends_the_run_after_the_next_step(tmp_path):
    class StopAtCheckpoint(Callback):
        def at_checkpoint(self, state: TrainingState) -> None:
            state.request_stop()

    result = train(config_from_dict(tiny_raw(tmp_path, max_steps=8, eval_interval=3)),
                   callbacks=[StopAtCheckpoint()])
    assert result.steps == 4  # saved at 3, where it asked; the next step ends (and saves) it
    assert load_checkpoint(tmp_path / "run").state["step"] == 4


# -- what a run says, and to whom ---------------------------------------------------------------


class Lifecycle(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def at_start(self, state: TrainingState, notes) -> None:
        self.events.append(("start", state.step, list(notes)))

    def after_step(self, state: TrainingState) -> None:
        self.events.append(("step", state.step))

    def at_end(self, state: TrainingState) -> None:
        self.events.append(("end", state.step, state.stop_reason))


def test_callbacks_hear_the_run_start_with_its_notes_and_end_however_it_ends(tmp_path):
    life = Lifecycle()
    train(config_from_dict(tiny_raw(tmp_path / "ok", max_steps=3, dtype="float32")),
          callbacks=[life])
    start, *steps, end = life.events
    assert start[:2] == ("start", 0) and start[2][0].startswith("training in dtype float32")
    assert steps == [("step", 1), ("step", 2), ("step", 3)]
    assert end == ("end", 3, "max_steps")
    life = Lifecycle()  # a run that fails ends too, with no reason to stop
    boom = tiny_raw(tmp_path / "boom", lr=1e30, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(TrainingError, match="loss became"):
        train(config_from_dict(boom), callbacks=[life])
    assert life.events[0][0] == "start" and life.events[-1][0::2] == ("end", None)


def test_a_library_run_prints_nothing(tmp_path, capfd):
    train(config_from_dict(tiny_raw(tmp_path, max_steps=4, eval_interval=2)))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_the_command_line_shows_the_run_as_it_goes(tmp_path, capsys):
    import yaml

    train(config_from_dict(tiny_raw(tmp_path / "base", max_steps=2)))
    raw = tiny_raw(tmp_path, max_steps=4, eval_interval=2, dtype="float32",
                   init_from=str(tmp_path / "base" / "run"))
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    assert train_main(["--config", str(config_path), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training in dtype float32 (train.dtype=float32)")
    assert lines[1].startswith("init_from smallgpt checkpoint")
    assert re.fullmatch(r"step 0: val loss \d+\.\d{4} nats/token, \d+\.\d{4} bits/byte", lines[2])
    assert [line.split(":")[0] for line in lines[3:]] == ["step 2", "step 4", "done"]
    assert lines[-1].startswith("done: 4 steps, val loss ")


def test_ctrl_c_saves_says_where_and_exits_130(tmp_path, monkeypatch, capsys):
    """The in-process twin of the subprocess test above, where the output can be read."""
    import yaml

    from model.cli.train import TerminalReport

    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(tiny_raw(tmp_path, max_steps=8, eval_interval=4)))
    shown = TerminalReport.after_step

    def interrupt_at_step_3(self, state: TrainingState) -> None:
        shown(self, state)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TerminalReport, "after_step", interrupt_at_step_3)
    assert train_main(["--config", str(config_path), "--no-progress"]) == 130
    out = capsys.readouterr().out
    assert (f"interrupted: checkpoint saved at step 3 in {tmp_path / 'run' / 'latest'}; resume "
            "with train.resume=true") in out
    assert "done: 3 steps" in out
    assert load_checkpoint(tmp_path / "run").state["step"] == 3


def test_metrics_lines_hold_every_logged_steps_loss_speed_and_mfu(tmp_path):
    raw = tiny_raw(tmp_path, max_steps=6, eval_interval=3, log_interval=2, peak_flops=1e12)
    result = train(config_from_dict(raw))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text()
               .splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    tokens_per_step = 4 * 16  # batch_size x block_size, one process, no accumulation
    flops_per_token = result.model.flops_per_token()
    for r in logged:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "mfu"}
        assert r["loss"] == result.losses[r["step"] - 1] and r["grad_norm"] > 0
        window = result.step_seconds[r["step"] - 2:r["step"]]  # the last log_interval steps
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step * 2 / sum(window))
        assert r["mfu"] == pytest.approx(flops_per_token * r["tokens_per_s"] / 1e12)
    assert result.train_seconds == pytest.approx(sum(result.step_seconds))
    assert result.tokens_per_second == pytest.approx(
        tokens_per_step * 6 / sum(result.step_seconds))
