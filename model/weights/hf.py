"""Hugging Face model directories, both ways: the one writer (`save_hf`) and the one reader
(`load_hf`) for every architecture, and GPT-2's layout.

A directory holds `config.json` and `model.safetensors` (or the older `pytorch_model.bin`).
A model with learned positions is GPT-2 (GPT2LMHeadModel), whose tensors map one to one onto
ours; the only twist is that its linear layers are `Conv1D` modules, which store the weight as
(in, out) where nn.Linear stores (out, in). A rotary model is one of the Llama family
(model/weights/hf_rotary.py).

    from model.weights.hf import load_hf, save_hf
    save_hf(model, "out/hf", tokenizer)            # AutoModelForCausalLM.from_pretrained loads it
    model, tokenizer, model_type = load_hf("out/hf")

transformers itself is not needed here: only its file format is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from model.data.tokenizer import Tokenizer
from model.errors import CheckpointError, ConfigError, first_line
from model.gpt import GPT, GPTConfig
from model.weights.checkpoint import read_safetensors
from model.weights.hf_rotary import (
    ACTIVATION_OF,
    ACTIVATIONS,
    FAMILIES,
    config_from_rotary,
    mlp_ratio_for,
    rotary_config,
    rotary_family,
    rotary_state,
    rotary_to_ours,
)
from model.weights.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from model.weights.meta import assign_state, on_meta

# config.json's model_type -> its "architectures" entry, the transformers class.
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel",
                 **{family: f.architecture for family, f in FAMILIES.items()}}

# Per block: (our module, Hugging Face module). The blocks live under `blocks.i` / `h.i`.
BLOCK_NAMES = (
    ("norm1", "ln_1"),
    ("attn.qkv", "attn.c_attn"),
    ("attn.proj", "attn.c_proj"),
    ("norm2", "ln_2"),
    ("mlp.fc", "mlp.c_fc"),
    ("mlp.proj", "mlp.c_proj"),
)
TOP_NAMES = (("tok_emb", "wte"), ("pos_emb", "wpe"), ("norm_f", "ln_f"))
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored transposed


def _hf_to_ours(key: str) -> str | None:
    """'h.3.attn.c_attn.weight' -> 'blocks.3.attn.qkv.weight'; None for a name we do not know."""
    module, _, param = key.rpartition(".")
    for ours, theirs in TOP_NAMES:
        if module == theirs:
            return f"{ours}.{param}"
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit():
        for ours, theirs in BLOCK_NAMES:
            if parts[2] == theirs:
                return f"blocks.{parts[1]}.{ours}.{param}"
    return None


def is_conv1d_weight(hf_key: str) -> bool:
    return hf_key.endswith(".weight") and any(f".{name}." in hf_key for name in CONV1D)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def read_hf_config(directory: Path, what: str = "Hugging Face") -> dict:
    """config.json of a Hugging Face model directory, checked to be a JSON object."""
    if not directory.exists():
        raise CheckpointError(f"{what} checkpoint {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointError(
            f"{what} checkpoint {str(directory)!r} is not a directory; pass the folder that "
            "holds config.json and model.safetensors"
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{what} checkpoint {str(directory)!r} has no config.json")
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{str(config_path)!r} is not valid JSON ({_reason(exc)})"
        ) from exc
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{str(config_path)!r} must hold a JSON object")
    return hf_config


def read_hf_weights(directory: Path, what: str = "Hugging Face",
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict of model.safetensors, or of the older pytorch_model.bin, each floating
    tensor in `dtype`. safetensors are read and converted one tensor at a time, so memory never
    holds the whole model twice (as stored, then converted)."""
    safetensors_path, bin_path = directory / "model.safetensors", directory / "pytorch_model.bin"
    path = safetensors_path if safetensors_path.is_file() else bin_path
    if not path.is_file():
        raise CheckpointError(
            f"{what} checkpoint {str(directory)!r} has neither model.safetensors nor "
            "pytorch_model.bin"
        )

    def converted(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    try:
        if path == safetensors_path:
            state = read_safetensors(path, dtype)
        else:
            # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run code.
            # The whole pickle loads at once; it is emptied as it is converted, so each weight
            # is held in both dtypes for one tensor's time only.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state = ({key: converted(t) if isinstance(t := loaded.pop(key), torch.Tensor) else t
                      for key in list(loaded)} if isinstance(loaded, dict) else loaded)
    except Exception as exc:  # each format fails in its own way on a truncated or corrupt file
        raise CheckpointError(
            f"cannot read {str(path)!r}, it looks truncated or corrupt ({_reason(exc)})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict")
    return state


