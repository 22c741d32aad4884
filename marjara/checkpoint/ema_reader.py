"""Read the EMA weights the trainer keeps in CKPT_DIR/<tag>/marjara_rank{R}.pt, as pieces.

Each rank file holds {"ema": {global name: fp32 tensor}, "ema_shapes": {global name: shape}}.
marjara.json's "ema" says how they are spread over ranks:
  "replicated"    (ZeRO 0-2) every tensor is a full parameter, held by exactly one rank;
  "zero3_shards"  (ZeRO-3) every rank holds a flat shard of every parameter; the parameter is the
                  concatenation in rank order, truncated to its size (the last shards are padded).
"""

from __future__ import annotations

from typing import Iterator

import torch

from marjara.checkpoint.reader import Checkpoint, load_file
from marjara.errors import MarjaraError
from marjara.checkpoint.pieces import Piece

LAYOUTS = ("replicated", "zero3_shards")


def rank_file_name(rank: int) -> str:
    return f"marjara_rank{rank}.pt"


def check_has_ema(ckpt: Checkpoint) -> str:
    """The EMA layout, after checking the checkpoint has EMA weights and every rank's file."""
    ema = ckpt.meta.get("ema")
    if not ema:
        raise MarjaraError(
            f"{ckpt.path} holds no EMA weights (trained without --ema_decay); convert without --ema"
        )
    layout = ema.get("layout")
    if layout not in LAYOUTS:
        raise MarjaraError(f"{ckpt.path}/marjara.json names EMA layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    for rank in range(ckpt.world_size):
        load_file(ckpt.file(rank_file_name(rank)))  # missing or truncated: reported before any write
    return layout


def ema_pieces(ckpt: Checkpoint, shapes: dict[str, torch.Size], skip: set[str] = frozenset()) -> Iterator[Piece]:
    """Pieces of every EMA tensor, one rank file at a time; names in `skip` (a tied head) are left out."""
    layout = check_has_ema(ckpt)
    filled: dict[str, int] = {}
    for rank in range(ckpt.world_size):
        path = ckpt.file(rank_file_name(rank))
        state = load_file(path)
        tensors, recorded = state.get("ema") or {}, state.get("ema_shapes") or {}
        for name, tensor in tensors.items():
            if name in skip:
                continue
            shape = shapes.get(name)
            if shape is not None and name in recorded and torch.Size(recorded[name]) != shape:
                raise MarjaraError(
                    f"{path}: EMA of {name!r} has shape {list(recorded[name])} but the weights have {list(shape)}; "
                    "the EMA belongs to another model"
                )
            flat = tensor.reshape(-1)
            if layout == "replicated":
                yield Piece(name, 0, flat)
                continue
            offset = filled.get(name, 0)
            filled[name] = offset + flat.numel()
            numel = shape.numel() if shape is not None else offset + flat.numel()
            yield Piece(name, offset, flat[: max(0, numel - offset)])
        del state, tensors
