"""bench/gpu_check.py as far as a CPU can check it: the plan (--dry-run) in its order and under
its budget, every command's flags accepted by the command it runs, the micro-batch search, the
verdicts on metrics it reads, and the one-line refusal without a GPU."""

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
import gpu_schedule  # noqa: E402  (gpu_check put bench/ on the path)
import gpu_throughput  # noqa: E402

CORRECTNESS = {"bf16_zero0", "bf16_zero1", "bf16_zero2", "bf16_zero3", "fp16_zero0", "fp16_zero2", "moe_zero2",
               "grad_checkpointing", "resume_zero3", "convert_generate"}
THROUGHPUT = {f"throughput_{preset}_{mode}" for preset in ("small", "large", "1b")
              for mode in ("eager", "compiled", "eager_gc", "compiled_gc")}
REQUIRED = CORRECTNESS | THROUGHPUT | {"bf16_matmul", "compile", "planned_memory"}


def dry_run(tmp_path, *flags):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work_dir", str(tmp_path), *flags],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def planned_names(stdout):
    return [line.split(" ")[0] for line in stdout.splitlines() if not line.startswith(" ") and "(about" in line]


def test_dry_run_prints_every_check_in_priority_order_and_what_the_budget_skips(tmp_path):
    out = dry_run(tmp_path)
    names = planned_names(out)
    assert set(names) == REQUIRED and len(names) == len(REQUIRED)
    # The matmul ceiling, then 1b's MFU eager and compiled, before anything else.
    assert names[:3] == ["bf16_matmul", "throughput_1b_eager", "throughput_1b_compiled"]
    assert f"{len(REQUIRED)} checks, about" in out and not list(tmp_path.iterdir())  # nothing ran
    last = out.strip().splitlines()[-1]
    assert last.startswith("under --budget_s 330: ") and " skipped (" in last
    skipped = set(last.split(" skipped (")[1].rstrip(")").split(", "))
    assert not skipped & ({"bf16_matmul", "throughput_1b_eager", "throughput_1b_compiled"} | CORRECTNESS)
    # What the default budget runs, as the estimates add up, stays within it.
    checks, _ = gpu_check.plan(tmp_path)
    ran = [c for c in checks if c.name not in skipped]
    assert sum(gpu_schedule.group_estimate(g) for g in gpu_schedule.groups(ran)) <= 330
    assert dry_run(tmp_path, "--budget_s", "100000").strip().splitlines()[-1].endswith(f"{len(REQUIRED)} run, 0 skipped")
    assert "throughput_1b_compiled" in dry_run(tmp_path, "--budget_s", "60").strip().splitlines()[-1]


def test_only_takes_along_the_check_it_needs(tmp_path):
    assert planned_names(dry_run(tmp_path, "--only", "convert_generate")) == ["resume_zero3", "convert_generate"]


def test_every_command_is_accepted_by_the_command_it_runs(tmp_path):
    from marjara import convert, generate
    from marjara.train.args import parse_config

    checks, _ = gpu_check.plan(tmp_path)
    for check in checks:
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


