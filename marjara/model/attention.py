"""RMSNorm and grouped-query attention with per-head QK-norm, through SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marjara.model.cache import KVCache
from marjara.model.config import ModelConfig
from marjara.model.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wqkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, config.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self._split = (q_dim, kv_dim, kv_dim)
        # Set by a trainer for sequence parallelism: a callable (q, k, v, dropout_p) -> y over the
        # ranks that share each sample (marjara/model/ulysses.py); None attends locally.
        self.sequence_parallel = None

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x: (B, T, d_model); rotary: RotaryEmbedding's rotations for the tokens' positions."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self._split, dim=-1)
        # (B, T, H, D) -> per-head norm over D -> (B, H, T, D)
        q = self.q_norm(q.view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None and self.sequence_parallel is not None:
            y = self.sequence_parallel(q, k, v, self.dropout if self.training else 0.0)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            keys, values = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=cache.mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
