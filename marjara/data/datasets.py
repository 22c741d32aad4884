"""Token datasets cut into windows of seq_len + 1 tokens (inputs plus the next-token targets).

Window i is tokens[i*seq_len : i*seq_len + seq_len + 1]; consecutive windows share one token, so
every token but the first is a target exactly once. len(ds) = (n_tokens - 1) // seq_len.
"""

from __future__ import annotations

import numpy as np

from marjara.errors import MarjaraError
from marjara.data.tokenizer import Tokenizer, token_dtype_name


class TokenDataset:
    """Windows over a 1-D token array (in memory or a numpy.memmap slice).

    With vocab_size set, every window read is checked to hold only ids below it (one max over the
    batch): a file opened without a full scan still never feeds an out-of-range id to the model.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str, vocab_size: int | None = None) -> None:
        if seq_len < 1:
            raise MarjaraError(f"seq_len must be >= 1 (got {seq_len})")
        if len(tokens) < seq_len + 1:
            raise MarjaraError(
                f"{name} has {len(tokens)} tokens, shorter than one window of seq_len + 1 = {seq_len + 1}; "
                "use more data or a smaller seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name
        self.vocab_size = vocab_size

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def window(self, i: int) -> np.ndarray:
        """int64 array of seq_len + 1 tokens: inputs are [:-1], targets [1:]."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {self.name} ({len(self)} windows)")
        start = i * self.seq_len
        window = np.array(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        self._check_ids(window[None], [i])
        return window

    def windows(self, indices) -> np.ndarray:
        """(len(indices), seq_len + 1) int64 array of the given windows."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            i = int(i)
            if not 0 <= i < len(self):
                raise IndexError(f"window {i} out of range for {self.name} ({len(self)} windows)")
            start = i * self.seq_len
            out[row] = self.tokens[start : start + self.seq_len + 1]
        self._check_ids(out, indices)
        return out

    def _check_ids(self, windows: np.ndarray, indices) -> None:
        if self.vocab_size is None or windows.size == 0 or int(windows.max()) < self.vocab_size:
            return
        row, column = np.argwhere(windows >= self.vocab_size)[0]
        position = int(indices[row]) * self.seq_len + int(column)
        raise MarjaraError(
            f"{self.name}: token id {int(windows[row, column])} at position {position} is not below the "
            f"tokenizer's vocab size {self.vocab_size}; the file was made with another tokenizer or dtype"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n_tokens={self.n_tokens}, windows={len(self)})"


class MMapSliceDataset(TokenDataset):
    """tokens[start:stop] of a .bin read through numpy.memmap: nothing is loaded until a window is."""

    def __init__(self, tokens: np.memmap, seq_len: int, name: str, start: int = 0, stop: int | None = None,
                 vocab_size: int | None = None):
        super().__init__(tokens[start:stop], seq_len, name, vocab_size)


class TextDataset(TokenDataset):
    """Tokens of a text tokenised in memory (a .txt on the fly, or the built-in corpus)."""

    @classmethod
    def train_val(cls, tokens: np.ndarray, seq_len: int, name: str, val_fraction: float = 0.1):
        """The first (1 - val_fraction) of the tokens train, the rest validate (no token shared)."""
        split = train_token_count(len(tokens), val_fraction)
        return cls(tokens[:split], seq_len, f"{name} (train split)"), cls(tokens[split:], seq_len, f"{name} (val split)")


def train_token_count(n_tokens: int, val_fraction: float) -> int:
    """Where a token stream splits into train and val: at least one token goes to each side."""
    if n_tokens < 2:
        raise MarjaraError(f"{n_tokens} token(s) cannot be split into train and validation; use more data")
    val = min(n_tokens - 1, max(1, round(n_tokens * val_fraction)))
    return n_tokens - val


def tokenize_documents(documents, tokenizer: Tokenizer) -> np.ndarray:
    """Each document's tokens followed by end-of-text, as one array of the tokenizer's dtype."""
    ids: list[int] = []
    for text in documents:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eot_id)
    return np.array(ids, dtype=token_dtype_name(tokenizer.vocab_size))

