"""The Hugging Face `tokenizers` equivalent of a MARJARA tokenizer, for exported folders that
transformers' AutoTokenizer loads (tokenizer.json + tokenizer_config.json).

- tiktoken encodings (gpt2, cl100k_base, o200k_base, ...): a byte-level BPE with tiktoken's ranks as
  ids, merges recovered from the ranks (each token's splits into two lower-ranked tokens, ordered by
  the token's rank, as transformers' own TikTokenConverter does), tiktoken's split regex as
  pre-tokenizer, and the special tokens at tiktoken's ids;
- bytes: the same byte-level model with the 256 bytes as ids 0..255, no merges, and <|endoftext|>
  at 256: every UTF-8 byte is one token, as MARJARA's ByteTokenizer encodes.

Needs the `tokenizers` package (installed with transformers: pip install '.[hf]').
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from marjara.data.tokenizer import BYTES, EOT_TEXT, TiktokenTokenizer, get_tokenizer
from marjara.errors import MarjaraError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what a ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _ranks_and_specials(name: str) -> tuple[dict[bytes, int], dict[str, int], str | None]:
    tokenizer = get_tokenizer(name)
    if name == BYTES:
        return {bytes([b]): b for b in range(256)}, {EOT_TEXT: tokenizer.eot_id}, None
    if not isinstance(tokenizer, TiktokenTokenizer):
        raise MarjaraError(f"tokenizer {name!r} has no Hugging Face equivalent MARJARA can write")
    encoding = tokenizer._enc
    return dict(encoding._mergeable_ranks), dict(encoding._special_tokens), encoding._pat_str


# tiktoken's patterns use possessive quantifiers; Oniguruma (the regex engine of `tokenizers`)
# reads "X{1,3}+" as "(X{1,3})+" (a repeated interval), not as a possessive one. An atomic group
# says "possessive" in both.
_POSSESSIVE_INTERVAL = re.compile(r"(\\p\{\w+\}|\\.|\[[^\]]*\]|[^\\])(\{\d+(?:,\d*)?\})\+")


def onig_pattern(pattern: str) -> str:
    return _POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", pattern)


def build_tokenizer(name: str):
    """A tokenizers.Tokenizer that encodes text to the same ids as MARJARA's tokenizer `name`."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise MarjaraError("writing Hugging Face tokenizer files needs the tokenizers package; "
                           "pip install '.[hf]' (transformers)") from None
    ranks, specials, pattern = _ranks_and_specials(name)
    chars = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
        merges += [(rank, ranks[a], ranks[b], text(a), text(b)) for a, b in splits]
    merges.sort()
    vocab.update(specials)  # special tokens keep tiktoken's ids
    tokenizer = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], fuse_unk=False, ignore_merges=True))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.pre_tokenizer = (byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(onig_pattern(pattern)), behavior="isolated", invert=False), byte_level]))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials])
    return tokenizer


def tokenizer_config(name: str, model_max_length: int) -> dict:
    eot = EOT_TEXT
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "marjara_tokenizer": name,
    }


def write_tokenizer_files(tokenizer, name: str, model_max_length: int, out_dir: Path) -> None:
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(name, model_max_length), indent=2) + "\n")
