"""Merge the DeepSpeed JSON with the command line: one source of truth per setting.

The rule: a value written in the JSON wins over a flag's default; `"auto"` (or a missing key) is
filled from the flag; a flag given explicitly that contradicts a concrete JSON value stops the run
with an error naming both. Combinations DeepSpeed would refuse deep inside (MoE with ZeRO-3, fp16
without a GPU) are refused here first, with the fix.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marjara.errors import MarjaraError
from marjara.train.args import JSON_BACKED_DEFAULTS

AUTO = "auto"


@dataclass
class EngineSettings:
    ds_config: dict            # what deepspeed.initialize receives
    micro_batch: int
    grad_accum: int
    precision: str             # fp32 | bf16 | fp16
    zero_stage: int
    lr: float                  # peak learning rate
    min_lr: float              # end of the cosine
    optimizer_in_json: bool    # else MARJARA builds torch AdamW
    scheduler_in_json: bool    # else MARJARA's warmup + cosine
    log_dir: str


def load_json_config(path: str | None) -> dict:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise MarjaraError(f"DeepSpeed config {path} does not exist; pass an existing file such as ds_configs/zero2.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise MarjaraError(f"DeepSpeed config {path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from None
    if not isinstance(config, dict):
        raise MarjaraError(f"DeepSpeed config {path} must hold a JSON object")
    return config


def _explicit(args, name: str) -> bool:
    return getattr(args, name) is not None


def _take(config: dict, key: str, args, flag: str, default: Any, source: str) -> Any:
    """Resolve one setting present both as a JSON key and a flag, and write it back into config."""
    in_json = config.get(key, AUTO)
    flag_value = getattr(args, flag)
    if in_json == AUTO:
        value = flag_value if flag_value is not None else default
    else:
        if flag_value is not None and flag_value != in_json:
            raise MarjaraError(
                f"--{flag} {flag_value} contradicts \"{key}\": {in_json} in {source}; "
                f"drop one of them or set \"{key}\": \"auto\""
            )
        value = in_json
    config[key] = value
    return value


def _resolve_precision(config: dict, args, has_gpu: bool, source: str) -> str:
    enabled = {name for name in ("bf16", "fp16")
               if isinstance(config.get(name), dict) and config[name].get("enabled") not in (False, AUTO)}
    auto = {name for name in ("bf16", "fp16")
            if isinstance(config.get(name), dict) and config[name].get("enabled") == AUTO}
    if len(enabled) > 1:
        raise MarjaraError(f"{source} enables both bf16 and fp16; enable one of them")
    json_choice = next(iter(enabled), None)
    flag = args.mixed_precision
    if json_choice and flag and flag != json_choice:
        raise MarjaraError(
            f"--mixed_precision {flag} contradicts \"{json_choice}\": {{\"enabled\": true}} in {source}; "
            f"drop one of them or set \"enabled\": \"auto\""
        )
    precision = json_choice or flag or ("bf16" if has_gpu else "fp32")
    if precision == "fp16" and not has_gpu:
        raise MarjaraError("fp16 needs a GPU (DeepSpeed refuses it on CPU); use --mixed_precision fp32 or bf16")
    for name in ("bf16", "fp16"):
        block = config.get(name) if isinstance(config.get(name), dict) else {}
        if name == precision or name in auto or name in config:
            config[name] = {**block, "enabled": name == precision}
    return precision


def _fill_auto(block: dict, values: dict[str, Any], what: str, source: str) -> None:
    for key, value in list(block.items()):
        if value == AUTO:
            if key not in values:
                raise MarjaraError(f"{source}: {what} parameter \"{key}\" is \"auto\" but no flag fills it; set a value")
            block[key] = values[key]


def resolve_engine_settings(args, world_size: int, has_gpu: bool, use_moe: bool) -> EngineSettings:
    source = args.deepspeed_config or "the built-in DeepSpeed config"
    config = copy.deepcopy(load_json_config(args.deepspeed_config))

    micro = _take(config, "train_micro_batch_size_per_gpu", args, "batch_size", JSON_BACKED_DEFAULTS["batch_size"], source)
    accum = _take(config, "gradient_accumulation_steps", args, "grad_accum", JSON_BACKED_DEFAULTS["grad_accum"], source)
    _take(config, "gradient_clipping", args, "grad_clip", JSON_BACKED_DEFAULTS["grad_clip"], source)
    for name, value in (("batch_size", micro), ("grad_accum", accum)):
        if not isinstance(value, int) or value < 1:
            raise MarjaraError(f"{name} must be a positive integer (got {value!r} from {source} or the command line)")
    global_batch = micro * accum * world_size
    if config.get("train_batch_size", AUTO) not in (AUTO, global_batch):
        raise MarjaraError(
            f"\"train_batch_size\": {config['train_batch_size']} in {source} != micro-batch {micro} x grad_accum "
            f"{accum} x {world_size} ranks = {global_batch}; set it to \"auto\" or make them agree"
        )
    config["train_batch_size"] = global_batch

    precision = _resolve_precision(config, args, has_gpu, source)
    zero = config.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise MarjaraError(f"zero_optimization.stage in {source} must be 0, 1, 2 or 3 (got {stage!r})")
    if use_moe and stage == 3:
        raise MarjaraError(
            f"--use_moe cannot run with ZeRO stage 3 ({source}): DeepSpeed's MoE layers support ZeRO 0-2; "
            "use ds_configs/zero2.json"
        )

    lr = args.lr if args.lr is not None else JSON_BACKED_DEFAULTS["lr"]
    optimizer_in_json = "optimizer" in config
    if optimizer_in_json:
        params = config["optimizer"].setdefault("params", {})
        params.setdefault("lr", AUTO)
        lr = _take(params, "lr", args, "lr", JSON_BACKED_DEFAULTS["lr"], source)
        _fill_auto(params, {"weight_decay": args.weight_decay, "betas": [0.9, 0.95], "eps": 1e-8}, "optimizer", source)
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise MarjaraError(f"the learning rate must be > 0 (got {lr!r} from {source} or --lr)")
    min_lr = args.min_lr if args.min_lr is not None else lr / 10
    if min_lr > lr:
        raise MarjaraError(f"--min_lr {min_lr} exceeds the peak learning rate {lr}; lower --min_lr")
    scheduler_in_json = "scheduler" in config
    if scheduler_in_json:
        _fill_auto(config["scheduler"].setdefault("params", {}), {
            "total_num_steps": args.max_steps, "warmup_num_steps": args.warmup_steps,
            "warmup_max_lr": lr, "warmup_min_lr": 0.0, "warmup_min_ratio": 0.0,
            "cos_min_ratio": min_lr / lr}, "scheduler", source)

    log_dir = _resolve_log_dir(config.pop("tensorboard", None), args, source)
    config.setdefault("steps_per_print", 10**9)  # MARJARA prints its own progress
    config.setdefault("wall_clock_breakdown", False)
    return EngineSettings(config, micro, accum, precision, stage, lr, min_lr, optimizer_in_json, scheduler_in_json,
                          log_dir)


def _resolve_log_dir(block: dict | None, args, source: str) -> str:
    """MARJARA writes the tensorboard events itself; the JSON's tensorboard block only says where."""
    json_dir = None
    if isinstance(block, dict) and block.get("enabled", False):
        json_dir = os.path.join(block.get("output_path") or "runs", block.get("job_name") or "")
    if json_dir and args.log_dir and os.path.normpath(json_dir) != os.path.normpath(args.log_dir):
        raise MarjaraError(
            f"--log_dir {args.log_dir} contradicts the tensorboard output_path/job_name {json_dir} in {source}; drop one"
        )
    return args.log_dir or json_dir or os.path.join(args.out_dir, "tensorboard")
