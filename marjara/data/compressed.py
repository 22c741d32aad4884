"""`.jsonl.gz` and `.jsonl.zst` inputs (Dolma, RedPajama): one JSON document per line, compressed.

A compressed file cannot be cut at byte offsets, so the main process decompresses it as a stream
(gzip from the standard library, zstd through the `zstandard` package of the `data` extra) and
hands out blocks of about CHUNK_BYTES of whole lines, with their first line number, to the
tokenising workers. Parsing is the same as for `.jsonl`, so the tokens are byte-identical to the
same lines given uncompressed. Multi-member gzip and multi-frame zstd files are read to the end.

A truncated or corrupt archive stops the run with one line naming the file: gzip reports a
missing end-of-stream marker itself; for zstd a frame that has begun but not ended when the file
does is caught here (zstandard's stream reader would return the partial data without a word).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from marjara.data import documents
from marjara.data.documents import InputError, jsonl_texts
from marjara.data.extras import require

_READ_BLOCK = 1 << 16


@dataclass(frozen=True)
class LinesBlock:
    """Whole decompressed lines of a compressed .jsonl, starting at line `first_line` (1-based)."""

    path: str
    data: bytes
    first_line: int
    offset: int  # of data's first byte in the decompressed stream
    nbytes: int  # compressed bytes consumed for it (for the progress bar)
    text_field: str = "text"
    last: bool = False
    whole_documents = True

    def texts(self) -> list[str]:
        return jsonl_texts(self.data, self.path, self.text_field, self.offset, self.first_line)


def plan_blocks(path: Path, text_field: str = "text", chunk_bytes: int | None = None) -> Iterator[LinesBlock]:
    """Blocks of about chunk_bytes (default documents.CHUNK_BYTES) decompressed bytes, cut after a newline."""
    chunk_bytes = chunk_bytes or documents.CHUNK_BYTES
    size = path.stat().st_size
    line, offset, reported = 1, 0, 0
    pending = b""
    with open(path, "rb") as raw:
        for piece in _decompressed(raw, str(path)):
            pending += piece
            # Cut after the first newline past chunk_bytes; a longer line waits for its end.
            while len(pending) >= chunk_bytes and (cut := pending.find(b"\n", chunk_bytes - 1) + 1):
                block, pending = pending[:cut], pending[cut:]
                consumed = min(raw.tell(), size) - reported
                reported += consumed
                yield LinesBlock(str(path), block, line, offset, consumed, text_field)
                line += block.count(b"\n")
                offset += len(block)
    yield LinesBlock(str(path), pending, line, offset, size - reported, text_field, last=True)


def _decompressed(raw: BinaryIO, path: str) -> Iterator[bytes]:
    kind = "gzip" if path.endswith(".gz") else "zstd"
    try:
        yield from (_gzip_pieces(raw) if kind == "gzip" else _zstd_pieces(raw))
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise InputError(path, None, f"the {kind} archive is truncated or corrupt ({exc}); download or copy it again",
                         where="") from None


def _gzip_pieces(raw: BinaryIO) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=raw) as f:
        while piece := f.read(_READ_BLOCK):
            yield piece


def _zstd_pieces(raw: BinaryIO) -> Iterator[bytes]:
    zstandard = require("zstandard")
    context = zstandard.ZstdDecompressor()
    frame = context.decompressobj()
    inside_frame = False
    while block := raw.read(_READ_BLOCK):
        while block:
            inside_frame = True
            try:
                piece = frame.decompress(block)
            except zstandard.ZstdError as exc:
                raise OSError(str(exc)) from None
            if piece:
                yield piece
            if frame.eof:  # the frame ended within this block: the rest starts the next frame
                block, frame, inside_frame = frame.unused_data, context.decompressobj(), False
            else:
                block = b""
    if inside_frame:
        raise EOFError("the file ends inside a zstd frame")
