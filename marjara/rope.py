"""Rotary position embeddings at arbitrary per-sequence positions."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin of angles position * inv_freq, computed from the positions themselves.

    Positions have shape (B, T): each row of a batch may start at its own offset, and there is no
    table to outgrow. Angles are fp32 whatever the activation dtype.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None, :, None] * self.inv_freq.to(torch.float32)
        return angles.cos(), angles.sin()  # each (B, 1, T, head_dim / 2)


def apply_rotary(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the two halves of each head dimension of x (B, H, T, D)."""
    cos, sin = rotary
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
