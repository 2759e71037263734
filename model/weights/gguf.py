"""GGUF, the file llama.cpp and Ollama run: the architecture that computes our model exactly,
the tensors under its names, and the tokenizer, written with the `gguf` package.

    from model.weights.gguf import save_gguf
    save_gguf(model, "exported/small.gguf", tokenizer, "f16")   # -> "apertus"

llama.cpp builds each architecture's graph in C++ (src/models/*.cpp): a file names its
architecture and llama.cpp computes that graph, so the choice must be one whose graph is our
function. Ours map as follows:

    learned positions   gpt2      LayerNorm, fused qkv, GELU in its tanh form (gelu_tanh)
    swiglu              llama     gated MLP, biases allowed
    swiglu + qk_norm    qwen3     gated MLP, per-head q/k RMSNorm before rotary
    relu2               arcee     plain MLP whose graph hard-codes ReLU²
    relu2 + qk_norm     apertus   plain MLP with xIELU, which is exactly ReLU² at
                                  alpha_p = 1, alpha_n = beta = 0 (XIELU below)

Anything else (an exact-erf GELU, GELU with rotary positions, biases in an MLP without them,
...) is refused with one error naming every setting in the way. Rotary layout: ours rotates
(first half, second half) pairs, llama.cpp's "NEOX" rope; llama and arcee use its "NORM" rope
on adjacent pairs, so their q and k rows are interleaved here as llama.cpp's own converter
does (rotating a permuted q and k gives the same scores).

The tensors start from the Hugging Face layouts (model/weights/hf.py, hf_rotary.py), which
the `gguf` package's tensor-name map knows, so each name is the library's, not ours. Every
tokenizer becomes llama.cpp's byte-level BPE ("gpt2" model, "gpt-2" pre-tokenizer, whose
split pattern is the one ours uses): GPT-2's and ours with their merges, the char vocabulary as
characters whose UTF-8 bytes merge into one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from model.data.tokenizer import EOT_TEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from model.errors import ConfigError, TokenizerError
from model.gpt import GPT, GPTConfig
from model.weights.hf import gpt2_blockers, gpt2_state, is_conv1d_weight
from model.weights.hf_rotary import rotary_family, rotary_state
from model.weights.hf_tokenizer import bpe_merges, byte_to_char

Q = gguf.GGMLQuantizationType
# --outtype -> (the matrices' type, the file type recorded in the header).
OUTTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
DEFAULT_OUTTYPE = "f16"


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    neox_rope: bool  # rotates (first half, second half) pairs as ours; else adjacent pairs
    needs_output: bool  # output.weight is required even when the head is tied to token_embd


ARCHITECTURES = {
    "gpt2": Architecture(gguf.MODEL_ARCH.GPT2, True, False),  # no rotary at all
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, False, False),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3, True, False),
    "arcee": Architecture(gguf.MODEL_ARCH.ARCEE, False, False),
    "apertus": Architecture(gguf.MODEL_ARCH.APERTUS, True, True),
}

# xIELU's keys for ReLU². llama.cpp passes alpha_p and alpha_n through softplus when it builds
# the graph (alpha_p = softplus(key), alpha_n = beta + softplus(key)); softplus of this float32
# is 1.0 exactly in glibc's expf/logf, and of -1000 it is 0.0. Then x > 0 gives 1 * x² + 0 and
# x <= 0 gives 0 * (expm1(min(x, eps)) - x) + 0: ReLU² for every input.
XIELU = {"alpha_p": 0.5413249135017395, "alpha_n": -1000.0, "beta": 0.0, "eps": -1e-6}


def gguf_blockers(config: GPTConfig) -> tuple[str, list[str]]:
    """The llama.cpp architecture closest to `config`, and every setting its graph does not
    compute exactly (empty: the export is exact)."""
    if config.pos_emb == "learned":
        family, blockers = "gpt2", gpt2_blockers(config)
        if config.activation in ("gelu", "relu2"):
            blockers.append(f"model.activation={config.activation!r} (llama.cpp's GPT-2 "
                            "computes GELU in its tanh form only: gelu_tanh)")
        return family, blockers
    family, blockers = rotary_family(config)
    if family in ("arcee", "apertus") and config.activation != "relu2":
        blockers.append(f"model.activation={config.activation!r} (llama.cpp's plain-MLP "
                        f"architecture for this model, {family}, computes ReLU² only: relu2; "
                        "or a gated MLP: swiglu)")
    if family == "arcee" and config.bias:
        blockers.append("model.bias=True (llama.cpp's arcee has no MLP biases)")
    return family, blockers


def gguf_architecture(config: GPTConfig) -> str:
    """The llama.cpp architecture that computes exactly what a model of `config` computes;
    one ConfigError listing every setting in the way otherwise."""
    family, blockers = gguf_blockers(config)
    if blockers:
        raise ConfigError(f"cannot export exactly to GGUF: no llama.cpp architecture computes "
                          f"this model; the closest, {family}, lacks {len(blockers)} of its "
                          f"settings: {'; '.join(blockers)}")
    return family


# -- tensors ---------------------------------------------------------------------------------------

def _interleave_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows (first half, second half) -> alternating rows: pair i of our rotary
    becomes the adjacent pair (2i, 2i + 1) that llama.cpp's NORM rope rotates."""
    rest = weight.shape[1:]
    heads = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *rest)
    return heads.transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model: GPT, family: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names for `family`, in its layout ((out, in) matrices)."""
    config, target = model.config, ARCHITECTURES[family]
    if family == "gpt2":  # GPT-2's Conv1D stores (in, out): back to a Linear's (out, in)
        state = {k: t.t().contiguous() if is_conv1d_weight(k) else t
                 for k, t in gpt2_state(model).items()}
    else:
        state = rotary_state(model, family)
    names = gguf.get_tensor_name_map(target.arch, config.n_layer)
    tensors = {}
    for key, tensor in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"no {family} GGUF name for the tensor {key!r}")
        if not target.neox_rope and ".self_attn.q_proj." in key:
            tensor = _interleave_rows(tensor, config.n_head)
        elif not target.neox_rope and ".self_attn.k_proj." in key:
            tensor = _interleave_rows(tensor, config.kv_heads)
        tensors[name] = tensor
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    if target.needs_output and output not in tensors:
        tensors[output] = tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"]
    return tensors


def _encoded(name: str, tensor: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q]:
    """A tensor's bytes in the file: vectors (norms, biases) and position tables stay float32,
    as llama.cpp's converter keeps them; a matrix whose rows do not split into whole Q8_0
    blocks falls back to float16."""
    data = tensor.detach().float().cpu().numpy()
    if data.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]):
        qtype = Q.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, Q.F16), Q.F16


# -- the tokenizer ---------------------------------------------------------------------------------

def _char_merges(chars: str, table: dict[int, str]) -> list[str]:
    """Merges that join each character's UTF-8 bytes, left to right, into one token. Every
    merge's right side is a continuation byte and its left side the start of a character, so
    no merge ever joins two characters."""
    merges: dict[str, None] = {}
    for char in chars:
        data = char.encode("utf-8")
        for end in range(1, len(data)):
            left = "".join(table[b] for b in data[:end])
            merges[f"{left} {table[data[end]]}"] = None
    return list(merges)


def tokenizer_fields(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """llama.cpp's byte-level BPE for one of our tokenizers: the token texts (bytes spelled
    with GPT-2's table), their types and the merges. Ids past the tokenizer's (a vocabulary
    padded for fast matmuls) become unused placeholders, as in llama.cpp's converter."""
    table = byte_to_char()
    if isinstance(tokenizer, CharTokenizer):
        pieces = [c.encode("utf-8") for c in tokenizer.chars]
        merges = _char_merges(tokenizer.chars, table)
    elif isinstance(tokenizer, (BPETokenizer, GPT2Tokenizer)):
        encoding = tokenizer.encoding
        pieces = [encoding.decode_single_token_bytes(i) for i in range(tokenizer.eot_id)]
        merges = [" ".join("".join(table[b] for b in part) for part in pair)
                  for pair in bpe_merges(pieces)]
    else:
        raise TokenizerError(f"no GGUF form for the {tokenizer.name} tokenizer")
    if tokenizer.vocab_size > n_vocab:
        raise TokenizerError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} tokens, "
                             f"more than the model's {n_vocab} embedding rows")
    tokens = ["".join(table[b] for b in piece) for piece in pieces] + [EOT_TEXT]
    types = [gguf.TokenType.NORMAL] * len(pieces) + [gguf.TokenType.CONTROL]
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer,
                   fields: tuple[list[str], list[int], list[str]],
                   chat_template: str | None) -> None:
    tokens, types, merges = fields
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split pattern, which ours uses too
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # End-of-text starts a document and ends a reply; nothing is added to a prompt, as ours.
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


