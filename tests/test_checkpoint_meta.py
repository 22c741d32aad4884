"""marjara.json as a typed CheckpointMeta: written and read in one place, the file unchanged
(format_version 2, the same keys in the same order), and a missing or wrong-typed key refused
in one line, also from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marjara.checkpoint.format import CheckpointMeta, EmaMeta, RunRecord, read_meta
from marjara.errors import MarjaraError

ROOT = Path(__file__).resolve().parents[1]
RUN = RunRecord(seq_len=16, model_config={"d_model": 64}, tokenizer="bytes", zero_stage=2, world_size=2, dtype="bf16",
                train_args={"lr": 0.001})
# What the trainer wrote before the meta was typed (a version-2 checkpoint of that time).
WRITTEN_BEFORE = {"format_version": 2, "step": 8, "samples_consumed": 64, "tokens_seen": 1024, "seq_len": 16,
                  "model_config": {"d_model": 64}, "tokenizer": "bytes", "zero_stage": 2, "world_size": 2,
                  "dtype": "bf16", "train_args": {"lr": 0.001}, "ema": {"decay": 0.99, "layout": "replicated"},
                  "files": {"algorithm": "xxh3_64", "files": {}}}


def write(tag_dir: Path, fields: dict) -> Path:
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / "marjara.json").write_text(json.dumps(fields))
    return tag_dir


def test_a_save_writes_the_keys_a_checkpoint_has_always_had_and_reads_back_equal(tmp_path):
    meta = CheckpointMeta.for_save(8, {"samples_consumed": 64}, RUN, EmaMeta(0.99, "replicated"))
    meta = CheckpointMeta(**{**meta.__dict__, "files": WRITTEN_BEFORE["files"]})
    assert list(meta.to_json().items()) == list(WRITTEN_BEFORE.items())
    assert read_meta(write(tmp_path / "global_step8", meta.to_json()), "") == meta


def test_an_existing_checkpoint_reads_as_attributes_and_hands_the_stream_its_state(tmp_path):
    meta = read_meta(write(tmp_path / "global_step8", WRITTEN_BEFORE), "")
    assert (meta.step, meta.samples_consumed, meta.tokens_seen, meta.zero_stage, meta.ema.layout) == \
        (8, 64, 1024, 2, "replicated")
    assert meta.data_state == {"samples_consumed": 64}


def test_version_1_without_manifest_or_later_keys_still_reads(tmp_path):
    old = {key: WRITTEN_BEFORE[key] for key in ("step", "samples_consumed", "model_config", "tokenizer",
                                                "zero_stage", "world_size", "dtype")}
    meta = read_meta(write(tmp_path / "global_step8", {**old, "format_version": 1}), "")
    assert (meta.format_version, meta.files, meta.ema, meta.tokens_seen) == (1, None, None, None)


@pytest.mark.parametrize("change, expected", [
    ({"tokenizer": None}, " lacks tokenizer"),
    ({"step": "8"}, ": step is '8', not a non-negative integer"),
    ({"samples_consumed": -1}, ": samples_consumed is -1, not a non-negative integer"),
    ({"world_size": True}, ": world_size is True, not a positive integer"),
    ({"model_config": [64]}, ": model_config is [64], not a JSON object"),
    ({"dtype": "int8"}, ": dtype is 'int8', not one of fp32, bf16, fp16"),
    ({"ema": {"decay": 0.9, "layout": "sharded"}}, ": ema is {'decay': 0.9, 'layout': 'sharded'}, not null or"),
    ({"files": "all"}, ": files is 'all', not a manifest"),
    ({"files": {"algorithm": "xxh3_64", "files": {"mp_rank_00_model_states.pt": {}}}}, ": files is a dict, not a manifest"),
    ({"files": {"algorithm": "xxh3_64"}}, ": files is {'algorithm': 'xxh3_64'}, not a manifest"),
])
def test_a_missing_or_wrong_typed_key_is_one_line_naming_it(tmp_path, change, expected):
    fields = {key: value for key, value in {**WRITTEN_BEFORE, **change}.items() if value is not None}
    tag_dir = write(tmp_path / "global_step8", fields)
    with pytest.raises(MarjaraError) as info:
        read_meta(tag_dir, "use another --tag")
    message = str(info.value)
    assert message.startswith(f"{tag_dir / 'marjara.json'}{expected}") and "\n" not in message
    assert message.endswith("it was not written by MARJARA's trainer, use another --tag")


def test_a_meta_that_breaks_the_schema_is_refused_before_it_is_written():
    with pytest.raises(ValueError, match="checkpoint meta: step is -3, not a non-negative integer"):
        CheckpointMeta.for_save(-3, {"samples_consumed": 0}, RUN, None)
    with pytest.raises(TypeError):  # a data stream whose state marjara.json has no key for
        CheckpointMeta.for_save(1, {"samples_consumed": 8, "epoch": 0}, RUN, None)


@pytest.mark.parametrize("command", ["resume", "convert"])
def test_a_wrong_typed_key_stops_resume_and_convert_in_one_line(tmp_path, command):
    ck = tmp_path / "ck"
    write(ck / "global_step8", {**WRITTEN_BEFORE, "zero_stage": "2"})
    (ck / "latest").write_text("global_step8")
    args = ([str(ROOT / "train.py"), "--max_steps", "1", "--resume", str(ck), "--out_dir", str(tmp_path / "out")]
            if command == "resume" else ["-m", "marjara.convert", str(ck), str(tmp_path / "out")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "zero_stage is '2', not a ZeRO stage 0-3" in lines[0]
    assert not (tmp_path / "out").exists()
