"""On a CUDA GPU: mixed-precision training, fused AdamW, torch.compile, NCCL DDP, resume of the
GPU's generator, and KV-cache generation. Every test here is marked cuda and skipped without one
(see conftest.py); the DDP test also needs two GPUs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_distributed import run_job, tiny_job
from test_sampling import TEXT, sharp_model, tokens_of
from test_training import step_losses, tiny_raw

from model import GPT, GPTConfig, runtime
from model.config import config_from_dict
from model.data.tokenizer import train_tokenizer
from model.inference.sampling import generate
from model.training.loop import train
from model.training.optim import build_optimizer
from model.weights.loading import load_checkpoint

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture
def exact_matmuls(monkeypatch):
    """float32 matmuls without TF32 (which training switches on), so paths compare closely."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    return GPT(GPTConfig(**{**config, **overrides})).to(CUDA)


def batch(vocab: int = 64, size: tuple[int, int] = (4, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randint(0, vocab, size, device=CUDA, generator=generator)
    return x, torch.roll(x, -1, dims=1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_lowers_the_loss(tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    cfg = config_from_dict(tiny_raw(tmp_path, max_steps=30, eval_interval=15, device="cuda",
                                    dtype=dtype), name="t")
    result = train(cfg)
    assert len(result.losses) == 30 and all(math.isfinite(v) for v in result.losses)
    assert result.losses[-1] < result.losses[0] - 0.5
    assert result.val_bpb is not None and math.isfinite(result.val_bpb)
    # Autocast computes in `dtype`; the weights, and the checkpoint, stay float32.
    saved = load_checkpoint(result.run_dir, CUDA)
    assert all(p.dtype == torch.float32 for p in saved.model.parameters())
    x, y = batch(saved.model.config.vocab_size, (2, 16))
    with runtime.autocast(CUDA, runtime.DTYPES[dtype]):
        logits, loss = saved.model(x, y)
    assert logits.dtype == runtime.DTYPES[dtype] and loss.dtype == torch.float32


def test_auto_dtype_is_bfloat16_where_the_gpu_has_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert runtime.choose_dtype("auto", CUDA).dtype == expected


def test_adamw_is_fused_on_cuda_and_steps_like_the_unfused_one(exact_matmuls):
    model = tiny_model()
    reference = copy.deepcopy(model)
    cfg = config_from_dict({"train": dict(lr=1e-3)}).train
    fused = build_optimizer(model, cfg, CUDA)
    assert fused.defaults["fused"] is True
    # The same groups (matrices decay, vectors do not) stepped one tensor at a time.
    params = list(reference.parameters())
    plain = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)
    x, y = batch()
    # One step: the gradients are then the same, and only the update's rounding may differ
    # (later steps would also compare Adam's amplified noise, e.g. in the key bias, whose
    # gradient is zero up to rounding).
    for net, optimizer in ((model, fused), (reference, plain)):
        net(x, y)[1].backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_model_matches_eager(exact_matmuls):
    model = tiny_model()
    eager, compiled = model, torch.compile(copy.deepcopy(model))
    x, y = batch()
    eager_logits, eager_loss = eager(x, y)
    compiled_logits, compiled_loss = compiled(x, y)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    eager_loss.backward()
    compiled_loss.backward()
    compiled_params = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        q = compiled_params[f"_orig_mod.{name}"]
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_kv_cache_generation_equals_full_recomputation_on_cuda():
    chars = train_tokenizer("char", [TEXT])
    model = sharp_model(chars.vocab_size).to(CUDA)  # float64: near-ties cannot flip
    kwargs = dict(prompt="Fir", max_new_tokens=4 * model.config.block_size, temperature=0,
                  ignore_eot=True)
    cached = list(generate(model, chars, use_cache=True, **kwargs))
    full = list(generate(model, chars, use_cache=False, **kwargs))
    assert tokens_of(cached) == tokens_of(full)
    assert len(set(tokens_of(cached))) > 3
    assert [s.prob for s in cached] == pytest.approx([s.prob for s in full], abs=1e-9)
    # The same text as on the CPU.
    on_cpu = list(generate(model.cpu(), chars, use_cache=True, **kwargs))
    assert tokens_of(on_cpu) == tokens_of(cached)


def test_resume_restores_the_gpus_generator(tmp_path):
    """With dropout, the losses after a resume follow the uninterrupted run only when the CUDA
    generator (which draws the masks) is restored. Approximately: some CUDA kernels add in a
    varying order."""
    def raw(name: str, **train_cfg):
        job = tiny_raw(tmp_path / name, max_steps=8, device="cuda", dtype="float32", **train_cfg)
        job["model"]["dropout"] = 0.1
        return config_from_dict(job, name="t")

    full = train(raw("a"))
    train(raw("b", time_budget_s=1e-9))  # stops after step 1
    resumed = train(raw("b", resume=True))
    assert resumed.steps == 8
    assert resumed.losses == pytest.approx(full.losses[1:], abs=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_ddp_two_gpus_match_one(tmp_path):
    """2 processes on cuda:0 and cuda:1 (NCCL, every collective checked for its GPU) against
    one process with the same global batch."""
    job = tiny_job(tmp_path, "ddp", device="cuda", dtype="float32")
    job["model"]["dropout"] = 0.0  # each rank draws its own masks: no match with one process
    run_job(2, [job], str(tmp_path / "calls"))
    single = dict(job, train=dict(job["train"], batch_size=4, out_dir=str(tmp_path / "one")))
    train(config_from_dict(single, name="one"))
    ddp, one = step_losses(tmp_path / "ddp"), step_losses(tmp_path / "one")
    assert ddp.keys() == one.keys() == {1, 2, 3, 4}
    for step in one:
        assert ddp[step] == pytest.approx(one[step], abs=2e-3)  # TF32 matmuls of other shapes
