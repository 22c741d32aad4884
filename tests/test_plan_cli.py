"""python -m marjara.plan as a user runs it: the table, --json, --write_config that train.py and
DeepSpeed accept, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marjara.model.config import PRESETS, ModelConfig
from marjara.model import MarjaraModel
from marjara.planner.shapes import flops_per_token, param_counts, parameter_numels
from train_helpers import QUICK, run_train

ROOT = Path(__file__).resolve().parents[1]


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marjara.plan", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("model", [{}, {"use_moe": True, "num_experts": 4, "top_k": 2},
                                   {"use_moe": True, "num_experts": 4, "use_residual": True},
                                   {"tie_embeddings": False}], ids=["dense", "moe", "residual_moe", "untied"])
def test_counts_from_shapes_equal_the_built_model(model):
    from marjara.distributed import ensure_process_group

    ensure_process_group()  # MoE layers need DeepSpeed's process group; a one-rank one here
    config = ModelConfig.from_preset("tiny", **model)
    built = MarjaraModel(config)
    counts = param_counts(config)
    assert counts.total == built.num_parameters()
    assert flops_per_token(config, 256) == built.flops_per_token(256)
    assert sorted(n for n, _ in parameter_numels(config)) == sorted(p.numel() for p in built.parameters())
    assert counts.largest_layer == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in built.modules())


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_model_and_the_planner_estimate_the_same_flops_for_every_preset(preset, moe):
    from marjara.distributed import ensure_process_group

    ensure_process_group()  # MoE layers need DeepSpeed's process group; a one-rank one here
    overrides = {"use_moe": True, "num_experts": 8, "top_k": 2} if moe else {}
    config = ModelConfig.from_preset(preset, vocab_size=50304, **overrides)
    with torch.device("meta"):  # shapes only: the 7b preset's weights would not fit here
        built = MarjaraModel(config)
    for seq_len in (256, config.max_seq_len):
        assert flops_per_token(config, seq_len) == built.flops_per_token(seq_len)
    assert built.flops_per_token(256) > 6 * built.num_active_parameters(include_embeddings=False)


def test_json_plan_recommends_the_lowest_stage_that_fits():
    out = plan("--model_size", "large", "--nodes", "2", "--gpus_per_node", "8", "--gpu", "A100-40GB",
               "--global_batch_tokens", "524288", "--tokens", "1e10", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    names = [c["name"] for c in result["candidates"]]
    assert names[:4] == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    chosen = result["recommendation"]
    first_fit = next(c for c in result["candidates"] if c["fits"])
    assert chosen["name"] == first_fit["name"]
    assert chosen["micro_batch"] * chosen["grad_accum"] * 16 * 1024 == 524288
    assert chosen["micro_batch"] <= chosen["max_micro_batch"]
    assert chosen["memory_bytes"]["total"] <= chosen["memory_bytes"]["usable"]


def test_model_that_fits_nowhere_exits_non_zero_with_the_table():
    out = plan("--model_size", "large", "--nodes", "1", "--gpus_per_node", "1", "--gpu", "4090",
               "--gpu_memory_gb", "2", "--seq_len", "8192")
    assert out.returncode == 1
    assert "recommendation: none fits" in out.stdout and "ZeRO-3+opt+param" in out.stdout


def test_moe_under_zero3_is_refused_in_the_table():
    out = plan("--model_size", "small", "--use_moe", "--num_experts", "8", "--ep_size", "8", "--zero_stage", "3")
    assert out.returncode == 1
    assert "no: DeepSpeed's MoE layers do not run under ZeRO-3" in out.stdout


def test_written_config_is_accepted_by_deepspeed_and_train_py(tmp_path):
    path = tmp_path / "ds.json"
    out = plan("--model_size", "tiny", "--seq_len", "32", "--nodes", "1", "--gpus_per_node", "1",
               "--mixed_precision", "fp32", "--global_batch_tokens", "128", "--zero_stage", "2",
               "--write_config", str(path))
    assert out.returncode == 0, out.stderr
    assert f"ds_config written to {path}" in out.stdout
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] == 4

    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(dict(config))
    assert parsed.zero_optimization_stage == 2 and parsed.train_batch_size == 4
    result = run_train(QUICK + ["--deepspeed_config", str(path), "--max_steps", "2", "--out_dir",
                                str(tmp_path / "ck"), "--save_interval", "0", "--mixed_precision", "fp32"])
    assert "zero_stage=2" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpu", "H900"], "unknown --gpu 'H900'"),
    (["--nodes", "0"], "--nodes must be > 0"),
    (["--gpu_memory_gb", "-5"], "--gpu_memory_gb must be > 0"),
    (["--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--tokens", "nan"], "--tokens must be > 0"),
    (["--peak_tflops", "nan"], "--peak_tflops must be > 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1 (got 0)"),
    (["--global_batch_tokens", "1024", "--nodes", "8"], "less than one sequence of 256 tokens per GPU"),
    (["--offload_param", "--zero_stage", "2"], "--offload_param needs ZeRO stage 3"),
    (["--zero_stage", "1", "--deepspeed_config", "ds_configs/zero3.json"], "--zero_stage 1 contradicts \"stage\": 3"),
    (["--use_moe", "--ep_size", "3"], "num_experts (4) must be divisible by ep_size (3)"),
    (["--deepspeed_config", "missing.json"], "DeepSpeed config missing.json does not exist"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(args, message, tmp_path):
    assert_refused_in_one_line(args, message, tmp_path)


def assert_refused_in_one_line(args: list[str], message: str, folder: Path) -> None:
    """The plan exits 2 with one line naming the problem, and writes no --write_config into folder."""
    out = plan(*args, "--write_config", str(folder / "ds.json"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not list(folder.iterdir())


def test_planned_peak_for_a_gpu_check_is_the_tables_total_without_the_allowance():
    from marjara.planner.measure import planned_peak_bytes

    argv = ["--model_size", "small", "--deepspeed_config", "ds_configs/zero2.json", "--batch_size", "4",
            "--seq_len", "512"]
    out = plan(*argv, "--nodes", "1", "--gpus_per_node", "2", "--json")
    memory = json.loads(out.stdout)["candidates"][0]["memory_bytes"]
    assert planned_peak_bytes(argv, gpus=2) == pytest.approx(memory["total"] - memory["fragmentation"])
