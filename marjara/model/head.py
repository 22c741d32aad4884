"""The output projection and its cross-entropy, computed over tokens in chunks.

A micro-batch of N tokens over a vocabulary of V holds N x V logits, and the loss in fp32 holds them
again in fp32 (plus log-softmax's output and, in backward, their gradient): with V = 100k that is
the largest tensor of a training step by far. Here the head and the loss run over slices of the
tokens; each slice's logits live only while its loss is computed, and backward recomputes them
slice by slice (non-re-entrant activation checkpointing), in the spirit of fused
linear-cross-entropy kernels. The cost is one more head matmul; loss and gradients equal the plain
path's (tested within 1e-5 in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# fp32 logits held per slice. Smaller slices save little more (the slice's logits are no longer the
# step's largest tensor) but add a pass over the output matrix's gradient for each slice.
CHUNK_LOGIT_BYTES = 256 * 2**20


def tokens_per_chunk(vocab_size: int, budget: int = CHUNK_LOGIT_BYTES) -> int:
    return max(1, budget // (4 * vocab_size))


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=-1)


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy of `hidden @ weight.T` against `targets`, number of targets that
    are not -1), with at most `chunk_tokens` tokens' logits alive at once. Nothing is read from
    the device."""
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, t)
    return total, (targets != -1).sum()


class OutputHead(nn.Linear):
    """hidden -> logits, or with targets (summed cross-entropy, target count) without the whole
    batch's logits.

    The loss runs inside this module's forward so that ZeRO-3 has gathered the weight for it."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        self.chunk_tokens = tokens_per_chunk(vocab_size)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return super().forward(hidden)
        return chunked_cross_entropy_sum(hidden, self.weight, targets, self.chunk_tokens)
