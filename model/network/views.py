"""GPT describes itself: its weights by TransformerLens's names, and the parts it is made of.

Mixed into model.gpt.GPT, so that other modules (the activation cache, analysis, LoRA, the tally,
export) read these instead of GPT's attribute names:

    W_E            [d_vocab, d_model]                    W_U     [d_model, d_vocab]
    ln_final       the final norm (module norm_f)        b_U     [d_vocab], zeros
    W_pos          [n_ctx, d_model] (learned positions; for rotary ones an error)
    W_Q, W_K, W_V  [n_layers, n_heads, d_model, d_head]  b_Q, ...  [n_layers, n_heads, d_head]
    W_O            [n_layers, n_heads, d_head, d_model]  b_O     [n_layers, d_model]
    W_in, W_gate   [n_layers, d_model, d_mlp]            b_in, b_gate  [n_layers, d_mlp]
    W_out          [n_layers, d_mlp, d_model]            b_out   [n_layers, d_model]

Layouts are TransformerLens's (HookedTransformer; TransformerBridge stacks them the same way):
head h of layer l computes its query as x @ W_Q[l, h] + b_Q[l, h], where x is the output of the
block's first norm, and its output as z[h] @ W_O[l, h]. With grouped-query attention W_K, W_V,
b_K and b_V repeat each key/value head for every query head it serves, as TransformerLens's
grouped-query W_K and W_V do. SwiGLU's MLP computes silu(x @ W_gate + b_gate) * (x @ W_in + b_in).

Rules: W_E, W_pos and W_U share the parameters' memory; the stacked views are new tensors
(editing one leaves the model as it was). A bias the model does not have (model.bias: false)
is None, and so is W_gate (and b_gate) for an MLP without a gate. None of them is weight-folded:
the norms' weights stay in the norms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model.errors import ConfigError

Q, K, V = 0, 1, 2  # positions in CausalSelfAttention.split_qkv's result


class WeightViews:
    """The views above, read from GPT's modules (tok_emb, pos_emb, blocks, norm_f, lm_head)."""

    tok_emb: nn.Embedding
    pos_emb: nn.Embedding | None
    blocks: nn.ModuleList
    norm_f: nn.Module
    lm_head: nn.Module

    def components(self) -> dict[str, list[nn.Module]]:
        """The modules of each part of the network, every parameter in exactly one part (a tied
        W_U is W_E's tensor): embed, pos_embed, attn, mlp, norm and unembed. The norms of
        queries and keys (qk_norm) count as norms, not as attention."""
        norms = [norm for b in self.blocks
                 for norm in (b.norm1, b.attn.q_norm, b.attn.k_norm, b.norm2) if norm is not None]
        return {"embed": [self.tok_emb],
                "pos_embed": [self.pos_emb] if self.pos_emb is not None else [],
                "attn": [m for b in self.blocks for m in (b.attn.qkv, b.attn.proj)],
                "mlp": [b.mlp for b in self.blocks],
                "norm": [*norms, self.norm_f],
                "unembed": [self.lm_head]}

    def head_results(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s per-head outputs (B, T, H, C), bias left out, from its hook_z
        (B, T, H, D): what the forward pass's `attn.hook_result` holds."""
        return self.blocks[layer].attn.head_results(z)

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """For each token (an id, ids, or a single-token string) the direction whose dot product
        with the normalized final stream is that token's logit, less the final norm's bias
        term: W_U[:, token] times the final norm's weight (TransformerLens folds that weight
        into W_U; we do not)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)  # type: ignore[attr-defined]
        tokens = torch.as_tensor(tokens, device=self.lm_head.weight.device)
        return self.lm_head.weight[tokens] * self.norm_f.weight

    @property
    def ln_final(self) -> nn.Module:
        """The final norm (TransformerLens's name for it; ours is `norm_f`)."""
        return self.norm_f

    @property
    def W_E(self) -> torch.Tensor:
        return self.tok_emb.weight

    @property
    def W_pos(self) -> torch.Tensor:
        if self.pos_emb is None:
            # Not an AttributeError: nn.Module.__getattr__ would replace this message with its own.
            raise ConfigError("W_pos: this model has rotary positions (model.pos_emb: rope), "
                             "not a table of learned ones")
        return self.pos_emb.weight

    @property
    def W_U(self) -> torch.Tensor:
        return self.lm_head.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        """Zeros: W_U has no bias (TransformerLens's unembedding always has one)."""
        return self.lm_head.weight.new_zeros(self.lm_head.weight.size(0))

    @property
    def W_Q(self) -> torch.Tensor:
        return self._per_layer(lambda b: _head_weights(b.attn, Q))

    @property
    def W_K(self) -> torch.Tensor:
        return self._per_layer(lambda b: _head_weights(b.attn, K))

    @property
    def W_V(self) -> torch.Tensor:
        return self._per_layer(lambda b: _head_weights(b.attn, V))

    @property
    def b_Q(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: _head_biases(b.attn, Q))

    @property
    def b_K(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: _head_biases(b.attn, K))

    @property
    def b_V(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: _head_biases(b.attn, V))

    @property
    def W_O(self) -> torch.Tensor:
        # proj's input columns are (head, d_head): its transpose's rows split into heads.
        return self._per_layer(
            lambda b: b.attn.proj.weight.T.reshape(b.attn.n_head, b.attn.head_dim, -1))

    @property
    def b_O(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: b.attn.proj.bias)

    @property
    def W_in(self) -> torch.Tensor:
        return self._per_layer(lambda b: _mlp_in(b.mlp, b.mlp.fc.weight, gate=False).T)

    @property
    def W_gate(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: _transpose(_mlp_in(b.mlp, b.mlp.fc.weight, gate=True)))

    @property
    def b_in(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: _mlp_in(b.mlp, b.mlp.fc.bias, gate=False))

    @property
    def b_gate(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: _mlp_in(b.mlp, b.mlp.fc.bias, gate=True))

    @property
    def W_out(self) -> torch.Tensor:
        return self._per_layer(lambda b: b.mlp.proj.weight.T)

    @property
    def b_out(self) -> torch.Tensor | None:
        return self._per_layer(lambda b: b.mlp.proj.bias)

    def _per_layer(self, view: Callable[[Any], torch.Tensor | None]) -> Any:
        """view(block) for every block, stacked on a first layer axis; None if it is None."""
        views = [view(block) for block in self.blocks]
        return None if views[0] is None else torch.stack(views)


def _head_weights(attn: Any, which: int) -> torch.Tensor:
    """Queries', keys' or values' rows of qkv's weight (H*D, C) as (H, C, D), per query head."""
    w = attn.split_qkv(attn.qkv.weight, dim=0)[which]
    return _per_query_head(attn, w.view(-1, attn.head_dim, w.size(-1)).transpose(1, 2))


def _head_biases(attn: Any, which: int) -> torch.Tensor | None:
    if attn.qkv.bias is None:
        return None
    return _per_query_head(attn, attn.split_qkv(attn.qkv.bias, dim=0)[which].view(-1,
                                                                                  attn.head_dim))


def _per_query_head(attn: Any, heads: torch.Tensor) -> torch.Tensor:
    """(H_kv, ...) -> (H, ...): query head h reads key/value head h // (H / H_kv)."""
    return heads.repeat_interleave(attn.n_head // heads.size(0), dim=0)


def _mlp_in(mlp: Any, t: torch.Tensor | None, gate: bool) -> torch.Tensor | None:
    """The value part (gate=False) or SwiGLU's gate part of fc's weight or bias (rows); SwiGLU's
    fc holds the gate's rows first. None for a missing bias, and for the gate of an ungated MLP."""
    if t is None or (gate and not mlp.gated):
        return None
    if not mlp.gated:
        return t
    return t.chunk(2, dim=0)[0 if gate else 1]


def _transpose(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.T
