"""model.inference.tally: the parameter count per component sums to the true total, on the
meta device too."""

from __future__ import annotations

import pytest
import torch

from model.gpt import GPT, GPTConfig
from model.inference.tally import parameter_tally


@pytest.mark.parametrize("tie", [True, False])
def test_tally_matches_parameter_count(tie):
    model = GPT(GPTConfig(vocab_size=50, n_embd=16, n_head=2, n_layer=2, block_size=8,
                          tie_embeddings=tie))
    total = sum(p.numel() for p in model.parameters())
    assert sum(r.count for r in parameter_tally(model)) == total


def test_tally_of_a_preset_matches_the_model_on_the_meta_device():
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.from_preset("gpt2"))
    total = sum(r.count for r in parameter_tally(GPTConfig.from_preset("gpt2")))
    assert total == sum(p.numel() for p in gpt2.parameters()) == 124_439_808
