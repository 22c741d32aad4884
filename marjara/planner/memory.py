"""One GPU's memory at a micro-batch: model states, activations, buffers and an allowance, and the
largest micro-batch that fits."""

from __future__ import annotations

from dataclasses import dataclass

from marjara.planner.activations import Activations, activations
from marjara.planner.devices import GIB
from marjara.planner.model_states import ModelStates, expert_states, model_states
from marjara.planner.setup import Setup
from marjara.planner.shapes import param_counts

FRAGMENTATION = 0.10      # of everything counted: the caching allocator's unusable gaps
RESERVED_GIB = 1.0        # per device: CUDA context and NCCL's own buffers, outside PyTorch's allocator
MAX_MICRO_BATCH = 1 << 14


@dataclass
class MemoryPlan:
    micro_batch: int
    states: ModelStates
    experts: ModelStates
    activations: Activations
    buffers: float            # ZeRO's communication buckets
    usable: float             # device memory less RESERVED_GIB

    @property
    def counted(self) -> float:
        return self.states.on_gpu + self.activations.peak + self.buffers

    @property
    def fragmentation(self) -> float:
        return FRAGMENTATION * self.counted

    @property
    def total(self) -> float:
        return self.counted + self.fragmentation

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def buckets(setup: Setup) -> float:
    """Flat buffers DeepSpeed fills for its collectives, at most as large as what they carry."""
    s, z, stage = setup.bytes_per_value, setup.zero, setup.zero_stage
    share = param_counts(setup.model).total
    reduce = s * min(z["reduce_bucket_size"], share)
    if stage == 0:  # one rank skips ZeRO-0's all-reduce (marjara/train/engine.py)
        return reduce if setup.world > 1 else 0.0
    if stage < 3:
        return reduce * (2 if setup.overlap_comm else 1)
    return reduce + s * min(z["stage3_prefetch_bucket_size"], share)


def plan_memory(setup: Setup, micro_batch: int) -> MemoryPlan:
    return MemoryPlan(micro_batch, model_states(setup), expert_states(setup), activations(setup, micro_batch),
                      buckets(setup), setup.device.memory_gib * GIB - RESERVED_GIB * GIB)


def largest_micro_batch(setup: Setup, limit: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch whose memory fits (0: not even one sequence), at most `limit`."""
    if not plan_memory(setup, 1).fits:
        return 0
    low, high = 1, 2
    while high <= limit and plan_memory(setup, high).fits:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # low fits, high does not (or is past the limit)
        middle = (low + high) // 2
        low, high = (middle, high) if plan_memory(setup, middle).fits else (low, middle)
    return low