def _gpt2_settings(hf_config: dict) -> tuple[str, float, bool]:
    """Reject GPT-2 variants our model does not compute; return (activation, norm_eps, tied)."""
    name = hf_config.get("activation_function", "gelu_new")
    if name not in ACTIVATION_OF:
        raise ConfigError(
            f"config.json activation_function={name!r} has no smallgpt equivalent; "
            f"supported: {', '.join(ACTIVATION_OF)}"
        )
    if not hf_config.get("scale_attn_weights", True):
        raise ConfigError("config.json scale_attn_weights=false: smallgpt scales by 1/sqrt(d)")
    if hf_config.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("config.json scale_attn_by_inverse_layer_idx=true is not supported")
    if hf_config.get("add_cross_attention", False):
        raise ConfigError("config.json add_cross_attention=true: cross-attention is not supported")
    return (ACTIVATION_OF[name], float(hf_config.get("layer_norm_epsilon", 1e-5)),
            bool(hf_config.get("tie_word_embeddings", True)))


def _to_our_layout(state: dict, owned: bool, tied: bool = True) -> dict[str, torch.Tensor]:
    """Our names, with Conv1D weights turned into nn.Linear's (out, in) layout; a caller's
    tensors become float32, a state read from disk keeps the dtype it was read in.

    Converts one tensor at a time. A state read from disk (`owned`) is emptied as it goes, so
    every weight is held about once, even for gpt2-xl; a caller's dict is left as it was, and
    its tensors are copied so that the model never shares memory with them.
    """
    ours: dict[str, torch.Tensor] = {}
    for hf_key in list(state):
        tensor = state.pop(hf_key) if owned else state[hf_key]
        key = hf_key.removeprefix("transformer.")
        # Causal-mask buffers of older transformers versions, and the head tied to wte.
        if key.endswith((".attn.bias", ".attn.masked_bias")) or (tied and key == "lm_head.weight"):
            continue
        name = "lm_head.weight" if key == "lm_head.weight" else _hf_to_ours(key)
        if name is None:
            raise CheckpointError(f"GPT-2 state dict has an unexpected tensor {key!r}")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"GPT-2 state dict entry {key!r} is not a tensor")
        if is_conv1d_weight(key):
            tensor = tensor.t()
        # contiguous() writes a transposed weight out as a tensor of its own (its source is
        # freed on the next turn); clone() copies a caller's tensor.
        ours[name] = tensor.contiguous() if owned else tensor.clone(
            memory_format=torch.contiguous_format).float()
    return ours


