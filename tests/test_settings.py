"""One declaration per setting (marjara/train/settings.py, ModelConfig's knobs): the tables the rest
of MARJARA uses are derived from it, and each range rule is written once and refuses a bad flag
and a bad DeepSpeed JSON value alike."""

import dataclasses
import json

import pytest

from marjara.errors import MarjaraError
from marjara.model.config import PRESETS, ModelConfig, architectural_fields
from marjara.planner.inputs import PLANNED_FLAGS
from marjara.train import ds_validate
from marjara.train.args import build_parser, help_text, parse_config
from marjara.train.build import model_config
from marjara.train.config import TrainConfig
from marjara.train.settings import SECTIONS, json_rules, settings

MODEL_FLAGS = [f for f in dataclasses.fields(ModelConfig) if f.metadata["flag"]]
# What checkpoints saved before the sections record under train_args: resuming and reading them
# keeps working only while these names stay.
TRAIN_ARGS_OF_OLD_CHECKPOINTS = {
    "data", "tokenizer", "seq_len", "model_size", "init_from", "dropout", "use_moe", "num_experts", "top_k", "ep_size",
    "capacity_factor", "eval_capacity_factor", "moe_eval_routing", "min_capacity", "moe_layer_freq", "use_residual",
    "aux_loss_coef", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "adam_betas", "adam_eps",
    "batch_size", "grad_accum", "grad_clip", "mixed_precision", "zero_stage", "grad_checkpointing", "ema_decay",
    "compile", "seed", "eval_interval", "eval_batches", "log_interval", "log_dir", "out_dir", "save_interval",
    "keep_last", "resume", "overwrite", "skip_samples", "max_bad_steps", "sample_tokens", "peak_tflops",
    "deepspeed_config"}


def test_every_model_field_marked_flag_is_a_setting_of_the_model_section_with_its_declaration():
    table = settings()
    for spec in MODEL_FLAGS:
        setting = table[spec.name]
        assert (setting.section, setting.model_field, setting.default) == ("model", True, spec.default)
        assert (setting.help, setting.rule) == (spec.metadata["help"], spec.metadata["rule"])
        assert setting.architectural == (spec.name in architectural_fields())
    assert {s.name for s in table.values() if s.model_field} == {f.name for f in MODEL_FLAGS}


def test_the_architectural_settings_are_exactly_the_model_flags_that_define_the_weights():
    """They are the ones --init_from takes from the folder and refuses a contradicting flag of."""
    architectural = {s.name for s in settings().values() if s.architectural}
    assert architectural == {f.name for f in MODEL_FLAGS} & set(architectural_fields())
    assert {"use_moe", "num_experts", "top_k", "moe_layer_freq", "use_residual"} <= architectural
    assert not architectural & {"dropout", "ep_size", "capacity_factor", "aux_loss_coef"}


def test_no_preset_sets_a_model_flag():
    """A model flag's default is ModelConfig's and always applies: a preset setting that field
    would be overridden silently by the flag's default."""
    flags = {f.name for f in MODEL_FLAGS}
    for name, preset in PRESETS.items():
        assert not flags & set(preset), name


def test_every_model_flag_reaches_the_model_config():
    """Each ModelConfig flag given to train.py is the model's value (MoE ones with --use_moe)."""
    changed = {"dropout": 0.1, "use_moe": True, "num_experts": 8, "top_k": 2, "capacity_factor": 2.0,
               "eval_capacity_factor": 3.0, "min_capacity": 1, "use_residual": True, "moe_layer_freq": 1, "ep_size": 2,
               "aux_loss_coef": 0.5, "rope_theta": 5e5}
    assert set(changed) == {f.name for f in MODEL_FLAGS}  # a new model flag gets a value here
    config = model_config(TrainConfig.from_flags(changed, has_gpu=False), 256)
    assert {name: getattr(config, name) for name in changed} == changed
    dense = model_config(TrainConfig.from_flags({"num_experts": 8}, has_gpu=False), 256)
    assert dense.num_experts == ModelConfig().num_experts  # an MoE setting means nothing without --use_moe


def test_the_planner_lists_exactly_the_settings_declared_to_change_the_plan():
    declared = {s.name for s in settings().values() if s.plan}
    assert PLANNED_FLAGS == declared | {"deepspeed_config", "help"}
    assert {"batch_size", "zero_stage", "num_experts", "seq_len"} <= declared and "lr" not in declared
    from marjara.planner.inputs import build_parser as plan_parser

    listed = {a.dest for a in plan_parser()._actions if a.help != "==SUPPRESS==" and a.dest in settings()}
    assert listed == declared


def test_help_names_the_json_keys_each_setting_shares():
    parser = {a.dest: a for a in build_parser()._actions}
    for name, spec in settings().items():
        assert parser[name].help == help_text(spec)
        for path in spec.json:
            assert path in parser[name].help, name
    assert "(= train_micro_batch_size_per_gpu)" in parser["batch_size"].help
    assert "(= optimizer.params.lr, scheduler.params.warmup_max_lr)" in parser["lr"].help


def test_help_groups_are_the_sections():
    titles = [g.title for g in build_parser()._action_groups]
    assert [title for _, title in SECTIONS.values()] == [t for t in titles if t in {t for _, t in SECTIONS.values()}]


def test_every_default_satisfies_its_own_rule():
    for name, spec in settings().items():
        if spec.rule is not None and spec.default is not None:
            assert spec.rule.holds(spec.default), name


