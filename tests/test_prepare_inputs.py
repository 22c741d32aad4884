"""prepare's parquet, .jsonl.gz and .jsonl.zst inputs: the same tokens as the same text given as
.jsonl, whatever the chunking and worker count, and every bad input refused in one line."""

import gzip
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from marjara.data import documents
from marjara.data.prepare import plan_input, prepare
from marjara.errors import MarjaraError

from offline_tiktoken import ROOT

pa = pytest.importorskip("pyarrow", reason="the data extra (pip install -e '.[data]') is not installed")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard", reason="the data extra (pip install -e '.[data]') is not installed")

TEXTS = [f"Document {i}: " + "naïve café in 東京 said “hi” 🙂\n" * (i % 5) for i in range(120)]
TEXTS[7] = ""  # empty documents are skipped by every reader alike


def jsonl_bytes(texts, field="text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)).encode()


def write_inputs(folder: Path) -> dict[str, Path]:
    data = jsonl_bytes(TEXTS)
    paths = {kind: folder / f"docs{kind}" for kind in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")}
    paths[".jsonl"].write_bytes(data)
    # Two gzip members and two zstd frames, as concatenated shards often are.
    half = data.index(b"\n", len(data) // 2) + 1
    paths[".jsonl.gz"].write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    zstd = zstandard.ZstdCompressor()
    paths[".jsonl.zst"].write_bytes(zstd.compress(data[:half]) + zstd.compress(data[half:]))
    # Row groups of uneven sizes: small ones are merged into one chunk, big ones cut into row ranges.
    table = pa.table({"id": list(range(len(TEXTS))), "text": TEXTS})
    with pq.ParquetWriter(paths[".parquet"], table.schema) as writer:
        start = 0
        for rows in (3, 3, 3, 40, 2, 2, 50, 17):
            writer.write_table(table.slice(start, rows))
            start += rows
    return paths


def output(folder: Path) -> tuple[bytes, bytes, bytes]:
    return tuple((folder / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json"))


def test_every_format_gives_the_bytes_of_the_same_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "CHUNK_BYTES", 700)  # many chunks, row-group groups and blocks
    paths = write_inputs(tmp_path)
    assert pq.ParquetFile(paths[".parquet"]).metadata.num_row_groups == 8
    for kind in (".parquet", ".jsonl.gz", ".jsonl.zst"):
        assert len(list(plan_input(paths[kind], "text"))) > 3, kind
    chunks = list(plan_input(paths[".parquet"], "text"))
    assert any(c.stop - c.first > 1 for c in chunks) and sum(c.rows is not None for c in chunks) > 3
    reference = prepare([str(paths[".jsonl"])], tmp_path / "ref", "bytes", workers=1, progress=False)
    assert reference["documents"] == len(TEXTS) - 1 and reference["max_token_id"] == 256
    for kind in (".parquet", ".jsonl.gz", ".jsonl.zst"):
        for workers in (1, 2):
            out = tmp_path / f"out{kind}{workers}"
            prepare([str(paths[kind])], out, "bytes", workers=workers, progress=False)
            assert output(out) == output(tmp_path / "ref"), (kind, workers)


def test_text_field_picks_the_column_or_field(tmp_path):
    pq.write_table(pa.table({"content": ["alpha", "beta"], "text": [1, 2]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(["gamma"], field="content")))
    meta = prepare([str(tmp_path)], tmp_path / "out", "bytes", workers=1, progress=False, text_field="content")
    tokens = (tmp_path / "out" / "train.bin").read_bytes() + (tmp_path / "out" / "val.bin").read_bytes()
    ids = [int.from_bytes(tokens[i:i + 2], "little") for i in range(0, len(tokens), 2)]
    assert meta["documents"] == 3
    assert ids == list(b"alpha") + [256] + list(b"beta") + [256] + list(b"gamma") + [256]


def test_a_null_row_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "CHUNK_BYTES", 1)  # one row group per chunk: the row number is the file's
    pq.write_table(pa.table({"text": ["a", "b", "c", None, "e"]}), tmp_path / "n.parquet", row_group_size=2)
    with pytest.raises(MarjaraError, match=r"n.parquet, row 4: field 'text' is null"):
        prepare([str(tmp_path / "n.parquet")], tmp_path / "out", "bytes", workers=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_bad_line_in_a_compressed_file_is_named_by_line(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "CHUNK_BYTES", 64)
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    lines[33] = '{"text": "unterminated'
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(MarjaraError, match=r"d.jsonl.zst, line 34: not valid JSON"):
        prepare([str(tmp_path / "d.jsonl.zst")], tmp_path / "out", "bytes", workers=2, progress=False)


# ---- refusals as a user sees them: one line on stderr, exit code 2, nothing written --------------

def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def make_case(name: str, tmp: Path) -> list[str]:
    """Write the case's input under tmp; the CLI arguments that run it."""
    data = jsonl_bytes(TEXTS * 20)
    if name == "truncated_gz":
        (tmp / "t.jsonl.gz").write_bytes(_truncated(gzip.compress(data)))
    elif name == "truncated_zst":
        (tmp / "t.jsonl.zst").write_bytes(_truncated(zstandard.ZstdCompressor().compress(data)))
    elif name == "corrupt_zst":
        (tmp / "t.jsonl.zst").write_bytes(b"this is not zstd at all\n")
    elif name == "missing_field":
        pq.write_table(pa.table({"content": ["x"] * 30}), tmp / "t.parquet", row_group_size=10)
    elif name == "not_a_string":
        pq.write_table(pa.table({"text": list(range(30))}), tmp / "t.parquet", row_group_size=10)
    elif name == "not_parquet":
        (tmp / "t.parquet").write_bytes(b"PAR1 but nothing more")
    elif name in ("no_pyarrow", "no_zstandard"):
        module = name[3:]
        (tmp / "blocked" / module).mkdir(parents=True)
        (tmp / "blocked" / module / "__init__.py").write_text("raise ImportError('not installed')\n")
        if module == "pyarrow":
            pq.write_table(pa.table({"text": ["x"]}), tmp / "t.parquet")
        else:
            (tmp / "t.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    files = sorted(p for p in tmp.iterdir() if p.name.startswith("t."))
    return [str(files[0]), "--out", str(tmp / "out"), "--tokenizer", "bytes", "--workers", "2"]


REFUSALS = {
    "truncated_gz": r"t.jsonl.gz: the gzip archive is truncated or corrupt \(.*\); download or copy it again",
    "truncated_zst": r"t.jsonl.zst: the zstd archive is truncated or corrupt \(the file ends inside a zstd frame\)",
    "corrupt_zst": r"t.jsonl.zst: the zstd archive is truncated or corrupt \(.*Unknown frame descriptor",
    "missing_field": r"t.parquet: has no field 'text' \(it has content\); choose the text field with --text_field",
    "not_a_string": r"t.parquet: field 'text' is int64 in every row, not a string; choose the text field",
    "not_parquet": r"t.parquet: not a readable parquet file \(.*\); download or copy it again",
    "no_pyarrow": r"reading .parquet inputs needs the pyarrow package, which is not installed; "
                  r"install the 'data' extra: pip install -e '.\[data\]'",
    "no_zstandard": r"reading .jsonl.zst inputs needs the zstandard package, .* pip install -e '.\[data\]'",
}


def listing(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    def run_case(name):
        tmp = tmp_path_factory.mktemp(name)
        args = make_case(name, tmp)
        before = listing(tmp)
        path = os.pathsep.join([str(tmp / "blocked"), str(ROOT)])
        env = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run([sys.executable, "-m", "marjara.prepare", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc, before, listing(tmp)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(REFUSALS, pool.map(run_case, REFUSALS)))


@pytest.mark.parametrize("name", list(REFUSALS))
def test_bad_input_is_refused_in_one_line(refusals, name):
    proc, before, after = refusals[name]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(REFUSALS[name], lines[0]), lines[0]
    assert after == before and proc.stdout == ""  # nothing written, not even a temporary file
