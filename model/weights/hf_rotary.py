"""Rotary models in the Hugging Face layouts of the Llama family, both directions.

Four transformers architectures share Llama's skeleton (pre-norm blocks, RMSNorm, rotary
positions on (first half, second half) pairs as `rotate_half` rotates them, grouped-query
attention, separate q/k/v/o projections) and differ exactly where our options do:

    model_type  MLP                              per-head q/k RMSNorm    MLP biases
    llama       gated: down(silu(gate) * up)     no                      mlp_bias
    qwen3       gated                            yes, before rotary      none
    arcee       plain: down(act(up)), any act    no                      mlp_bias
    apertus     plain, any act                   yes, before rotary      none

So swiglu maps to a gated MLP (our fc holds gate rows, then up rows), relu2 / gelu / gelu_tanh
to a plain one, and qk_norm picks the family with q_norm/k_norm. `rotary_family` names the
family for a config and every setting that keeps it from computing exactly our function.

The names of our activations in transformers and the MLP width's inverse are here too, shared
with GPT-2's layout (model/weights/hf.py, which reads and writes every architecture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from model.errors import CheckpointError, ConfigError
from model.gpt import GPT, GPTConfig

# -- shared with GPT-2 (model/weights/hf.py) -----------------------------------------------------

class HFNames(NamedTuple):
    """transformers' names (ACT2FN keys) for one of our plain activations, as written."""

    gpt2: str  # GPT2Config.activation_function
    rotary: str  # the rotary families' hidden_act


# Our plain activations, the one table every reader and writer uses. The tanh GELU has two
# names for one function: GPT-2's configs spell it gelu_new, the rotary families'
# gelu_pytorch_tanh (torch's own kernel, which ours calls); a reader takes either.
ACTIVATIONS = {"gelu": HFNames("gelu", "gelu"),
               "gelu_tanh": HFNames("gelu_new", "gelu_pytorch_tanh"),
               "relu2": HFNames("relu2", "relu2")}
ACTIVATION_OF = {hf: ours for ours, names in ACTIVATIONS.items() for hf in names}  # read


def mlp_ratio_for(hidden: int, n_embd: int) -> float:
    """An mlp_ratio for which int(mlp_ratio * n_embd) gives back `hidden` exactly (the plain
    quotient can land one ulp short)."""
    ratio = hidden / n_embd
    while int(ratio * n_embd) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


# -- the rotary families ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    architecture: str
    gated: bool
    qk_norm: bool
    mlp_bias: bool  # whether the MLP can carry biases
    norms: tuple[str, str]  # the block's two RMSNorms, before attention and before the MLP


FAMILIES = {
    "llama": Family("LlamaForCausalLM", True, False, True,
                    ("input_layernorm", "post_attention_layernorm")),
    "qwen3": Family("Qwen3ForCausalLM", True, True, False,
                    ("input_layernorm", "post_attention_layernorm")),
    "arcee": Family("ArceeForCausalLM", False, False, True,
                    ("input_layernorm", "post_attention_layernorm")),
    "apertus": Family("ApertusForCausalLM", False, True, False,
                      ("attention_layernorm", "feedforward_layernorm")),
}
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu"}  # hidden_act of a gated MLP -> ours


def rotary_family(config: GPTConfig) -> tuple[str, list[str]]:
    """The family closest to a rotary `config`, and every setting it cannot compute exactly
    (empty when the export is exact)."""
    gated = config.activation == "swiglu"
    family = {(True, False): "llama", (True, True): "qwen3", (False, False): "arcee",
              (False, True): "apertus"}[(gated, config.qk_norm)]
    blockers = []
    if config.norm != "rmsnorm":
        blockers.append(f"model.norm={config.norm!r} (the rotary families use RMSNorm)")
    if config.bias and not FAMILIES[family].mlp_bias:
        blockers.append(f"model.bias=True ({family}, the family with "
                        f"{'gated' if gated else 'plain'} MLPs and QK-norm, has no MLP biases)")
    return family, blockers


def _split_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [t.contiguous().clone() for t in tensor.detach().cpu().split(sizes, dim=0)]


def rotary_state(model: GPT, family: str) -> dict[str, torch.Tensor]:
    """Our weights under the family's names (HF Linear and ours both store (out, in))."""
    c, fam = model.config, FAMILIES[family]
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    ours = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    state = {"model.embed_tokens.weight": ours["tok_emb.weight"].clone(),
             "model.norm.weight": ours["norm_f.weight"].clone()}
    if not c.tie_embeddings:
        state["lm_head.weight"] = ours["lm_head.weight"].clone()
    params = ("weight", "bias") if c.bias else ("weight",)
    for i in range(c.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        state[dst + f"{fam.norms[0]}.weight"] = ours[src + "norm1.weight"].clone()
        state[dst + f"{fam.norms[1]}.weight"] = ours[src + "norm2.weight"].clone()
        if c.qk_norm:
            state[dst + "self_attn.q_norm.weight"] = ours[src + "attn.q_norm.weight"].clone()
            state[dst + "self_attn.k_norm.weight"] = ours[src + "attn.k_norm.weight"].clone()
        for p in params:
            parts = _split_rows(ours[src + f"attn.qkv.{p}"], [q, kv, kv])
            for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                state[dst + f"self_attn.{name}.{p}"] = part
            state[dst + f"self_attn.o_proj.{p}"] = ours[src + f"attn.proj.{p}"].clone()
            fc = ours[src + f"mlp.fc.{p}"]
            if fam.gated:  # our fc computes the gate rows first, then the up rows
                gate, up = _split_rows(fc, [c.mlp_hidden, c.mlp_hidden])
                state[dst + f"mlp.gate_proj.{p}"] = gate
            else:
                up = fc.clone()
            state[dst + f"mlp.up_proj.{p}"] = up
            state[dst + f"mlp.down_proj.{p}"] = ours[src + f"mlp.proj.{p}"].clone()
    return state


def rotary_config(config: GPTConfig, family: str, eot_id: int | None) -> dict[str, Any]:
    """config.json for `family`; every field that changes the function is written out."""
    fam = FAMILIES[family]
    hf: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu" if fam.gated else ACTIVATIONS[config.activation].rotary,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # Plain rotary (no scaling) with our base. transformers 4.x reads rope_scaling and
        # rope_theta instead; without rope_scaling its Apertus would default to llama3 scaling.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_scaling": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_theta": config.rope_base,
        "attention_bias": config.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": None,
        "use_cache": True,
    }
    if fam.mlp_bias:
        hf["mlp_bias"] = config.bias
    if family == "qwen3":  # full attention in every layer
        hf.update(use_sliding_window=False, sliding_window=None,
                  max_window_layers=config.n_layer,
                  layer_types=["full_attention"] * config.n_layer)
    return hf


