"""The training loop waits for the device at most once per optimizer step (the stop signal and
the non-finite flag, all-reduced together), and never between the micro-batches of a step; the
loss is read at log steps. ZeRO-1: under ZeRO-0 in fp32 the guarded AdamW's own finite check
(marjara/train/nonfinite.py) is a second read, inside the optimizer step, as the overflow checks
of DeepSpeed's own optimizers are."""

import json
import subprocess
import sys

from train_helpers import QUICK, ROOT

STEPS, ACCUM = 4, 4


def test_no_host_sync_per_micro_batch(tmp_path):
    # logs only at the last step; no evaluation; the only save is at the end
    flags = [*QUICK, "--max_steps", str(STEPS), "--grad_accum", str(ACCUM), "--batch_size", "2",
             "--log_interval", "100", "--save_interval", "0", "--deepspeed_config", "ds_configs/zero1.json",
             "--out_dir", str(tmp_path)]
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "host_sync_probe.py"), *flags],
                            capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    windows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(windows) == STEPS * ACCUM
    boundaries = [w["boundary"] for w in windows]
    assert boundaries == ([False] * (ACCUM - 1) + [True]) * STEPS
    within_steps = [w["syncs"] for w in windows if not w["boundary"]]
    assert within_steps == [0] * len(within_steps), windows
    # between optimizer steps (the last one also logs, saves and checks replicas): the stop signal
    between_steps = [w["syncs"] for w in windows if w["boundary"]][:-1]
    assert all(n <= 1 for n in between_steps), windows