def test_the_micro_batch_search_backs_off_until_one_fits():
    def fits_up_to(limit):
        return lambda batch: batch <= limit

    assert gpu_throughput.largest_fitting(18, fits_up_to(18)) == (18, [18])
    assert gpu_throughput.largest_fitting(18, fits_up_to(10)) == (9, [18, 13, 9])
    assert gpu_throughput.largest_fitting(18, fits_up_to(5)) == (None, [18, 13, 9])  # at most MAX_TRIES runs
    assert gpu_throughput.largest_fitting(2, fits_up_to(0), tries=5) == (None, [2, 1])  # never below 1
    assert gpu_throughput.ran_out_of_memory("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert not gpu_throughput.ran_out_of_memory("error: unknown tokenizer")


def test_the_planned_micro_batches_fit_the_planner_and_the_token_cap():
    for preset, seq in gpu_throughput.SEQ_LEN.items():
        for checkpointed in (False, True):
            assert 1 <= gpu_throughput.planned_batch(preset, checkpointed, "H200") * seq <= gpu_throughput.MAX_TOKENS
    # 1b without checkpointing is held by memory, not by the cap; a smaller GPU fits fewer.
    h200 = gpu_throughput.planned_batch("1b", False, "H200")
    assert h200 < gpu_throughput.MAX_TOKENS // 2048 and gpu_throughput.planned_batch("1b", False, "A100") < h200


def test_parallel_checks_are_admitted_only_while_the_budget_holds():
    def check(name, seconds, needs=None):
        return gpu_schedule.Check(name, [], lambda w, o: "", seconds, parallel=True, needs=needs)

    group = [check("a", 30), check("b", 30), check("resume", 60), check("convert", 30, needs="resume")]
    assert gpu_schedule.group_estimate(group) == 90  # the chain resume -> convert, more than 150 / 4
    assert [c.name for c in gpu_schedule.admit(group, 90)] == ["a", "b", "resume", "convert"]
    assert [c.name for c in gpu_schedule.admit(group, 60)] == ["a", "b", "resume"]
    solo = gpu_schedule.Check("solo", [], lambda w, o: "", 20)
    assert [len(g) for g in gpu_schedule.groups([solo, *group, solo])] == [1, 4, 1]


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
    assert result.returncode == 2 and "unknown check(s) bf16_zero9; choose from bf16_matmul, throughput_1b_eager" in result.stderr


def test_throughput_is_read_from_the_runs_log_windows(tmp_path):
    """train.py logs the loss every --log_interval steps only; the last window's figures count."""
    rows = [{"step": s, "train/loss": 11.0 - s / 3, "train/tokens_per_sec": 1000.0 * s, "train/mfu": 0.01 * s,
             "train/gpu_peak_memory_gib": 40.0 + s} for s in range(3, 10, 3)]
    write_metrics(tmp_path / "run", rows)
    got = gpu_throughput.measured(tmp_path / "run")
    assert (got["tokens_per_sec"], got["mfu"], got["measured_gib"]) == (9000.0, 0.09, 49.0)
    write_metrics(tmp_path / "run", [{**r, "train/loss": 11.0} for r in rows])
    with pytest.raises(gpu_check.CheckFailed, match="finite and falling"):
        gpu_throughput.measured(tmp_path / "run")
    write_metrics(tmp_path / "run", rows[:2])
    with pytest.raises(gpu_check.CheckFailed, match=r"logged steps \[3, 6\], expected every 3 to 9"):
        gpu_throughput.measured(tmp_path / "run")


def test_the_planners_peak_is_compared_with_the_measured_one():
    """The planner reads each run's own flags; a measured peak far from the plan fails."""
    run = gpu_throughput.Run("1b")
    planned = gpu_throughput.planned_peak(run, 16, "H200")
    assert planned > gpu_throughput.planned_peak(run, 8, "H200") > 2**30
    row = {"run": run.name, "preset": "1b", "mode": "eager", "seq_len": 2048, "batch": 16, "tried": [16],
           "tokens_per_sec": 50_000.0, "mfu": 0.4, "planned_gib": planned / 2**30}
    assert gpu_throughput.verify_planned_memory(
        [{**row, "measured_gib": planned / 2**30 * 1.1, "planned_over_measured": 1 / 1.1}]) == (
        "planned / measured: 1b eager 0.91")
    with pytest.raises(gpu_check.CheckFailed, match="outside 0.5-2 for tput_1b_eager: 1b eager 0.33"):
        gpu_throughput.verify_planned_memory([{**row, "measured_gib": 3 * planned / 2**30,
                                               "planned_over_measured": 1 / 3}])
    with pytest.raises(gpu_check.CheckSkipped):
        gpu_throughput.verify_planned_memory([])
    table = gpu_throughput.table([{**row, "measured_gib": 40.0, "planned_over_measured": row["planned_gib"] / 40}],
                                 matmul_tflops=790.0, peak_tflops=989.0)
    assert "| 1b | eager | 16 x 2048 | 50,000 | 40.0% | 50.1% |" in table


def test_a_run_out_of_memory_is_repeated_at_a_smaller_micro_batch(tmp_path, monkeypatch):
    """execute() as on the device, with train.py replaced by a fake that runs out of memory above
    12 sequences and otherwise leaves what train.py leaves: metrics.jsonl and a checkpoint."""
    import time
    from types import SimpleNamespace

    calls = []

    def fake_train(cmd, **kwargs):
        batch, out = int(cmd[cmd.index("--batch_size") + 1]), gpu_throughput.Path(cmd[cmd.index("--out_dir") + 1])
        calls.append(batch)
        (out / "global_step9").mkdir(parents=True)
        if batch > 12:
            return SimpleNamespace(returncode=1, stdout="", stderr="torch.OutOfMemoryError: CUDA out of memory.")
        write_metrics(out, [{"step": s, "train/loss": 11.0 - s / 3, "train/tokens_per_sec": 2000.0 * batch,
                             "train/mfu": 0.4, "train/gpu_peak_memory_gib": 100.0} for s in (3, 6, 9)])
        return SimpleNamespace(returncode=0, stdout="step 9 | loss 8.0", stderr="")

    monkeypatch.setattr(gpu_throughput.subprocess, "run", fake_train)
    batches, results = {}, []
    verdict, detail = gpu_throughput.execute(gpu_throughput.Run("1b"), tmp_path, time.monotonic() + 600, "H200",
                                             batches, results)
    assert calls == [18, 13, 9] and batches == {("1b", False): 9}
    assert verdict == "PASS" and detail.startswith("micro-batch 9 x 2048: 18,000 tok/s, MFU 40.0%, peak planned")
    assert detail.endswith("(out of memory at 18, 13)")
    assert [r["batch"] for r in json.loads((tmp_path / gpu_throughput.RESULTS_FILE).read_text())] == [9]
    assert not list(tmp_path.glob("*/global_step*"))  # each try's checkpoint is gone
    assert "CUDA out of memory" in (tmp_path / "tput_1b_eager_b18.log").read_text()
    # The compiled run starts from the micro-batch that fitted, and must say it ran compiled.
    with pytest.raises(gpu_check.CheckFailed, match="did not report running under torch.compile"):
        gpu_throughput.execute(gpu_throughput.Run("1b", compiled=True), tmp_path, time.monotonic() + 600, "H200",
                               batches, results)
    assert calls[-1] == 9


def test_the_verdicts_that_only_read_results_run_even_past_the_budget():
    reader = gpu_schedule.Check("planned_memory", [], lambda w, o: "", 0)
    assert gpu_schedule.admit([reader], -30.0) == [reader]
    assert gpu_schedule.admit([gpu_schedule.Check("run", [], lambda w, o: "", 10)], -30.0) == []
