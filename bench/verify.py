"""Cost of checkpoint verification (size + xxh3_64 of every file) against loading the checkpoint.

    python bench/verify.py [--preset medium] [--stage 1] [--repeats 3] [--work /tmp/marjara_bench_verify]

The checkpoint comes from a 1-step, 1-rank train.py run. Measured in this process, best of
--repeats, files in the page cache for every measurement (as right after a save, or for the load
that follows the check, which reads what the check just brought in):

- load:    torch.load of every file of the tag (what resume and convert read);
- verify:  marjara.checkpoint.verify.find_damage over the tag (one rank);
- crc32:   the same streamed pass with zlib.crc32, the checksum not chosen, for comparison;
- save-side: building the manifest after a save.

It prints verify / load (the cost verification adds to a load) and crc32 / xxh3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = ROOT.parent / "shared" / "tiktoken"


def best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def crc32_file(path: Path) -> int:
    value = 0
    with open(path, "rb", buffering=0) as f:
        block = bytearray(8 << 20)
        view = memoryview(block)
        while n := f.readinto(block):
            value = zlib.crc32(view[:n], value)
    return value


def train(ckpt: Path, preset: str, stage: int, env: dict) -> Path:
    tokenizer = "gpt2" if (SHARED_TIKTOKEN.is_dir() or os.environ.get("TIKTOKEN_CACHE_DIR")) else "bytes"
    cmd = [sys.executable, "train.py", "--deepspeed_config", f"ds_configs/zero{stage}.json", "--model_size", preset,
           "--tokenizer", tokenizer, "--max_steps", "1", "--save_interval", "1", "--batch_size", "1",
           "--seq_len", "64", "--eval_interval", "0", "--sample_tokens", "0", "--out_dir", str(ckpt)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed:\n{result.stderr[-3000:]}")
    return ckpt / (ckpt / "latest").read_text().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/marjara_bench_verify")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if SHARED_TIKTOKEN.is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    tag_dir = train(work / "ckpt", args.preset, args.stage, env)

    import torch

    from marjara.checkpoint.verify import build_manifest, find_damage

    files = sorted(p for p in tag_dir.iterdir() if p.suffix == ".pt")
    total = sum(p.stat().st_size for p in files)
    manifest = {}

    def build():
        manifest.update(build_manifest(tag_dir))

    def load():
        for path in files:
            torch.load(path, map_location="cpu", weights_only=False)

    def verify():
        assert find_damage(tag_dir, manifest) is None

    def crc32():
        for path in files:
            crc32_file(path)

    load()  # bring every file into the page cache first
    t_build = best_of(args.repeats, build)
    t_load = best_of(args.repeats, load)
    t_verify = best_of(args.repeats, verify)
    t_crc = best_of(args.repeats, crc32)
    gib = total / 2**30
    print(f"{args.preset}, ZeRO-{args.stage}, 1 rank: {len(files)} files, {gib:.2f} GiB")
    print(f"load (torch.load of every file)   {t_load:7.3f} s  {gib / t_load:6.2f} GiB/s")
    print(f"verify (size + xxh3_64)           {t_verify:7.3f} s  {gib / t_verify:6.2f} GiB/s  "
          f"= {t_verify / t_load:.2f}x load")
    print(f"crc32 of the same files           {t_crc:7.3f} s  {gib / t_crc:6.2f} GiB/s  = {t_crc / t_verify:.2f}x xxh3")
    print(f"manifest after a save (xxh3)      {t_build:7.3f} s  = {t_build / t_load:.2f}x load")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
