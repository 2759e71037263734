"""The optimizers: Muon's orthogonalised update in float32, and its place beside AdamW."""

from __future__ import annotations

import torch

from model.config import TrainConfig
from model.gpt import GPT, GPTConfig
from model.training.optim import CombinedOptimizer, Muon, build_optimizer, orthogonalize


def test_orthogonalize_pushes_singular_values_towards_one_in_float32():
    torch.manual_seed(0)
    for shape in ((64, 16), (16, 64)):
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k))
        g = u @ torch.diag(torch.logspace(-1.5, 1, k)) @ v.T  # singular values 0.03 .. 10
        out = orthogonalize(g)
        assert out.dtype == torch.float32 and out.shape == g.shape
        s = torch.linalg.svdvals(out)
        # Five quintic steps bring the spread of singular values from over 50x to under 5x
        # (they land roughly in [0.3, 1.2], not exactly on 1).
        raw = torch.linalg.svdvals(g)
        assert raw.max() / raw.min() > 50
        assert s.max() < 1.3 and s.max() / s.min() < 5, s


def test_muon_step_follows_the_recipe():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    start = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.9, weight_decay=0.5)
    grad = torch.randn(8, 4)
    w.grad = grad.clone()
    opt.step()
    buf = 0.1 * grad  # lerp from zero by 1 - momentum
    update = orthogonalize(grad.lerp(buf, 0.9))
    expected = start * (1 - 0.1 * 0.5) - 0.1 * (8 / 4) ** 0.5 * update
    torch.testing.assert_close(w.detach(), expected)


def test_muon_trains_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=8))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02),
                          torch.device("cpu"))
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt.optimizers[0], Muon)
    muon_params = {id(p) for p in opt.optimizers[0].param_groups[0]["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in muon_params
    assert id(model.tok_emb.weight) not in muon_params  # embeddings stay with AdamW
    x = torch.randint(0, 32, (4, 8))
    losses = []
    for _ in range(30):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    state = opt.state_dict()  # a checkpoint round trip keeps the momentum buffers
    again = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    again.load_state_dict(state)
    buffers = [s["momentum_buffer"] for s in again.optimizers[0].state.values()]
    assert buffers and all(b.abs().sum() > 0 for b in buffers)


def test_weight_decay_shrinks_matrices_and_tables_but_not_biases_or_norm_gains():
    """With zero gradients an AdamW step moves a parameter only by its weight decay."""
    model = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=8,
                          bias=True, qk_norm=True))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    vectors = 0
    for name, p in model.named_parameters():
        if p.ndim >= 2:  # weight matrices and embedding tables decay: w * (1 - lr * wd)
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.5), msg=name)
        else:  # biases and norm gains stay where they were
            assert torch.equal(p.detach(), before[name]), name
            vectors += 1
    assert vectors > 10  # norms (with biases and QK norms) and linear biases were all checked


def test_frozen_parameters_stay_out_of_the_optimizer():
    model = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, block_size=8))
    model.tok_emb.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(model.tok_emb.weight) not in in_optimizer
    assert len(in_optimizer) == sum(1 for p in model.parameters() if p.requires_grad)


def test_muon_takes_the_matrices_of_the_blocks_modules_in_the_models_order():
    """Chosen from the module structure (what `model.blocks` holds), not from names; the same
    parameters, in the same order, as the 2-D weights registered under blocks.*."""
    model = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=8,
                          bias=True, qk_norm=True))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon = [id(p) for p in opt.optimizers[0].param_groups[0]["params"]]
    by_name = [id(p) for n, p in model.named_parameters()
               if n.startswith("blocks.") and p.ndim == 2]
    assert muon == by_name and len(muon) == 2 * 4  # attention qkv and proj, MLP fc and proj
    adamw = {id(p) for group in opt.optimizers[1].param_groups for p in group["params"]}
    assert not adamw & set(muon) and len(adamw) + len(muon) == len(list(model.parameters()))


def test_a_model_without_blocks_keeps_adamw_for_everything():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert opt.optimizers[0].param_groups[0]["params"] == []
    assert sum(len(g["params"]) for g in opt.optimizers[1].param_groups) == 3
