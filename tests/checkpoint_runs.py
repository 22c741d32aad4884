"""Checkpoints written by real 2-rank train.py runs, made once per test session and shared by the
convert, generate and evaluate tests (each launch starts two interpreters and DeepSpeed's
engine: the slowest part of those tests, so none is repeated).

Each test module asks with `checkpoint(tmp_path_factory, NAME)`; the first call launches, later
calls (from any module) reuse the folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
MOE = ["--use_moe", "--num_experts", "4", "--top_k", "2", "--ep_size", "2"]
RUNS = {
    "zero1": ["--deepspeed_config", "ds_configs/zero1.json"],
    # Saves every step: global_step1 and global_step2 (latest), for --tag tests.
    "zero2": ["--deepspeed_config", "ds_configs/zero2.json", "--save_interval", "1"],
    "zero3": ["--deepspeed_config", "ds_configs/zero3.json"],
    # Validates at its last step too (tests/test_moe_validation.py).
    "moe_ep2": ["--deepspeed_config", "ds_configs/moe_zero2.json", *MOE, "--eval_interval", str(STEPS),
                "--eval_batches", "2"],
    "moe_ep2_bf16": ["--deepspeed_config", "ds_configs/moe_zero2.json", *MOE, "--mixed_precision", "bf16"],
    "moe_ep2_top1": ["--deepspeed_config", "ds_configs/moe_zero2.json", *MOE, "--top_k", "1"],
}
COMMON = ["--model_size", "tiny", "--max_steps", str(STEPS), "--save_interval", str(STEPS), "--batch_size", "2",
          "--seq_len", "32", "--lr", "3e-3", "--warmup_steps", "1", "--ema_decay", "0.5", "--seed", "3",
          "--eval_interval", "0", "--log_interval", "1", "--sample_tokens", "0"]

_made: dict[str, Path] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           script, *args]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    finally:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def checkpoint(tmp_path_factory, name: str) -> Path:
    """CKPT_DIR of the train.py run called `name` (see RUNS)."""
    if name not in _made:
        out = tmp_path_factory.mktemp(f"ckpt_{name}")
        torchrun("train.py", [*COMMON, *RUNS[name], "--out_dir", str(out)])
        _made[name] = out
    return _made[name]


def engine_logits(tmp_path_factory, name: str) -> dict:
    """DeepSpeed's own logits for the latest checkpoint of run `name` (tests/engine_logits.py)."""
    import torch

    key = f"{name}/engine_logits"
    if key not in _made:
        ckpt = checkpoint(tmp_path_factory, name)
        out = tmp_path_factory.mktemp(f"logits_{name}") / "logits.pt"
        torchrun("tests/engine_logits.py", [str(ckpt), (ckpt / "latest").read_text().strip(), str(out)])
        _made[key] = out
    return torch.load(_made[key], weights_only=True)
