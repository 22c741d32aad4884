import json
from operator import attrgetter
from pathlib import Path

import pytest

from marjara.errors import MarjaraError
from marjara.train.args import parse_config

ROOT = Path(__file__).resolve().parents[1]


def settings(tmp_path, config: dict | None, *flags, world=1, gpu=False, moe=False):
    """The TrainConfig of these flags and this JSON, and what deepspeed.initialize receives."""
    argv = list(flags) + (["--use_moe"] if moe else [])
    if config is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(config))
        argv += ["--deepspeed_config", str(path)]
    cfg = parse_config(argv, has_gpu=gpu)
    return cfg, cfg.engine_config(world)


def test_auto_values_are_filled_from_the_flags(tmp_path):
    _, c = settings(tmp_path, {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "train_batch_size": "auto", "gradient_clipping": "auto"},
                    "--batch_size", "3", "--grad_accum", "5", "--grad_clip", "0.5", world=4)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"],
            c["gradient_clipping"]) == (3, 5, 60, 0.5)


def test_a_json_value_wins_over_a_flag_default(tmp_path):
    s, c = settings(tmp_path, {"train_micro_batch_size_per_gpu": 7})
    assert s.optim.batch_size == 7 and c["train_batch_size"] == 7


def test_no_config_uses_the_documented_defaults(tmp_path):
    s, c = settings(tmp_path, None)
    assert (s.optim.batch_size, s.optim.grad_accum, s.optim.zero_stage, s.optim.mixed_precision, s.optim.lr) == (8, 1, 0, "fp32", 1e-3)
    assert c["gradient_clipping"] == 1.0 and c["zero_optimization"] == {"stage": 0}


def test_precision_defaults_to_bf16_on_gpu_and_fp32_on_cpu(tmp_path):
    assert settings(tmp_path, {"bf16": {"enabled": "auto"}}, gpu=True)[1]["bf16"]["enabled"] is True
    cpu, c = settings(tmp_path, {"bf16": {"enabled": "auto"}})
    assert cpu.optim.mixed_precision == "fp32" and c["bf16"]["enabled"] is False
    fp16, c = settings(tmp_path, {"fp16": {"enabled": "auto", "loss_scale": 0}}, "--mixed_precision", "fp16", gpu=True)
    assert c["fp16"] == {"enabled": True, "loss_scale": 0} and fp16.optim.mixed_precision == "fp16"


@pytest.mark.parametrize("config, flags, message", [
    ({"train_micro_batch_size_per_gpu": 8}, ["--batch_size", "4"],
     '--batch_size 4 contradicts "train_micro_batch_size_per_gpu": 8'),
    ({"gradient_accumulation_steps": 2}, ["--grad_accum", "3"], '--grad_accum 3 contradicts "gradient_accumulation_steps": 2'),
    ({"train_batch_size": 100}, ["--batch_size", "4"], '"train_batch_size": 100'),
    ({"bf16": {"enabled": True}}, ["--mixed_precision", "fp16"], "--mixed_precision fp16 contradicts \"bf16\""),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, [], "enables both bf16 and fp16"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, ["--lr", "0.2"], '--lr 0.2 contradicts "lr": 0.1'),
    ({"zero_optimization": {"stage": 5}}, [], "stage"),
    ({"tensorboard": {"enabled": True, "output_path": "x", "job_name": "y"}}, ["--log_dir", "z"], "--log_dir z contradicts"),
    ({"scheduler": {"type": "WarmupLR", "params": {"mystery": "auto"}}}, [], '"mystery" is "auto"'),
])
def test_contradictions_stop_with_both_sides_named(tmp_path, config, flags, message):
    with pytest.raises(MarjaraError) as err:
        settings(tmp_path, config, *flags, gpu=True)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("lr", [0, -0.1, "fast"])
def test_a_json_learning_rate_that_no_run_can_use_is_refused(tmp_path, lr):
    with pytest.raises(MarjaraError) as err:
        settings(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": lr}}})
    # The rule --lr is checked by, worded for a JSON value (whose type is not known in advance).
    assert f'ds.json: "optimizer.params.lr" must be a number > 0 (or "auto"), not {lr!r}' in str(err.value)
    assert "\n" not in str(err.value)


def test_moe_with_zero3_and_fp16_on_cpu_are_refused_up_front(tmp_path):
    with pytest.raises(MarjaraError, match="--use_moe cannot run with ZeRO stage 3.*zero2.json"):
        settings(tmp_path, {"zero_optimization": {"stage": 3}}, moe=True)
    with pytest.raises(MarjaraError, match="fp16 needs a GPU"):
        settings(tmp_path, {"fp16": {"enabled": True}})


def test_scheduler_and_optimizer_auto_params_are_filled(tmp_path):
    s, c = settings(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
                               "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto",
                                             "warmup_num_steps": "auto", "cos_min_ratio": "auto"}}},
                    "--lr", "0.01", "--max_steps", "50", "--warmup_steps", "5", "--weight_decay", "0.2")
    # Missing AdamW parameters are "auto" too: DeepSpeed's own betas would differ from the run's.
    assert c["optimizer"]["params"] == {"lr": 0.01, "weight_decay": 0.2, "betas": [0.9, 0.95], "eps": 1e-8}
    assert c["scheduler"]["params"] == {"total_num_steps": 50, "warmup_num_steps": 5, "warmup_min_ratio": 0.0,
                                        "cos_min_ratio": pytest.approx(0.1)}
    assert s.optimizer_in_json and s.scheduler_in_json


