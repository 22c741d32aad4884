"""One run per output folder: refuse, overwrite, or continue the metrics of a resumed run (the
Checkpointer's claim, here in a one-rank group)."""

import json
from pathlib import Path

import pytest

from marjara.checkpoint import store
from marjara.checkpoint.format import CheckpointMeta
from marjara.errors import MarjaraError
from marjara.train.checkpointer import Checkpointer
from marjara.train.run_dir import continue_metrics

pytestmark = pytest.mark.usefixtures("process_group")  # claim() agrees through barriers


def old_run(out):
    (out / "global_step20").mkdir(parents=True)
    (out / "global_step20" / "marjara.json").write_text("{}")
    (out / "latest").write_text("global_step20")
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")


def claim(out, resume=None, overwrite=False):
    Checkpointer(str(out), keep_last=0, save_interval=0, resume=resume, zero_stage=0).claim(
        str(out / "tensorboard"), overwrite)


class OneFileEngine:
    def save_checkpoint(self, out_dir, tag, save_latest):
        (Path(out_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def saved_run(out, step):
    meta = CheckpointMeta(step=step, samples_consumed=4 * step, model_config={}, tokenizer="bytes", zero_stage=0,
                          world_size=1, dtype="fp32")
    store.save(OneFileEngine(), out, meta, {"rng": {}}, keep_last=0)


def test_a_fresh_run_into_another_runs_folder_is_refused_with_the_ways_out(tmp_path):
    old_run(tmp_path / "ck")
    with pytest.raises(MarjaraError) as info:
        claim(tmp_path / "ck")
    message = str(info.value)
    assert "holds another run (latest, 1 checkpoint tag(s) (global_step20 ...), metrics.jsonl" in message
    assert "--resume" in message and "another --out_dir" in message and "--overwrite" in message


def test_overwrite_removes_the_old_run_and_keeps_other_files(tmp_path):
    out = tmp_path / "ck"
    old_run(out)
    (out / "notes.txt").write_text("mine")
    claim(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tensorboard"]
    assert not list((out / "tensorboard").iterdir())


def test_resuming_into_the_same_folder_and_empty_folders_pass_and_another_runs_folder_is_refused(tmp_path):
    saved_run(tmp_path / "ck", 20)
    lines = [json.dumps({"step": s, "train/loss": 1.0}) for s in (10, 20, 30)]
    (tmp_path / "ck" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    claim(tmp_path / "ck", resume=str(tmp_path / "ck"))
    assert [json.loads(x)["step"] for x in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    claim(tmp_path / "new")
    old_run(tmp_path / "other")
    with pytest.raises(MarjaraError, match="holds another run"):
        claim(tmp_path / "other", resume=str(tmp_path / "ck"))


def test_metrics_of_an_abandoned_continuation_are_dropped_on_resume(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (10, 20, 30, 40)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5')  # last line cut by a crash
    continue_metrics(str(tmp_path), resume_step=20)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]
