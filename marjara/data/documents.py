"""Raw text inputs: finding them, cutting them into chunks for parallel work, reading documents.

A `.txt` file is one document. A `.jsonl` file holds one document per line, in its text field
("text" unless --text_field names another; blank lines are skipped; a line that is not a JSON
object with a string in that field is an error). Compressed `.jsonl.gz`/`.jsonl.zst` files are
read by marjara.data.compressed, `.parquet` files by marjara.data.parquet.

Invalid UTF-8 policy: input must be valid UTF-8 text. A file that is not, or that holds a NUL
byte (the mark of binary data), stops the run with one line naming the file, the line and the
byte offset, and nothing is written; re-encode it (e.g. `iconv -f latin1 -t utf-8`) or drop it.
Silently replacing bytes would put U+FFFD tokens into the training stream that no one asked for;
failing early costs one re-run.

Big `.txt` files are cut at points where the tokenizer's pre-tokenisation splits anyway (after a
newline followed by a printable ASCII character, else before a space between an ASCII character
and a letter), so chunks tokenise exactly as the whole file would. Only a file with no such point
in several MiB (e.g. unbroken CJK text) is cut at a character boundary instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from marjara.errors import MarjaraError

INPUT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
CHUNK_BYTES = 1 << 20
_SCAN_BLOCK = 1 << 16
_MAX_TXT_SCAN = 1 << 22
_TXT_SPLIT = re.compile(rb"\n(?=[!-~])|(?<=[!-~])(?= [A-Za-z])")


class InputError(Exception):
    """Bad input, raised in worker processes (picklable: plain args). `where` names the place
    ("line 3", "row 12", "" for the whole file); when it is None, the line of byte `offset` is
    looked up (only when the error is shown)."""

    def __init__(self, path: str, offset: int | None, reason: str, where: str | None = None) -> None:
        super().__init__(path, offset, reason, where)
        self.path, self.offset, self.reason, self.where = path, offset, reason, where

    def to_marjara_error(self) -> MarjaraError:
        where = self.where if self.where is not None else f"line {line_number(Path(self.path), self.offset)}"
        return MarjaraError(f"{self.path}{', ' + where if where else ''}: {self.reason}")


def input_suffix(path: Path) -> str | None:
    """The input kind of a file name (".jsonl.gz" for "a.jsonl.gz"), or None if prepare cannot read it."""
    return next((suffix for suffix in INPUT_SUFFIXES if path.name.endswith(suffix)), None)


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, stop) of an uncompressed input file; `last` when it ends the file.

    Every kind of chunk has `texts()` (run in a worker), `whole_documents` (False: a piece of one
    .txt document), `last` and `nbytes` (input bytes, for the progress bar)."""

    path: str
    start: int
    stop: int
    last: bool
    text_field: str = "text"

    @property
    def whole_documents(self) -> bool:
        return self.path.endswith(".jsonl")

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    def texts(self) -> list[str]:
        return chunk_documents(self)


def collect_inputs(paths: list[str]) -> list[Path]:
    """The input files named (folders expand to their .txt/.jsonl files, sorted), all checked."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise MarjaraError(f"input {raw} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if input_suffix(p) and p.is_file())
            if not found:
                raise MarjaraError(f"input folder {raw} holds no {', '.join(INPUT_SUFFIXES)} files")
            files.extend(found)
        elif input_suffix(path):
            files.append(path)
        else:
            raise MarjaraError(
                f"input {raw}: cannot read {''.join(path.suffixes[-2:]) or 'a file without extension'}; "
                f"prepare reads {', '.join(INPUT_SUFFIXES)} files and folders of them"
            )
    for path in files:
        if path.stat().st_size == 0:
            raise MarjaraError(f"input {path} is empty; remove it or give it text")
    return files


def plan_chunks(path: Path, chunk_bytes: int | None = None, text_field: str = "text") -> Iterator[Chunk]:
    """Consecutive chunks of about chunk_bytes (default CHUNK_BYTES) covering a .txt or .jsonl file,
    each ending at a safe cut."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    size = path.stat().st_size
    jsonl = path.suffix == ".jsonl"
    with open(path, "rb") as f:
        start = 0
        while start < size:
            stop = _next_cut(f, start + chunk_bytes, size, jsonl)
            yield Chunk(str(path), start, stop, stop == size, text_field)
            start = stop


