"""Rotary position embeddings at arbitrary per-sequence positions."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Unit complex rotations exp(i * position * inv_freq), computed from the positions themselves.

    Positions have shape (B, T): each row of a batch may start at its own offset, and there is no
    table to outgrow. Angles are fp32 whatever the activation dtype.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[:, None, :, None] * self.inv_freq.to(torch.float32)
        return torch.polar(torch.ones_like(angles), angles)  # (B, 1, T, head_dim / 2), complex64


def apply_rotary(x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of adjacent dimensions (2j, 2j+1) of x (B, H, T, D) by its angle.

    One complex multiply instead of the half-split formulation's eight element-wise ops: decoding
    on CPU is bound by per-op overhead.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotary).flatten(-2).to(x.dtype)
