"""Bad input to python -m marjara.convert: one line naming problem and fix, exit status 2, nothing written."""

import json
import shutil
import subprocess
import sys

import pytest

from checkpoint_runs import ROOT, checkpoint
from marjara.convert import main
from marjara.model.pretrained import CONFIG_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.slow


def refuse(capsys, args, message):
    """Run the CLI in-process; assert exit 2 and a single `error: ...` line matching message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err[0]


@pytest.fixture
def zero2_copy(tmp_path_factory, tmp_path):
    return shutil.copytree(checkpoint(tmp_path_factory, "zero2"), tmp_path / "ckpt")


@pytest.fixture
def zero3_copy(tmp_path_factory, tmp_path):
    return shutil.copytree(checkpoint(tmp_path_factory, "zero3"), tmp_path / "ckpt3")


def test_folder_without_a_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    refuse(capsys, [tmp_path / "empty", tmp_path / "out"], "no DeepSpeed checkpoint in")
    refuse(capsys, [tmp_path / "missing", tmp_path / "out"], "does not exist")
    assert not (tmp_path / "out").exists()


def test_tag_that_does_not_exist_lists_the_available_ones(capsys, zero2_copy, tmp_path):
    refuse(capsys, [zero2_copy, tmp_path / "out", "--tag", "global_step99"],
           "tag 'global_step99' not found in")
    refuse(capsys, [zero2_copy, tmp_path / "out", "--tag", "global_step99"], "available tags: global_step1, global_step2")
    assert not (tmp_path / "out").exists()


def test_missing_rank_file(capsys, zero3_copy, zero2_copy, tmp_path):
    (zero3_copy / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    refuse(capsys, [zero3_copy, tmp_path / "out"], "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing")
    (zero2_copy / "global_step2" / "marjara_rank1.pt").unlink()
    refuse(capsys, [zero2_copy, tmp_path / "out", "--ema"], "marjara_rank1.pt is missing")
    assert not (tmp_path / "out").exists()


def test_truncated_file(capsys, zero3_copy, zero2_copy, tmp_path):
    for path in (zero3_copy / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 zero2_copy / "global_step2" / "mp_rank_00_model_states.pt"):
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[: size // 2])
        refuse(capsys, [path.parents[1], tmp_path / "out"],
               f"{path.parent} is damaged: {path.name} has {size // 2} bytes, {size} were saved (truncated or replaced)")
        # A checkpoint saved before manifests (format_version 1) meets the reader's own check.
        meta_path = path.parent / "marjara.json"
        meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if k != "files"}
        meta_path.write_text(json.dumps({**meta, "format_version": 1}))
        refuse(capsys, [path.parents[1], tmp_path / "out"], f"cannot read {path}: the file is truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_interrupted_save_and_missing_ema(capsys, zero2_copy, tmp_path):
    meta_path = zero2_copy / "global_step2" / "marjara.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "ema": None}))
    refuse(capsys, [zero2_copy, tmp_path / "out", "--ema"], "holds no EMA weights (trained without --ema_decay); convert without --ema")
    meta_path.unlink()  # rank 0 writes it last: its absence means the save never finished
    refuse(capsys, [zero2_copy, tmp_path / "out"], "has no marjara.json")
    assert not (tmp_path / "out").exists()


def test_out_dir_holding_a_different_model_needs_overwrite(capsys, tmp_path_factory, tmp_path):
    zero2, zero3 = checkpoint(tmp_path_factory, "zero2"), checkpoint(tmp_path_factory, "zero3")
    out = tmp_path / "out"
    main([str(zero2), str(out)])
    main([str(zero2), str(out)])  # the same model again: replaced quietly
    before = {name: (out / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)}
    refuse(capsys, [zero3, out], "already holds a different model; pass --overwrite to replace it")
    refuse(capsys, [zero2, out, "--tag", "global_step1"], "already holds a different model")
    refuse(capsys, [zero2, out, "--ema"], "already holds a different model")
    assert {name: (out / name).read_bytes() for name in before} == before
    main([str(zero3), str(out), "--overwrite"])
    assert json.loads((out / CONFIG_FILE).read_text())["source"]["checkpoint"] == str(zero3.resolve())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    refuse(capsys, [zero2, tmp_path / "notes"], "already holds other files")


def test_exit_status_of_the_real_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "marjara.convert", str(tmp_path / "nothing"), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint folder")
    assert not (tmp_path / "out").exists()
