"""prepare's core: tokenise documents into train.bin, val.bin and meta.json (the CLI, with the
accepted inputs, is marjara/prepare.py).

End-of-text follows every document; the last val_fraction of the token stream becomes val.bin.
Inputs must be valid UTF-8 (see marjara.data.documents). Files are cut into ~1 MiB chunks
(parquet: groups of row groups, compressed files: blocks of decompressed lines) tokenised by a
pool of worker processes with a bounded number of chunks in flight, so memory stays flat whatever
the corpus size, and the output is identical for any number of workers. Everything is written to
temporary files renamed at the end: an interrupted or failed run leaves no file that looks
complete. meta.json records the largest token id, so opening the data later checks ids without
reading the files.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from marjara.data.datasets import tokenize_documents, train_token_count
from marjara.data.compressed import plan_blocks
from marjara.data.documents import Chunk, InputError, collect_inputs, input_suffix, plan_chunks
from marjara.data.extras import require
from marjara.data.formats import DTYPES, build_meta
from marjara.errors import MarjaraError
from marjara.fileio import atomic_dir, atomic_path, write_json_atomic
from marjara.data.parquet import check_parquet_input, plan_row_groups
from marjara.data.tokenizer import get_tokenizer, token_dtype_name

_COPY_BLOCK = 1 << 24
# Inputs whose reader needs an optional package (checked before any work starts).
_NEEDS = {".parquet": "pyarrow.parquet", ".jsonl.zst": "zstandard"}


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(inputs: list[str], out: str | os.PathLike, tokenizer: str = "gpt2", val_fraction: float = 0.1,
            workers: int | None = None, progress: bool = True, text_field: str = "text") -> dict:
    """Write out/{train.bin,val.bin,meta.json} from the inputs; returns the meta.

    workers: tokenising processes (default: every core this process may use); progress: show a
    tqdm bar on stderr when it is a terminal; text_field: the JSON field / parquet column holding
    each document.
    """
    if not 0.0 < val_fraction < 1.0:
        raise MarjaraError(f"--val_fraction must be between 0 and 1, exclusive (got {val_fraction})")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise MarjaraError(f"--workers must be >= 1 (got {workers})")
    if not text_field:
        raise MarjaraError("--text_field must name a field (got an empty string)")
    files = collect_inputs(inputs)
    for module in sorted({_NEEDS[input_suffix(f)] for f in files if input_suffix(f) in _NEEDS}):
        require(module)
    try:  # footers only: a wrong --text_field stops the run before any tokenising
        for path in files:
            if input_suffix(path) == ".parquet":
                check_parquet_input(path, text_field)
    except InputError as exc:
        raise exc.to_marjara_error() from None
    tok = get_tokenizer(tokenizer)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MarjaraError(f"--out {out} exists and is not a folder")
    write = functools.partial(_write_tokens, files, tok.name, token_dtype_name(tok.vocab_size), val_fraction,
                              workers, progress, text_field)
    if not out.exists():
        with atomic_dir(out) as stage:
            meta = write(stage / "train.bin", stage / "val.bin")
            write_json_atomic(stage / "meta.json", meta)
        return meta
    with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:
        meta = write(train_tmp, val_tmp)
        # Old meta goes before the new .bin files land: never new tokens described by an old meta.
        (out / "meta.json").unlink(missing_ok=True)
    write_json_atomic(out / "meta.json", meta)
    return meta


def plan_input(path: Path, text_field: str) -> Iterator:
    """The chunks of one input file, for its kind (see the module docstring)."""
    suffix = input_suffix(path)
    if suffix == ".parquet":
        return plan_row_groups(path, text_field)
    if suffix in (".jsonl.gz", ".jsonl.zst"):
        return plan_blocks(path, text_field)
    return plan_chunks(path, text_field=text_field)


def _write_tokens(files: list[Path], tokenizer: str, dtype: str, val_fraction: float, workers: int, progress: bool,
                  text_field: str, train_path: Path, val_path: Path) -> dict:
    """Tokenise every file into train_path, move the last val_fraction into val_path; the meta."""
    n_tokens = documents = max_token_id = 0
    chunks = (chunk for path in files for chunk in plan_input(path, text_field))
    total_bytes = sum(path.stat().st_size for path in files)
    try:
        with open(train_path, "wb") as f:
            for _, (tokens, docs) in _tokenize_all(chunks, tokenizer, dtype, workers, total_bytes, progress):
                f.write(tokens.astype(DTYPES[dtype], copy=False).tobytes())  # little-endian on any host
                n_tokens += len(tokens)
                documents += docs
                if len(tokens):
                    max_token_id = max(max_token_id, int(tokens.max()))
    except InputError as exc:
        raise exc.to_marjara_error() from None
    if documents == 0:
        raise MarjaraError(f'the inputs hold no text (every document\'s "{text_field}" is empty)')
    n_train = train_token_count(n_tokens, val_fraction)
    _move_tail(train_path, val_path, n_train * DTYPES[dtype].itemsize)
    tok = get_tokenizer(tokenizer)
    return build_meta(dtype=dtype, tokenizer=tok.name, vocab_size=tok.vocab_size, eot_id=tok.eot_id,
                      train_tokens=n_train, val_tokens=n_tokens - n_train, documents=documents,
                      val_fraction=val_fraction, max_token_id=max_token_id)


def tokenize_chunk(chunk: Chunk, tokenizer: str, dtype: str) -> tuple[np.ndarray, int]:
    """Tokens of one chunk (of any kind) and the number of documents it completes (runs in workers)."""
    tok = get_tokenizer(tokenizer)
    texts = chunk.texts()
    if chunk.whole_documents:
        texts = [text for text in texts if text]
        return tokenize_documents(texts, tok), len(texts)
    ids = tok.encode(texts[0])
    if chunk.last:
        ids.append(tok.eot_id)
    return np.array(ids, dtype=dtype), int(chunk.last)


def _tokenize_all(chunks: Iterable[Chunk], tokenizer: str, dtype: str, workers: int, total_bytes: int,
                  progress: bool) -> Iterator[tuple[Chunk, tuple[np.ndarray, int]]]:
    """(chunk, result) in input order, with a progress bar over input bytes."""
    # The pool forks before tqdm may start its monitor thread (forking a threaded process is unsafe).
    pool = multiprocessing.Pool(workers, initializer=_ignore_sigint) if workers > 1 else None
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare",
                  disable=None if progress else True) as bar:
            for chunk, result in _in_order(pool, workers, chunks, tokenizer, dtype):
                bar.update(chunk.nbytes)
                yield chunk, result
    finally:
        if pool is not None:
            pool.terminate()


def _ignore_sigint() -> None:
    """Ctrl-C is the parent's to handle (it terminates the pool); workers print no tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _in_order(pool, workers: int, chunks: Iterable[Chunk], tokenizer: str, dtype: str):
    if pool is None:
        for chunk in chunks:
            yield chunk, tokenize_chunk(chunk, tokenizer, dtype)
        return
    pending: deque = deque()  # at most 2 chunks per worker in flight: memory stays bounded
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(tokenize_chunk, (chunk, tokenizer, dtype))))
        if len(pending) >= 2 * workers:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


def _move_tail(train_path: Path, val_path: Path, cut: int) -> None:
    """Move bytes [cut:] of train_path into val_path (block by block), then truncate train_path."""
    with open(train_path, "r+b") as src, open(val_path, "wb") as dst:
        src.seek(cut)
        while block := src.read(_COPY_BLOCK):
            dst.write(block)
        src.truncate(cut)
