"""The GPT, in the order a token meets it.

    idx (B, T) -> W_E[idx] (+ learned positions)            one vector per token
               -> n_layer x Block:                           the vectors are refined in place
                    x = x + attention(norm(x))               vectors exchange information
                    x = x + MLP(norm(x))                     each vector is transformed alone
               -> final norm -> W_U                          logits (B, T, vocab_size)

Training scores the logits at every position against the next token (cross-entropy).
GPTConfig, the network's shape, is defined first. The norms and non-linearities live in
model/network/layers.py, positions (rotary tables, a padded batch's masks) in
model/network/positions.py. Attention goes through `scaled_dot_product_attention`, which picks a
flash kernel on CUDA; generation passes a KVCache (model/network/kv_cache.py).

GPT also describes itself, so that no other module needs its attribute names: weight views by
TransformerLens's names (W_E, W_Q, ..., W_U) and the parts each parameter belongs to
(model/network/views.py), and the final norm with W_U as one step (`unembed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ConfigError, check_choice, check_positive
from model.network.hooks import HookedModel, HookPoint
from model.network.kv_cache import KVCache
from model.network.layers import ACTIVATION_FNS, LayerNorm, RMSNorm
from model.network.positions import (
    Placement,
    apply_rope,
    causal_mask,
    place,
    rope_tables,
    text_positions,
)
from model.network.text import TextModel
from model.network.views import WeightViews

POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu2", "swiglu")


@dataclass
class GPTConfig:
    """The shape of the network, checked once when it is constructed.

    Defaults are a small GPT that trains on a CPU. vocab_size None means "the tokenizer's":
    training fills it in; a GPT cannot be built before it is known.
    """

    vocab_size: int | None = None
    block_size: int = 256  # context size: the most tokens the model sees at once
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int | None = None  # fewer key/value heads than query heads (GQA); None = n_head
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * n_embd
    pos_emb: str = "learned"  # "learned" absolute positions or "rope" rotary
    rope_base: float = 10000.0
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"  # "gelu", "gelu_tanh", "relu2" or "swiglu"
    qk_norm: bool = False  # normalise queries and keys per head before attention
    bias: bool = True  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # W_U shares its tensor with W_E

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.n_embd)

    def __post_init__(self) -> None:
        """Every rule about the shape, each error naming its key as in a config file."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name}: must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd: {self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ConfigError(f"model.n_kv_head: {self.n_kv_head} must be >= 1 and divide "
                              f"model.n_head={self.n_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.n_embd: rotary positions need an even head size, "
                              f"got {self.n_embd}/{self.n_head}={self.head_dim}")
        check_choice("model.pos_emb", self.pos_emb, POS_EMBS)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.activation", self.activation, ACTIVATIONS)
        for name in ("mlp_ratio", "norm_eps", "rope_base"):
            check_positive(f"model.{name}", getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_ratio: gives an MLP width of {self.mlp_hidden}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl or gpt3 (175B)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# GPT-2 shapes from Radford et al. 2019 (Table 2); GPT-3 175B from Brown et al. 2020 (Table 2.1).
_GPT2_STYLE = dict(
    vocab_size=50257, pos_emb="learned", norm="layernorm", activation="gelu_tanh", bias=True,
    tie_embeddings=True, qk_norm=False, dropout=0.0, mlp_ratio=4.0, norm_eps=1e-5,
)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2_STYLE, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(_GPT2_STYLE, n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(_GPT2_STYLE, n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(_GPT2_STYLE, n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    "gpt3": dict(_GPT2_STYLE, n_layer=96, n_head=96, n_embd=12288, block_size=2048),
}


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position attends to itself and earlier positions."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which slot of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # One matrix computes queries, keys and values together: one matmul instead of three.
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.dropout = config.dropout
        # Hook points (model/network/hooks.py), TransformerLens's names; heads as (B, T, H, D).
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        if config.pos_emb == "rope":
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()  # (B, H, T, S)
        self.hook_z, self.hook_result = HookPoint(), HookPoint()  # result: (B, T, H, C)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: (B, 1, T, S) booleans, the keys each query sees, for a padded batch
        (model/network/positions.py); None is causal attention over every key."""
        B, T, C = x.shape
        past = cache.length if cache is not None else 0
        q, k, v = self._heads(x, rope, cache)
        dropout = self.dropout if self.training else 0.0
        if self.hook_attn_scores.active or self.hook_pattern.active:
            # A hook wants the (T, S) matrix.
            y = self._explicit(q, k, v, causal_mask(T, past, x.device) if mask is None else mask,
                               dropout)
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:  # one new token may attend to everything before it: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            mask = causal_mask(T, past, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = self.hook_z(y.transpose(1, 2))  # (B, H, T, D) -> (B, T, H, D)
        if self.hook_result.active:  # each head's share of the output, summed by proj
            result = self.hook_result(self.head_results(y))
            return result.sum(dim=2) + (self.proj.bias if self.proj.bias is not None else 0)
        return self.proj(y.reshape(B, T, C))  # (B, T, H, D) -> (B, T, H*D)

    def head_results(self, z: torch.Tensor) -> torch.Tensor:
        """Each head's output in the residual stream, bias left out: z (B, T, H, D) times that
        head's columns of proj, (B, T, H, C). proj's output is their sum plus its bias."""
        w = self.proj.weight.to(z.dtype).view(-1, self.n_head, self.head_dim)  # (C, H, D)
        return torch.einsum("bthd,chd->bthc", z, w)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  dropout: float) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v, forming the (T, S) matrix that the fused kernel
        never stores, so that hooks can read or edit scores and pattern."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype))
        return F.dropout(pattern, dropout) @ v

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """How many of qkv's output rows are queries, keys and values, in that order."""
        kv = self.n_kv_head * self.head_dim
        return self.n_head * self.head_dim, kv, kv

    def split_qkv(self, t: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values of qkv's output (dim -1) or of its weight or bias (dim 0)."""
        return t.split(self.qkv_sizes, dim=dim)

    def _heads(self, x: torch.Tensor, rope: torch.Tensor | None,
               cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (B, H, S, D), keys and values including cached positions."""
        B, T, _ = x.shape
        q, k, v = self.split_qkv(self.qkv(x))
        # (B, T, H*D) -> (B, H, T, D): heads become a batch dimension for the attention matmuls
        q = self.hook_q(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.hook_k(k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.hook_v(v.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = self.hook_rot_q.heads(apply_rope(q, rope))
            k = self.hook_rot_k.heads(apply_rope(k, rope))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.n_kv_head != self.n_head:
            # Grouped-query attention: each key/value head serves n_head / n_kv_head query heads.
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return q, k, v


class MLP(nn.Module):
    """Applied to each position alone: widen, non-linearity, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden
        # SwiGLU computes a gate and a value from the input: one matrix of twice the width.
        self.gated = config.activation == "swiglu"
        fc_out = 2 * hidden if self.gated else hidden
        self.fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.act: Callable[[torch.Tensor], torch.Tensor] = ACTIVATION_FNS[config.activation]
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # SwiGLU's hook_pre holds gate and value side by side, as fc computes them.
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.hook_post(self.act(self.hook_pre(self.fc(x))))))


class Block(nn.Module):
    """Pre-norm residual block: vectors first exchange information, then each is transformed."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.hook_resid_pre, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        # The mask only for a padded batch: an attention variant written as (x, rope, cache)
        # keeps working for everything else.
        masked = () if mask is None else (mask,)
        attended = self.attn(self.norm1(x), rope, cache, *masked)
        x = x + self.hook_attn_out(self.resid_dropout(attended))
        x = self.hook_resid_mid(x)
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.norm2(x))))


# Our module names where TransformerLens's hook names differ (state_dict keys keep ours).
TL_NAMES = {"norm1": "ln1", "norm2": "ln2", "norm_f": "ln_final"}


class GPT(HookedModel, WeightViews, TextModel, nn.Module):
    hook_renames = TL_NAMES  # hook_dict finds every hook point again at each lookup

    def __init__(self, config: GPTConfig, device: torch.device | str | None = None) -> None:
        """A randomly initialised GPT with its parameters on `device` (None: the CPU). On
        "meta" the parameters are shapes only and nothing is drawn: a model whose weights are
        about to be loaded."""
        super().__init__()
        if config.vocab_size is None:
            raise ConfigError("model.vocab_size: not set; set it, or let training take it from "
                              "the tokenizer")
        self.config = config
        device = torch.device("cpu" if device is None else device)
        meta = device.type == "meta"

        def table(rows: int) -> nn.Embedding:
            # On meta, nn.Embedding's own normal_ would make torch import its compiler (>1 s).
            return nn.Embedding(rows, config.n_embd,
                                _weight=torch.empty(rows, config.n_embd) if meta else None)

        with device:  # every parameter is created there
            self.tok_emb = table(config.vocab_size)  # W_E
            self.pos_emb = table(config.block_size) if config.pos_emb == "learned" else None
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
            self.norm_f = make_norm(config)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # W_U
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor: W_U = W_E^T
        if config.pos_emb == "rope":
            # Not in the state dict, so loading cannot fill it: real even on meta (on the CPU).
            rope = rope_tables(config.head_dim, config.block_size, config.rope_base,
                               "cpu" if meta else device)
            self.register_buffer("rope", rope, persistent=False)
        else:
            self.rope = None
        self.hook_embed = HookPoint()
        if config.pos_emb == "learned":
            self.hook_pos_embed = HookPoint()  # (B, T, C), broadcast over the batch as TL's
        self.find_hook_points()  # each point knows its name from the start
        if not meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialization, every decision in one place: N(0, 0.02) weights, zero biases,
        unit norms, and the output projections of each residual branch scaled by
        1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth
        (Radford et al., 2019, section 2.3)."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("attn.proj") or name.endswith("mlp.proj")
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor, start: int | torch.Tensor = 0
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_E[idx] plus positions (learned), and the rotary table for those positions: start..
        in every row, or with `start` (B, T) each token's own (a padded batch)."""
        T = idx.size(1)
        per_row = isinstance(start, torch.Tensor)
        if not per_row and start + T > self.config.block_size:
            raise ConfigError(
                f"input of {start + T} tokens is longer than the context size "
                f"model.block_size={self.config.block_size}; crop it to the last "
                f"{self.config.block_size} tokens"
            )
        x = self.hook_embed(self.tok_emb(idx))
        positions = start if per_row else torch.arange(start, start + T, device=idx.device)
        if self.pos_emb is not None:
            pos = self.pos_emb(positions)  # (T, C), or (B, T, C) per row
            x = x + self.hook_pos_embed(pos.expand_as(x) if self.hook_pos_embed.active else pos)
        if self.rope is None:
            rope = None
        elif per_row:
            rope = self.rope[:, positions].unsqueeze(2)  # (2, B, 1, T, D/2): broadcast over heads
        else:
            rope = self.rope[:, start:start + T]
        return self.drop(x), rope

    def forward(self, idx: torch.Tensor | str | list[str], targets: torch.Tensor | None = None,
                cache: KVCache | None = None, *, attention_mask: torch.Tensor | None = None,
                window_start: int | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for every position, and with targets the mean next-token
        cross-entropy in nats over every position whose target is not -1.

        With a cache, idx holds only the new tokens; their positions follow the cached ones.
        `attention_mask` (B, T), 1 = token and 0 = padding as in transformers, runs a batch of
        texts of different lengths, padded left or right: each row's tokens take positions
        from its first token and never see padding, so their logits are the text's own (within
        float rounding; model/network/positions.py). With a cache it describes the new tokens;
        the cache remembers earlier ones. `window_start` (a number or (B,)) counts the tokens of
        each row's text before idx (generation's moving window): hooks read each token's index
        in the whole text as `hook.positions`; with a cache it holds until named again.
        A text (or list of texts) is tokenized first by the model's tokenizer (to_tokens).
        """
        idx = self.as_tokens(idx)
        where = place(idx, cache, attention_mask, self.config.block_size)
        self._show_positions(idx, where, cache, window_start)
        x, rope = self.embed(idx, where.start if where.positions is None else where.positions)
        for block in self.blocks:
            x = block(x, rope, cache, where.mask)
        if cache is not None:
            cache.length += idx.size(1)
        logits = self.unembed(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def _show_positions(self, idx: torch.Tensor, where: Placement, cache: KVCache | None,
                        window_start: int | torch.Tensor | None) -> None:
        """Every hooked point's `positions` for this pass (HookPoint.positions)."""
        if cache is not None:
            if isinstance(window_start, torch.Tensor):  # a copy: the cache edits it later
                cache.window_start = window_start.to(idx.device, copy=True)
            elif window_start is not None:
                cache.window_start = window_start
            window_start = cache.window_start
        hooked = [hp for hp in self.known_hook_points if hp.active]
        if hooked:
            positions = text_positions(where, idx, 0 if window_start is None else window_start)
            for hp in hooked:
                hp.positions = positions

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of a residual stream (..., C): the final norm, then W_U."""
        return self.lm_head(self.norm_f(resid))

    def num_params(self) -> int:
        """Parameters, a tied W_E/W_U counted once."""
        return count_parameters(self)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's
        12 * n_layer * n_embd * block_size (Kaplan et al., 2020; PaLM appendix B)."""
        c = self.config
        positions = self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        weights = self.num_params() - positions
        return 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size

    def new_cache(self, batch_size: int, device: Any = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        c, ref = self.config, self.tok_emb.weight
        return KVCache(c.n_layer, batch_size, c.kv_heads, c.block_size, c.head_dim,
                       device=device or ref.device, dtype=dtype or ref.dtype)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT:
        """Randomly initialised weights in a named shape (gpt2, ..., gpt3)."""
        return cls(GPTConfig.from_preset(name, **overrides))


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """The parameters of `module` (only those that require gradients, with trainable_only),
    a tensor held under two names (a tied W_E/W_U) counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return LayerNorm(dim, eps=config.norm_eps, bias=config.bias)