def test_tensorboard_block_chooses_the_log_dir(tmp_path):
    s, c = settings(tmp_path, {"tensorboard": {"enabled": True, "output_path": "runs", "job_name": "exp1"}})
    assert s.run.log_dir == "runs/exp1" and "tensorboard" not in c
    assert settings(tmp_path, None, "--out_dir", "ck")[0].run.log_dir == "ck/tensorboard"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_every_shipped_config_is_valid_and_resolves(name):
    config = json.loads((ROOT / "ds_configs" / name).read_text())
    assert "zero_optimization" in config
    flags = ["--deepspeed_config", str(ROOT / "ds_configs" / name)] + (["--use_moe"] if name.startswith("moe") else [])
    s = parse_config(flags, has_gpu=True)
    c = s.engine_config(world_size=8)
    assert s.optim.mixed_precision == "bf16" and c["train_batch_size"] == 8 * 8
    assert AUTO_LEFT(c) == []


def AUTO_LEFT(node, path=""):
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in AUTO_LEFT(v, f"{path}.{k}")]
    return [path] if node == "auto" else []


# Every setting a flag and the JSON can both express: a flag left out takes the JSON's value...



@pytest.mark.parametrize("config, field, expected", [
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.05}}}, "optim.weight_decay", 0.05),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.99]}}}, "optim.adam_betas", (0.8, 0.99)),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, "optim.adam_eps", 1e-6),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.02}}}, "optim.lr", 0.02),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.02}}}, "optim.lr", 0.02),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000}}}, "optim.max_steps", 1000),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 7}}}, "optim.warmup_steps", 7),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0.25}}}, "optim.min_lr", 0.25e-3),
    ({"gradient_clipping": 0.5}, "optim.grad_clip", 0.5),
    ({"gradient_accumulation_steps": 3}, "optim.grad_accum", 3),
    ({"zero_optimization": {"stage": 2}}, "optim.zero_stage", 2),
    ({"bf16": {"enabled": True}}, "optim.mixed_precision", "bf16"),
])
def test_a_json_value_is_taken_when_the_flag_is_left_out(tmp_path, config, field, expected):
    cfg, _ = settings(tmp_path, config)
    assert attrgetter(field)(cfg) == pytest.approx(expected)


# ... and a flag given that contradicts it stops the run, naming both.
@pytest.mark.parametrize("config, flags, message", [
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.05}}}, ["--weight_decay", "0.1"],
     '--weight_decay 0.1 contradicts "weight_decay": 0.05'),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, ["--adam_betas", "0.9", "0.95"],
     '--adam_betas 0.9 0.95 contradicts "betas": [0.9, 0.999]'),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, ["--adam_eps", "1e-8"], '--adam_eps 1e-08 contradicts "eps"'),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000}}}, ["--max_steps", "800"],
     '--max_steps 800 contradicts "total_num_steps": 1000'),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}}}, ["--warmup_steps", "40"],
     '--warmup_steps 40 contradicts "warmup_num_steps": 10'),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.02}}}, ["--lr", "0.01"],
     '--lr 0.01 contradicts "warmup_max_lr": 0.02'),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0.5}}}, ["--min_lr", "1e-4"],
     '--min_lr 0.0001 contradicts "cos_min_ratio": 0.5'),
    ({"gradient_clipping": 0.5}, ["--grad_clip", "1.0"], '--grad_clip 1.0 contradicts "gradient_clipping": 0.5'),
    ({"zero_optimization": {"stage": 2}}, ["--zero_stage", "1"], '--zero_stage 1 contradicts "stage": 2'),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.01}}, "scheduler": {"type": "WarmupLR",
      "params": {"warmup_max_lr": 0.02}}}, [], '"lr": 0.01 and "warmup_max_lr": 0.02 in'),
])
def test_a_flag_that_contradicts_the_json_stops_the_run(tmp_path, config, flags, message):
    with pytest.raises(MarjaraError) as err:
        settings(tmp_path, config, *flags)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_flag_that_agrees_with_the_json_is_accepted(tmp_path):
    cfg, _ = settings(tmp_path, {"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.05, "betas": [0.9, 0.99]}},
                                 "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100}}},
                      "--weight_decay", "0.05", "--adam_betas", "0.9", "0.99", "--max_steps", "100")
    assert (cfg.optim.weight_decay, cfg.optim.adam_betas, cfg.optim.max_steps) == (0.05, (0.9, 0.99), 100)


def test_missing_scheduler_parameters_are_filled_from_the_run(tmp_path):
    """DeepSpeed's own defaults (1000 warmup steps, a 1e-4 cosine floor) would silently differ."""
    _, c = settings(tmp_path, {"scheduler": {"type": "WarmupCosineLR"}}, "--max_steps", "60", "--warmup_steps", "6")
    assert c["scheduler"]["params"] == {"total_num_steps": 60, "warmup_num_steps": 6, "warmup_min_ratio": 0.0,
                                        "cos_min_ratio": pytest.approx(0.1)}
    _, c = settings(tmp_path, {"scheduler": {"type": "WarmupLR"}}, "--lr", "0.02")
    assert c["scheduler"]["params"] == {"warmup_num_steps": 40, "warmup_max_lr": 0.02, "warmup_min_lr": 0.0}


def test_the_json_weight_decay_reaches_the_engines_parameter_groups(tmp_path):
    """The decay group gets the JSON's weight_decay, not --weight_decay's default (norms get none)."""
    from marjara.distributed import ensure_process_group
    from marjara.model import MarjaraModel
    from marjara.model.config import ModelConfig
    from marjara.train.build import build_engine

    ensure_process_group()
    # torch_adam: DeepSpeed builds torch's AdamW, with nothing to compile.
    cfg, c = settings(tmp_path, {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "weight_decay": 0.05,
                                                                           "betas": [0.8, 0.99]}}})
    engine, _ = build_engine(MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=128)), cfg, c)
    groups = engine.optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.99)}
    engine.destroy()
