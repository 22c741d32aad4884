"""TrainConfig: every setting of a training run, typed, in sections (data, model, optim, run,
checkpoint) whose fields are declared in marjara/train/settings.py.

It is built once, from the flags given on the command line and the DeepSpeed JSON (the merge rule
is in marjara/train/ds_config.py), and then travels alone: the Learner, the benchmarks and the
tests take a TrainConfig, never an argparse Namespace. train.py's --help is generated from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from marjara.data.mixture_spec import parse_data_arg
from marjara.errors import MarjaraError
from marjara.model.config import PRESETS
from marjara.train.ds_config import merge_json, with_train_batch_size
from marjara.train.settings import (SECTIONS, CheckpointSettings, DataSettings, ModelSettings, OptimSettings,
                                    RunSettings, settings)


@dataclass
class TrainConfig:
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    # DeepSpeed's own --deepspeed_config flag (deepspeed.add_config_arguments) fills this one.
    deepspeed_config: str | None = field(default=None, metadata={
        "help": "a DeepSpeed JSON, e.g. ds_configs/zero2.json", "shown": "none: ZeRO 0 and the settings above"})
    # The JSON with every setting above written into it (train_batch_size aside, which depends on
    # the world size: see engine_config()).
    ds_json: dict = field(default_factory=dict, repr=False)

    # ---- built once -------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, given: dict[str, Any], has_gpu: bool | None = None) -> "TrainConfig":
        """The config of a run from the flags given (name -> value, only those on the command
        line) and the DeepSpeed JSON --deepspeed_config names."""
        if has_gpu is None:
            import torch

            has_gpu = torch.cuda.is_available()
        table = settings()
        unknown = sorted(set(given) - set(table) - {"deepspeed_config"})
        if unknown:
            raise MarjaraError(f"unknown training setting(s) {', '.join(unknown)}")
        # Flat, by flag name, while the flags and the JSON are merged; in sections once resolved.
        values = {name: spec.default for name, spec in table.items()} | {"deepspeed_config": None}
        values.update(given)
        if isinstance(values["adam_betas"], list):
            values["adam_betas"] = tuple(values["adam_betas"])
        if isinstance(values["data"], list) and len(values["data"]) == 1:  # one path or mix.json stays a str
            values["data"] = values["data"][0]
        if values["init_from"] is not None:
            from marjara.train.init_from import apply_init_from

            apply_init_from(values, set(given))
        _check(values, given)
        ds_json = merge_json(values, set(given), has_gpu)
        if values["seq_len"] is None:
            values["seq_len"] = PRESETS[values["model_size"]]["max_seq_len"]
        sections = {name: section(**{spec.attr: values[spec.name] for spec in table.values() if spec.section == name})
                    for name, (section, _) in SECTIONS.items()}
        return cls(**sections, deepspeed_config=values["deepspeed_config"], ds_json=ds_json)

    def engine_config(self, world_size: int) -> dict:
        """What deepspeed.initialize receives for this world size."""
        return with_train_batch_size(self.ds_json, self, world_size)

    @property
    def optimizer_in_json(self) -> bool:
        """DeepSpeed builds the JSON's optimizer; else MARJARA builds torch AdamW."""
        return "optimizer" in self.ds_json

    @property
    def scheduler_in_json(self) -> bool:
        """DeepSpeed runs the JSON's scheduler; else MARJARA's warmup + cosine."""
        return "scheduler" in self.ds_json

    def plain_values(self) -> dict[str, Any]:
        """The settings as JSON-ready values, flat by flag name (what a checkpoint records)."""
        flat = {name: getattr(getattr(self, spec.section), spec.attr) for name, spec in settings().items()}
        flat["deepspeed_config"] = self.deepspeed_config
        return {name: list(value) if isinstance(value, tuple) else value for name, value in flat.items()}


def _check(values: dict, given: dict) -> None:
    """Values no run can use, refused before anything starts: each flag given against its
    declared rule (the JSON's values are checked by the same rules where the file is read)."""
    parse_data_arg(values["data"])  # a malformed mixture stops here, before any process group starts
    problems = []
    for name, spec in settings().items():
        value = values[name]
        if (name in given and spec.rule is not None and value is not None and (values["use_moe"] or not spec.moe)
                and not spec.rule.holds(value)):
            problems.append(spec.rule.problem(f"--{name}", value))
    if values["offload_activations"] and not values["grad_checkpointing"] and "offload_activations" in given:
        problems.append("--offload_activations needs --grad_checkpointing (it offloads the inputs the checkpointed "
                        "blocks keep for their recomputation); add --grad_checkpointing")
    for name in ("out_dir", "log_dir"):
        if values[name] is not None and os.path.exists(values[name]) and not os.path.isdir(values[name]):
            problems.append(f"--{name} {values[name]} is a file, not a folder; give a folder (it is created if missing)")
    if problems:
        raise MarjaraError("; ".join(problems))
