"""One run per output folder: refuse, overwrite, or continue the metrics of a resumed run."""

import json

import pytest

from marjara.errors import MarjaraError
from marjara.train.run_dir import claim, continue_metrics


def old_run(out):
    (out / "global_step20").mkdir(parents=True)
    (out / "global_step20" / "marjara.json").write_text("{}")
    (out / "latest").write_text("global_step20")
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")


def test_a_fresh_run_into_another_runs_folder_is_refused_with_the_ways_out(tmp_path):
    old_run(tmp_path / "ck")
    with pytest.raises(MarjaraError) as info:
        claim(str(tmp_path / "ck"), str(tmp_path / "ck" / "tensorboard"), resuming=False, overwrite=False)
    message = str(info.value)
    assert "holds another run (latest, 1 checkpoint tag(s) (global_step20 ...), metrics.jsonl" in message
    assert "--resume" in message and "another --out_dir" in message and "--overwrite" in message


def test_overwrite_removes_the_old_run_and_keeps_other_files(tmp_path):
    out = tmp_path / "ck"
    old_run(out)
    (out / "notes.txt").write_text("mine")
    claim(str(out), str(out / "tensorboard"), resuming=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tensorboard"]
    assert not list((out / "tensorboard").iterdir())


def test_resuming_and_empty_folders_pass(tmp_path):
    old_run(tmp_path / "ck")
    claim(str(tmp_path / "ck"), str(tmp_path / "ck" / "tensorboard"), resuming=True, overwrite=False)
    claim(str(tmp_path / "new"), str(tmp_path / "new" / "tensorboard"), resuming=False, overwrite=False)


def test_metrics_of_an_abandoned_continuation_are_dropped_on_resume(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (10, 20, 30, 40)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5')  # last line cut by a crash
    continue_metrics(str(tmp_path), resume_step=20)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]
