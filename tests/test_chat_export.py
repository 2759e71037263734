"""A chat-tuned GPT-2 still loads in transformers after export, and ends its turn there too.

The chat template adds no token, so the fine-tuned model keeps GPT-2's 50257-token shape; its
end of turn is GPT-2's <|endoftext|>, which is transformers' eos_token_id, so
`model.generate` stops where our sampler stops.
"""

import json
import os
import random
from pathlib import Path

import pytest
import torch

from model.config import config_from_dict
from model.data.chat import render_chat
from model.inference.sampling import generate
from model.training.loop import train
from model.weights.export import export
from model.weights.loading import load_model

TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"


@pytest.fixture
def gpt2_vocab(monkeypatch):
    for candidate in (TIKTOKEN_CACHE, Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))):
        if candidate.is_dir():
            monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(candidate))
            return
    pytest.skip("GPT-2 vocabulary files not found")


@pytest.mark.slow
def test_chat_tuned_gpt2_exports_to_transformers_and_stops_at_end_of_turn(tmp_path, gpt2_vocab):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = tmp_path / "base"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(base)
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud"]
    records = []
    for _ in range(200):
        word = rng.choice(words)
        records.append({"messages": [{"role": "user", "content": f"Shout {word}."},
                                     {"role": "assistant", "content": word.upper() + "!"}]})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = config_from_dict({
        "data": dict(source=str(tmp_path / "chat.jsonl"), format="chat",
                     cache_dir=str(tmp_path / "cache"), val_fraction=0.2),
        "train": dict(init_from=str(base), out_dir=str(tmp_path / "run"), max_steps=60,
                      batch_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=60,
                      eval_steps=1, device="cpu", threads=1, weight_decay=0.0)}, name="c")
    train(cfg)

    ours = load_model(str(tmp_path / "run"))
    assert ours.model.config.vocab_size == 50257  # no token was added
    exported = export(str(tmp_path / "run"), tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported.directory).eval()
    messages = [{"role": "user", "content": "Shout stone."}]
    prompt = render_chat(messages, ours.tokenizer)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours.model(ids)[0], atol=1e-4)

    steps = list(generate(ours.model, ours.tokenizer, prompt, max_new_tokens=10, temperature=0))
    assert steps[-1].finished == "eot"  # it learned to end its turn
    out = theirs.generate(ids, max_new_tokens=10, do_sample=False,
                          pad_token_id=ours.tokenizer.eot_id)[0, len(prompt):].tolist()
    assert theirs.generation_config.eos_token_id == ours.tokenizer.eot_id
    assert out == [s.token for s in steps]  # the same reply, ending at the same token
