"""train.py's command line as a new user meets it: --help documents every flag with its real default."""

import argparse
import json
import subprocess
import sys

import pytest
from train_helpers import QUICK, ROOT, TRAIN

from marjara.errors import MarjaraError
from marjara.model.config import ModelConfig
from marjara.train.args import _default_text, build_parser, parse_config
from marjara.train.settings import settings


def words(text: str) -> str:
    return " ".join(text.split())


def test_help_shows_every_flag_with_its_help_and_real_default():
    result = subprocess.run([sys.executable, TRAIN, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = words(result.stdout)
    assert "deepscale" not in shown  # DeepSpeed's deprecated spellings stay hidden
    assert "(default: None)" not in shown
    flags = [a for a in build_parser()._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    assert {a.dest for a in flags} >= set(settings()) | {"deepspeed_config"}
    for action in flags:
        help_text = words(action.help)
        assert action.option_strings[-1] in shown
        # Printed as written, nothing dropped (argparse may wrap a line after a hyphen).
        assert "".join(help_text.split()) in "".join(shown.split()), action.dest
        text, _, default = help_text.rpartition(" (default: ")
        assert text and default.endswith(")") and len(default) > 1, action.dest


def test_the_default_help_states_is_the_one_a_run_gets():
    parser = {a.dest: a for a in build_parser()._actions}
    cfg = parse_config([], has_gpu=False)
    for name, spec in settings().items():
        if spec.shown is None:  # a fixed default: stated as it is, and taken as it is
            assert parser[name].help.endswith(f"(default: {_default_text(spec.default)})"), name
            assert getattr(getattr(cfg, spec.section), spec.attr) == spec.default, name
    # Worked out at start, as the help says in words.
    assert (cfg.data.seq_len, cfg.optim.min_lr, cfg.optim.mixed_precision, cfg.run.log_dir) == (
        256, cfg.optim.lr / 10, "fp32", "checkpoints/tensorboard")
    model = ModelConfig()
    model_flags = [spec for spec in settings().values() if spec.model_field]
    assert {spec.name for spec in model_flags} >= {"dropout", "use_moe", "num_experts", "top_k", "ep_size"}
    assert all(getattr(cfg.model, spec.attr) == getattr(model, spec.attr) for spec in model_flags)  # the model's defaults


def test_a_json_scheduler_that_contradicts_max_steps_stops_train_py(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"scheduler": {"type": "WarmupCosineLR",
                                                                "params": {"total_num_steps": 1000}}}))
    result = subprocess.run([sys.executable, TRAIN, *QUICK, "--max_steps", "800", "--deepspeed_config",
                             str(tmp_path / "ds.json"), "--out_dir", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --max_steps 800 contradicts \"total_num_steps\": 1000 in "), last
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_deepspeeds_deprecated_config_flag_is_refused_with_the_current_name():
    with pytest.raises(MarjaraError, match="--deepscale_config is DeepSpeed's deprecated name; use --deepspeed_config"):
        parse_config(["--deepscale_config", "ds_configs/zero2.json"])
