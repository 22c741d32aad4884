"""--sp_size with what it cannot run with, run as a user runs train.py: one `error:` line, exit 2,
no traceback, nothing written, before the engine starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ds(tmp: Path, config: dict) -> list[str]:
    path = tmp / "ds.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed_config", str(path)]


CASES = {
    "seq_len_not_divisible": (lambda tmp: ["--sp_size", "2", "--seq_len", "15"],
                              "--seq_len 15 must be divisible by --sp_size 2 (each rank holds seq_len / sp_size "
                              "tokens); use --seq_len 14"),
    "sp_size_not_dividing_the_world": (lambda tmp: ["--sp_size", "2"],
                                       "--sp_size 2 must divide the number of ranks (1); launch a multiple of 2 ranks"),
    "heads_not_divisible": (lambda tmp: ["--sp_size", "3", "--seq_len", "15"],
                            "the model's 4 attention heads must be divisible by --sp_size 3"),
    "sp_size_zero": (lambda tmp: ["--sp_size", "0"], "--sp_size must be >= 1 (got 0)"),
    "json_contradicts_the_flag": (lambda tmp: ["--sp_size", "2", *_ds(tmp, {"sequence_parallel_size": 4})],
                                  '--sp_size 2 contradicts "sequence_parallel_size": 4 in'),
    "json_sequence_parallel_size_not_an_integer": (lambda tmp: _ds(tmp, {"sequence_parallel_size": "two"}),
                                                   '"sequence_parallel_size" must be an integer >= 1 (or "auto"), not \'two\''),
    "json_data_parallel_size_with_sp": (lambda tmp: _ds(tmp, {"sequence_parallel_size": 2, "data_parallel_size": 1}),
                                        '"data_parallel_size" in'),
    "moe_with_sp": (lambda tmp: ["--sp_size", "2", "--use_moe"], "--use_moe cannot run with --sp_size 2"),
    "compile_with_sp": (lambda tmp: ["--sp_size", "2", "--compile"], "--compile cannot run with --sp_size 2"),
    "offload_without_checkpointing": (lambda tmp: ["--offload_activations"],
                                      "--offload_activations needs --grad_checkpointing"),
    "offload_contradicts_the_json": (
        lambda tmp: ["--grad_checkpointing", "--offload_activations",
                     *_ds(tmp, {"activation_checkpointing": {"cpu_checkpointing": False}})],
        '--offload_activations True contradicts "cpu_checkpointing": false'),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sequence_parallel_bad_input_stops_with_one_line(name, tmp_path):
    make_args, expected = CASES[name]
    command = [sys.executable, str(ROOT / "train.py"), "--max_steps", "1", "--seq_len", "16", "--sample_tokens", "0",
               "--out_dir", str(tmp_path / "out"), *make_args(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists(), "a refused run writes nothing"
