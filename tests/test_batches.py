"""Micro-batches fetched one ahead: the same batches in the same order, and the position a
checkpoint records is that of the batches handed out."""

import numpy as np
import pytest
import torch

from marjara.data import TokenDataset, TrainStream
from marjara.train.batches import DeviceBatches


def stream(grad_accum: int, consumed: int = 0) -> TrainStream:
    data = TokenDataset(np.arange(50 * 4 + 1, dtype=np.uint16), 4, "counting")
    return TrainStream(data, seed=3, micro_batch_size=2, grad_accum=grad_accum, rank=0, world_size=1,
                       samples_consumed=consumed)


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_prefetching_changes_neither_the_batches_nor_the_recorded_position(grad_accum):
    plain, ahead = stream(grad_accum), DeviceBatches(stream(grad_accum), torch.device("cpu"))
    for _ in range(4):  # optimizer steps
        for _ in range(grad_accum):
            expected = plain.next_micro_batch()
            got = ahead.next()
            ahead.prefetch()  # the next one (possibly the next step's) is already cut
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert ahead.samples_consumed == plain.samples_consumed
        assert ahead.stream.samples_consumed >= plain.samples_consumed


def test_a_stream_resumed_from_the_recorded_state_continues_with_the_same_batches():
    ahead = DeviceBatches(stream(1), torch.device("cpu"))
    for _ in range(3):
        ahead.next()
        ahead.prefetch()
    state = ahead.state_dict()
    assert state == {"samples_consumed": 6}  # the field marjara.json has always recorded
    resumed = DeviceBatches(stream(1), torch.device("cpu"))
    resumed.next()
    resumed.prefetch()  # fetched ahead of the old position: dropped by the load
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead.next(), resumed.next()))


def test_skip_steps_over_samples_as_a_stream_started_past_them():
    skipped, started_there = DeviceBatches(stream(3), torch.device("cpu")), stream(3, consumed=12)
    skipped.skip(12)
    assert skipped.state_dict() == started_there.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(skipped.next(), started_there.next_micro_batch()))
