"""bfloat16 where the CPU computes it: what `auto` picks and says, training under autocast with
float32 weights, explicit float32 left exact, and bfloat16 generation with the KV cache."""

from __future__ import annotations

import pytest
import torch
from test_sample_cli import cli, sample, saved  # noqa: F401, F811  (fixtures)
from test_sampling import BLOCK, sharp_model, tokens_of  # tests/ is on sys.path under pytest
from test_training import step_losses, tiny_raw

from model import runtime
from model.cli.train import TerminalReport
from model.config import config_from_dict
from model.data.tokenizer import train_tokenizer
from model.errors import ConfigError
from model.inference.sampling import generate
from model.training.loop import train
from model.weights.loading import load_checkpoint

CPU = torch.device("cpu")
# What torch.cpu.get_capabilities() reports on each kind of CPU (the keys that matter here).
NATIVE = {"avx512_f": True, "avx512_bf16": True, "amx_bf16": False}  # AMD Zen 4, Cooper Lake
AMX = {"avx512_f": True, "avx512_bf16": True, "amx_bf16": True}  # Sapphire Rapids
EMULATING = {"avx512_f": True, "avx512_bw": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(capabilities): make this process see a CPU with those capabilities, the way
    torch reports them, so both kinds are tested on any machine."""
    def fake(capabilities: dict) -> None:
        monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)  # conftest's float32_cpu
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(capabilities))
    return fake


def test_auto_picks_bfloat16_only_where_the_cpu_computes_it(fake_cpu):
    for capabilities, expected, feature in ((NATIVE, torch.bfloat16, "avx512_bf16"),
                                            (AMX, torch.bfloat16, "amx_bf16"),
                                            (EMULATING, torch.float32, None),
                                            ({}, torch.float32, None)):
        fake_cpu(capabilities)
        assert runtime.native_bf16_feature() == feature
        assert runtime.choose_dtype("auto", CPU).dtype == expected, capabilities
        choice = runtime.choose_dtype("auto", CPU)
        assert choice.dtype == expected
        # The run says what it chose and why.
        assert choice.name in choice.describe() and "auto" in choice.describe()
        assert (feature or "no native bfloat16") in choice.reason


def test_the_environment_overrides_the_detection_both_ways(fake_cpu, monkeypatch):
    fake_cpu(NATIVE)
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "0")
    choice = runtime.choose_dtype("auto", CPU)
    assert choice.dtype == torch.float32 and "SMALLGPT_CPU_BF16=0" in choice.reason
    fake_cpu(EMULATING)
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    choice = runtime.choose_dtype("auto", CPU)
    assert choice.dtype == torch.bfloat16 and "SMALLGPT_CPU_BF16=1" in choice.reason


def test_a_torch_that_cannot_report_capabilities_gets_float32(monkeypatch):
    monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)

    def missing():
        raise AttributeError("get_capabilities")
    monkeypatch.setattr(torch.cpu, "get_capabilities", missing)
    assert runtime.choose_dtype("auto", CPU).dtype == torch.float32


def test_an_explicit_dtype_is_taken_as_given_on_any_cpu(fake_cpu):
    for capabilities in (NATIVE, EMULATING):
        fake_cpu(capabilities)
        assert runtime.choose_dtype("float32", CPU).dtype == torch.float32
        assert runtime.choose_dtype("bfloat16", CPU).dtype == torch.bfloat16
        assert "train.dtype=float32" in runtime.choose_dtype("float32", CPU).reason
    with pytest.raises(ConfigError, match="--dtype: float16 needs a GPU"):
        runtime.choose_dtype("float16", CPU, setting="--dtype")


def test_auto_trains_under_bfloat16_autocast_with_float32_weights_and_moments(tmp_path,
                                                                               fake_cpu):
    fake_cpu(NATIVE)
    auto = train(config_from_dict(tiny_raw(tmp_path / "auto", dtype="auto")))
    fake_cpu(EMULATING)
    full = train(config_from_dict(tiny_raw(tmp_path / "f32", dtype="auto")))
    fake_cpu(NATIVE)
    exact = train(config_from_dict(tiny_raw(tmp_path / "exact", dtype="float32")))
    # bfloat16 changed the arithmetic (so it ran), but not what is learned ...
    assert auto.losses != full.losses
    assert auto.losses == pytest.approx(full.losses, rel=0.02)
    # ... and float32, asked for on a bfloat16 CPU, is bit for bit the float32 run.
    assert exact.losses == full.losses
    checkpoint = load_checkpoint(tmp_path / "auto" / "run" / "latest")
    assert all(p.dtype == torch.float32 for p in checkpoint.model.parameters())
    moments = torch.load(tmp_path / "auto" / "run" / "latest" / "optimizer.pt",
                         weights_only=True)["state"]
    tensors = [v for state in moments.values() for v in state.values() if v.dim() > 0]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    logged = step_losses(tmp_path / "auto" / "run")
    assert len(logged) == 8


def test_training_prints_the_dtype_it_chose(tmp_path, fake_cpu, capsys):
    fake_cpu(NATIVE)
    train(config_from_dict(tiny_raw(tmp_path, max_steps=1, eval_interval=1)),
          callbacks=[TerminalReport()])
    shown = capsys.readouterr().out
    assert "training in dtype bfloat16 (auto: this CPU computes bfloat16 natively" in shown
    assert "weights and optimizer state stay float32" in shown


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_bfloat16_cached_greedy_equals_bfloat16_full_recomputation(pos_emb):
    chars = train_tokenizer("char", ["First Citizen:\nBefore we proceed any further.\n"])
    model = sharp_model(chars.vocab_size, pos_emb, seed=5).to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    kwargs = dict(prompt="First", max_new_tokens=3 * BLOCK, temperature=0.0, ignore_eot=True)
    cached = list(generate(model, chars, use_cache=True, **kwargs))
    full = list(generate(model, chars, use_cache=False, **kwargs))
    assert tokens_of(cached) == tokens_of(full)
    assert len(set(tokens_of(cached))) > 3  # a varied output, so the comparison means something
    # The model really ran in bfloat16: its output differs from the float32 model's somewhere.
    f32 = list(generate(model.float(), chars, use_cache=True, **kwargs))
    assert [s.prob for s in f32] != [s.prob for s in cached]



def test_sample_py_generates_from_bfloat16_weights_where_the_cpu_has_them(cli, fake_cpu,  # noqa: F811
                                                                          monkeypatch):
    seen = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, *a, **kw: (
        seen.append(next(model.parameters()).dtype), real(model, *a, **kw))[1])
    monkeypatch.setattr(runtime, "MIN_BF16_GENERATION_PARAMS", 0)  # as if it were large
    for capabilities, flag, dtype in ((NATIVE, [], torch.bfloat16),
                                      (EMULATING, [], torch.float32),
                                      (NATIVE, ["--dtype", "float32"], torch.float32)):
        fake_cpu(capabilities)
        code, out, err = cli("--prompt", "B", "--max-new-tokens", "3", "--seed", "1", *flag,
                             keep_loading_line=True)
        assert code == 0 and out.startswith("B") and seen[-1] == dtype
        # The loading line says which dtype and why.
        assert err.count("\n") == 1 and f"in dtype {str(dtype)[6:]} (" in err
        assert ("natively, avx512_bf16" in err) == (dtype == torch.bfloat16)


def test_auto_keeps_a_small_model_in_float32_for_generation(cli, fake_cpu,  # noqa: F811
                                                            monkeypatch):
    """Small models decode faster in float32 even where the CPU has bfloat16 units; an
    explicit --dtype bfloat16 is still taken as given."""
    fake_cpu(NATIVE)
    code, _, err = cli("--prompt", "B", "--max-new-tokens", "2", keep_loading_line=True)
    assert code == 0 and "in dtype float32 (auto: a model of" in err
    assert "decodes faster in float32" in err
    code, _, err = cli("--prompt", "B", "--max-new-tokens", "2", "--dtype", "bfloat16",
                       keep_loading_line=True)
    assert code == 0 and "in dtype bfloat16 (--dtype=bfloat16)" in err
    choice = runtime.choose_dtype("auto", CPU)
    big = runtime.generation_precision(choice, runtime.MIN_BF16_GENERATION_PARAMS)
    assert big.dtype == torch.bfloat16


def test_a_checkpoints_parameters_are_counted_without_loading_it(saved):  # noqa: F811
    from model.weights.loading import parameter_count

    _, run, model, _ = saved
    assert parameter_count(run) == model.num_params()


def test_the_precision_records_fields_decide_and_its_words_only_explain(fake_cpu):
    import dataclasses

    fake_cpu(NATIVE)
    auto = runtime.choose_dtype("auto", CPU)
    assert (auto.dtype, auto.automatic, auto.native, auto.device_type) == (
        torch.bfloat16, True, True, "cpu")
    fake_cpu(EMULATING)
    named = runtime.choose_dtype("bfloat16", CPU, setting="--dtype")
    assert (named.dtype, named.automatic, named.native) == (torch.bfloat16, False, False)
    assert runtime.choose_dtype("float32", CPU).native
    assert runtime.generation_precision(named, 1000) is named  # the user's choice stands
    small = runtime.generation_precision(dataclasses.replace(auto, reason="chosen"), 1000)
    assert (small.dtype, small.automatic) == (torch.float32, True)
    on_gpu = dataclasses.replace(auto, device_type="cuda")  # its words still say CPU
    assert runtime.generation_precision(on_gpu, 1000) is on_gpu
