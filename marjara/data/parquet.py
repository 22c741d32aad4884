""".parquet inputs (FineWeb, The Stack, most Hugging Face datasets): one document per row.

The document is the string column --text_field (default "text"); other columns are never read.
The main process reads only each file's footer and plans chunks of about CHUNK_BYTES uncompressed:
consecutive small row groups together, a big one cut into row ranges (so the workers share it
evenly). A worker reads its chunk's row groups of that one column and keeps the last one it read,
so the ranges of a big row group cost each worker at most one read of it, and memory is bounded
by a row group or two per worker whatever the file size. Rows are documents in file order,
empty strings skipped as in `.jsonl`, so the tokens are byte-identical to the same texts given as
`.jsonl`. A missing column, a column that is not a string, or a null value stops the run with one
line naming the file (and the row). Needs `pyarrow`, from the `data` extra.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from marjara.data import documents
from marjara.data.documents import InputError
from marjara.data.extras import require


@dataclass(frozen=True)
class RowGroups:
    """Row groups [first, stop) of a parquet file, whose first row is file row `first_row` (0-based);
    with `rows` = (a, b), only rows [a, b) of the single row group `first`."""

    path: str
    first: int
    stop: int
    first_row: int
    nbytes: int  # file bytes, for the progress bar
    text_field: str = "text"
    last: bool = False
    rows: tuple[int, int] | None = None
    whole_documents = True

    def texts(self) -> list[str]:
        column = _read(os.getpid(), self.path, self.first, self.stop, self.text_field)
        if self.rows is not None:
            column = column.slice(self.rows[0], self.rows[1] - self.rows[0])
        if column.null_count:
            pc = require("pyarrow.compute")
            index = pc.index(pc.is_null(column), True).as_py()
            raise InputError(self.path, None, f"field {self.text_field!r} is null; give every row a string "
                             "(or drop the row)", where=f"row {self.first_row + index + 1}")
        return column.to_pylist()


@functools.lru_cache(maxsize=1)
def _read(pid: int, path: str, first: int, stop: int, text_field: str):
    """One column of row groups [first, stop); the last one read is kept for the next row range."""
    return _open(pid, path).read_row_groups(range(first, stop), columns=[text_field], use_threads=False).column(0)


@functools.lru_cache(maxsize=8)
def _open(pid: int, path: str):
    """The file's reader, kept per process (a worker reads several chunks of one file in a row;
    the pid keeps a forked worker from using its parent's open file)."""
    pq = require("pyarrow.parquet")
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow.ArrowInvalid, OSError: not a parquet file, or a damaged one
        raise InputError(path, None, f"not a readable parquet file ({exc}); download or copy it again",
                         where="") from None


def plan_row_groups(path: Path, text_field: str = "text", chunk_bytes: int | None = None) -> Iterator[RowGroups]:
    """Chunks of about chunk_bytes (default documents.CHUNK_BYTES) uncompressed, in file order."""
    chunk_bytes = chunk_bytes or documents.CHUNK_BYTES
    metadata = check_parquet_input(path, text_field).metadata
    size, reported = path.stat().st_size, 0
    n_groups = metadata.num_row_groups
    first, first_row, row = 0, 0, 0  # the pending (not yet yielded) small row groups start at `first`
    pending_bytes = 0

    def progress(nbytes: int, last: bool) -> int:
        nonlocal reported
        nbytes = size - reported if last else min(size - reported, nbytes)
        reported += nbytes
        return nbytes

    for i in range(n_groups):
        group = metadata.row_group(i)
        last = i == n_groups - 1
        if group.total_byte_size >= 2 * chunk_bytes:  # big: flush what is pending, then cut it into row ranges
            if first < i:
                yield RowGroups(str(path), first, i, first_row, progress(_compressed_size_of(metadata, first, i), False),
                                text_field)
            pieces = min(group.num_rows, group.total_byte_size // chunk_bytes)
            cuts = [group.num_rows * k // pieces for k in range(pieces + 1)]
            for k in range(pieces):
                piece_last = last and k == pieces - 1
                yield RowGroups(str(path), i, i + 1, row + cuts[k], progress(_compressed_size(group) // pieces,
                                                                             piece_last),
                                text_field, piece_last, (cuts[k], cuts[k + 1]))
            first, first_row, pending_bytes = i + 1, row + group.num_rows, 0
        else:
            pending_bytes += group.total_byte_size
            if pending_bytes >= chunk_bytes or last:
                yield RowGroups(str(path), first, i + 1, first_row, progress(_compressed_size_of(metadata, first, i + 1),
                                                                              last), text_field, last)
                first, first_row, pending_bytes = i + 1, row + group.num_rows, 0
        row += group.num_rows


def _compressed_size_of(metadata, first: int, stop: int) -> int:
    return sum(_compressed_size(metadata.row_group(i)) for i in range(first, stop))


def _compressed_size(group) -> int:
    return sum(group.column(c).total_compressed_size for c in range(group.num_columns))


def check_parquet_input(path: Path, text_field: str):
    """The file's reader, after checking (from its footer alone) that it has a string column text_field."""
    parquet_file = _open(os.getpid(), str(path))
    _check_text_column(parquet_file, str(path), text_field)
    return parquet_file


def _check_text_column(parquet_file, path: str, text_field: str) -> None:
    pa = require("pyarrow")
    schema = parquet_file.schema_arrow
    if text_field not in schema.names:
        raise InputError(path, None, f"has no field {text_field!r} (it has {', '.join(schema.names) or 'none'}); "
                         "choose the text field with --text_field", where="")
    kind = schema.field(text_field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise InputError(path, None, f"field {text_field!r} is {kind} in every row, not a string; "
                         "choose the text field with --text_field", where="")
