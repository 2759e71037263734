"""Export to the Hugging Face layout, judged by transformers' Auto classes (no code of ours).

For each shipped config's model shape (shrunk): the exported directory loads with
AutoModelForCausalLM and AutoTokenizer, the logits equal ours, greedy generation equals our
greedy sample token for token, the tokenizer encodes and decodes a Unicode text as ours does,
and the directory loads back into smallgpt with the same logits.
"""

import dataclasses
import json

import pytest
import torch

from model import GPT, ConfigError, GPTConfig
from model.cli.export import main
from model.config import Config, DataConfig, load_config
from model.data.tokenizer import train_tokenizer
from model.errors import TokenizerError
from model.inference.sampling import generate
from model.weights.checkpoint import save_checkpoint
from model.weights.export import export
from model.weights.hf import hf_architecture, load_hf, save_hf
from model.weights.loading import load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\tSpeak, speak!  Naïve café, jalapeño; 東京 and Ελληνικά, 😀👍🏽 e\u0301\u00a0ok\n"
        "It's 1234 o'clock -- isn't it?   \n  trailing spaces   \r\n\x0b\x0c\x1c\u2028\u3000x "
        "<|endoftext|> is text here\n")
# A config's model shape and its tokenizer; the architecture transformers gets for it.
SHIPPED = {
    "tiny": "ArceeForCausalLM",
    "small": "ApertusForCausalLM",
    "shakespeare_char": "GPT2LMHeadModel",
    "shakespeare_fast": "ApertusForCausalLM",
    "gpt2_124m": "GPT2LMHeadModel",
}
_tokenizers = {}


def tokenizer_for(name: str):
    """The config's kind of tokenizer, trained on TEXT (small BPE vocabulary: fast)."""
    if name not in _tokenizers:
        if name == "gpt2":
            pytest.importorskip("tiktoken")
            try:
                _tokenizers[name] = train_tokenizer("gpt2", [])
            except Exception as exc:  # no cached GPT-2 vocabulary and no network
                pytest.skip(f"GPT-2 vocabulary unavailable: {exc}")
        else:
            _tokenizers[name] = train_tokenizer(name, [TEXT * 3], 300)
    return _tokenizers[name]


def shrunk(config_name: str) -> tuple[GPT, object]:
    """A random model with the shipped config's settings at a tiny size, norms and biases
    perturbed so that a wrong mapping of any of them shows in the logits."""
    cfg = load_config(config_name)
    tokenizer = tokenizer_for(cfg.data.tokenizer)
    vocab = cfg.model.vocab_size if cfg.model.vocab_size else tokenizer.vocab_size
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab, n_layer=2, n_head=4, n_embd=32,
                                    block_size=32, dropout=0.0, n_kv_head=None)
    return perturbed(model_cfg, seed=0), tokenizer


