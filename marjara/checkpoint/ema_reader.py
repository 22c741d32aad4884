"""Read the EMA weights the trainer keeps in every rank's file, as pieces or as whole tensors.

How the EMA tensors spread over the rank files (the layouts) is described in
marjara.checkpoint.format; this is the one place that puts them back together, for convert
(streamed, one rank file at a time) and for a resume on another world size or layout.
"""

from __future__ import annotations

from typing import Iterator

import torch

from marjara.checkpoint.format import EMA_REPLICATED, Checkpoint
from marjara.checkpoint.pieces import Piece, assemble
from marjara.checkpoint.reader import load_file
from marjara.errors import MarjaraError


def check_has_ema(ckpt: Checkpoint, fix: str = "convert without --ema") -> str:
    """The EMA layout, after checking the checkpoint has EMA weights and every rank's file."""
    layout = ckpt.ema_layout
    if layout is None:
        raise MarjaraError(f"{ckpt.tag_dir} holds no EMA weights (trained without --ema_decay); {fix}")
    for rank in range(ckpt.world_size):
        load_file(ckpt.rank_file(rank))  # missing or truncated: reported before any write
    return layout


def ema_pieces(ckpt: Checkpoint, shapes: dict[str, torch.Size], skip: set[str] = frozenset()) -> Iterator[Piece]:
    """Pieces of every EMA tensor, one rank file at a time; names in `skip` (a tied head) are left out."""
    layout = check_has_ema(ckpt)
    filled: dict[str, int] = {}
    for rank in range(ckpt.world_size):
        path = ckpt.rank_file(rank)
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
            if layout == EMA_REPLICATED:
                yield Piece(name, 0, flat)
                continue
            offset = filled.get(name, 0)
            filled[name] = offset + flat.numel()
            numel = shape.numel() if shape is not None else offset + flat.numel()
            yield Piece(name, offset, flat[: max(0, numel - offset)])
        del state, tensors


def ema_tensors(ckpt: Checkpoint, fix: str = "resume without --ema_decay") -> dict[str, torch.Tensor]:
    """Every EMA tensor whole (fp32, by global name), put together from all ranks' files."""
    check_has_ema(ckpt, fix)
    shapes: dict[str, torch.Size] = {}
    for rank in range(ckpt.world_size):
        recorded = load_file(ckpt.rank_file(rank)).get("ema_shapes") or {}
        shapes.update({name: torch.Size(shape) for name, shape in recorded.items()})
    full = {name: torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()}
    assemble(full, ema_pieces(ckpt, shapes), f"the EMA of checkpoint {ckpt.tag_dir}")
    return full
