"""bench/gpu_run.sh on a CPU: its dry run names every step in order with its timeout, runs
gpu_check's and gpu_profile's dry runs and writes only what the device's $OUT takes back; bad
arguments stop it in one line."""

import os
import subprocess
import sys

from train_helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_run.sh"


def run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_dry_run_prints_every_step_and_runs_both_dry_runs(tmp_path):
    out = tmp_path / "out"
    result = run("--dry-run", env={"OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line.split(" (timeout")[0][3:] for line in result.stdout.splitlines()
             if line.startswith("== ") and "(timeout" in line]
    assert steps == ["environment", "install", "imports", "gpu_check", "profile", "collect"]
    assert "== gpu_check (timeout 420 s): " in result.stdout  # the budget, plus time for its last verdicts
    assert "--budget_s 330 --work_dir /tmp/marjara_gpu_check" in result.stdout
    # Without .whl/ (CI) it says what to do; with it, the wheels are checked for the device's Python.
    assert ("note: no .whl/ here" in result.stdout) != ("== install check (dry run)" in result.stdout)
    plan = (out / "gpu_check-dry-run.txt").read_text()
    assert plan.splitlines()[-1].startswith("under --budget_s 330: ") and plan.splitlines()[-1] in result.stdout
    assert "top ops by CPU self ms:" in (out / "profile-dry-run.txt").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check-dry-run.txt", "gpu_run.log", "profile-dry-run.txt"] and len(files) <= 8
    assert "dry run: nothing was installed or started on a GPU" in result.stdout


def test_a_rerun_passes_its_checks_on_and_skips_the_profile(tmp_path):
    result = run("--dry-run", "--only", "bf16_zero3", "resume_zero3", "--budget_s", "150",
                 env={"OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--budget_s 150 --work_dir /tmp/marjara_gpu_check --only bf16_zero3 resume_zero3" in result.stdout
    assert "== profile" not in result.stdout
    assert "under --budget_s 150: 2 run, 0 skipped" in result.stdout


def test_bad_arguments_stop_in_one_line(tmp_path):
    cases = {("--budget_s", "soon"): "error: --budget_s must be a whole number of seconds, not 'soon'",
             ("--budget_s",): "error: --budget_s needs a number of seconds",
             ("--only",): "error: --only needs check names (bench/gpu_check.py --dry-run lists them)",
             ("--fast",): "error: unknown argument --fast; use --dry-run, --budget_s N, --only CHECK..., --no_profile"}
    for args, message in cases.items():
        result = run("--dry-run", *args, env={"OUT": str(tmp_path)})
        assert (result.returncode, result.stderr.strip()) == (2, message)
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: $OUT is not set; run this through the device tool (it sets OUT), or set OUT=folder")
    assert not list(tmp_path.iterdir())  # nothing half-written
