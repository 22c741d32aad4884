"""Checkpoint conversion: time and peak memory against output size, MARJARA's converter (its own
format, and the Hugging Face layout of --format hf) beside DeepSpeed's zero_to_fp32 on the same
dense checkpoint, measured in this run on this machine.

    python bench/convert.py [--presets small medium] [--stages 2 3] [--work /tmp/marjara_bench_convert]

Each checkpoint comes from a 1-step, 2-rank train.py run (gpt2 tokenizer when its files are in
TIKTOKEN_CACHE_DIR or ../shared/tiktoken, else bytes). Each conversion runs in a fresh process that
imports everything first, then resets the kernel's peak-RSS mark; "peak" is the rise of resident
memory (VmHWM) over that baseline during the conversion, memory-mapped checkpoint pages included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = ROOT.parent / "shared" / "tiktoken"


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(tool: str, ckpt: str, out: str) -> None:
    """Child process: convert once with `tool`, print {"seconds", "peak_mib", "output_mib"} as JSON."""
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    from marjara.checkpoint.conversion import convert

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = memory_kib("VmRSS")
    start = time.perf_counter()
    if tool == "marjara":
        convert(ckpt, out)
    elif tool == "marjara_hf":
        convert(ckpt, out, format="hf")
    else:
        # Its safetensors output refuses tied weights ("Some tensors share memory"): the default .bin.
        convert_zero_checkpoint_to_fp32_state_dict(ckpt, out)
    seconds = time.perf_counter() - start
    peak = memory_kib("VmHWM") - baseline
    size = sum(p.stat().st_size for p in Path(out).iterdir() if p.suffix in (".safetensors", ".bin"))
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "output_mib": size / 2**20}))


def train(ckpt: Path, preset: str, stage: int, tokenizer: str, env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
           "--deepspeed_config", f"ds_configs/zero{stage}.json", "--model_size", preset, "--tokenizer", tokenizer,
           "--max_steps", "1", "--save_interval", "1", "--batch_size", "1", "--seq_len", "64",
           "--eval_interval", "0", "--sample_tokens", "0", "--out_dir", str(ckpt)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed:\n{result.stderr[-3000:]}")


def run_tool(tool: str, ckpt: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, __file__, "--_measure", tool, str(ckpt), str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_weights(ours: Path, theirs: Path) -> bool:
    from safetensors.torch import load_file

    a = load_file(ours / "model.safetensors")
    import torch

    b = {}
    for path in theirs.glob("*.bin"):
        b.update(torch.load(path, map_location="cpu", weights_only=True))
    return all(name in b and bool((a[name] == b[name]).all()) for name in a)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_measure":
        measure(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "medium"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--work", type=Path, default=Path("/tmp/marjara_bench_convert"))
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if "TIKTOKEN_CACHE_DIR" not in env and SHARED_TIKTOKEN.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN)
    tokenizer = "gpt2" if "TIKTOKEN_CACHE_DIR" in env else "bytes"
    print(f"tokenizer {tokenizer}; peak = rise of resident memory during the conversion (fresh process each)")
    columns = ("marjara.convert", "convert --format hf", "zero_to_fp32")
    print(f"{'preset':8} {'zero':>4} {'output':>10} | " + " | ".join(f"{c:^27}" for c in columns) + " | same")
    print(f"{'':8} {'':>4} {'MiB':>10} | " + " | ".join(f"{'s':>7} {'peak MiB':>9} {'x out':>7}" for _ in columns) + " |")
    for preset in args.presets:
        for stage in args.stages:
            ckpt = args.work / f"{preset}_zero{stage}"
            if not (ckpt / "latest").is_file():
                shutil.rmtree(ckpt, ignore_errors=True)
                train(ckpt, preset, stage, tokenizer, env)
            ours = run_tool("marjara", ckpt, args.work / f"{preset}_zero{stage}_marjara", env)
            hf = run_tool("marjara_hf", ckpt, args.work / f"{preset}_zero{stage}_hf", env)
            theirs = run_tool("zero_to_fp32", ckpt, args.work / f"{preset}_zero{stage}_ds", env)
            same = same_weights(args.work / f"{preset}_zero{stage}_marjara", args.work / f"{preset}_zero{stage}_ds")
            size = ours["output_mib"]
            cells = [f"{r['seconds']:>7.2f} {r['peak_mib']:>9.1f} {r['peak_mib'] / r['output_mib']:>7.2f}"
                     for r in (ours, hf, theirs)]
            print(f"{preset:8} {stage:>4} {size:>10.1f} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'}",
                  flush=True)


if __name__ == "__main__":
    main()