def _next_cut(f: BinaryIO, target: int, size: int, jsonl: bool) -> int:
    if target >= size:
        return size
    f.seek(target - 1)  # one byte back: the lookbehind of the split pattern, or a newline
    buf = b""
    while len(buf) < _MAX_TXT_SCAN or jsonl:
        block = f.read(_SCAN_BLOCK)
        if not block:
            return size
        searched_to = max(0, len(buf) - 1)  # re-check the last byte: it may now have its lookahead
        buf += block
        if jsonl:
            newline = buf.find(b"\n", searched_to)
            if newline >= 0:
                return target - 1 + newline + 1
        else:
            match = _TXT_SPLIT.search(buf, searched_to)
            if match and match.end() < len(buf):
                return target - 1 + match.end()
    # no safe cut nearby: cut at the next UTF-8 character boundary (skip continuation bytes)
    f.seek(target)
    cut = target
    while cut < size and 0x80 <= f.read(1)[0] < 0xC0:
        cut += 1
    return cut


def read_chunk(chunk: Chunk) -> bytes:
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        return f.read(chunk.stop - chunk.start)


def chunk_documents(chunk: Chunk) -> list[str]:
    """The texts in a chunk: a piece of one .txt document, or the documents of whole .jsonl lines."""
    data = read_chunk(chunk)
    if not chunk.whole_documents:
        return [decode_utf8(data, chunk.path, chunk.start)]
    return jsonl_texts(data, chunk.path, chunk.text_field, chunk.start)


def jsonl_texts(data: bytes, path: str, text_field: str, offset: int, first_line: int | None = None) -> list[str]:
    """The text field of each non-blank line of `data` (whole lines starting at byte `offset` of the
    file, or of the decompressed stream; with first_line given, errors name lines directly)."""
    texts = []
    for i, line in enumerate(data.split(b"\n")):
        if line.strip():
            where = None if first_line is None else f"line {first_line + i}"
            texts.append(_jsonl_text(line, path, text_field, offset, where))
        offset += len(line) + 1
    return texts


def _jsonl_text(line: bytes, path: str, text_field: str, offset: int, where: str | None) -> str:
    text = decode_utf8(line, path, offset, where)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, offset, f"not valid JSON ({exc.msg} at column {exc.colno})", where) from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        hint = ""
        if isinstance(record, dict) and text_field not in record:
            hint = f" (it has {', '.join(record) or 'no fields'}; choose the text field with --text_field)"
        raise InputError(path, offset, f'not a JSON object with a string field "{text_field}"{hint}', where)
    return record[text_field]


def decode_utf8(data: bytes, path: str, offset: int, where: str | None = None) -> str:
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text holds NUL: a binary file given as text
        at = offset + nul
        raise InputError(
            path, at, f"a NUL byte at byte {at}: this is binary data, not text; give text files "
            "(a .bin of tokens trains directly with --data)", where,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
        raise InputError(
            path, at, f"invalid UTF-8 at byte {at} ({exc.reason}); re-encode the file as UTF-8 (e.g. iconv -t utf-8)",
            where,
        ) from None


def read_text_file(path: Path) -> str:
    """A whole .txt file as str, strictly UTF-8; MarjaraError if missing, empty or not UTF-8."""
    if not path.is_file():
        raise MarjaraError(f"{path}: no such file")
    data = path.read_bytes()
    if not data:
        raise MarjaraError(f"{path}: the file is empty")
    try:
        return decode_utf8(data, str(path), 0)
    except InputError as exc:
        raise exc.to_marjara_error() from None


def line_number(path: Path, offset: int) -> int:
    """1-based line of byte `offset` (read in blocks: only used to word an error)."""
    newlines = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
    return newlines + 1
