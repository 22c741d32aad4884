"""bench/gpu_check.py as far as a CPU can check it: the plan (--dry-run), every command's flags
accepted by the command it runs, the verdicts on metrics it reads, and the one-line refusal
without a GPU."""

import importlib.util
import json
import subprocess
import sys

import pytest

from train_helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)

REQUIRED = {"bf16_zero0", "bf16_zero1", "bf16_zero2", "bf16_zero3", "fp16_zero0", "fp16_zero2", "moe_zero2",
            "grad_checkpointing", "compile", "resume_zero3", "convert_generate", "bf16_matmul",
            "throughput_large", "throughput_1b", "planned_memory"}


def test_dry_run_prints_every_check_and_its_commands(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    names = {line.split(" ")[0] for line in result.stdout.splitlines() if not line.startswith(" ") and "(about" in line}
    assert names == REQUIRED
    assert "15 checks, about" in result.stdout and not list(tmp_path.iterdir())  # nothing ran
    estimate = sum(c.estimate_s for c in gpu_check.plan(tmp_path))
    assert estimate < 9 * 60


def test_every_command_is_accepted_by_the_command_it_runs(tmp_path):
    from marjara import convert, generate
    from marjara.train.args import parse_config

    for check in gpu_check.plan(tmp_path):
        for cmd in check.commands:
            if cmd[1] == "train.py":
                config = parse_config(cmd[2:], has_gpu=True)
                assert str(config.checkpoint.out_dir).startswith(str(tmp_path))
            elif cmd[1:3] == ["-m", "marjara.convert"]:
                convert.parse_args(cmd[3:])
            elif cmd[1:3] == ["-m", "marjara.generate"]:
                generate.parse_args(cmd[3:])
            else:
                assert cmd[1] == "-c" and check.name == "bf16_matmul"
                compile(cmd[2], "matmul", "exec")


def write_metrics(out, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_passes_only_with_every_step_finite_and_falling(tmp_path):
    good = {s: 5.0 - 0.2 * s for s in range(1, 21)}
    assert gpu_check.falling_loss(good).startswith("loss 4.800 -> 1.000")
    with pytest.raises(gpu_check.CheckFailed, match="did not fall"):
        gpu_check.falling_loss({s: 5.0 for s in range(1, 21)})
    with pytest.raises(gpu_check.CheckFailed, match="non-finite"):
        gpu_check.falling_loss({**good, 7: float("nan")})
    with pytest.raises(gpu_check.CheckFailed, match="expected 1..20"):
        gpu_check.falling_loss({s: v for s, v in good.items() if s != 3})
    write_metrics(tmp_path / "fp16_zero0", [{"step": s, "train/loss": v} for s, v in good.items()])
    with pytest.raises(gpu_check.CheckFailed, match="loss_scale"):
        gpu_check.verify_run("fp16_zero0", fp16=True)(tmp_path, [])
    write_metrics(tmp_path / "fp16_zero0", [{"step": s, "train/loss": v, "train/loss_scale": 2.0**15,
                                             "train/skipped_steps": 2} for s, v in good.items()])
    assert "loss scale 32768, 2 overflow steps skipped" in gpu_check.verify_run("fp16_zero0", fp16=True)(tmp_path, [])


def test_resume_passes_only_when_the_resumed_losses_match(tmp_path):
    full = {s: 5.0 - 0.2 * s for s in range(1, 21)}
    write_metrics(tmp_path / "resume_zero3_full", [{"step": s, "train/loss": v} for s, v in full.items()])
    write_metrics(tmp_path / "resume_zero3_resumed", [{"step": s, "train/loss": full[s]} for s in range(11, 21)])
    assert gpu_check.verify_resume(tmp_path, []) == "bit-identical losses after resume"
    write_metrics(tmp_path / "resume_zero3_resumed", [{"step": s, "train/loss": full[s] + 0.01} for s in range(11, 21)])
    with pytest.raises(gpu_check.CheckFailed, match="differ"):
        gpu_check.verify_resume(tmp_path, [])


def test_without_a_gpu_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA GPU here; run this on a GPU machine, or pass --dry-run to see the plan"]


def test_an_unknown_check_name_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "bf16_zero9"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "unknown check(s) bf16_zero9; choose from bf16_zero0" in result.stderr


def test_the_planners_peak_is_compared_with_the_measured_one(tmp_path, monkeypatch):
    """The planner reads each throughput run's own flags; a measured peak far from the plan fails."""
    import torch

    from marjara.planner.measure import planned_peak_bytes

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    planned = {p: planned_peak_bytes(gpu_check.throughput_flags(p, tmp_path / f"tput_{p}_eager"), gpus=1, gpu="H200")
               for p in gpu_check.THROUGHPUT}
    assert all(bytes_ > 2**30 for bytes_ in planned.values())
    for factor, ok in ((1.1, True), (3.0, False)):
        for preset, bytes_ in planned.items():
            write_metrics(tmp_path / f"tput_{preset}_eager",
                          [{"step": 5, "train/loss": 3.0, "train/gpu_peak_memory_gib": bytes_ * factor / 2**30}])
        if ok:
            assert "planned / measured = 0.91" in gpu_check.verify_planned_memory(tmp_path, [])
        else:
            with pytest.raises(gpu_check.CheckFailed, match="planned / measured = 0.33"):
                gpu_check.verify_planned_memory(tmp_path, [])
