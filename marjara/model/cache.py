"""Preallocated key/value cache for incremental decoding, with a length per sequence."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for a batch, allocated once for `max_len` positions.

    Each sequence has its own positions, so prompts of different lengths share one batch: a token
    at position p of row b is written at slot p of that row and attends to slots 0..p of it.
    Nothing is reallocated while decoding.
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch_size, max_len, n_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self._rows = torch.arange(batch_size, device=device)[:, None]
        self._positions: torch.Tensor | None = None

    def begin_step(self, positions: torch.Tensor) -> None:
        """Declare the positions (B, T) of the tokens every layer is about to write."""
        used = int(positions.max()) + 1
        if used > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; position {used - 1} does not fit")
        slots = torch.arange(used, device=positions.device)
        self._positions = positions
        self._used = used
        # (B, 1, T, used): a token sees the slots at or before its own position in its own row.
        self.mask = slots[None, None, None, :] <= positions[:, None, :, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, Hkv, T, D); return slots 0..used-1 as (B, Hkv, used, D) views."""
        self.keys[layer][self._rows, self._positions] = k.transpose(1, 2)
        self.values[layer][self._rows, self._positions] = v.transpose(1, 2)
        keys = self.keys[layer, :, : self._used].transpose(1, 2)
        values = self.values[layer, :, : self._used].transpose(1, 2)
        return keys, values
