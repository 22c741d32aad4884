"""Merge the DeepSpeed JSON with the command line: one source of truth per setting.

The rule, for every setting a flag and a JSON key can both express: `"auto"` (or a missing key)
takes the flag's value, or its default; a concrete JSON value is taken when the flag was not given;
a flag given explicitly that contradicts a concrete JSON value stops the run with one line naming
both. Combinations DeepSpeed would refuse deep inside (MoE with ZeRO-3, fp16 without a GPU) are
refused here first, with the fix.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

from marjara.errors import MarjaraError
from marjara.train.ds_validate import check_top_level, check_with_deepspeed

AUTO = "auto"

# Top-level keys, always written: (TrainConfig field, JSON key).
TOP_LEVEL = (("batch_size", "train_micro_batch_size_per_gpu"), ("grad_accum", "gradient_accumulation_steps"),
             ("grad_clip", "gradient_clipping"))
# The optimizer block's parameters: lr is always written; the others when missing too for ADAM_TYPES,
# since DeepSpeed's own defaults (weight decay 0.01, betas 0.9/0.999) would differ from the run's silently.
OPTIMIZER = (("lr", "lr"), ("weight_decay", "weight_decay"), ("adam_betas", "betas"), ("adam_eps", "eps"))
ADAM_TYPES = {"adam", "adamw"}
# The scheduler block's parameters, written when missing for the schedulers that take them.
SCHEDULER = (("max_steps", "total_num_steps"), ("warmup_steps", "warmup_num_steps"), ("lr", "warmup_max_lr"))
SCHEDULER_TAKES = {
    "WarmupLR": {"warmup_num_steps", "warmup_max_lr", "warmup_min_lr"},
    "WarmupDecayLR": {"total_num_steps", "warmup_num_steps", "warmup_max_lr", "warmup_min_lr"},
    "WarmupCosineLR": {"total_num_steps", "warmup_num_steps", "warmup_min_ratio", "cos_min_ratio"},
}


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
    check_top_level(config, path)
    return config


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class _Merge:
    def __init__(self, values: dict, given: set[str], source: str) -> None:
        self.values, self.given, self.source = values, given, source

    def link(self, name: str, slots: list[tuple[dict, str, bool]]) -> None:
        """Resolve setting `name`, which the JSON holds at `slots` (block, key, written when missing)."""
        concrete = [(key, block[key]) for block, key, _ in slots if block.get(key, AUTO) != AUTO]
        for key, value in concrete[1:]:
            if not _same(value, concrete[0][1]):
                raise MarjaraError(f"\"{concrete[0][0]}\": {json.dumps(concrete[0][1])} and \"{key}\": "
                                   f"{json.dumps(value)} in {self.source} disagree; make them equal")
        if concrete:
            key, value = concrete[0]
            if name in self.given and not _same(self.values[name], value):
                raise MarjaraError(
                    f"--{name} {_shown(self.values[name])} contradicts \"{key}\": {json.dumps(value)} in {self.source}; "
                    f"drop one of them or set \"{key}\": \"auto\"")
            self.values[name] = tuple(value) if isinstance(value, list) else value
        for block, key, when_missing in slots:
            if block.get(key, AUTO if when_missing else None) == AUTO:
                value = self.values[name]
                block[key] = list(value) if isinstance(value, tuple) else value

    def require(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            raise MarjaraError(f"{name} must be {what} (got {self.values[name]!r} from {self.source} or the command line)")


def merge_json(values: dict, given: set[str], has_gpu: bool) -> dict:
    """Apply the rule between `values` (TrainConfig's, flags given by name in `given`) and the JSON
    `values["deepspeed_config"]` names: updates `values` in place and returns the merged JSON."""
    source = values["deepspeed_config"] or "the built-in DeepSpeed config"
    config = copy.deepcopy(load_json_config(values["deepspeed_config"]))
    merge = _Merge(values, given, source)

    for name, key in TOP_LEVEL:
        merge.link(name, [(config, key, True)])
    for name in ("batch_size", "grad_accum"):
        value = values[name]
        merge.require(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a positive integer")
    merge.require("grad_clip", isinstance(values["grad_clip"], (int, float)) and values["grad_clip"] >= 0, ">= 0")

    values["mixed_precision"] = _resolve_precision(config, values["mixed_precision"], has_gpu, source)
    merge.link("zero_stage", [(config.setdefault("zero_optimization", {}), "stage", True)])
    if values["zero_stage"] not in (0, 1, 2, 3):
        raise MarjaraError(f"zero_optimization.stage in {source} must be 0, 1, 2 or 3 (got {values['zero_stage']!r})")
    if values["use_moe"] and values["zero_stage"] == 3:
        raise MarjaraError(
            f"--use_moe cannot run with ZeRO stage 3 ({source}): DeepSpeed's MoE layers support ZeRO 0-2; "
            "use ds_configs/zero2.json")

    _merge_optimizer_and_scheduler(config, merge)
    _merge_sequence_parallel(config, merge)
    check_with_deepspeed(config, source)  # every "auto" is filled by now
    values["log_dir"] = _resolve_log_dir(config.pop("tensorboard", None), values, source)
    config.setdefault("steps_per_print", 10**9)  # MARJARA prints its own progress
    config.setdefault("wall_clock_breakdown", False)
    return config


def _merge_optimizer_and_scheduler(config: dict, merge: _Merge) -> None:
    values, source = merge.values, merge.source
    optimizer = config.get("optimizer")
    opt_params = optimizer.setdefault("params", {}) if isinstance(optimizer, dict) else None
    scheduler = config.get("scheduler")
    sched_params = scheduler.setdefault("params", {}) if isinstance(scheduler, dict) else None
    takes = SCHEDULER_TAKES.get(scheduler.get("type"), set()) if sched_params is not None else set()
    adam = opt_params is not None and str(optimizer.get("type", "")).lower() in ADAM_TYPES

    def slots(block, name_key_pairs, name, missing):
        return [(block, key, missing(key)) for n, key in name_key_pairs if n == name] if block is not None else []

    for name in ("lr", "weight_decay", "adam_betas", "adam_eps", "max_steps", "warmup_steps"):
        merge.link(name, slots(opt_params, OPTIMIZER, name, lambda key: key == "lr" or adam)
                   + slots(sched_params, SCHEDULER, name, lambda key: key in takes))
    lr = values["lr"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise MarjaraError(f"the learning rate must be > 0 (got {lr!r} from {source} or --lr)")
    merge.require("weight_decay", isinstance(values["weight_decay"], (int, float)) and values["weight_decay"] >= 0, ">= 0")
    betas = values["adam_betas"]
    merge.require("adam_betas", isinstance(betas, tuple) and len(betas) == 2
                  and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas), "two numbers in [0, 1)")
    merge.require("adam_eps", isinstance(values["adam_eps"], (int, float)) and values["adam_eps"] > 0, "> 0")
    merge.require("max_steps", isinstance(values["max_steps"], int) and values["max_steps"] >= 1, "an integer >= 1")
    merge.require("warmup_steps", isinstance(values["warmup_steps"], int) and values["warmup_steps"] >= 0,
                  "an integer >= 0")

    ratio = sched_params.get("cos_min_ratio", AUTO) if sched_params is not None else AUTO
    if ratio != AUTO:
        if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise MarjaraError(f"\"cos_min_ratio\": {json.dumps(ratio)} in {source} must be in [0, 1]")
        if values["min_lr"] is not None and "min_lr" in merge.given and not _same(values["min_lr"], ratio * lr):
            raise MarjaraError(
                f"--min_lr {values['min_lr']} contradicts \"cos_min_ratio\": {ratio} in {source} (x lr {lr} = "
                f"{ratio * lr:g}); drop one of them or set \"cos_min_ratio\": \"auto\"")
        values["min_lr"] = ratio * lr
    if values["min_lr"] is None:
        values["min_lr"] = lr / 10
    if values["min_lr"] > lr:
        raise MarjaraError(f"--min_lr {values['min_lr']} exceeds the peak learning rate {lr}; lower --min_lr")
    if sched_params is not None:
        derived = {"cos_min_ratio": values["min_lr"] / lr, "warmup_min_lr": 0.0, "warmup_min_ratio": 0.0}
        for key, value in derived.items():
            if sched_params.get(key, AUTO if key in takes else None) == AUTO:
                sched_params[key] = value
    for what, block in (("optimizer", opt_params), ("scheduler", sched_params)):
        for key, value in (block or {}).items():
            if value == AUTO:
                raise MarjaraError(f"{source}: {what} parameter \"{key}\" is \"auto\" but no flag fills it; set a value")


def _merge_sequence_parallel(config: dict, merge: _Merge) -> None:
    """--sp_size and "sequence_parallel_size" by the rule above; the value goes to MARJARA's sequence
    groups (marjara/train/sequence_parallel.py), never to DeepSpeed's engine, whose config-key route
    builds a mesh that does not reduce gradients over the sequence ranks. Likewise
    --offload_activations and activation_checkpointing.cpu_checkpointing."""
    values, source = merge.values, merge.source
    merge.link("sp_size", [(config, "sequence_parallel_size", False)])
    merge.require("sp_size", isinstance(values["sp_size"], int) and not isinstance(values["sp_size"], bool)
                  and values["sp_size"] >= 1, "an integer >= 1")
    config.pop("sequence_parallel_size", None)
    if values["sp_size"] > 1:
        if "data_parallel_size" in config:
            raise MarjaraError(f"\"data_parallel_size\" in {source} cannot be combined with sequence parallelism "
                               f"(--sp_size {values['sp_size']}): the data-parallel ranks are world / sp_size; "
                               "remove the key")
        if values["compile"]:
            raise MarjaraError(f"--compile cannot run with --sp_size {values['sp_size']}: DeepSpeed-Ulysses' "
                               "all-to-all is not tested under torch.compile here; drop --compile")
    checkpointing = config.get("activation_checkpointing", {})
    merge.link("offload_activations", [(checkpointing, "cpu_checkpointing", False)])
    if values["offload_activations"]:
        config["activation_checkpointing"] = {**checkpointing, "cpu_checkpointing": True}


def _resolve_precision(config: dict, flag: str | None, has_gpu: bool, source: str) -> str:
    enabled = {name for name in ("bf16", "fp16")
               if isinstance(config.get(name), dict) and config[name].get("enabled") not in (False, AUTO)}
    auto = {name for name in ("bf16", "fp16")
            if isinstance(config.get(name), dict) and config[name].get("enabled") == AUTO}
    if len(enabled) > 1:
        raise MarjaraError(f"{source} enables both bf16 and fp16; enable one of them")
    json_choice = next(iter(enabled), None)
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


def _resolve_log_dir(block: dict | None, values: dict, source: str) -> str:
    """MARJARA writes the tensorboard events itself; the JSON's tensorboard block only says where."""
    json_dir = None
    if isinstance(block, dict) and block.get("enabled", False):
        json_dir = os.path.join(block.get("output_path") or "runs", block.get("job_name") or "")
    flag = values["log_dir"]
    if json_dir and flag and os.path.normpath(json_dir) != os.path.normpath(flag):
        raise MarjaraError(f"--log_dir {flag} contradicts the tensorboard output_path/job_name {json_dir} in {source}; "
                           "drop one")
    return flag or json_dir or os.path.join(values["out_dir"], "tensorboard")


def with_train_batch_size(ds_json: dict, cfg, world_size: int) -> dict:
    """A copy of the merged JSON whose train_batch_size is micro-batch x accumulation x ranks."""
    config = copy.deepcopy(ds_json)
    source = cfg.deepspeed_config or "the built-in DeepSpeed config"
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    if config.get("train_batch_size", AUTO) not in (AUTO, global_batch):
        raise MarjaraError(
            f"\"train_batch_size\": {config['train_batch_size']} in {source} != micro-batch {cfg.batch_size} x "
            f"grad_accum {cfg.grad_accum} x {world_size} ranks = {global_batch}; set it to \"auto\" or make them agree")
    config["train_batch_size"] = global_batch
    return config
