"""train.py as one plain process: exact resume, preemption, checkpoints, logs, bad input."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_helpers import QUICK, ROOT, TRAIN, ema_weights, metrics, run_train, train_losses

# Long enough that a SIGTERM sent once step 2 is logged lands before the last step (a tiny step
# takes ~20 ms here).
STEPS = 40
RUN = QUICK + ["--max_steps", str(STEPS), "--batch_size", "4", "--ema_decay", "0.9", "--eval_interval", "20"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = run_train(RUN + ["--save_interval", "16", "--keep_last", "2", "--out_dir", str(out),
                              "--log_dir", str(out / "tb"), "--sample_tokens", "12"])
    return out, result


def test_loss_falls_and_the_run_leaves_checkpoint_logs_and_a_sample(uninterrupted):
    out, result = uninterrupted
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5
    assert (out / "latest").read_text() == f"global_step{STEPS}"
    assert "sample: The " in result.stdout
    evals = [m for m in metrics(out) if "val/loss" in m]
    assert [m["step"] for m in evals] == [20, 40] and all("val/loss_ema" in m for m in evals)
    assert evals[1]["val/loss"] < evals[0]["val/loss"]


def test_keep_last_rotation_keeps_the_newest_and_latest(uninterrupted):
    out, _ = uninterrupted
    tags = sorted(p.name for p in out.glob("global_step*"))
    assert tags == ["global_step32", "global_step40"]  # saved at 16, 32 and the end; keep_last 2


def test_tensorboard_events_are_written_and_readable(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = uninterrupted
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_sec", "train/mfu", "train/grad_norm", "val/loss",
            "val/ppl", "val/loss_ema"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_resume_is_step_for_step_identical(uninterrupted, tmp_path):
    out, _ = uninterrupted
    # global_step16 was rotated away; resume from the kept step-32 checkpoint to the end.
    run_train(RUN + ["--out_dir", str(tmp_path), "--resume", str(out / "global_step32")])
    resumed, original = train_losses(tmp_path), train_losses(out)
    assert sorted(resumed) == list(range(33, STEPS + 1))
    assert all(resumed[s] == original[s] for s in resumed), (resumed, original)  # bit-identical
    for name, value in ema_weights(tmp_path / "global_step40").items():
        assert torch.equal(value, ema_weights(out / "global_step40")[name]), name


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_identically(uninterrupted, tmp_path):
    out, _ = uninterrupted
    proc = subprocess.Popen([sys.executable, TRAIN, *RUN, "--save_interval", "0", "--out_dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            path = tmp_path / "metrics.jsonl"
            if path.exists() and any(m.get("step", 0) >= 2 for m in metrics(tmp_path)):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: saved checkpoint" in stdout
    stopped_at = int((tmp_path / "latest").read_text().removeprefix("global_step"))
    assert 2 <= stopped_at < STEPS
    resumed_dir = tmp_path / "resumed"
    run_train(RUN + ["--out_dir", str(resumed_dir), "--resume", str(tmp_path)])
    resumed, original = train_losses(resumed_dir), train_losses(out)
    assert sorted(resumed) == list(range(stopped_at + 1, STEPS + 1))
    assert all(resumed[s] == original[s] for s in resumed)


def test_resume_with_another_model_lists_the_differences(uninterrupted, tmp_path):
    out, _ = uninterrupted
    result = run_train(RUN + ["--out_dir", str(tmp_path), "--resume", str(out), "--model_size", "small"],
                       check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --resume") and "d_model: 128 != 256" in error and "n_layers: 4 != 8" in error
    assert not (tmp_path / "latest").exists()


def test_resume_under_another_zero_stage_is_refused(uninterrupted, tmp_path):
    out, _ = uninterrupted
    result = run_train(RUN + ["--out_dir", str(tmp_path), "--resume", str(out),
                              "--deepspeed_config", "ds_configs/zero1.json"], check=False)
    assert result.returncode == 2
    assert "saved under ZeRO stage 0, this run uses stage 1" in result.stderr.strip().splitlines()[-1]


def test_an_incomplete_checkpoint_is_refused(uninterrupted, tmp_path):
    out, _ = uninterrupted
    broken = tmp_path / "ck"
    (broken / "global_step3").mkdir(parents=True)
    (broken / "latest").write_text("global_step3")
    result = run_train(RUN + ["--out_dir", str(tmp_path / "o"), "--resume", str(broken)], check=False)
    assert result.returncode == 2
    assert "incomplete" in result.stderr.strip().splitlines()[-1]


def test_a_checkpoint_of_an_unknown_format_version_is_refused(tmp_path):
    ck = tmp_path / "ck"
    (ck / "global_step3").mkdir(parents=True)
    (ck / "latest").write_text("global_step3")
    meta = {"format_version": 99, "step": 3, "samples_consumed": 12, "model_config": {}, "tokenizer": "bytes",
            "zero_stage": 0, "world_size": 1, "dtype": "fp32"}
    (ck / "global_step3" / "marjara.json").write_text(json.dumps(meta))
    result = run_train(RUN + ["--out_dir", str(tmp_path / "o"), "--resume", str(ck)], check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "has format_version 99; this MARJARA reads checkpoints of version 1 and 2" \
        in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "latest").exists()


@pytest.mark.parametrize("args, message", [
    (["--use_moe", "--deepspeed_config", "ds_configs/zero3.json"], "--use_moe cannot run with ZeRO stage 3"),
    (["--mixed_precision", "fp16"], "fp16 needs a GPU"),
    (["--deepspeed_config", "nope.json"], "DeepSpeed config nope.json does not exist"),
    (["--deepspeed_config", "BAD_JSON"], "is not valid JSON"),
    (["--deepspeed_config", "ds_configs/zero2.json", "--batch_size", "0"], "--batch_size must be >= 1 (got 0)"),
    (["--data", "missing.txt"], "missing.txt"),
    (["--resume", "nowhere/"], "--resume nowhere/: no such folder"),
    (["--ema_decay", "1.5"], "--ema_decay must be in [0, 1)"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--log_interval", "0"], "--log_interval must be >= 1"),
    (["--seq_len", "0"], "--seq_len must be >= 1"),
    (["--min_lr", "0.5"], "--min_lr 0.5 exceeds the peak learning rate"),
    (["--peak_tflops", "0"], "--peak_tflops must be > 0"),
])
def test_bad_flags_stop_with_one_clear_line(tmp_path, args, message):
    args = [str(tmp_path / "bad.json") if a == "BAD_JSON" else a for a in args]
    (tmp_path / "bad.json").write_text("{ not json")
    result = subprocess.run([sys.executable, TRAIN, *QUICK, "--max_steps", "1", "--out_dir", str(tmp_path / "o"), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "latest").exists()


def test_an_unknown_moe_eval_routing_is_refused_with_the_choices(tmp_path):
    result = subprocess.run([sys.executable, TRAIN, *QUICK, "--out_dir", str(tmp_path / "o"), "--use_moe",
                             "--moe_eval_routing", "noisy"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    # (Python 3.12 stopped quoting the choices.)
    assert re.search(r"--moe_eval_routing: invalid choice: 'noisy' \(choose from '?deterministic'?, '?training'?\)",
                     last), last
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_compile_with_moe_says_so_once_and_trains_uncompiled(tmp_path):
    result = run_train(QUICK + ["--max_steps", "2", "--batch_size", "2", "--use_moe", "--compile",
                                "--out_dir", str(tmp_path)])
    assert result.stdout.count("--compile: torch.compile cannot trace DeepSpeed's MoE layers") == 1
    assert sorted(train_losses(tmp_path)) == [1, 2]


def test_compile_of_a_dense_model_trains_as_the_uncompiled_one(tmp_path, monkeypatch):
    common = QUICK + ["--max_steps", "3", "--batch_size", "2"]
    with monkeypatch.context() as env:
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
        compiled = run_train(common + ["--compile", "--out_dir", str(tmp_path / "compiled")])
    assert "--compile: the model runs under torch.compile" in compiled.stdout
    assert list((tmp_path / "inductor").rglob("*.py")), "inductor generated no code"
    run_train(common + ["--out_dir", str(tmp_path / "eager")])
    losses, expected = train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager")
    assert sorted(losses) == [1, 2, 3]
    for step in losses:
        assert losses[step] == pytest.approx(expected[step], abs=1e-4), (losses, expected)