def test_plain_values_keep_the_flat_names_checkpoints_record():
    values = parse_config([], has_gpu=False).plain_values()
    assert set(values) == set(settings()) | {"deepspeed_config"}
    assert set(values) >= TRAIN_ARGS_OF_OLD_CHECKPOINTS
    assert values["batch_size"] == 8 and values["adam_betas"] == [0.9, 0.95] and values["data"] is None
    json.dumps(values)


def test_the_json_scalars_ds_validate_lists_itself_are_none_a_setting_holds():
    """A DeepSpeed key a setting holds is checked by that setting's rule, never a second copy."""
    assert not set(ds_validate._SCALARS) & set(json_rules())


def _bad_value(rule, candidates):
    return next(v for v in candidates if not rule.holds(v))


SHARED = [s for s in settings().values() if s.json and s.rule is not None]


@pytest.mark.parametrize("spec", SHARED, ids=[s.name for s in SHARED])
def test_one_rule_refuses_the_flag_and_the_json_value(tmp_path, spec):
    bad = _bad_value(spec.rule, [(0.5, 1.5)] if spec.name == "adam_betas" else [-1, 0, 5])
    with pytest.raises(MarjaraError) as from_flag:
        TrainConfig.from_flags({spec.name: bad}, has_gpu=False)
    assert str(from_flag.value).startswith(f"--{spec.name} must be {spec.rule.bound} (got ")
    for path in spec.json:
        outer, _, key = path.rpartition(".")
        config: dict = {key: list(bad) if isinstance(bad, tuple) else bad}
        for part in reversed(outer.split(".") if outer else []):
            config = {part: config}
        if "optimizer" in config:
            config["optimizer"]["type"] = "AdamW"
        if "scheduler" in config:
            config["scheduler"]["type"] = "WarmupCosineLR"
        (tmp_path / "ds.json").write_text(json.dumps(config))
        with pytest.raises(MarjaraError) as from_json:
            TrainConfig.from_flags({"deepspeed_config": str(tmp_path / "ds.json")}, has_gpu=False)
        assert f'"{path}" must be {spec.rule.described} (or "auto"), not ' in str(from_json.value), path
        assert spec.rule.bound in str(from_flag.value) and spec.rule.bound in str(from_json.value)


def test_a_model_flag_is_checked_by_the_model_configs_own_rule():
    with pytest.raises(MarjaraError, match=r"^--num_experts must be > 0 \(got 0\)$"):
        TrainConfig.from_flags({"use_moe": True, "num_experts": 0}, has_gpu=False)
    with pytest.raises(MarjaraError, match=r"invalid model config: num_experts must be > 0 \(got 0\)"):
        ModelConfig(use_moe=True, num_experts=0)
    TrainConfig.from_flags({"num_experts": 0}, has_gpu=False)  # without --use_moe it means nothing, as before


@pytest.mark.usefixtures("process_group")
def test_init_from_refuses_every_architectural_flag_that_contradicts_the_folder(tmp_path):
    """The list --init_from checks is the declaration's: each architectural setting, none forgotten."""
    import torch

    from marjara.checkpoint.export import save_pretrained
    from marjara.model import MarjaraModel

    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=320, use_moe=True, num_experts=4, top_k=2))
    save_pretrained(model, config=model.config, out_dir=tmp_path / "m", tokenizer="bytes")
    for spec in (s for s in settings().values() if s.architectural):
        theirs = getattr(model.config, spec.name)
        mine = (not theirs) if isinstance(theirs, bool) else theirs + 1
        with pytest.raises(MarjaraError, match=f"--{spec.name}.* contradicts --init_from .*whose {spec.name} is"):
            TrainConfig.from_flags({"init_from": str(tmp_path / "m"), spec.name: mine}, has_gpu=False)
    cfg = TrainConfig.from_flags({"init_from": str(tmp_path / "m")}, has_gpu=False)
    assert {s.name: getattr(cfg.model, s.attr) for s in settings().values() if s.architectural} == {
        s.name: getattr(model.config, s.name) for s in settings().values() if s.architectural}


def test_rope_theta_is_a_train_flag_declared_once(tmp_path):
    """Declared in ModelConfig alone: --help, the rule, --init_from's and --resume's checks, the
    exported config.json follow. A run trains with it and its checkpoint records it."""
    import subprocess
    import sys

    from train_helpers import QUICK, ROOT, TRAIN

    parser = {a.dest: a for a in build_parser()._actions}
    assert parser["rope_theta"].help == "RoPE base frequency (larger: slower-turning positions, for longer contexts) " \
        "(default: 10000.0)"
    assert settings()["rope_theta"].architectural and "rope_theta" not in PLANNED_FLAGS
    with pytest.raises(MarjaraError, match=r"^--rope_theta must be > 0 \(got 0\.0\)$"):
        parse_config(["--rope_theta", "0"], has_gpu=False)
    result = subprocess.run([sys.executable, TRAIN, *QUICK, "--max_steps", "1", "--rope_theta", "500000", "--out_dir",
                             str(tmp_path / "ck")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads(next((tmp_path / "ck").glob("global_step*/marjara.json")).read_text())
    assert meta["model_config"]["rope_theta"] == 500000.0 and meta["train_args"]["rope_theta"] == 500000.0
    resumed = subprocess.run([sys.executable, TRAIN, *QUICK, "--max_steps", "2", "--resume", str(tmp_path / "ck"),
                              "--out_dir", str(tmp_path / "ck")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2
    assert "rope_theta: 500000.0 != 10000.0 as checkpoint != now" in resumed.stderr.strip().splitlines()[-1]