def _rope_base(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"config.json rope_type={kind!r}: smallgpt computes plain rotary "
                          "positions only (no scaling)")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("config.json partial_rotary_factor: smallgpt rotates whole heads")
    base = rope.get("rope_theta", hf.get("rope_theta"))
    if base is None:
        raise ConfigError("config.json gives no rope_theta")
    return float(base)


def config_from_rotary(hf: dict[str, Any]) -> GPTConfig:
    """Our config for a llama / qwen3 / arcee / apertus config.json; ConfigError for settings
    we do not compute."""
    family = hf["model_type"]
    fam = FAMILIES[family]
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or n_embd // n_head
        act = hf.get("hidden_act", "silu")
        table = GATED_ACTIVATIONS if fam.gated else ACTIVATION_OF
        if act not in table:
            raise ConfigError(f"config.json hidden_act={act!r} has no smallgpt equivalent in a "
                              f"{'gated' if fam.gated else 'plain'} MLP; supported: "
                              f"{', '.join(table)}")
        if head_dim * n_head != n_embd:
            raise ConfigError(f"config.json head_dim={head_dim}: smallgpt needs "
                              f"hidden_size / num_attention_heads = {n_embd // n_head}")
        if hf.get("use_sliding_window") or any(t != "full_attention"
                                               for t in hf.get("layer_types") or []):
            raise ConfigError("config.json uses sliding-window attention; smallgpt attends "
                              "to the whole context")
        bias = bool(hf.get("attention_bias", False))
        if fam.mlp_bias and bool(hf.get("mlp_bias", False)) != bias:
            raise ConfigError("config.json attention_bias and mlp_bias differ; smallgpt has one "
                              "bias setting for every linear layer")
        if bias and not fam.mlp_bias:
            raise ConfigError(f"config.json attention_bias=true: a {family} MLP has no biases, "
                              "and smallgpt's bias setting covers both")
        hidden = int(hf["intermediate_size"])
        return GPTConfig(
            vocab_size=int(hf["vocab_size"]), block_size=int(hf["max_position_embeddings"]),
            n_layer=int(hf["num_hidden_layers"]), n_head=n_head, n_embd=n_embd,
            n_kv_head=n_kv if (n_kv := int(hf.get("num_key_value_heads") or n_head)) != n_head
            else None,
            mlp_ratio=mlp_ratio_for(hidden, n_embd), pos_emb="rope", rope_base=_rope_base(hf),
            norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            activation=table[act], qk_norm=fam.qk_norm, bias=bias, dropout=0.0,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise CheckpointError(f"config.json of a {family} model is incomplete or malformed "
                              f"({type(exc).__name__}: {exc})") from exc


def rotary_to_ours(state: dict[str, torch.Tensor], config: GPTConfig,
                   family: str) -> dict[str, torch.Tensor]:
    """The family's tensors under our names (the reverse of `rotary_state`), in the dtype they
    were read in; emptied as it goes so each weight is held about once."""
    fam = FAMILIES[family]

    def take(key: str) -> torch.Tensor:
        for name in (key, key.removeprefix("model.")):
            if name in state:
                return state.pop(name)
        raise CheckpointError(f"{family} state dict lacks {key!r}")

    ours = {"tok_emb.weight": take("model.embed_tokens.weight"),
            "norm_f.weight": take("model.norm.weight")}
    ours["lm_head.weight"] = (ours["tok_emb.weight"] if config.tie_embeddings
                              else take("lm_head.weight"))
    state.pop("lm_head.weight", None)  # a tied head some writers store anyway
    params = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        ours[dst + "norm1.weight"] = take(src + f"{fam.norms[0]}.weight")
        ours[dst + "norm2.weight"] = take(src + f"{fam.norms[1]}.weight")
        if fam.qk_norm:
            ours[dst + "attn.q_norm.weight"] = take(src + "self_attn.q_norm.weight")
            ours[dst + "attn.k_norm.weight"] = take(src + "self_attn.k_norm.weight")
        for p in params:
            ours[dst + f"attn.qkv.{p}"] = torch.cat(
                [take(src + f"self_attn.{n}_proj.{p}") for n in "qkv"])
            ours[dst + f"attn.proj.{p}"] = take(src + f"self_attn.o_proj.{p}")
            up = take(src + f"mlp.up_proj.{p}")
            ours[dst + f"mlp.fc.{p}"] = (torch.cat([take(src + f"mlp.gate_proj.{p}"), up])
                                         if fam.gated else up)
            ours[dst + f"mlp.proj.{p}"] = take(src + f"mlp.down_proj.{p}")
    leftover = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise CheckpointError(f"{family} state dict has an unexpected tensor {leftover[0]!r}")
    return ours
