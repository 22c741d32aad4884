"""Damaged checkpoints: resume, convert and generate refuse them before any training or loading,
naming the damaged file in one line (printed by rank 0 alone), and point at the newest intact
earlier tag. Every rank is started by hand here so that each one's output can be read apart."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import QUICK, ROOT, run_ranks, run_train

DAMAGED, INTACT = "global_step4", "global_step2"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_RANK1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-rank ZeRO-2 run that saved global_step2 and global_step4 (latest)."""
    out = tmp_path_factory.mktemp("damaged") / "ck"
    run_train([*QUICK, "--deepspeed_config", "ds_configs/zero2.json", "--batch_size", "2", "--max_steps", "4",
               "--save_interval", "2", "--out_dir", str(out)], nproc=2)
    return out


def copy_of(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ck"
    shutil.copytree(saved, out)
    return out


def flip(path: Path) -> None:
    """4 KiB of other bytes in the middle of the file: same size, different content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(255 - b for b in data[middle : middle + 4096])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def assert_refused_once(results, expected: str) -> None:
    """Rank 0 prints one error line; every other rank exits with the same code, silent; no
    training step ran."""
    for rank, result in enumerate(results):
        assert result.returncode == 2, f"rank {rank}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"rank {rank}: {result.stderr[-3000:]}"
        assert "| loss" not in result.stdout and "saved" not in result.stdout
    assert [line for line in results[0].stderr.splitlines() if line.strip()] == [results[0].stderr.strip()]
    assert results[0].stderr.startswith("error: ") and expected in results[0].stderr, results[0].stderr
    for result in results[1:]:
        assert "error" not in result.stderr, result.stderr


def resume_args(out: Path) -> list[str]:
    return [*QUICK, "--deepspeed_config", "ds_configs/zero2.json", "--batch_size", "2", "--max_steps", "6",
            "--resume", str(out), "--out_dir", str(out)]


def unchanged(out: Path, before: dict) -> bool:
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damage, file, world, expected", [
    (flip, MODEL_STATES, 2, f"{MODEL_STATES} does not match its xxh3_64 checksum"),
    (truncate, MODEL_STATES, 1, f"{MODEL_STATES} has "),
    (Path.unlink, MODEL_STATES, 1, f"{MODEL_STATES} is missing"),
    (Path.unlink, "marjara_rank0.pt", 1, "marjara_rank0.pt is missing"),
    (Path.unlink, OPTIM_RANK1, 2, f"{OPTIM_RANK1} is missing"),
    (Path.unlink, OPTIM_RANK1, 1, f"{OPTIM_RANK1} is missing"),  # was: a misleading universal-conversion error
])
def test_resume_refuses_a_damaged_checkpoint_on_every_rank(saved, tmp_path, damage, file, world, expected):
    out = copy_of(saved, tmp_path)
    damage(out / DAMAGED / file)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    results = run_ranks(resume_args(out), world)
    assert_refused_once(results, f"checkpoint {out / DAMAGED} is damaged: {expected}")
    assert results[0].stderr.rstrip().endswith(f"use the newest intact earlier checkpoint: --resume {out / INTACT}")
    assert (out / "latest").read_text().strip() == DAMAGED and unchanged(out, before)


@pytest.mark.parametrize("command", ["convert", "generate"])
def test_convert_and_generate_refuse_flipped_bytes_naming_the_file(saved, tmp_path, command):
    out = copy_of(saved, tmp_path)
    flip(out / DAMAGED / MODEL_STATES)
    args = {"convert": [str(out), str(tmp_path / "exported")],
            "generate": [str(out), "--prompt", "The ", "--max_new_tokens", "4"]}[command]
    result = subprocess.run([sys.executable, "-m", f"marjara.{command}", *args], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {out / DAMAGED} is damaged: {MODEL_STATES} does not match its xxh3_64 checksum (its "
        f"bytes changed after the save); use the newest intact earlier checkpoint: --tag {INTACT}"]
    assert not (tmp_path / "exported").exists() and result.stdout == ""


def test_an_intact_checkpoint_still_resumes_and_converts(saved, tmp_path):
    out = copy_of(saved, tmp_path)
    result = subprocess.run([sys.executable, "-m", "marjara.convert", str(out), str(tmp_path / "exported")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exported" / "model.safetensors").is_file()
