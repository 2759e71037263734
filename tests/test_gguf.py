"""GGUF export, judged by llama.cpp itself (llama-cpp-python, no code of ours on that side).

For each shipped recipe's model shape (shrunk, trained 5 steps from random weights with
perturbed norms and biases and a sharpened embedding, so that greedy choices are decisive): the
file names the expected
llama.cpp architecture, llama.cpp tokenizes a Unicode text as ours does and decodes it back,
its float32 logits equal ours within 1e-3, and 30 greedy tokens equal ours; the 16-bit and
Q8_0 files load and stay close. Without llama-cpp-python (`pip install -e ".[gguf]"`) the
llama.cpp tests skip; CI sets SMALLGPT_REQUIRE_LLAMA_CPP=1, under which they fail instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from test_export import TEXT, perturbed, tokenizer_for  # tests/ is on sys.path (pytest)

from model import GPT, ConfigError, GPTConfig
from model.config import Config, DataConfig, load_config
from model.data.chat import render_chat
from model.inference.sampling import generate
from model.weights.checkpoint import save_checkpoint

gguf = pytest.importorskip("gguf")
from model.weights.gguf import (  # noqa: E402  (needs the gguf package)
    OUTTYPES,
    gguf_architecture,
    save_gguf,
    tokenizer_fields,
)

try:  # imported here, not skipped at once: under SMALLGPT_REQUIRE_LLAMA_CPP its absence fails
    import llama_cpp
except ImportError:
    llama_cpp = None

REQUIRED = os.environ.get("SMALLGPT_REQUIRE_LLAMA_CPP", "") not in ("", "0")
TOL = 1e-3  # llama.cpp as a user runs it: float32 weights, its default float16 KV cache
# With a float32 KV cache as well, what is left is float32 rounding, except in GPT-2, whose
# GELU llama.cpp reads from a float16 table (up to 4e-4 measured; docs/export.md).
EXACT = {"gpt2": TOL, "llama": 1e-4, "qwen3": 1e-4, "arcee": 1e-4, "apertus": 1e-4}
# Whitespace runs, newlines before words, contractions and digits: where split patterns differ.
MORE_TEXT = ("\n\nAll: hi\n\n\nIt: it's 1234 -- ok?!\t\t \n  x  \n\n  \u00a0y'all're don't 3.14 "
             "東京and😀😀 ")  # only characters of TEXT, so the char vocabulary holds them all
# Every shipped recipe: (the shape it trains, its tokenizer) -> llama.cpp architecture.
RECIPES = {
    "tiny": "arcee",
    "small": "apertus",
    "shakespeare_fast": "apertus",
    "chat_small": "apertus",
    "finetune_shakespeare": "gpt2",
    "chat_gpt2": "gpt2",
    "gpt2_124m": "gpt2",
}
REFUSED = {"shakespeare_char": "model.activation='gelu'"}
# The recipes whose shape and tokenizer differ; the others share one of them (shakespeare_fast
# and chat_small are small's, chat_gpt2 is finetune_shakespeare's: see the test below).
SHAPES = ("tiny", "small", "finetune_shakespeare", "gpt2_124m")


@pytest.fixture(scope="module")
def llama():
    if llama_cpp is None:
        reason = 'llama-cpp-python is not installed (pip install -e ".[gguf]")'
        if REQUIRED:
            pytest.fail(f"{reason}; SMALLGPT_REQUIRE_LLAMA_CPP is set, so the llama.cpp tests "
                        "must run", pytrace=False)
        pytest.skip(reason)
    return llama_cpp


def recipe_shape(name: str) -> tuple[GPTConfig, str]:
    """The model config a recipe trains and its tokenizer's name: a fine-tuning recipe's
    shape is its starting model's (GPT-2's, or small.yaml's for chat_small)."""
    cfg = load_config(name)
    if cfg.train.init_from == "gpt2":
        return GPTConfig.from_preset("gpt2", block_size=cfg.model.block_size), "gpt2"
    if cfg.train.init_from not in (None, "scratch"):
        return recipe_shape("small")
    return cfg.model, cfg.data.tokenizer


