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
from marjara.fileio import read_json_object
from marjara.train.ds_validate import check_top_level, check_with_deepspeed
from marjara.train.settings import settings

AUTO = "auto"

# Which settings the JSON holds where comes from the declaration (marjara/train/settings.py). A
# missing key is written (as if "auto") at the top level and in zero_optimization; in the optimizer
# block, lr always and the others for ADAM_TYPES, since DeepSpeed's own defaults (weight decay 0.01,
# betas 0.9/0.999) would differ from the run's silently; in the scheduler block, the keys its type takes.
ADAM_TYPES = {"adam", "adamw"}
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
    config = read_json_object(file, "fix the file", "it must hold DeepSpeed's settings, e.g. ds_configs/zero2.json",
                              what="DeepSpeed config")
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


def merge_json(values: dict, given: set[str], has_gpu: bool) -> dict:
    """Apply the rule between `values` (TrainConfig's, flags given by name in `given`) and the JSON
    `values["deepspeed_config"]` names: updates `values` in place and returns the merged JSON."""
    source = values["deepspeed_config"] or "the built-in DeepSpeed config"
    config = copy.deepcopy(load_json_config(values["deepspeed_config"]))
    merge, blocks = _Merge(values, given, source), _Blocks(config)
    # Every value merged here was checked by its setting's rule already: a flag given in
    # TrainConfig.from_flags, a JSON value where the file was read (check_top_level).
    for spec in settings().values():
        if spec.json:
            merge.link(spec.name, [slot for path in spec.json if (slot := blocks.slot(path)) is not None])

    values["mixed_precision"] = _resolve_precision(config, values["mixed_precision"], has_gpu, source)
    if values["use_moe"] and values["zero_stage"] == 3:
        raise MarjaraError(
            f"--use_moe cannot run with ZeRO stage 3 ({source}): DeepSpeed's MoE layers support ZeRO 0-2; "
            "use ds_configs/zero2.json")

    _min_lr(blocks.params("scheduler"), blocks.scheduler_takes, merge)
    _no_auto_left(config, source)
    _sequence_parallel(config, values, source)
    check_with_deepspeed(config, source)  # every "auto" is filled by now
    values["log_dir"] = _resolve_log_dir(config.pop("tensorboard", None), values, source)
    config.setdefault("steps_per_print", 10**9)  # MARJARA prints its own progress
    config.setdefault("wall_clock_breakdown", False)
    return config


class _Blocks:
    """The JSON's places a setting can live in, and whether a missing key there is written."""

    def __init__(self, config: dict) -> None:
        self.config = config
        optimizer, scheduler = config.get("optimizer"), config.get("scheduler")
        self.adam = isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ADAM_TYPES
        self.scheduler_takes = SCHEDULER_TAKES.get(scheduler.get("type"), set()) if isinstance(scheduler, dict) else set()

    def params(self, block: str) -> dict | None:
        """The optimizer's or scheduler's params (created empty), None without that block."""
        holder = self.config.get(block)
        return holder.setdefault("params", {}) if isinstance(holder, dict) else None

    def slot(self, path: str) -> tuple[dict, str, bool] | None:
        """(block, key, written when missing) of a dotted JSON path; None where the block is absent."""
        *outer, key = path.split(".")
        if outer in (["optimizer", "params"], ["scheduler", "params"]):
            block = self.params(outer[0])
            if block is None:
                return None
            return block, key, key == "lr" or self.adam if outer[0] == "optimizer" else key in self.scheduler_takes
        block = self.config
        for part in outer:
            block = block.setdefault(part, {})
        return block, key, True


def _min_lr(sched_params: dict | None, takes: set[str], merge: _Merge) -> None:
    """min_lr is lr x the scheduler's cos_min_ratio: resolved after lr, by the same rule."""
    values, source = merge.values, merge.source
    lr = values["lr"]
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


def _no_auto_left(config: dict, source: str) -> None:
    for what in ("optimizer", "scheduler"):
        for key, value in (config.get(what) or {}).get("params", {}).items():
            if value == AUTO:
                raise MarjaraError(f"{source}: {what} parameter \"{key}\" is \"auto\" but no flag fills it; set a value")


def _sequence_parallel(config: dict, values: dict, source: str) -> None:
    """--sp_size (= "sequence_parallel_size", merged above) goes to MARJARA's sequence groups
    (marjara/train/sequence_parallel.py), never to DeepSpeed's engine: its config-key route builds a
    mesh that does not reduce gradients over the sequence ranks."""
    config.pop("sequence_parallel_size", None)
    if values["sp_size"] > 1:
        if "data_parallel_size" in config:
            raise MarjaraError(f"\"data_parallel_size\" in {source} cannot be combined with sequence parallelism "
                               f"(--sp_size {values['sp_size']}): the data-parallel ranks are world / sp_size; "
                               "remove the key")
        if values["compile"]:
            raise MarjaraError(f"--compile cannot run with --sp_size {values['sp_size']}: DeepSpeed-Ulysses' "
                               "all-to-all is not tested under torch.compile here; drop --compile")
    # The merge writes --offload_activations' default into a block it creates: one holding only
    # that default means what no block means.
    if config.get("activation_checkpointing") == {"cpu_checkpointing": False}:
        del config["activation_checkpointing"]


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
    batch_size, grad_accum = cfg.optim.batch_size, cfg.optim.grad_accum
    global_batch = batch_size * grad_accum * world_size
    if config.get("train_batch_size", AUTO) not in (AUTO, global_batch):
        raise MarjaraError(
            f"\"train_batch_size\": {config['train_batch_size']} in {source} != micro-batch {batch_size} x "
            f"grad_accum {grad_accum} x {world_size} ranks = {global_batch}; set it to \"auto\" or make them agree")
    config["train_batch_size"] = global_batch
    return config
