"""The GPT: token embeddings, a stack of pre-norm transformer blocks, and an unembedding head.

    idx (B, T) -> W_E[idx] (+ learned positions) -> n_layer x [x + attn(norm(x)); x + mlp(norm(x))]
               -> final norm -> W_U -> logits (B, T, vocab_size)

Attention goes through `scaled_dot_product_attention`, which picks a flash kernel on CUDA.
Generation passes a `KVCache` so each new token costs one position's compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig
from .errors import ConfigError


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_tables(head_dim: int, length: int, base: float, device: Any = None) -> torch.Tensor:
    """cos and sin of position * frequency, stacked: (2, length, head_dim // 2), float32."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), freqs)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's vector by its position's angle.

    x: (B, H, T, D); table: (2, T, D/2) for the positions of x.
    """
    cos, sin = table[0].to(x.dtype), table[1].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to block_size.

    `length` is how many positions are filled; the model writes new keys and values at
    [length, length + T) and advances it once per forward pass.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: Any = None,
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, config.kv_heads, config.block_size, config.head_dim)
        layers = range(config.n_layer)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.length = 0
        self.capacity = config.block_size

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, H_kv, T, D) after the filled part; return all keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position attends to itself and earlier positions."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # One matrix computes queries, keys and values together: one matmul instead of three.
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                cache: KVCache | None = None, return_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
             self.n_kv_head * self.head_dim], dim=-1)
        # (B, T, H*D) -> (B, H, T, D): heads become a batch dimension for the attention matmuls
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
        if self.n_kv_head != self.n_head:
            # Grouped-query attention: each key/value head serves n_head / n_kv_head query heads.
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if return_weights:
            y, weights = self._explicit_attention(q, k, v, past)
        else:
            weights = None
            dropout = self.dropout if self.training else 0.0
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            elif T == 1:  # one new token may attend to everything before it: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
            else:
                mask = self._causal_mask(T, past, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, H*D)
        return self.proj(y), weights

    @staticmethod
    def _causal_mask(T: int, past: int, device: Any) -> torch.Tensor:
        """(T, past + T) booleans: query i (at position past + i) sees keys 0 .. past + i."""
        rows = torch.arange(T, device=device)[:, None] + past
        return torch.arange(past + T, device=device)[None, :] <= rows

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(q k^T / sqrt(d) + causal mask) v, also returning the weights (B, H, T, S)."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = self._causal_mask(q.size(2), past, q.device)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return weights @ v, weights


class MLP(nn.Module):
    """Applied to each position alone: widen, non-linearity, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        hidden = config.mlp_hidden
        # SwiGLU computes a gate and a value from the input: one matrix of twice the width.
        fc_out = 2 * hidden if self.activation == "swiglu" else hidden
        self.fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:  # swiglu
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm residual block: vectors first exchange information, then each is transformed."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                cache: KVCache | None = None, return_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.norm1(x), rope, cache, return_weights)
        x = x + self.resid_dropout(attn_out)
        x = x + self.mlp(self.norm2(x))
        return x, weights


@dataclass
class ForwardTrace:
    """What `GPT.trace` records: the residual stream after each block and attention weights."""

    logits: torch.Tensor  # (B, T, V)
    hidden: list[torch.Tensor]  # n_layer + 1 tensors (B, T, C): embeddings, then each block
    attention: list[torch.Tensor]  # n_layer tensors (B, H, T, T)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate("model")
        if config.vocab_size is None:
            raise ConfigError("model.vocab_size: not set; set it, or let training take it from "
                              "the tokenizer")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)  # W_E
        self.pos_emb = (nn.Embedding(config.block_size, config.n_embd)
                        if config.pos_emb == "learned" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # W_U
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor: W_U = W_E^T
        if config.pos_emb == "rope":
            table = rope_tables(config.head_dim, config.block_size, config.rope_base)
            self.register_buffer("rope", table, persistent=False)
        else:
            self.rope = None
        self.reset_parameters()

    # -- initialization: every decision in one place -------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 initialization: N(0, 0.02) weights, zero biases, unit norms, and the output
        projections of each residual branch scaled by 1/sqrt(2 * n_layer) so the residual
        stream's variance does not grow with depth (Radford et al., 2019, section 2.3)."""
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

    # -- forward ---------------------------------------------------------------------------------
    def _embed(self, idx: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ConfigError(
                f"input of {start + T} tokens is longer than the context size "
                f"model.block_size={self.config.block_size}; crop it to the last "
                f"{self.config.block_size} tokens"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        rope = self.rope[:, start:start + T] if self.rope is not None else None
        return self.drop(x), rope

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for every position, and with targets the mean next-token
        cross-entropy in nats over every position whose target is not -1.

        With a cache, idx holds only the new tokens; their positions follow the cached ones.
        """
        start = cache.length if cache is not None else 0
        x, rope = self._embed(idx, start)
        for block in self.blocks:
            x, _ = block(x, rope, cache)
        if cache is not None:
            cache.length += idx.size(1)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def trace(self, idx: torch.Tensor) -> ForwardTrace:
        """A forward pass that keeps the residual stream after every block and the attention
        weights, computed explicitly (slower than the fused kernel; for inspection only)."""
        x, rope = self._embed(idx, 0)
        hidden, attention = [x], []
        for block in self.blocks:
            x, weights = block(x, rope, None, return_weights=True)
            hidden.append(x)
            attention.append(weights)
        logits = self.lm_head(self.norm_f(x))
        return ForwardTrace(logits=logits, hidden=hidden, attention=attention)

    # -- conveniences ----------------------------------------------------------------------------
    def num_params(self) -> int:
        """Trainable parameters, a tied W_E/W_U counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's
        12 * n_layer * n_embd * block_size (Kaplan et al., 2020; PaLM appendix B)."""
        c = self.config
        positions = self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        weights = self.num_params() - positions
        return 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size

    def new_cache(self, batch_size: int, device: Any = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        ref = self.tok_emb.weight
        return KVCache(self.config, batch_size, device or ref.device, dtype or ref.dtype)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT:
        return cls(GPTConfig.from_preset(name, **overrides))

    @classmethod
    def from_hf_gpt2(cls, path_or_state_dict: str | Path | dict[str, torch.Tensor],
                     n_head: int | None = None) -> GPT:
        """Load GPT-2 weights in the Hugging Face layout (directory, or state dict and n_head)."""
        from .hf import load_hf_gpt2

        return load_hf_gpt2(path_or_state_dict, n_head)

    def to_hf_gpt2(self, directory: str | Path) -> Path:
        """Write this model as a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
        from .hf import save_hf_gpt2

        return save_hf_gpt2(self, directory)
