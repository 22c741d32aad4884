"""Weights that arrive in pieces: (name, element offset, flat tensor) triples, from whichever file
holds them, checked to add up to every tensor exactly once.

Readers of sharded checkpoints yield pieces one source file at a time, so a consumer (the
streaming safetensors writer, or `assemble` for an in-memory model) never needs the whole model
from every rank at once.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import torch

from marjara.errors import MarjaraError


class Piece(NamedTuple):
    name: str
    offset: int  # index of the first element within the flattened tensor
    values: torch.Tensor  # 1-D


def whole(name: str, tensor: torch.Tensor) -> Piece:
    return Piece(name, 0, tensor.reshape(-1))


class Coverage:
    """Records which elements of each tensor were written; `check` names what is missing or doubled."""

    def __init__(self, shapes: dict[str, torch.Size], source: str) -> None:
        self.numels = {name: shape.numel() for name, shape in shapes.items()}
        self.spans: dict[str, list[tuple[int, int]]] = {name: [] for name in shapes}
        self.source = source

    def add(self, piece: Piece) -> None:
        numel = self.numels.get(piece.name)
        if numel is None:
            raise MarjaraError(
                f"{self.source} holds a tensor {piece.name!r} that the model config does not describe; "
                "the checkpoint and its marjara.json disagree"
            )
        end = piece.offset + piece.values.numel()
        if piece.offset < 0 or end > numel:
            raise MarjaraError(
                f"{self.source}: a piece of {piece.name!r} covers elements {piece.offset}..{end} "
                f"of a tensor of {numel}; the checkpoint files do not fit together"
            )
        self.spans[piece.name].append((piece.offset, end))

    def check(self) -> None:
        for name, spans in self.spans.items():
            covered = 0
            for start, end in sorted(spans):
                if start != covered:
                    what = "is missing" if start > covered else "appears twice"
                    raise MarjaraError(
                        f"{self.source} is incomplete: part of {name!r} {what} (elements {min(start, covered)}.."
                        f"{max(start, covered)}); a rank's file is probably missing or from another run"
                    )
                covered = end
            if covered != self.numels[name]:
                raise MarjaraError(
                    f"{self.source} is incomplete: {name!r} has {covered} of {self.numels[name]} elements; "
                    "a rank's file is probably missing or from another run"
                )


def assemble(into: dict[str, torch.Tensor], pieces: Iterable[Piece], source: str) -> None:
    """Copy pieces into existing tensors (a model's own), so no second copy of the model is made."""
    coverage = Coverage({name: tensor.shape for name, tensor in into.items()}, source)
    out = {name: tensor.detach() for name, tensor in into.items()}
    for piece in pieces:
        coverage.add(piece)
        flat = out[piece.name].view(-1)
        flat[piece.offset: piece.offset + piece.values.numel()] = piece.values
    coverage.check()


def slice_across(chunks: list[torch.Tensor], start: int, length: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Elements start..start+length of the concatenation of 1-D `chunks`, as (position within the
    slice, view) parts, without concatenating."""
    position, base = 0, 0
    for chunk in chunks:
        lo, hi = max(start, base), min(start + length, base + chunk.numel())
        if lo < hi:
            yield lo - start, chunk[lo - base: hi - base]
            position += hi - lo
        base += chunk.numel()
    if position != length:
        raise MarjaraError(f"a flat partition ends after {base} elements but element {start + length} was expected")
