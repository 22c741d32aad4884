"""deepspeed.initialize as MARJARA calls it (the trainer and the benchmarks alike), with two
corrections to what DeepSpeed 0.19 does on its own."""

from __future__ import annotations

import functools

import torch


def initialize_engine(**kwargs):
    """deepspeed.initialize(**kwargs) -> the engine."""
    import deepspeed

    share_zero3_fp32_masters()
    engine, *_ = deepspeed.initialize(**kwargs)
    skip_single_rank_allreduce(engine)
    return engine


def skip_single_rank_allreduce(engine) -> None:
    """With one data-parallel rank, ZeRO-0's gradient all-reduce only copies every gradient through
    flat buckets and back; skip it (ZeRO 1-3 move gradients into their partitions there, so stay)."""
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def share_zero3_fp32_masters() -> None:
    """ZeRO-3 means to use the parameter partitions themselves as the optimizer's fp32 masters when
    they already are fp32 on the optimizer's device (DeepSpeed PR #7651), but it tests
    `partition.device == self.device` with self.device the accelerator's device *name* ('cpu',
    'cuda:0'): a torch.device never equals a str, so every fp32 run kept a second fp32 copy of its
    partition. Make the test compare devices; the copy DeepSpeed's step does from master to
    partition becomes a no-op on the shared tensor. (DeepSpeed's offload_states/reload_states,
    which MARJARA does not call, would split the two again: correct values, two copies.)"""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = getattr(Stage3, "_create_fp32_partitions", None)
    if original is None or getattr(original, "compares_devices", False):
        return  # another DeepSpeed: tests/test_engine.py says whether the masters are still shared

    @functools.wraps(original)
    def create_fp32_partitions(self):
        name = self.device
        if self.offload_optimizer or not isinstance(name, str):
            return original(self)
        self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    create_fp32_partitions.compares_devices = True
    Stage3._create_fp32_partitions = create_fp32_partitions