# -- the file --------------------------------------------------------------------------------------

def _add_hparams(writer: gguf.GGUFWriter, config: GPTConfig, family: str) -> None:
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if family == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_layer_norm_rms_eps(config.norm_eps)  # every RMSNorm, q/k norms included
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.head_dim)  # the whole head rotates
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if family == "apertus":
        writer.add_xielu_alpha_p([XIELU["alpha_p"]] * config.n_layer)
        writer.add_xielu_alpha_n([XIELU["alpha_n"]] * config.n_layer)
        writer.add_xielu_beta([XIELU["beta"]] * config.n_layer)
        writer.add_xielu_eps([XIELU["eps"]] * config.n_layer)


def save_gguf(model: GPT, path: str | Path, tokenizer: Tokenizer, outtype: str = DEFAULT_OUTTYPE,
              *, name: str = "smallgpt", chat_template: str | None = None) -> str:
    """Write `model` with `tokenizer` as one GGUF file at `path`, its matrices in `outtype`
    (f32, f16, bf16 or q8_0), and `chat_template` (Jinja) when given. Returns the llama.cpp
    architecture; ConfigError, before anything is written, when none computes the model."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"GGUF outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    family = gguf_architecture(model.config)
    vocabulary = tokenizer_fields(tokenizer, model.config.vocab_size)  # may refuse: before writing
    qtype, file_type = OUTTYPES[outtype]
    tensors = {key: _encoded(key, t, qtype) for key, t in gguf_tensors(model, family).items()}
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCHITECTURES[family].arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        _add_hparams(writer, model.config, family)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, vocabulary, chat_template)
        for key, (data, dtype) in tensors.items():
            writer.add_tensor(key, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return family
