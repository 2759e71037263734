"""int8 weights (model/network/quantized.py): each kernel against the float layer it replaces,
and a trained model's logits and greedy text against its float32 self."""

import pytest
import torch
from torch import nn

from model import GPT, GPTConfig, quantize_int8
from model.config import load_config
from model.errors import ConfigError
from model.inference.sampling import generate
from model.network.quantized import Int8Linear, fbgemm_available
from model.training.loop import train
from model.weights.loading import load_model

KERNELS = [pytest.param(True, id="fbgemm", marks=pytest.mark.skipif(
    not fbgemm_available(), reason="torch's x86 quantized engine is not here")),
    pytest.param(False, id="weight-only")]
PROMPT = "ROMEO:\nBut soft"


@pytest.mark.parametrize("fbgemm", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_the_float_layer_within_its_rounding(fbgemm, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row stays zero
        linear.weight[5, 7] = 2.0  # an outlier sets its row's scale alone
    layer = Int8Linear(linear, fbgemm)
    scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
    error = (layer.weight - linear.weight).abs()
    assert (error <= scale / 2 + 1e-7).all()  # round to nearest: at most half a step
    assert (layer.weight[3] == 0).all() and layer.weight[5, 7] == 2.0
    x = torch.randn(2, 5, 96)
    expected = linear(x).detach()
    out = layer(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    # The weights' rounding alone moves an output by at most sum|x| * scale / 2; 8-bit
    # activations (FBGEMM) or bfloat16 ones add about as much again.
    bound = 2 * (x.abs() @ (scale / 2).expand(-1, 96).T) + 0.01 * expected.abs()
    assert ((out - expected).abs() <= bound).all()
    assert not ((out - expected).abs() < 1e-6).all()  # it is not the float layer


def test_quantize_replaces_every_linear_layer_and_keeps_the_embedding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    embedding = model.tok_emb.weight.detach().clone()
    assert quantize_int8(model) == 2 * 4 + 1  # qkv, proj, fc, proj per block, and the head
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert torch.equal(model.tok_emb.weight, embedding)  # W_E is still read by the lookups
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 50) and torch.isfinite(logits).all()


def test_a_model_on_a_gpu_is_refused_in_one_line():
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    with pytest.raises(ConfigError, match="int8 weights run on the CPU, and the model is on meta"):
        quantize_int8(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny.yaml trained for 200 steps: a model whose predictions mean something."""
    out = tmp_path_factory.mktemp("run")
    config = load_config("tiny.yaml", [f"train.out_dir={out}", "train.max_steps=200",
                                       "train.eval_interval=200"])
    return load_model(str(train(config).run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("fbgemm", KERNELS)
def test_a_trained_model_in_int8_keeps_its_logits_and_greedy_text(trained, fbgemm):
    reference = trained.model
    quantized = load_model(str(trained.path)).model
    quantize_int8(quantized, fbgemm=fbgemm)
    ids = torch.tensor([trained.tokenizer.encode(PROMPT + " what light through yonder")[:32]])
    with torch.no_grad():
        ours, theirs = quantized(ids)[0], reference(ids)[0]
    spread = theirs.std().item()
    # Measured: 7.9e-2 (FBGEMM) and 5.1e-2 (weight-only) of logits whose std is 2.4.
    assert (ours - theirs).abs().max() < 0.05 * spread
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95

    def greedy(model: nn.Module) -> list[int]:
        return [s.token for s in generate(model, trained.tokenizer, PROMPT, max_new_tokens=20,
                                          temperature=0)]
    assert greedy(quantized) == greedy(reference)


@pytest.mark.slow
def test_sample_and_the_server_take_quantize_int8(trained, monkeypatch, capsys):
    """sample.py --quantize int8 prints what the library's int8 model generates; sample.py
    --serve and python -m model.serve serve an int8 model (uvicorn's run stood in)."""
    from model.cli import sample, serve

    run = str(trained.path)
    args = ["--checkpoint", run, "--prompt", PROMPT, "--max-new-tokens", "20",
            "--temperature", "0", "--threads", "1"]
    assert sample.cli([*args, "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    model = load_model(run).model
    quantize_int8(model)
    expected = "".join(s.delta for s in generate(model, trained.tokenizer, PROMPT,
                                                 max_new_tokens=20, temperature=0))
    assert out == PROMPT + expected + "\n"
    assert "linear layers in int8" in err

    uvicorn = pytest.importorskip("uvicorn")
    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: apps.append(self.config.app))
    assert sample.cli(["--serve", "--checkpoint", run, "--port", "0", "--quantize", "int8"]) == 0
    assert serve.main(["--checkpoint", run, "--port", "0", "--quantize", "int8"]) == 0
    assert serve.main(["--checkpoint", run, "--port", "0"]) == 0
    int8 = [any(isinstance(m, Int8Linear) for m in app.state.served.model.modules())
            for app in apps]
    assert int8 == [True, True, False]
