"""Multi-rank reliability: what a 2-rank run leaves behind, and how it stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train_helpers import QUICK, ROOT, TRAIN, free_port


def launch(args: list[str], port: int, nproc: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    """deepspeed's own launcher (it sets LOCAL_SIZE, so DeepSpeed's CPU comm op makes its buffers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
           TRAIN, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def shm_buffers(port: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_a_finished_two_rank_run_removes_its_shared_memory_buffers(tmp_path):
    port = free_port()
    try:
        result = launch([*QUICK, "--max_steps", "1", "--out_dir", str(tmp_path / "ck")], port)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not shm_buffers(port)
    finally:
        for path in shm_buffers(port):
            path.unlink()


def test_overwrite_replaces_another_run_and_nothing_of_it_mixes_in(tmp_path):
    from test_bad_inputs import _old_run
    from train_helpers import metrics, run_train

    out = _old_run(tmp_path / "ck")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"old run")
    run_train([*QUICK, "--max_steps", "2", "--out_dir", str(out), "--overwrite"])
    assert (out / "latest").read_text().strip() == "global_step2"
    assert not (out / "global_step20").exists() and not (out / "tensorboard" / "events.out.tfevents.1.old").exists()
    assert [m["step"] for m in metrics(out) if "train/loss" in m] == [1, 2]
