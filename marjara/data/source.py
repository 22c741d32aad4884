"""open_data: whatever `--data` names becomes train and validation datasets plus their tokenizer.

    path None          the built-in corpus (tokenizer "bytes" unless one is given), split 90/10
    X.txt              tokenised on the fly; first 90% of tokens train, last 10% validate
    X.bin              raw tokens via numpy.memmap; sibling val.bin validates when present, else
                       the last 10% of X.bin's windows (the split shares one boundary token)
    folder             prepared by `python -m marjara.prepare`: train.bin, val.bin, meta.json
                       (nanoGPT's folders without meta.json are read as gpt2 uint16)
    several / mix.json a weighted mixture of the above (mixture_spec.py): train is a Mixture,
                       val is None and val_sets holds each source's (name, weight, validation set)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marjara.data.corpus import DEFAULT_CORPUS_NAME, DEFAULT_CORPUS_TOKENIZER, default_corpus_documents
from marjara.data.datasets import MMapSliceDataset, TextDataset, TokenDataset, tokenize_documents
from marjara.data.documents import read_text_file
from marjara.data.mixture import Mixture
from marjara.data.mixture_spec import SourceSpec, parse_data_arg
from marjara.data.formats import expected_token_count, open_token_file, recorded_max_token_id, token_file_info
from marjara.errors import MarjaraError
from marjara.data.tokenizer import Tokenizer, check_tokenizer_name, get_tokenizer, token_dtype_name

DEFAULT_TOKENIZER = "gpt2"
VAL_FRACTION = 0.1


@dataclass
class DataSource:
    train: TokenDataset | Mixture
    val: TokenDataset | None
    tokenizer_name: str
    vocab_size: int  # the tokenizer's vocabulary (as recorded by the data when it records one)
    description: str
    meta: dict | None = None
    _tokenizer: Tokenizer | None = field(default=None, repr=False)
    val_sets: list[tuple[str, float, TokenDataset]] = field(default_factory=list)

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.train, Mixture)

    def validation_sets(self) -> list[tuple[str, float, TokenDataset]]:
        """(name, weight, dataset) per source; one unnamed set of weight 1 for a single source."""
        return self.val_sets or [("", 1.0, self.val)]

    @property
    def tokenizer(self) -> Tokenizer:
        """Loaded on first use: training on prepared .bin files needs no tokenizer files."""
        if self._tokenizer is None:
            tok = get_tokenizer(self.tokenizer_name)
            if tok.vocab_size != self.vocab_size:
                raise MarjaraError(
                    f"{self.description} records vocab_size {self.vocab_size} for tokenizer {self.tokenizer_name!r}, "
                    f"which has {tok.vocab_size}; re-run python -m marjara.prepare"
                )
            self._tokenizer = tok
        return self._tokenizer

    def check_model_vocab(self, model_vocab_size: int) -> None:
        if self.vocab_size > model_vocab_size:
            padded = -(-self.vocab_size // 64) * 64
            raise MarjaraError(
                f"{self.description} uses tokenizer {self.tokenizer_name!r} with {self.vocab_size} tokens but the "
                f"model's vocab_size is {model_vocab_size}; use vocab_size >= {self.vocab_size} (e.g. {padded})"
            )


def open_data(path: str | list[str] | list[SourceSpec] | None, seq_len: int, tokenizer: str | None = None) -> DataSource:
    """`path` as --data gives it: None, one path, or a mixture (WEIGHT PATH strings, a mix.json, SourceSpecs)."""
    if seq_len < 1:
        raise MarjaraError(f"seq_len must be >= 1 (got {seq_len})")
    path = parse_data_arg(path)
    if isinstance(path, list):
        return open_mixture(path, seq_len, tokenizer)
    if path is None:
        return _open_documents(default_corpus_documents(), DEFAULT_CORPUS_NAME, seq_len,
                               tokenizer or DEFAULT_CORPUS_TOKENIZER)
    p = Path(path)
    if not p.exists():
        raise MarjaraError(f"data path {path} does not exist; give a .txt, a .bin or a folder made by python -m marjara.prepare")
    if p.is_dir():
        train_bin = p / "train.bin"
        if not train_bin.is_file():
            raise MarjaraError(f"data folder {path} has no train.bin; make it with python -m marjara.prepare INPUT --out {path}")
        return _open_bin(train_bin, seq_len, tokenizer)
    if p.suffix == ".txt":
        return _open_documents([read_text_file(p)], str(p), seq_len, tokenizer or DEFAULT_TOKENIZER)
    if p.suffix == ".bin":
        return _open_bin(p, seq_len, tokenizer)
    raise MarjaraError(
        f"data path {path}: cannot train on {p.suffix or 'a file without extension'} directly; give a .txt, a .bin "
        "or a folder (python -m marjara.prepare turns .txt/.jsonl into one)"
    )


def _open_documents(documents: list[str], name: str, seq_len: int, tokenizer_name: str) -> DataSource:
    tok = get_tokenizer(tokenizer_name)
    tokens = tokenize_documents(documents, tok)
    train, val = TextDataset.train_val(tokens, seq_len, name, VAL_FRACTION)
    return DataSource(train, val, tok.name, tok.vocab_size, name, None, tok)


def _open_bin(bin_path: Path, seq_len: int, tokenizer: str | None) -> DataSource:
    info = token_file_info(bin_path)
    described = str(info.meta_path) if info.meta_path else f"{bin_path} (raw, no meta: read as gpt2 uint16)"
    if info.meta is not None and tokenizer is not None and tokenizer != info.tokenizer:
        raise MarjaraError(
            f"{info.meta_path} records tokenizer {info.tokenizer!r} but {tokenizer!r} was asked for; "
            "drop the tokenizer option or re-run python -m marjara.prepare with it"
        )
    tokenizer_name = tokenizer or info.tokenizer
    # Checked now, not when the end-of-run sample first needs the tokenizer (training reads ids only).
    check_tokenizer_name(tokenizer_name, f"{info.meta_path}: " if info.meta_path and not tokenizer else "")
    _check_promised_files(bin_path, info)
    tok = None
    vocab_size = info.vocab_size
    if vocab_size is None:  # raw nanoGPT-style file: only the tokenizer knows its vocabulary
        tok = get_tokenizer(tokenizer_name)
        vocab_size = tok.vocab_size
        if token_dtype_name(vocab_size) != info.dtype:
            raise MarjaraError(
                f"{bin_path} has no meta, so it is read as {info.dtype}, which cannot hold tokenizer "
                f"{tokenizer_name!r} ({vocab_size} tokens); write it with python -m marjara.prepare"
            )
    tokens = open_token_file(bin_path, info.dtype, vocab_size, expected_token_count(info, bin_path),
                             recorded_max_token_id(info, bin_path))

    val_path = bin_path.with_name("val.bin")
    if val_path.is_file() and val_path != bin_path:
        train = MMapSliceDataset(tokens, seq_len, str(bin_path), vocab_size=vocab_size)
        val = MMapSliceDataset(_open_val(val_path, info, tokenizer_name, vocab_size), seq_len, str(val_path),
                               vocab_size=vocab_size)
    else:
        train, val = _split_windows(tokens, seq_len, bin_path, vocab_size)
    return DataSource(train, val, tokenizer_name, vocab_size, described, info.meta, tok)


def _check_promised_files(bin_path: Path, info) -> None:
    """A prepared folder's meta.json counts the tokens of train.bin and val.bin: both must be there
    (without val.bin the run would silently validate on a slice of the training windows)."""
    if info.meta_path is None or info.meta_path.name != "meta.json":
        return
    for name, key in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")):
        promised = info.meta.get(key)
        if isinstance(promised, int) and promised > 0 and not (bin_path.parent / name).is_file():
            raise MarjaraError(
                f"{bin_path.parent / name} is missing, but {info.meta_path} records {promised} tokens for it; "
                f"restore it or re-run python -m marjara.prepare INPUT --out {bin_path.parent}"
            )


def _open_val(val_path: Path, train_info, tokenizer_name: str, vocab_size: int) -> np.memmap:
    """val.bin, described by its own meta when it has one, else by the training file's."""
    info = token_file_info(val_path)
    if info.meta is None:
        info = train_info
    elif (info.tokenizer, info.dtype, info.vocab_size) != (tokenizer_name, train_info.dtype, vocab_size):
        raise MarjaraError(
            f"{info.meta_path} (tokenizer {info.tokenizer}, {info.dtype}) disagrees with the training data "
            f"(tokenizer {tokenizer_name}, {train_info.dtype}); prepare both with the same tokenizer"
        )
    return open_token_file(val_path, info.dtype, vocab_size, expected_token_count(info, val_path),
                           recorded_max_token_id(info, val_path))


