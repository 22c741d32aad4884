"""Save protocol: `latest` only ever names a complete checkpoint; rotation spares what it names."""

import json
from pathlib import Path

import pytest

from marjara.checkpoint import format, locate, store as ckpt
from marjara.checkpoint.format import CheckpointMeta
from marjara.checkpoint.locate import find_resume_point
from marjara.errors import MarjaraError


class FakeEngine:
    """Writes a DeepSpeed-like file per save; can be told to die halfway through one."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at

    def save_checkpoint(self, out_dir, tag, save_latest):
        assert save_latest is False  # MARJARA writes `latest` itself, last
        (Path(out_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if tag == format.tag_for(self.crash_at or -1):
            raise KeyboardInterrupt("killed during save")


def meta(step):
    return CheckpointMeta(step=step, samples_consumed=8 * step, model_config={}, tokenizer="bytes", zero_stage=0,
                          world_size=1, dtype="fp32")


def save(engine, out, step, keep_last=0):
    return ckpt.save(engine, out, meta(step), {"rng": {}}, keep_last)


def test_a_crash_during_a_save_leaves_latest_on_the_previous_checkpoint(tmp_path):
    save(FakeEngine(), tmp_path, 10)
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(crash_at=20), tmp_path, 20)
    assert (tmp_path / "latest").read_text() == "global_step10"
    assert not (tmp_path / "global_step20" / format.META_FILE).exists()
    assert find_resume_point(str(tmp_path)).tag == "global_step10"
    with pytest.raises(MarjaraError, match="incomplete"):
        find_resume_point(str(tmp_path / "global_step20"))


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save(FakeEngine(), tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step3", "global_step4"]
    assert (tmp_path / "latest").read_text() == "global_step4"


def test_rotation_never_deletes_what_latest_names(tmp_path):
    for step in (5, 6, 7):
        save(FakeEngine(), tmp_path, step)
    # A re-run saves an older step again: `latest` now names the oldest tag, which must survive.
    save(FakeEngine(), tmp_path, 5, keep_last=1)
    assert (tmp_path / "latest").read_text() == "global_step5"
    assert (tmp_path / "global_step5" / format.META_FILE).exists()


def test_re_saving_the_step_latest_names_moves_latest_back_first(tmp_path):
    save(FakeEngine(), tmp_path, 2)
    save(FakeEngine(), tmp_path, 4)
    # A run resumed from step 2 into the same folder saves step 4 again, and dies doing it.
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(crash_at=4), tmp_path, 4)
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert find_resume_point(str(tmp_path)).tag == "global_step2"


@pytest.mark.parametrize("version", [3, None, "1"])
def test_an_unknown_format_version_is_refused_by_resume_and_convert(tmp_path, version):
    save(FakeEngine(), tmp_path, 3)
    meta_path = tmp_path / "global_step3" / format.META_FILE
    stored = json.loads(meta_path.read_text())
    assert stored["format_version"] == format.FORMAT_VERSION
    meta_path.write_text(json.dumps({**stored, "format_version": version}))
    for open_it in (find_resume_point, locate.open_checkpoint):
        with pytest.raises(MarjaraError, match=f"has format_version {version!r}; this MARJARA reads checkpoints of "
                                               "version 1 and 2"):
            open_it(str(tmp_path))


def test_the_manifest_lists_every_file_but_marjara_json_and_version_1_reads_unverified(tmp_path):
    from marjara.checkpoint.verify import check_checkpoint

    save(FakeEngine(), tmp_path, 5)
    point = find_resume_point(str(tmp_path))
    assert sorted(point.manifest["files"]) == ["marjara_rank0.pt", "mp_rank_00_model_states.pt"]
    assert check_checkpoint(point, lambda c: c.tag) is True
    meta_path = tmp_path / "global_step5" / format.META_FILE
    old = {k: v for k, v in json.loads(meta_path.read_text()).items() if k != format.FILES_KEY}
    meta_path.write_text(json.dumps({**old, "format_version": 1}))
    assert check_checkpoint(find_resume_point(str(tmp_path)), lambda c: c.tag) is False
    meta_path.write_text(json.dumps({**old, "format_version": 2}))  # version 2 must carry its manifest
    with pytest.raises(MarjaraError, match="lacks files"):
        find_resume_point(str(tmp_path))
