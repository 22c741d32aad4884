"""The Hugging Face equivalent of a MARJARA tokenizer, for exported folders that transformers'
AutoTokenizer loads (tokenizer.json in the `tokenizers` library's format + tokenizer_config.json).

- tiktoken encodings (gpt2, cl100k_base, o200k_base, ...): a byte-level BPE with tiktoken's ranks as
  ids, merges recovered from the ranks (each token's splits into two lower-ranked tokens, ordered by
  the token's rank, as transformers' own TikTokenConverter does), tiktoken's split regex as
  pre-tokenizer, and the special tokens at tiktoken's ids;
- bytes: the same byte-level model with the 256 bytes as ids 0..255, no merges, and <|endoftext|>
  at 256: every UTF-8 byte is one token, as MARJARA's ByteTokenizer encodes.

Written as plain JSON: exporting needs neither transformers nor tokenizers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from marjara.data.tokenizer import BYTES, EOT_TEXT, TiktokenTokenizer, get_tokenizer
from marjara.errors import MarjaraError

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


def write_tokenizer_json(name: str, path: Path) -> None:
    """tokenizer.json in the `tokenizers` library's format, written as it is generated: the ranks
    tiktoken already holds are the only large thing in memory."""
    ranks, specials, pattern = _ranks_and_specials(name)
    chars = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    pre_tokenizer = byte_level if pattern is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": onig_pattern(pattern)}, "behavior": "Isolated", "invert": False},
        byte_level]}
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for token, i in sorted(specials.items(), key=lambda item: item[1])]
    head = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True}
    in_rank_order = sorted(ranks, key=ranks.__getitem__)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "model": ' + json.dumps(model)[:-1] + ', "vocab": {')
        entries = ((text(token), ranks[token]) for token in in_rank_order)
        for k, (key, rank) in enumerate([*entries, *specials.items()]):
            f.write(("," if k else "") + json.dumps(key, ensure_ascii=False) + f": {rank}")
        f.write('}, "merges": [')
        first = True
        for token in in_rank_order:  # a merge's priority is the rank of the token it makes
            splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                      if token[:i] in ranks and token[i:] in ranks]
            for _, _, i in sorted(splits):
                f.write(("" if first else ",") + json.dumps([text(token[:i]), text(token[i:])], ensure_ascii=False))
                first = False
        f.write("]}}\n")


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
