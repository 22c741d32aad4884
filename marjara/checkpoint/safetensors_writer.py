"""Write a .safetensors file piece by piece, so a model never has to be whole in memory.

The header (every tensor's dtype, shape and byte range) is known up front; the file is laid out
and sized first, then each piece is converted to the file's dtype and written at its place. The
result is an ordinary safetensors file (little-endian header length, JSON header padded to 8
bytes, contiguous tensor data) that `safetensors.safe_open` reads.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from marjara.checkpoint.pieces import Coverage, Piece
from marjara.dtypes import SAFETENSORS_CODES

def _layout(shapes: dict[str, torch.Size], dtype: torch.dtype, metadata: dict[str, str] | None):
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets, position = {}, 0
    for name, shape in shapes.items():
        size = shape.numel() * itemsize
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, offsets, position


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while data:
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written


def write_pieces(path: str | os.PathLike, shapes: dict[str, torch.Size], pieces: Iterable[Piece],
                 dtype: torch.dtype, source: str, metadata: dict[str, str] | None = None) -> None:
    """Write `shapes` (name -> shape, in file order) as `dtype`, filled from `pieces`.

    Raises MarjaraError unless the pieces cover every element of every tensor exactly once.
    """
    write_files({path: shapes}, pieces, dtype, source, metadata)


def write_files(files: dict[str | os.PathLike, dict[str, torch.Size]], pieces: Iterable[Piece],
                dtype: torch.dtype, source: str, metadata: dict[str, str] | None = None) -> None:
    """Several safetensors files (the shards of one model) filled from one stream of pieces, each
    piece written into whichever file holds its tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    coverage = Coverage({name: shape for shapes in files.values() for name, shape in shapes.items()}, source)
    where: dict[str, tuple[int, int]] = {}  # tensor name -> (fd, byte position of its data)
    fds: list[int] = []
    try:
        for path, shapes in files.items():
            header, offsets, data_size = _layout(shapes, dtype, metadata)
            fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.ftruncate(fd, len(header) + data_size)
            _pwrite_all(fd, memoryview(header), 0)
            where.update({name: (fd, len(header) + offset) for name, offset in offsets.items()})
        for piece in pieces:
            coverage.add(piece)
            fd, base = where[piece.name]
            values = piece.values.detach().to(dtype=dtype, device="cpu").contiguous().view(torch.uint8)
            _pwrite_all(fd, memoryview(values.numpy()), base + piece.offset * itemsize)
            del values
        coverage.check()
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
