"""DeepSpeed-Ulysses sequence parallelism (--sp_size) where MARJARA needs more than the documented
DistributedAttention layer: the sequence groups handed to the engine, and how each ZeRO stage
reduces gradients over them. Each function says What, Why, Upstream, Guard and Test (see
marjara/compat/__init__.py)."""

from __future__ import annotations

from marjara.compat import version_guard
from marjara.errors import MarjaraError


def sequence_parallel_mpu(sp_size: int):
    """What: DeepSpeed's deepspeed.runtime.sequence_parallel.parallel_state_sp, with its groups of
    `sp_size` consecutive ranks created once per process, as the "mpu" for deepspeed.initialize.
    Why: no documented way gives the engine sequence groups; the config keys
    `sequence_parallel_size` / `data_parallel_size` build a device mesh whose gradients are never
    reduced across the sequence ranks (measured, ../shared/DEEPSPEED_NOTES.md), and without a
    registered mpu the sequence rank reads 0 on every rank. With this module as mpu the engine
    reduces over the data x sequence ranks and partitions ZeRO state over them.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_sequence_parallel_runs.py (gradients of sp 2 equal one rank's, ZeRO 0/2/3)."""
    version_guard("deepspeed")
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sp_size)
    elif mpu.get_sequence_parallel_world_size() != sp_size:
        raise MarjaraError(f"this process already has sequence groups of {mpu.get_sequence_parallel_world_size()} "
                           f"ranks; it cannot also train with --sp_size {sp_size}")
    return mpu


def sequence_gradient_scale(zero_stage: int, sp_size: int) -> float:
    """What: the factor each sequence rank's gradient is multiplied by so that DeepSpeed's reduction
    yields the gradient of the sample's mean loss.
    Why: with the parallel_state_sp mpu, ZeRO 0-2 divide the sum over the data x sequence ranks by
    the data-parallel ranks only (engine.py `_reduce_non_expert_gradients`: dp_world_size = seq_dp /
    sequence_parallel_size; stage_1_and_2 likewise), i.e. they SUM over the sequence ranks; ZeRO-3
    divides by all data x sequence ranks, i.e. it AVERAGES over them and needs sp_size times the
    gradient. Neither is documented.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_sequence_parallel_runs.py (fails at either stage if the factor is wrong)."""
    version_guard("deepspeed")
    return float(sp_size) if zero_stage == 3 else 1.0
