"""On-disk token files: raw little-endian `.bin` arrays and the `meta.json` that describes them.

A prepared folder holds `train.bin`, `val.bin` and `meta.json`. A lone `X.bin` may have a sidecar
`X.meta.json`. A `.bin` with no meta at all is nanoGPT's format: uint16 gpt2 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marjara.errors import MarjaraError
from marjara.fileio import read_json_object

FORMAT_VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
RAW_BIN_TOKENIZER = "gpt2"
RAW_BIN_DTYPE = "uint16"
# A file whose meta records no max_token_id (nanoGPT's raw files, older metas) is checked at open on
# SAMPLE_BLOCKS evenly spaced blocks of SAMPLE_BLOCK tokens (the whole file when it is that small):
# enough to catch a wrong dtype or tokenizer, at a cost that does not grow with the file.
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 1 << 16


@dataclass(frozen=True)
class TokenFileInfo:
    """What a .bin holds: dtype, tokenizer, that tokenizer's vocab size, and where this came from."""

    dtype: str
    tokenizer: str
    vocab_size: int | None  # None: not recorded (raw nanoGPT file); the tokenizer's own is used
    meta_path: Path | None
    meta: dict | None


def meta_path_for(bin_path: Path) -> Path | None:
    """The meta file describing `bin_path`: its `X.meta.json` sidecar, else the folder's meta.json."""
    for candidate in (bin_path.with_name(bin_path.stem + ".meta.json"), bin_path.with_name("meta.json")):
        if candidate.is_file():
            return candidate
    return None


def read_token_meta(path: Path) -> dict:
    """Load and validate a meta.json; every problem is one MarjaraError line naming the file."""
    meta = read_json_object(path, "re-run python -m marjara.prepare")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MarjaraError(f"{path}: format_version {version!r} is newer than this marjara reads ({FORMAT_VERSION})")
    for key, kind in (("dtype", str), ("tokenizer", str), ("vocab_size", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise MarjaraError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if meta["dtype"] not in DTYPES:
        raise MarjaraError(f"{path}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    if meta["vocab_size"] <= 0 or meta["vocab_size"] > np.iinfo(DTYPES[meta["dtype"]]).max + 1:
        raise MarjaraError(f"{path}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}")
    return meta


def token_file_info(bin_path: Path) -> TokenFileInfo:
    meta_path = meta_path_for(bin_path)
    if meta_path is None:
        return TokenFileInfo(RAW_BIN_DTYPE, RAW_BIN_TOKENIZER, None, None, None)
    meta = read_token_meta(meta_path)
    return TokenFileInfo(meta["dtype"], meta["tokenizer"], meta["vocab_size"], meta_path, meta)


def expected_token_count(info: TokenFileInfo, bin_path: Path) -> int | None:
    """The token count the meta records for this file (train_tokens/val_tokens/tokens), if any."""
    if info.meta is None:
        return None
    if info.meta_path.name == "meta.json":
        key = {"train.bin": "train_tokens", "val.bin": "val_tokens"}.get(bin_path.name)
    else:  # an X.meta.json sidecar counts X.bin's tokens only (val.bin may borrow its dtype and tokenizer)
        key = "tokens" if info.meta_path.name == bin_path.stem + ".meta.json" else None
    value = info.meta.get(key) if key else None
    return value if isinstance(value, int) else None


def recorded_max_token_id(info: TokenFileInfo, bin_path: Path) -> int | None:
    """The largest token id the meta records for this file (written by python -m marjara.prepare)."""
    if info.meta is None:
        return None
    if info.meta_path.name == "meta.json":  # a prepared folder's: it describes its train.bin and val.bin
        own = bin_path.name in ("train.bin", "val.bin")
    else:
        own = info.meta_path.name == bin_path.stem + ".meta.json"
    value = info.meta.get("max_token_id") if own else None
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MarjaraError(f"{info.meta_path}: max_token_id {value!r} is not a non-negative integer; "
                           "re-run python -m marjara.prepare")
    return value


def open_token_file(bin_path: Path, dtype: str, vocab_size: int, expected_tokens: int | None = None,
                    max_token_id: int | None = None) -> np.memmap:
    """Memory-map a .bin after checking its size and its token ids against vocab_size.

    The ids are checked without reading the file when the meta records max_token_id (prepare
    does), else on a sample of blocks; every batch is checked again as it is read (datasets.py).
    """
    if not bin_path.is_file():
        raise MarjaraError(f"{bin_path}: no such file")
    size = bin_path.stat().st_size
    itemsize = DTYPES[dtype].itemsize
    if size == 0:
        raise MarjaraError(f"{bin_path}: the file is empty; re-run python -m marjara.prepare")
    if size % itemsize:
        raise MarjaraError(
            f"{bin_path}: size {size} bytes is not a multiple of {itemsize} ({dtype}); "
            "the file is truncated or its dtype is not the one recorded"
        )
    n_tokens = size // itemsize
    if expected_tokens is not None and expected_tokens != n_tokens:
        raise MarjaraError(
            f"{bin_path}: holds {n_tokens} tokens but its meta records {expected_tokens}; "
            "the file was truncated or replaced, re-run python -m marjara.prepare"
        )
    if max_token_id is not None and max_token_id >= vocab_size:
        raise MarjaraError(
            f"{bin_path}: its meta records token id {max_token_id}, not below the tokenizer's vocab size "
            f"{vocab_size}; the file was made with another tokenizer"
        )
    tokens = np.memmap(bin_path, dtype=DTYPES[dtype], mode="r")
    if max_token_id is None:
        check_token_sample(tokens, vocab_size, str(bin_path))
    return tokens


def check_token_sample(tokens: np.ndarray, vocab_size: int, name: str) -> None:
    """MarjaraError at the first id >= vocab_size in SAMPLE_BLOCKS evenly spaced blocks."""
    n = len(tokens)
    if n <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
        starts = range(0, n, SAMPLE_BLOCK)
    else:
        starts = (i * (n - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS))
    for start in starts:
        block = np.asarray(tokens[start : start + SAMPLE_BLOCK])
        if int(block.max()) >= vocab_size:
            offset = start + int(np.argmax(block >= vocab_size))
            raise MarjaraError(
                f"{name}: token id {int(tokens[offset])} at position {offset} is not below the tokenizer's "
                f"vocab size {vocab_size}; the file was made with another tokenizer or dtype"
            )


def build_meta(*, dtype: str, tokenizer: str, vocab_size: int, eot_id: int, train_tokens: int,
               val_tokens: int, documents: int, val_fraction: float, max_token_id: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "documents": documents,
        "val_fraction": val_fraction,
        "max_token_id": max_token_id,  # of train.bin and val.bin: opening checks ids without a scan
    }
