"""NaN injected into a 2-rank run through poisoned data: the run skips the bad steps, stops after
--max_bad_steps in a row with one line (rank 0) and exit 3, saves nothing, leaves `latest` and its
files as they were, and `--resume --skip_samples` continues past the poisoned stretch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from poisoned_train import POISON
from train_helpers import QUICK, ROOT, metrics, run_ranks

SEQ_LEN = 32
WINDOWS = 400
SEED = 1337
MICRO = 2
LONE_BAD_STEP = 3                     # 1-based optimizer steps whose every sample is poisoned:
BAD_STEPS = (5, 6, 7)                 # one alone, then a streak of --max_bad_steps
SCRIPT = str(ROOT / "tests" / "poisoned_train.py")


def poisoned_folder(folder: Path, G: int) -> list[int]:
    """A prepared folder (bytes tokenizer) whose windows at the samples of BAD_STEPS hold POISON."""
    from marjara.data.sampler import GlobalSampler

    rng = np.random.default_rng(0)
    train = rng.integers(0, 200, size=WINDOWS * SEQ_LEN + 1).astype("<u2")
    sampler = GlobalSampler(WINDOWS, SEED)
    windows = np.concatenate([sampler.window_indices((LONE_BAD_STEP - 1) * G, LONE_BAD_STEP * G),
                              sampler.window_indices((BAD_STEPS[0] - 1) * G, BAD_STEPS[-1] * G)])
    train[windows * SEQ_LEN + 1] = POISON  # inside the window, not its shared boundary token
    val = rng.integers(0, 200, size=20 * SEQ_LEN + 1).astype("<u2")
    folder.mkdir()
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({
        "format_version": 1, "dtype": "uint16", "tokenizer": "bytes", "vocab_size": 257, "eot_id": 256,
        "train_tokens": len(train), "val_tokens": len(val), "documents": 1, "val_fraction": 0.05}))
    return sorted(int(w) for w in windows)


def args(data: Path, out: Path, stage: int, *extra: str) -> list[str]:
    return [*QUICK, "--data", str(data), "--seq_len", str(SEQ_LEN), "--seed", str(SEED), "--batch_size", str(MICRO),
            "--deepspeed_config", f"ds_configs/zero{stage}.json", "--max_steps", "10", "--save_interval", "2",
            "--max_bad_steps", "3", "--out_dir", str(out), *extra]


# ZeRO-2: DeepSpeed's ZeRO optimizer refuses the non-finite step itself. ZeRO-0 in fp32: DeepSpeed
# runs the client optimizer directly, and MARJARA's GuardedAdamW refuses it. sp 2: the poisoned
# token lies in the first half of each window, so only one of the two sequence ranks sees it.
@pytest.mark.slow
@pytest.mark.parametrize("stage, world, sp", [(2, 2, 1), (0, 1, 1), (2, 2, 2)])
def test_a_poisoned_stretch_stops_the_run_and_resume_skips_past_it(tmp_path, stage, world, sp):
    from marjara.checkpoint.locate import find_resume_point
    from marjara.checkpoint.verify import find_damage

    data, out = tmp_path / "data", tmp_path / "ck"
    G = MICRO * world // sp  # samples per optimizer step
    poisoned_folder(data, G)
    results = run_ranks(args(data, out, stage, "--sp_size", str(sp)), world, script=SCRIPT)

    for rank, result in enumerate(results):
        assert result.returncode == 3, f"rank {rank}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr
    skip = BAD_STEPS[-1] * G - 4 * G  # from global_step4's position to the end of the poisoned stretch
    assert results[0].stderr.strip().splitlines() == [
        f"error: stopped at step 7: 3 steps in a row with a non-finite loss or gradient norm (--max_bad_steps 3), "
        f"from step 5 on (global sample {4 * G}); none was applied and nothing was saved; {out}/latest still "
        f"names global_step4: to step over the data that blew up, resume with --resume {out} --skip_samples {skip}"]
    assert all(result.stderr.strip() == "" for result in results[1:])
    for step in (LONE_BAD_STEP, *BAD_STEPS):
        assert f"step {step:>6} | non-finite loss or gradient norm: update skipped" in results[0].stdout

    # latest still names the last good tag, whose files are exactly as saved; no later tag exists.
    assert (out / "latest").read_text().strip() == "global_step4"
    assert sorted(p.name for p in out.glob("global_step*")) == ["global_step2", "global_step4"]
    point = find_resume_point(str(out))
    assert find_damage(point.tag_dir, point.manifest) is None
    records = metrics(out)
    assert [r["train/non_finite_steps"] for r in records if "train/non_finite_steps" in r] == [1, 2, 3, 4]
    # The lone bad step was not applied: the next step trains on finite weights (and was saved).
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert np.isnan(losses[LONE_BAD_STEP]) and np.isfinite(losses[LONE_BAD_STEP + 1])

    resumed = run_ranks(args(data, out, stage, "--sp_size", str(sp), "--resume", str(out), "--skip_samples", str(skip)),
                        world,
                        script=SCRIPT)
    for rank, result in enumerate(resumed):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "non-finite" not in resumed[0].stdout
    assert f"--skip_samples {skip}: stepping over global samples {4 * G}..{4 * G + skip - 1}" in resumed[0].stdout
    after = {r["step"]: r["train/loss"] for r in metrics(out) if "train/loss" in r}
    # The resumed run continued the same metrics file from step 4: the stopped run's records of
    # steps 5-7 are gone, replaced by the resumed run's finite ones.
    assert sorted(after) == list(range(1, 11)) and all(np.isfinite(after[s]) for s in range(4, 11))
    assert [r["step"] for r in metrics(out) if "train/non_finite_steps" in r] == [LONE_BAD_STEP]
    assert (out / "latest").read_text().strip() == "global_step10"
    # So did the tensorboard events: the stopped run's steps 5-7 are purged from their view.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))
    assert all(np.isfinite(e.value) for e in events.Scalars("train/loss") if e.step > LONE_BAD_STEP)