def load_hf_gpt2(source: str | Path | dict[str, torch.Tensor],
                 n_head: int | None = None, dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT from a Hugging Face GPT-2 directory (its weights read in `dtype`) or a bare state
    dict (float32, copied: the caller's dict is left as it was).

    The head count is not visible in any tensor shape, so it is read from config.json, or must
    be passed as `n_head` with a bare state dict. Names may carry GPT2LMHeadModel's
    `transformer.` prefix or not. `load_hf` reads a directory of any architecture, with its
    tokenizer.
    """
    if isinstance(source, dict):
        if n_head is None:
            raise ConfigError(
                "a bare GPT-2 state dict does not record n_head (no tensor shape shows it); "
                "pass n_head=..., e.g. 12 for the 124M model"
            )
        return _gpt2_model(source, {}, n_head, owned=False, dtype=torch.float32)
    directory = Path(source)
    hf_config = read_hf_config(directory, "GPT-2")
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(
            f"{str(directory)!r} holds a {hf_config['model_type']!r} model, not GPT-2"
        )
    return _gpt2_from_directory(directory, hf_config, dtype, n_head)


def _gpt2_from_directory(directory: Path, hf_config: dict, dtype: torch.dtype,
                         n_head: int | None = None) -> GPT:
    state = read_hf_weights(directory, "GPT-2", dtype)
    if "n_head" not in hf_config and n_head is None:
        raise CheckpointError(f"{str(directory / 'config.json')!r} does not give n_head")
    saved = hf_config.get("n_head", n_head)
    if n_head is not None and n_head != saved:
        raise ConfigError(f"n_head={n_head} disagrees with config.json n_head={saved}")
    return _gpt2_model(state, hf_config, saved, owned=True, dtype=dtype)


def _gpt2_model(state: dict, hf_config: dict, n_head: int, *, owned: bool,
                dtype: torch.dtype) -> GPT:
    """GPT-2's tensors (`owned`: read from disk, emptied as they are taken) as a GPT.

    The shape comes from the tensors: vocab_size from wte, block_size from wpe, n_embd, n_layer
    from the h.N blocks and the MLP width from c_fc; config.json, where there is one, must agree.
    """
    activation, norm_eps, tied = _gpt2_settings(hf_config)
    ours = _to_our_layout(state, owned, tied)
    for required in ("tok_emb.weight", "pos_emb.weight", "blocks.0.mlp.fc.weight"):
        if required not in ours:
            raise CheckpointError(f"GPT-2 state dict lacks {required!r} (HF name for it missing)")
    vocab_size, n_embd = ours["tok_emb.weight"].shape
    config = GPTConfig(
        vocab_size=vocab_size,
        block_size=ours["pos_emb.weight"].shape[0],
        n_layer=len({name.split(".")[1] for name in ours if name.startswith("blocks.")}),
        n_head=n_head,
        n_embd=n_embd,
        mlp_ratio=mlp_ratio_for(ours["blocks.0.mlp.fc.weight"].shape[0], n_embd),
        pos_emb="learned",
        norm="layernorm",
        norm_eps=norm_eps,
        activation=activation,
        bias=True,  # a bias=False model comes back with its zero biases: the same function
        dropout=0.0,
        tie_embeddings=tied,
    )
    for key, value in (("vocab_size", config.vocab_size), ("n_positions", config.block_size),
                       ("n_embd", config.n_embd), ("n_layer", config.n_layer)):
        if key in hf_config and hf_config[key] != value:
            raise CheckpointError(f"config.json {key}={hf_config[key]}, the weights have {value}")
    if tied:
        ours["lm_head.weight"] = ours["tok_emb.weight"]  # the same tensor under both names
    return _assembled(config, ours, "GPT-2", dtype)


def gpt2_blockers(config: GPTConfig) -> list[str]:
    """Every setting of `config` that GPT2LMHeadModel cannot compute exactly (empty: none).

    Missing biases are no blocker (they are written as zeros), nor is an untied head or any
    plain activation transformers knows (GPT2MLP looks activation_function up in ACT2FN).
    """
    problems = (
        (config.pos_emb != "learned", f"model.pos_emb={config.pos_emb!r} (GPT-2 has learned "
                                      "absolute positions)"),
        (config.norm != "layernorm", f"model.norm={config.norm!r} (GPT-2 uses LayerNorm)"),
        (config.qk_norm, "model.qk_norm=True (GPT-2 has no query/key norms)"),
        (config.activation not in ACTIVATIONS,
         f"model.activation={config.activation!r} (GPT-2's MLP is not gated)"),
        (config.kv_heads != config.n_head, f"model.n_kv_head={config.n_kv_head} "
                                           f"(GPT-2 has one key/value head per query head)"),
    )
    return [what for bad, what in problems if bad]


def gpt2_state(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names; a model without biases gets zero ones."""
    config, ours = model.config, model.state_dict()
    if not config.bias:
        for name, module in model.named_modules():
            if hasattr(module, "weight") and getattr(module, "bias", 0) is None and name not in (
                    "tok_emb", "pos_emb", "lm_head"):
                ours[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    state: dict[str, torch.Tensor] = {}
    ours_to_hf = dict(TOP_NAMES)
    for name, tensor in ours.items():
        module, _, param = name.rpartition(".")
        if name == "lm_head.weight":
            if config.tie_embeddings:
                continue  # GPT2LMHeadModel re-ties it to wte on load
            key = name
        elif module.startswith("blocks."):
            _, index, rest = module.split(".", 2)
            key = f"transformer.h.{index}.{dict(BLOCK_NAMES)[rest]}.{param}"
        else:
            key = f"transformer.{ours_to_hf[module]}.{param}"
        tensor = tensor.detach().cpu()
        # safetensors needs contiguous tensors that share no memory with one another.
        state[key] = (tensor.t() if is_conv1d_weight(key) else tensor).contiguous().clone()
    return state


def gpt2_config(config: GPTConfig, eot_id: int | None) -> dict:
    return {
        "architectures": [ARCHITECTURES["gpt2"]],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # older readers (llama.cpp's converter) look for this name
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        # None means GPT-2's standard 4 * n_embd
        "n_inner": None if config.mlp_hidden == 4 * config.n_embd else config.mlp_hidden,
        "activation_function": ACTIVATIONS[config.activation].gpt2,
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


# -- every architecture: the choice, the writer and the reader -----------------------------------

def hf_architecture(config: GPTConfig) -> str:
    """The transformers model_type that computes exactly what a model of `config` computes:
    gpt2 for learned positions, else a rotary family (model/weights/hf_rotary.py). Raises one
    ConfigError listing every setting that keeps the closest architecture from it."""
    if config.pos_emb == "learned":
        family, blockers = "gpt2", gpt2_blockers(config)
    else:
        family, blockers = rotary_family(config)
    if blockers:
        raise ConfigError(f"cannot export exactly: no transformers architecture computes this "
                          f"model; the closest, {ARCHITECTURES[family]}, lacks {len(blockers)} "
                          f"of its settings: {'; '.join(blockers)}")
    return family


def save_hf(model: GPT, directory: str | Path, tokenizer: Tokenizer | None = None, *,
            chat_template: str | None = None) -> str:
    """Write `model` (and `tokenizer`) as a Hugging Face directory that transformers' Auto
    classes load: config.json, model.safetensors, generation_config.json and the tokenizer
    files, with `chat_template` (Jinja) in tokenizer_config.json when given. Returns the
    model_type written (ARCHITECTURES names its class); ConfigError (before anything is
    written) when no architecture computes the model exactly."""
    config = model.config
    family = hf_architecture(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.eot_id if tokenizer is not None else None
    if family == "gpt2":
        state, hf_config = gpt2_state(model), gpt2_config(config, eot)
    else:
        state, hf_config = rotary_state(model, family), rotary_config(config, family, eot)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config["dtype"] = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n",
                                           encoding="utf-8")
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                      encoding="utf-8")
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, directory, config.block_size, chat_template)
    return family


class LoadedHF(NamedTuple):
    model: GPT
    tokenizer: Tokenizer
    model_type: str  # config.json's: gpt2, llama, qwen3, arcee or apertus


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32) -> LoadedHF:
    """A GPT, its weights read in `dtype`, and its tokenizer from a Hugging Face directory of
    any architecture we write (gpt2, llama, qwen3, arcee, apertus), chosen by config.json's
    model_type. The tokenizer comes from tokenizer.json (char or byte-level BPE as we write
    them); GPT-2's otherwise."""
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    family = hf_config.get("model_type", "gpt2")
    if family == "gpt2":
        model = _gpt2_from_directory(directory, hf_config, dtype)
    elif family in FAMILIES:
        config = config_from_rotary(hf_config)
        ours = rotary_to_ours(read_hf_weights(directory, dtype=dtype), config, family)
        model = _assembled(config, ours, family, dtype)
    else:
        raise CheckpointError(f"{str(directory)!r} holds a {family!r} model; smallgpt reads "
                              f"gpt2, {', '.join(FAMILIES)}")
    return LoadedHF(model, load_hf_tokenizer(directory), family)


def _assembled(config: GPTConfig, ours: dict[str, torch.Tensor], what: str,
               dtype: torch.dtype) -> GPT:
    """A GPT of `config` whose parameters are the tensors `ours` (under our names), once they
    are checked to be exactly the model's: no name missing, none unexpected, every shape its
    own. The one check of every architecture's reader."""
    model = on_meta(GPT, config, dtype)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing:
        raise CheckpointError(f"{what} state dict lacks {len(missing)} tensors, "
                              f"e.g. {missing[0]!r}")
    if unexpected:  # e.g. h.0 and h.2 without h.1
        raise CheckpointError(f"{what} state dict has an unexpected tensor for {unexpected[0]!r}")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{what} tensor for {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name].shape)}")
    assign_state(model, ours)
    return model
