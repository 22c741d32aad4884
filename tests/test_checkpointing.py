"""Save protocol: `latest` only ever names a complete checkpoint; rotation spares what it names."""

from pathlib import Path

import pytest

from marjara.checkpoint import store as ckpt
from marjara.errors import MarjaraError


class FakeEngine:
    """Writes a DeepSpeed-like file per save; can be told to die halfway through one."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at

    def save_checkpoint(self, out_dir, tag, save_latest):
        assert save_latest is False  # MARJARA writes `latest` itself, last
        (Path(out_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if tag == ckpt.tag_for(self.crash_at or -1):
            raise KeyboardInterrupt("killed during save")


def save(engine, out, step, keep_last=0):
    return ckpt.save(engine, out, step, {"step": step}, {"rng": {}}, keep_last)


def test_a_crash_during_a_save_leaves_latest_on_the_previous_checkpoint(tmp_path):
    save(FakeEngine(), tmp_path, 10)
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(crash_at=20), tmp_path, 20)
    assert (tmp_path / "latest").read_text() == "global_step10"
    assert not (tmp_path / "global_step20" / ckpt.META_FILE).exists()
    assert ckpt.find_resume_point(str(tmp_path)).tag == "global_step10"
    with pytest.raises(MarjaraError, match="incomplete"):
        ckpt.find_resume_point(str(tmp_path / "global_step20"))


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
    assert (tmp_path / "global_step5" / ckpt.META_FILE).exists()


def test_re_saving_the_step_latest_names_moves_latest_back_first(tmp_path):
    save(FakeEngine(), tmp_path, 2)
    save(FakeEngine(), tmp_path, 4)
    # A run resumed from step 2 into the same folder saves step 4 again, and dies doing it.
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(crash_at=4), tmp_path, 4)
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert ckpt.find_resume_point(str(tmp_path)).tag == "global_step2"
