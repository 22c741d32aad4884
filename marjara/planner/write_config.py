"""The DeepSpeed JSON of a recommended run, in DeepSpeed's own keys (as ds_configs/ writes them)."""

from __future__ import annotations

import json
from pathlib import Path

from marjara.errors import MarjaraError
from marjara.fileio import atomic_path
from marjara.planner.recommend import Candidate


def ds_config(candidate: Candidate) -> dict:
    s = candidate.setup
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage > 0:
        zero.update(overlap_comm=s.overlap_comm, contiguous_gradients=True,
                    reduce_bucket_size=s.zero["reduce_bucket_size"])
    if s.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = s.zero["allgather_bucket_size"]
    if s.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=s.zero["stage3_prefetch_bucket_size"],
                    stage3_param_persistence_threshold=s.zero["stage3_param_persistence_threshold"],
                    sub_group_size=s.zero["sub_group_size"])
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": candidate.micro_batch,
        "gradient_accumulation_steps": candidate.grad_accum,
        "train_batch_size": candidate.global_sequences,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": s.precision == "bf16"},
        "fp16": {"enabled": s.precision == "fp16"},
        "zero_optimization": zero,
    }
    if s.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam, which its own block builds
        config["optimizer"] = {"type": "AdamW",
                               "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    if s.grad_checkpointing:
        config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False}
    return config


def write_config(candidate: Candidate, path: str) -> None:
    """Written to a temporary file beside `path` and renamed: a failure leaves nothing half-written."""
    target = Path(path)
    if not target.parent.is_dir():
        raise MarjaraError(f"--write_config {path}: folder {target.parent} does not exist; create it first")
    if target.is_dir():
        raise MarjaraError(f"--write_config {path} is a folder; give the path of a .json file")
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(ds_config(candidate), indent=2) + "\n")
