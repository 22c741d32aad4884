"""The pieces of sequence parallelism that need no second rank: slicing, positions, kv-head
replication, the layout checks, and the DeepSpeed surface marjara/compat/deepspeed_sequence.py relies on."""

from __future__ import annotations

import pytest
import torch

from marjara.compat.deepspeed_sequence import sequence_gradient_scale
from marjara.errors import MarjaraError
from marjara.model.config import ModelConfig
from marjara.model.ulysses import kv_heads_after_replication
from marjara.train.sequence_parallel import SequenceParallel, check_layout


def test_each_rank_gets_its_slice_and_its_global_positions():
    x = torch.arange(2 * 12).view(2, 12)
    y = x + 100  # stands for x shifted over the whole sample
    shards = [SequenceParallel(None, 3, r, zero_stage=0) for r in range(3)]
    pieces = [s.shard(x, y) for s in shards]
    assert torch.equal(torch.cat([p[0] for p in pieces], dim=1), x)
    assert torch.equal(torch.cat([p[1] for p in pieces], dim=1), y)  # labels cut after the shift, never re-shifted
    positions = torch.cat([s.positions(2, 4, "cpu") for s in shards], dim=1)
    assert torch.equal(positions, torch.arange(12).expand(2, 12))


def test_kv_heads_are_replicated_to_a_multiple_of_the_sequence_ranks():
    assert kv_heads_after_replication(8, 4, 2) == 4  # divides already
    assert kv_heads_after_replication(8, 1, 4) == 4
    assert kv_heads_after_replication(12, 2, 3) == 6
    assert kv_heads_after_replication(16, 4, 8) == 8


def test_zero3_needs_sp_size_times_the_gradient_and_zero0_to_2_none():
    assert [sequence_gradient_scale(stage, 4) for stage in (0, 1, 2, 3)] == [1.0, 1.0, 1.0, 4.0]


def test_layout_checks_name_the_numbers():
    tiny = ModelConfig.from_preset("tiny", vocab_size=64)
    check_layout(2, tiny, 64, 4)  # fine
    with pytest.raises(MarjaraError, match=r"--sp_size 3 must divide the number of ranks \(4\)"):
        check_layout(3, tiny, 63, 4)
    with pytest.raises(MarjaraError, match="4 attention heads must be divisible by --sp_size 8"):
        check_layout(8, tiny, 64, 8)
    with pytest.raises(MarjaraError, match="--seq_len 65 must be divisible by --sp_size 2"):
        check_layout(2, tiny, 65, 2)


def test_deepspeed_still_has_the_sequence_parallel_surface_compat_uses():
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.sequence.layer import DistributedAttention
    import inspect

    for name in ("initialize_sequence_parallel", "get_sequence_parallel_group", "get_sequence_parallel_rank",
                 "get_sequence_parallel_world_size", "get_sequence_data_parallel_group", "_SEQUENCE_PARALLEL_GROUP"):
        assert hasattr(parallel_state_sp, name), name
    assert list(inspect.signature(DistributedAttention.forward).parameters)[:5] == [
        "self", "query", "key", "value", "batch_dim_idx"]