def shaped(name: str, seed: int = 0) -> tuple[GPT, object]:
    """A model of the recipe's settings at a tiny size, trained a few steps on TEXT from a
    random start whose norms and biases are perturbed (so that a wrong mapping of any of them
    shows) and whose embedding is scaled up (so that logits spread and greedy choices never
    hinge on float noise)."""
    config, tokenizer_name = recipe_shape(name)
    tokenizer = tokenizer_for(tokenizer_name)
    vocab = config.vocab_size or tokenizer.vocab_size
    config = dataclasses.replace(config, vocab_size=vocab, n_layer=2, n_head=4, n_embd=64,
                                 block_size=64, dropout=0.0, n_kv_head=None)
    model = perturbed(config, seed)
    with torch.no_grad():
        model.tok_emb.weight.mul_(20)
    ids = torch.tensor([tokenizer.encode(TEXT)[:config.block_size + 1]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        _, loss = model.train()(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


@contextlib.contextmanager
def loaded(llama, path, n_ctx: int, f32_cache: bool = False):
    """llama.cpp's model and context for the file, freed at the end (not at interpreter exit,
    where llama-cpp-python's finalizer finds its library already unloaded). Its KV cache is
    float16 unless `f32_cache`."""
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0: GGML_TYPE_F32
    llm = llama.Llama(str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                      **cache)
    try:
        yield llm
    finally:
        llm.close()


def their_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def their_greedy(llm, prompt: list[int], n: int, eot: int) -> list[int]:
    """llama.cpp's forward pass, one token at a time with its KV cache, taking the argmax."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < n:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eot:
            break
        llm.eval([token])
    return out


def ours_greedy(model, tokenizer, prompt: list[int], n: int) -> list[int]:
    return [s.token for s in generate(model, tokenizer, prompt, max_new_tokens=n, temperature=0)]


def test_recipes_share_the_shapes_tested():
    def key(recipe):
        config, tokenizer = recipe_shape(recipe)
        return repr(dataclasses.replace(config, block_size=1, dropout=0.0)), tokenizer

    shapes = {key(recipe): recipe for recipe in SHAPES}
    assert len(shapes) == len(SHAPES)
    assert all(key(recipe) in shapes for recipe in RECIPES)


@pytest.mark.parametrize("recipe", SHAPES)
def test_shipped_recipe_runs_exactly_in_llama_cpp(tmp_path, llama, recipe):
    model, tokenizer = shaped(recipe)
    path = tmp_path / "model.gguf"
    assert save_gguf(model, path, tokenizer, "f32") == RECIPES[recipe]
    with loaded(llama, path, model.config.block_size) as llm:
        check_recipe(llm, model, tokenizer, RECIPES[recipe])
    ids = tokenizer.encode(TEXT)[:model.config.block_size]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    with loaded(llama, path, model.config.block_size, f32_cache=True) as llm:
        assert np.abs(their_logits(llm, ids) - ours).max() < EXACT[RECIPES[recipe]]


def check_recipe(llm, model: GPT, tokenizer, architecture: str) -> None:
    assert llm.metadata["general.architecture"] == architecture
    assert llm.n_vocab() == model.config.vocab_size

    # The tokenizer: the same ids for Unicode text (a literal <|endoftext|> is text), the same
    # text back.
    for text in (TEXT, MORE_TEXT):
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == text
    assert llm.token_eos() == tokenizer.eot_id

    # The model: float32 logits at every position, then 30 greedy tokens with the KV cache.
    ids = tokenizer.encode(TEXT)[:model.config.block_size]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(their_logits(llm, ids) - ours).max() < TOL
    prompt = ids[:6]
    expected = ours_greedy(model, tokenizer, prompt, 30)
    assert len(expected) == 30  # no early end-of-text: all 30 are compared
    assert their_greedy(llm, prompt, 30, tokenizer.eot_id) == expected


@pytest.mark.parametrize("outtype, bound", [("f16", 0.02), ("bf16", 0.15), ("q8_0", 0.15)])
def test_smaller_types_load_and_stay_close(tmp_path, llama, outtype, bound):
    """16-bit and Q8_0 files: llama.cpp loads them and their logits stay within a bound of ours
    relative to the logits' spread (the measured figures are in docs/export.md)."""
    model, tokenizer = shaped("small")
    path = tmp_path / f"model-{outtype}.gguf"
    save_gguf(model, path, tokenizer, outtype)
    reader = gguf.GGUFReader(path)
    matrices = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    assert matrices == {OUTTYPES[outtype][0]}
    vectors = {t.tensor_type for t in reader.tensors if len(t.shape) == 1}
    assert vectors == {gguf.GGMLQuantizationType.F32}
    ids = tokenizer.encode(TEXT)[:model.config.block_size]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    with loaded(llama, path, model.config.block_size) as llm:
        assert np.abs(their_logits(llm, ids) - ours).max() < bound * ours.std()
        assert len(their_greedy(llm, ids[:6], 30, tokenizer.eot_id)) >= 1


@pytest.mark.parametrize("settings, architecture", [
    (dict(activation="swiglu", n_kv_head=2, bias=True, tie_embeddings=False, rope_base=500.0),
     "llama"),
    (dict(activation="swiglu", qk_norm=True, n_kv_head=1, norm_eps=1e-6), "qwen3"),
    (dict(activation="relu2", n_kv_head=2, tie_embeddings=False), "arcee"),
    (dict(activation="relu2", qk_norm=True, n_kv_head=2, rope_base=321.0), "apertus"),
    # shakespeare_char.yaml with the tanh GELU: no biases (zeros are written), norm eps 1e-3
    (dict(pos_emb="learned", norm="layernorm", activation="gelu_tanh", norm_eps=1e-3,
          tie_embeddings=False), "gpt2"),
])
def test_every_option_runs_exactly(tmp_path, llama, settings, architecture):
    """Grouped-query heads, biases or none, untied heads, rotary bases and norm eps reach
    llama.cpp, and the q/k rows of the adjacent-pair rope (llama, arcee) are interleaved
    right."""
    tokenizer = tokenizer_for("char")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=4,
                       n_embd=64, **{"pos_emb": "rope", "norm": "rmsnorm", "bias": False,
                                     **settings})
    model = perturbed(config, seed=1)
    assert save_gguf(model, tmp_path / "m.gguf", tokenizer, "f32") == architecture
    batch = torch.randint(0, config.vocab_size - 1, (40,),
                          generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([batch]))[0][0].numpy()
    with loaded(llama, tmp_path / "m.gguf", config.block_size, f32_cache=True) as llm:
        assert np.abs(their_logits(llm, batch) - ours).max() < EXACT[architecture]


def test_recipes_without_an_exact_architecture_are_refused_in_one_line():
    for recipe, blocker in REFUSED.items():
        with pytest.raises(ConfigError) as info:
            gguf_architecture(recipe_shape(recipe)[0])
        assert blocker in str(info.value) and "\n" not in str(info.value)
    for recipe, architecture in RECIPES.items():
        assert gguf_architecture(recipe_shape(recipe)[0]) == architecture


def test_refusal_lists_every_blocker(tmp_path):
    learned = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=4, n_embd=16,
                        pos_emb="learned", norm="rmsnorm", qk_norm=True, activation="relu2",
                        n_kv_head=2)
    with pytest.raises(ConfigError) as info:
        save_gguf(GPT(learned), tmp_path / "x.gguf", tokenizer_for("char"))
    message = str(info.value)
    assert message.startswith("cannot export exactly to GGUF") and "gpt2" in message
    for setting in ("model.norm", "model.qk_norm", "model.activation", "model.n_kv_head"):
        assert setting in message
    assert not (tmp_path / "x.gguf").exists()

    rotary = dataclasses.replace(learned, pos_emb="rope", qk_norm=False, activation="gelu",
                                 norm="layernorm", bias=True, n_kv_head=None)
    with pytest.raises(ConfigError, match=r"arcee.*model\.norm.*model\.activation='gelu'.*"
                                          r"model\.bias"):
        gguf_architecture(rotary)


def test_char_vocabulary_merges_join_only_a_characters_bytes():
    """Every multi-byte character is one token through its merges; ASCII needs none."""
    tokenizer = tokenizer_for("char")
    tokens, types, merges = tokenizer_fields(tokenizer, tokenizer.vocab_size + 3)
    assert len(tokens) == tokenizer.vocab_size + 3 and tokens[tokenizer.eot_id] == "<|endoftext|>"
    assert types[tokenizer.eot_id] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED
    multibyte = [c for c in tokenizer.chars if len(c.encode()) > 1]
    assert len(merges) >= len(multibyte) > 0
    assert all(" " in m and m.count(" ") == 1 for m in merges)


def chat_run(tmp_path, recipe: str = "chat_small"):
    """A checkpoint of a chat-trained run (data.format chat), as the export command sees it."""
    model, tokenizer = shaped(recipe)
    cfg = load_config(recipe)
    run = Config(model=model.config, data=dataclasses.replace(DataConfig(), format="chat",
                                                              tokenizer=tokenizer.name),
                 name=cfg.name)
    path = save_checkpoint(tmp_path / "run" / "ckpt", model, run, tokenizer.spec())
    return path, model, tokenizer


CONVERSATIONS = [
    [{"role": "user", "content": "Who art thou?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Which play?\nSay it."},
     {"role": "assistant", "content": "Macbeth"},
     {"role": "developer", "content": "Be 'brief'."},
     {"role": "user", "content": "And who speaks it? {{ x }} <|endoftext|>"}],
]


def test_export_command_writes_gguf_and_modelfile_with_the_chat_template(tmp_path, llama,
                                                                         capsys):
    from model.cli.export import main

    path, model, tokenizer = chat_run(tmp_path)
    out = tmp_path / "gguf"
    assert main([str(path), str(out), "--format", "gguf", "--outtype", "f32"]) == 0
    printed = capsys.readouterr().out
    assert "apertus" in printed and "chat template" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "chat_small-f32.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./chat_small-f32.gguf\n" in modelfile
    assert f"PARAMETER num_ctx {model.config.block_size}\n" in modelfile
    assert 'TEMPLATE """<|endoftext|>{{ if .Messages }}' in modelfile

    with loaded(llama, out / "chat_small-f32.gguf", model.config.block_size) as llm:
        template = llm.metadata["tokenizer.chat_template"]
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template, eos_token="<|endoftext|>",
                                    bos_token="<|endoftext|>")
    for messages in CONVERSATIONS:
        prompt = formatter(messages=messages).prompt  # llama-cpp-python's own rendering
        assert prompt == tokenizer.decode(render_chat(messages, tokenizer))

    # Without --format gguf, --outtype is an error; an unknown one is refused by argparse.
    assert main([str(path), str(tmp_path / "x"), "--outtype", "f16"]) == 2
    assert "--outtype f16 applies to --format gguf only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_hf_export_of_a_chat_run_carries_the_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model.weights.export import export

    path, _, tokenizer = chat_run(tmp_path)
    result = export(str(path), tmp_path / "hf")
    assert result.chat_template
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "chat_template" in config
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == tokenizer.decode(render_chat(messages, tokenizer))


def test_a_run_not_trained_on_chats_has_no_template(tmp_path):
    from model.weights.export import export

    model, tokenizer = shaped("small")
    run = Config(model=model.config, data=DataConfig(tokenizer="bpe"), name="small")
    path = save_checkpoint(tmp_path / "run" / "ckpt", model, run, tokenizer.spec())
    result = export(str(path), tmp_path / "out", "gguf")
    assert result.outtype == "f16" and not result.chat_template
    assert result.files == ["Modelfile", "small-f16.gguf"]
    assert 'TEMPLATE """{{ .Prompt }}"""' in (tmp_path / "out" / "Modelfile").read_text()
    reader = gguf.GGUFReader(tmp_path / "out" / "small-f16.gguf")
    assert "tokenizer.chat_template" not in reader.fields