def perturbed(config: GPTConfig, seed: int) -> GPT:
    """A seeded random GPT of `config` in eval mode, its norms and biases moved off their init
    so that a wrong mapping of any of them shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def needs_architecture(name: str) -> None:
    if not hasattr(transformers, name):  # Apertus arrived in transformers 4.56, Qwen3 in 4.51
        pytest.skip(f"transformers {transformers.__version__} has no {name}")


def logits_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < TOL


def ours_greedy(model: GPT, tokenizer, prompt: list[int], n: int) -> list[int]:
    return [s.token for s in generate(model, tokenizer, prompt, max_new_tokens=n, temperature=0)]


@pytest.mark.parametrize("config_name", SHIPPED)
def test_shipped_shape_exports_to_transformers(tmp_path, config_name):
    needs_architecture(SHIPPED[config_name])
    model, tokenizer = shrunk(config_name)
    model_type = save_hf(model, tmp_path, tokenizer)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == [SHIPPED[config_name]]
    assert hf_config["model_type"] == model_type
    assert hf_config["eos_token_id"] == tokenizer.eot_id
    if model_type == "gpt2":  # both names of the context: transformers' and the older one
        assert hf_config["n_positions"] == hf_config["n_ctx"] == model.config.block_size

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == SHIPPED[config_name]
    assert theirs.generation_config.eos_token_id == tokenizer.eot_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.eos_token_id == tokenizer.eot_id

    # The tokenizer: the same ids for a Unicode text, the same text back.
    ids = tokenizer.encode(TEXT)
    assert hf_tok(TEXT)["input_ids"] == ids
    assert hf_tok.decode(ids) == tokenizer.decode(ids) == TEXT
    assert hf_tok.decode(ids + [tokenizer.eot_id]) == tokenizer.decode(ids + [tokenizer.eot_id])

    # The model: equal logits on a batch, and greedy decoding token for token.
    batch = torch.tensor([ids[:20], ids[-20:]])
    with torch.no_grad():
        ours, _ = model(batch)
        assert logits_close(ours, theirs(batch).logits)
    prompt = ids[:6]
    expected = ours_greedy(model, tokenizer, prompt, 12)
    got = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert got[0, len(prompt):].tolist() == expected

    # And back into smallgpt: the same function and the same tokenizer.
    back, back_tokenizer, back_type = load_hf(tmp_path)
    assert back_type == model_type
    # GPT-2 has biases everywhere: a bias=False model comes back with zero ones.
    assert back.config == dataclasses.replace(model.config, bias=model.config.bias or
                                              model_type == "gpt2")
    with torch.no_grad():
        assert logits_close(back(batch)[0], ours)
    assert back_tokenizer.encode(TEXT) == ids
    assert back_tokenizer.spec() == tokenizer.spec()


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_tokenizer_edge_cases(tmp_path, name):
    """An unknown character fails in ours and is the unknown token, end-of-text, in
    transformers (so that tools which tokenize any text can); a token sequence ending inside a
    UTF-8 character decodes to the same replacement character in both."""
    from model.weights.hf_tokenizer import save_hf_tokenizer

    tokenizer = tokenizer_for(name)
    save_hf_tokenizer(tokenizer, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    if name == "char":
        with pytest.raises(TokenizerError, match="'Z'"):
            tokenizer.encode("Zebra")  # no "Z" in TEXT
        assert hf_tok("Zest")["input_ids"] == [tokenizer.eot_id] + tokenizer.encode("est")
        assert hf_tok.unk_token_id == tokenizer.eot_id
    else:
        ids = tokenizer.encode("😀👍🏽")
        assert len(ids) > 2  # bytes: the emoji are not in a 300-token vocabulary
        for cut in range(1, len(ids)):
            assert hf_tok.decode(ids[:cut]) == tokenizer.decode(ids[:cut])
        assert hf_tok("<|endoftext|>")["input_ids"] == tokenizer.encode("<|endoftext|>")


TL_OPTIONS = {  # the rotary families no shipped recipe uses
    "llama": dict(activation="swiglu", n_kv_head=2, tie_embeddings=False),
    "qwen3": dict(activation="swiglu", qk_norm=True, n_kv_head=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [*SHIPPED, *TL_OPTIONS])
def test_export_boots_in_transformer_lens(tmp_path, case):
    """Every architecture we write boots in TransformerLens 4 (its bridge around the
    transformers model, offline) and computes our logits."""
    tl_bridge = pytest.importorskip("transformer_lens.model_bridge")
    if case in SHIPPED:
        model, tokenizer = shrunk(case)
    else:
        model, tokenizer = shrunk("tiny")
        config = dataclasses.replace(model.config, **TL_OPTIONS[case])
        torch.manual_seed(3)
        model = GPT(config).eval()
    save_hf(model, tmp_path, tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    bridge = tl_bridge.TransformerBridge.boot_transformers(str(tmp_path), tokenizer=hf_tok,
                                                           device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    batch = torch.tensor([tokenizer.encode(TEXT)[:20]])
    with torch.no_grad():
        assert logits_close(bridge(batch), model(batch)[0])


def test_shipped_recipes_map_as_documented():
    for config_name, architecture in SHIPPED.items():
        family = hf_architecture(load_config(config_name).model)
        assert architecture.lower().startswith(family.replace("_", ""))


@pytest.mark.parametrize("settings, architecture", [
    (dict(activation="swiglu", n_kv_head=2, bias=True, tie_embeddings=False, rope_base=500.0),
     "LlamaForCausalLM"),
    (dict(activation="swiglu", qk_norm=True, n_kv_head=1, norm_eps=1e-6), "Qwen3ForCausalLM"),
    (dict(activation="gelu_tanh", bias=True, n_kv_head=2), "ArceeForCausalLM"),
    (dict(activation="gelu", qk_norm=True, tie_embeddings=False), "ApertusForCausalLM"),
])
def test_rotary_families(tmp_path, settings, architecture):
    """Grouped-query heads, biases, untied heads, rotary bases and norm eps reach transformers."""
    needs_architecture(architecture)
    tokenizer = tokenizer_for("char")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=4,
                       n_embd=32, pos_emb="rope", norm="rmsnorm",
                       **{"bias": False, **settings})
    model = perturbed(config, seed=1)
    save_hf(model, tmp_path, tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == architecture
    batch = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, _ = model(batch)
        assert logits_close(ours, theirs(batch).logits)
        back = load_hf(tmp_path).model
        assert back.config == config
        assert logits_close(back(batch)[0], ours)


def test_no_exact_equivalent_lists_every_blocker(tmp_path):
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=4, n_embd=16,
                       pos_emb="learned", norm="rmsnorm", qk_norm=True, activation="swiglu",
                       n_kv_head=2)
    with pytest.raises(ConfigError) as info:
        save_hf(GPT(config), tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message
    for setting in ("model.norm", "model.qk_norm", "model.activation", "model.n_kv_head"):
        assert setting in message
    assert not (tmp_path / "out").exists()

    rotary = dataclasses.replace(config, pos_emb="rope", norm="layernorm", bias=True,
                                 n_kv_head=None)
    with pytest.raises(ConfigError, match=r"Qwen3ForCausalLM.*model\.norm.*model\.bias"):
        hf_architecture(rotary)


def checkpoint_of(tmp_path, config_name: str):
    model, tokenizer = shrunk(config_name)
    cfg = load_config(config_name)
    run = Config(model=model.config, data=DataConfig(tokenizer=tokenizer.name), name=cfg.name)
    return save_checkpoint(tmp_path / "run" / "ckpt", model, run, tokenizer.spec()), model


def test_export_command_round_trip(tmp_path, capsys):
    path, model = checkpoint_of(tmp_path, "small")
    out = tmp_path / "hf"
    assert main([str(path), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ApertusForCausalLM" in printed and str(out) in printed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    # The exported directory is a name like any other for smallgpt's loader.
    loaded = load_model(str(out))
    assert loaded.tokenizer.spec() == tokenizer_for("bpe").spec()
    batch = torch.tensor([loaded.tokenizer.encode(TEXT)[:16]])
    with torch.no_grad():
        assert logits_close(loaded.model(batch)[0], model(batch)[0])

    # An existing, non-empty directory is never written into.
    assert main([str(path), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_export_refusal_writes_nothing(tmp_path, capsys):
    path, _ = checkpoint_of(tmp_path, "tiny")
    cfg_path = path / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["config"]["model"]["norm"] = "layernorm"  # rotary + LayerNorm: no exact equivalent
    cfg_path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="model.norm"):
        export(str(path), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert main([str(path), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot export exactly")


def test_bpe_token_reachable_only_whole(tmp_path):
    """tiktoken looks a whole pre-token up before merging: "abcd" is one token although no
    merge of "ab" and the bytes c, d reaches it. The exported tokenizer must do the same."""
    from model.data.tokenizer import BPETokenizer
    from model.weights.hf_tokenizer import save_hf_tokenizer

    tokenizer = BPETokenizer([bytes([b]) for b in range(256)] + [b"ab", b"abcd"])
    save_hf_tokenizer(tokenizer, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ("abcd", "abcde abcd", "xabcd"):
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    assert tokenizer.encode("abcd") == [257]


def exported(tmp_path):
    model, tokenizer = shrunk("small")
    save_hf(model, tmp_path, tokenizer)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("change, match", [
    (dict(model_type="mistral"), "mistral"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "yarn"),
    (dict(hidden_act="silu"), "hidden_act"),
    (dict(intermediate_size=100), "shape"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_directories_are_one_line_errors(tmp_path, change, match):
    from model.errors import SmallGPTError

    hf_config = {**exported(tmp_path), **change}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(SmallGPTError, match=match) as info:
        load_hf(tmp_path)
    assert "\n" not in str(info.value)


def test_gpt2_export_carries_the_models_norm_epsilon(tmp_path):
    """norm_eps 1e-3 against the residual stream's variance at init (~4e-4): a file that said
    GPT-2's 1e-5 instead would give other logits in transformers."""
    tokenizer = tokenizer_for("char")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2,
                       n_embd=16, activation="gelu_tanh", norm_eps=1e-3)
    torch.manual_seed(4)
    model = GPT(config).eval()
    save_hf(model, tmp_path, tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["layer_norm_epsilon"] == 1e-3
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert logits_close(model(batch)[0], theirs(batch).logits)


def test_rotary_export_states_its_rope_base_in_every_key_transformers_reads(tmp_path):
    """transformers 5 reads rope_parameters, 4.x rope_theta (and rope_scaling's type): each
    must hold the model's own base, not the default 10000."""
    tokenizer = tokenizer_for("char")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                       n_embd=16, pos_emb="rope", norm="rmsnorm", bias=False,
                       activation="relu2", rope_base=321.0)
    save_hf(GPT(config), tmp_path, tokenizer)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["rope_theta"] == 321.0
    assert hf_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 321.0}
    assert hf_config["rope_scaling"]["rope_type"] == "default"
    assert hf_config["rope_scaling"]["rope_theta"] == 321.0


@pytest.mark.parametrize("settings, key, written", [
    (dict(pos_emb="learned", norm="layernorm"), "activation_function", "gelu_new"),
    (dict(pos_emb="rope", norm="rmsnorm", bias=False), "hidden_act", "gelu_pytorch_tanh"),
])
def test_the_tanh_gelu_is_written_as_each_architecture_spells_it(tmp_path, settings, key,
                                                                 written):
    """One function, two names in transformers: GPT-2's configs say gelu_new, the Llama
    family's gelu_pytorch_tanh; either reads back as gelu_tanh."""
    tokenizer = tokenizer_for("char")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2,
                       n_embd=16, activation="gelu_tanh", **settings)
    save_hf(GPT(config), tmp_path, tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())[key] == written
    assert load_hf(tmp_path).model.config.activation == "gelu_tanh"
