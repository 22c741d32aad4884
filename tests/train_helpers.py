"""Running train.py as users do (plain python, torchrun, deepspeed) and reading what it leaves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")

# A few seconds of training on 2 CPU cores: tiny preset, short sequences, small batches.
QUICK = ["--model_size", "tiny", "--seq_len", "32", "--eval_batches", "2", "--eval_interval", "0",
         "--log_interval", "1", "--sample_tokens", "0", "--warmup_steps", "2", "--lr", "3e-3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(args: list[str], nproc: int = 1, launcher: str = "torchrun", timeout: int = 400,
              check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    port = free_port()
    if nproc == 1 and launcher == "torchrun":
        launcher = "python"
    if launcher == "python":
        cmd = [sys.executable, TRAIN]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), TRAIN]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(port), TRAIN]
    else:
        raise ValueError(launcher)
    try:
        result = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    finally:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(out_dir) if "train/loss" in m}


def ema_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA a checkpoint holds, put together here without marjara's reader: a "replicated"
    tensor is whole in one rank's file; "zero3_shards" concatenate in rank order, cut to size."""
    meta = json.loads((Path(tag_dir) / "marjara.json").read_text())
    states = [torch.load(Path(tag_dir) / f"marjara_rank{r}.pt", weights_only=True) for r in range(meta["world_size"])]
    if meta["ema"]["layout"] == "replicated":
        return {name: tensor for state in states for name, tensor in state["ema"].items()}
    shapes = {name: torch.Size(shape) for state in states for name, shape in state["ema_shapes"].items()}
    return {name: torch.cat([state["ema"][name].reshape(-1) for state in states])[: shape.numel()].reshape(shape)
            for name, shape in shapes.items()}


def run_ranks(args: list[str], world: int, timeout: int = 300, script: str = TRAIN) -> list[subprocess.CompletedProcess]:
    """`script` on `world` ranks started directly (as a launcher would), each with its own output."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
