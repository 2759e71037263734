"""model.inference.scoring on tiny seeded models: per-token log-probabilities equal a manual
forward pass and log_softmax, within one window and across the sliding window past the context
size."""

import pytest
import torch

from model import GPT, ConfigError, GPTConfig
from model.data.tokenizer import train_tokenizer
from model.inference.scoring import score_text, score_tokens, windows

BLOCK = 8


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """float64, so batched and unbatched forward passes agree to rounding."""
    torch.manual_seed(seed)
    config = dict(vocab_size=23, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16)
    model = GPT(GPTConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)  # sharp predictions that depend on the context
    return model.double().eval()


def manual(model: GPT, ids: list[int], start: int, t: int) -> torch.Tensor:
    """log_softmax of the logits after ids[start:t] (the model's own forward): log p(. | ...)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[start:t]]))[0][0, -1]
    return logits.float().log_softmax(dim=-1)


def test_scores_equal_a_manual_forward_and_log_softmax():
    model = tiny_model()
    ids = torch.randint(0, 23, (BLOCK + 1,), generator=torch.Generator().manual_seed(1)).tolist()
    scores = score_tokens(model, ids, top=3)
    assert scores.tokens.tolist() == ids[1:]
    with torch.no_grad():  # BLOCK + 1 ids: BLOCK inputs, each scoring the token after it
        lp = model(torch.tensor([ids[:-1]]))[0][0].float().log_softmax(dim=-1)  # (T - 1, V)
    expected = lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(scores.logprobs, expected)
    values, indices = lp.topk(3, dim=-1)
    torch.testing.assert_close(scores.top_logprobs, values)
    assert scores.top_ids.tolist() == indices.tolist()
    assert scores.total().item() == pytest.approx(expected.sum().item(), rel=1e-6)


def test_a_batch_scores_each_row_as_alone():
    model = tiny_model()
    batch = torch.randint(0, 23, (3, 6), generator=torch.Generator().manual_seed(2))
    together = score_tokens(model, batch, top=2, batch_size=2)
    assert together.logprobs.shape == (3, 5) and together.top_ids.shape == (3, 5, 2)
    for row, ids in enumerate(batch):
        alone = score_tokens(model, ids, top=2)
        torch.testing.assert_close(together.logprobs[row], alone.logprobs)
        assert together.top_ids[row].tolist() == alone.top_ids.tolist()


@pytest.mark.parametrize("length,stride", [(30, 4), (30, 1), (30, BLOCK), (19, 3), (10, 5)])
def test_past_the_context_each_token_is_scored_in_its_window(length, stride):
    """Window by window: token t is scored after ids[start:t] of the window that first reaches
    it, with at least block_size - stride + 1 tokens of context once past the first window."""
    model = tiny_model(seed=3)
    ids = torch.randint(0, 23, (length,), generator=torch.Generator().manual_seed(4)).tolist()
    scores = score_tokens(model, ids, stride=stride, batch_size=3)
    plan = windows(length, BLOCK, stride)
    assert plan[0] == (0, 0) and plan[-1][0] == length - 1 - BLOCK
    for i, (start, first) in enumerate(plan):
        last = plan[i + 1][1] if i + 1 < len(plan) else length - 1
        for target in range(first, last):  # ids[target + 1] after ids[start:target + 1]
            t = target + 1
            assert t - start <= BLOCK
            if i > 0:
                assert t - start >= BLOCK - stride + 1
            expected = manual(model, ids, start, t)[ids[t]]
            assert scores.logprobs[target].item() == pytest.approx(expected.item(), abs=1e-5)


def test_stride_one_gives_every_token_a_full_context():
    model = tiny_model(seed=5)
    ids = torch.randint(0, 23, (20,), generator=torch.Generator().manual_seed(6)).tolist()
    scores = score_tokens(model, ids, stride=1)
    for t in range(1, 20):
        expected = manual(model, ids, max(0, t - BLOCK), t)[ids[t]]
        assert scores.logprobs[t - 1].item() == pytest.approx(expected.item(), abs=1e-5)


def test_rotary_models_and_the_model_mode_are_kept():
    model = tiny_model(seed=7, pos_emb="rope").train()
    ids = list(range(12))
    scores = score_tokens(model, ids, stride=2)
    assert model.training  # restored
    model.eval()
    for t in (1, BLOCK, 11):
        start = max(0, t - BLOCK) if t <= BLOCK else 11 - BLOCK  # the last window ends at 11
        expected = manual(model, ids, start, t)[ids[t]]
        assert scores.logprobs[t - 1].item() == pytest.approx(expected.item(), abs=1e-5)


def test_score_text_scores_every_token_after_end_of_text():
    tokenizer = train_tokenizer("char", ["to be or not to be"])
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    scores = score_text(model, tokenizer, "to be", top=1)
    ids = [tokenizer.eot_id] + tokenizer.encode("to be")
    assert scores.tokens.tolist() == ids[1:] and scores.texts == list("to be")
    torch.testing.assert_close(scores.logprobs, score_tokens(model, ids).logprobs)
    bare = score_text(model, tokenizer, "to be", prepend_eot=False)
    assert bare.texts == list("o be")
    assert score_text(model, tokenizer, "").logprobs.shape == (0,)


def test_short_inputs_and_bad_arguments():
    model = tiny_model()
    assert score_tokens(model, [3]).logprobs.shape == (0,)
    assert score_tokens(model, torch.zeros(2, 1, dtype=torch.long)).logprobs.shape == (2, 0)
    for kwargs, match in [(dict(stride=0), "stride"), (dict(stride=BLOCK + 1), "stride"),
                          (dict(top=-1), "top"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ConfigError, match=match):
            score_tokens(model, [1, 2, 3], **kwargs)
    with pytest.raises(ConfigError, match="token ids in 0..22"):
        score_tokens(model, [1, 23])
    with pytest.raises(ConfigError, match="shape"):
        score_tokens(model, torch.zeros(1, 2, 3, dtype=torch.long))


def test_no_gradients_are_kept():
    model = tiny_model()
    scores = score_tokens(model, [1, 2, 3, 4], top=2)
    assert not scores.logprobs.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_the_vocabulary_is_the_tokenizers_when_the_head_is_padded():
    """vocab_size (the tokenizer's) is the one vocabulary: ids at or past it are refused, and
    the padded head's extra ids are in no distribution."""
    model = tiny_model()  # a head of 23
    scores = score_tokens(model, [1, 2, 3, 4], top=40, vocab_size=20)
    assert scores.top_ids.shape == (3, 20) and int(scores.top_ids.max()) < 20
    torch.testing.assert_close(scores.top_logprobs.exp().sum(-1), torch.ones(3))
    with pytest.raises(ConfigError, match="token ids in 0..19"):
        score_tokens(model, [1, 21], vocab_size=20)
