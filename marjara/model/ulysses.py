"""Ulysses sequence parallelism for the attention of MarjaraModel (DeepSpeed-Ulysses, ALST).

Each of the N ranks of a sequence group holds T/N consecutive tokens of every sample. Attention
needs all T tokens: an all-to-all turns q, k, v of shape (B, T/N, H, D) into (B, T, H/N, D) (every
token, a slice of the heads), causal SDPA runs on that slice, and the reverse all-to-all gives each
rank its tokens back with every head. RoPE and QK-norm have already been applied on the local
tokens, at their global positions (the caller's job: see marjara/train/sequence_parallel.py).

Heads are split whole: H must divide by N. With fewer kv heads than N (GQA), every kv head is
repeated (as ALST does) until there are lcm(n_kv_heads, N) of them, which N divides; query head
h still meets kv head h // (H / n_kv_heads), and the gradients of the copies add up in backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kv_heads_after_replication(n_heads: int, n_kv_heads: int, sp_size: int) -> int:
    """kv heads each sequence group attends with: n_kv_heads, or lcm(n_kv_heads, sp_size) if
    sp_size does not divide it (n_heads divides by both, so by the lcm too)."""
    return n_kv_heads if n_kv_heads % sp_size == 0 else math.lcm(n_kv_heads, sp_size)


def _local_causal_attention(dropout_p: float):
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, T, h, D) -> (B, h, T, D): no mask and is_causal, so SDPA takes its flash /
        # memory-efficient kernel and no T x T matrix is materialised (CPU included).
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1),
                                           dropout_p=dropout_p)
        return y.transpose(1, 2)
    return attend


class UlyssesAttention:
    """Callable attention over a sequence group: (q, k, v) of (B, H, T/N, D) as Attention builds
    them -> (B, H, T/N, D). A plain object, not a Module: it holds a process group, no weights."""

    def __init__(self, group, sp_size: int, n_heads: int, n_kv_heads: int) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        self.kv_repeat = kv_heads_after_replication(n_heads, n_kv_heads, sp_size) // n_kv_heads
        self._dropout_p = 0.0
        # scatter the heads (dim 2), gather the sequence (dim 1) of (B, T/N, H, D)
        self._attention = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    def _local(self, q, k, v):
        return _local_causal_attention(self._dropout_p)(q, k, v)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        if self.kv_repeat > 1:
            k, v = k.repeat_interleave(self.kv_repeat, dim=1), v.repeat_interleave(self.kv_repeat, dim=1)
        self._dropout_p = dropout_p
        # (B, T/N, H, D), the layout the all-to-all splits
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        return self._attention(q, k, v, 0).transpose(1, 2)