def _split_windows(tokens: np.memmap, seq_len: int, bin_path: Path,
                   vocab_size: int) -> tuple[MMapSliceDataset, MMapSliceDataset]:
    """The file's own windows, the last 10% (at least one) for validation."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 2:
        raise MarjaraError(
            f"{bin_path} has {len(tokens)} tokens: fewer than the two windows of seq_len + 1 = {seq_len + 1} "
            "needed to split off validation; use more data, a smaller seq_len, or a val.bin beside it"
        )
    n_val = max(1, round(n_windows * VAL_FRACTION))
    cut = (n_windows - n_val) * seq_len
    train = MMapSliceDataset(tokens, seq_len, f"{bin_path} (train windows)", 0, cut + 1, vocab_size)
    val = MMapSliceDataset(tokens, seq_len, f"{bin_path} (last {n_val} windows, val)", cut, vocab_size=vocab_size)
    return train, val


def open_mixture(specs: list[SourceSpec], seq_len: int, tokenizer: str | None = None):
    """A DataSource whose train is a Mixture and whose val_sets hold each source's validation set."""
    opened = []
    for spec in specs:
        if not Path(spec.path).exists():
            raise MarjaraError(f"data source {spec.name}: path {spec.path} does not exist; give a folder made by "
                               "python -m marjara.prepare or a .bin")
        src = open_data(spec.path, seq_len, tokenizer)
        if src.is_mixture:
            raise MarjaraError(f"data source {spec.name}: {spec.path} is itself a mixture; list its sources in this "
                               "mixture instead")
        opened.append(src)
    first = opened[0]
    for spec, src in zip(specs[1:], opened[1:]):
        if (src.tokenizer_name, src.vocab_size) != (first.tokenizer_name, first.vocab_size):
            raise MarjaraError(
                f"data source {spec.name} ({src.description}) uses tokenizer {src.tokenizer_name!r} "
                f"({src.vocab_size} tokens) but {specs[0].name} ({first.description}) uses "
                f"{first.tokenizer_name!r} ({first.vocab_size} tokens); prepare every source with the same tokenizer"
            )
    mixture = Mixture([s.name for s in specs], [s.weight for s in specs], [src.train for src in opened])
    val_sets: list[tuple[str, float, TokenDataset]] = [
        (spec.name, weight, src.val) for spec, weight, src in zip(specs, mixture.weights, opened)]
    description = "mixture of " + ", ".join(f"{s.name}={s.path}" for s in specs)
    return DataSource(mixture, None, first.tokenizer_name, first.vocab_size, description, None, first._tokenizer,
                      val_sets=val_sets)
