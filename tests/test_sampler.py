import numpy as np
import pytest
import torch

from marjara.data import GlobalSampler, TokenDataset, TrainStream, validation_batches
from marjara.errors import MarjaraError

SEQ = 4


def dataset(n_windows: int = 23) -> TokenDataset:
    # Window i starts with token i*SEQ, so a batch's first column names its windows.
    return TokenDataset(np.arange(n_windows * SEQ + 1, dtype=np.uint16), SEQ, "counting")


def windows_of(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // SEQ).tolist()


def step_windows(streams: list[TrainStream]) -> list[int]:
    """The windows of one optimizer step over all ranks, in global batch order (rank, micro, row)."""
    out = []
    for stream in streams:
        for _ in range(stream.grad_accum):
            x, y = stream.next_micro_batch()
            assert torch.equal(x[:, 1:], y[:, :-1])
            out += windows_of(x)
    return out


def run(split: tuple[int, int, int], steps: int, seed: int = 7, consumed: int = 0, ds=None) -> list[list[int]]:
    micro, accum, world = split
    ds = ds or dataset()
    streams = [TrainStream(ds, seed, micro, accum, r, world, samples_consumed=consumed) for r in range(world)]
    return [step_windows(streams) for _ in range(steps)]


def test_epoch_is_a_seeded_permutation():
    sampler = GlobalSampler(23, seed=7)
    expected = np.random.default_rng([7, 0]).permutation(23)
    assert [sampler.window_index(s) for s in range(23)] == expected.tolist()
    second = [sampler.window_index(s) for s in range(23, 46)]
    assert sorted(second) == list(range(23)) and second != expected.tolist()
    assert GlobalSampler(23, seed=8).global_batch(0, 23).tolist() != expected.tolist()


def test_global_batch_spans_epochs_consistently():
    sampler = GlobalSampler(5, seed=1)
    assert sampler.global_batch(3, 4).tolist() == [sampler.window_index(s) for s in range(12, 16)]
    assert GlobalSampler(5, seed=1).window_indices(3, 17).tolist() == [sampler.window_index(s) for s in range(3, 17)]


@pytest.mark.parametrize("split", [(8, 1, 1), (4, 2, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_steps_are_global_batches_whatever_the_split(split):
    sampler = GlobalSampler(23, seed=7)
    steps = run(split, steps=6)  # 48 samples: crosses two epoch boundaries
    assert steps == [sampler.global_batch(k, 8).tolist() for k in range(6)]


def test_samples_consumed_counts_completed_steps_only():
    stream = TrainStream(dataset(), 0, micro_batch_size=2, grad_accum=3, rank=1, world_size=2)
    for expected in (0, 0, 0, 12):
        assert stream.state_dict() == {"samples_consumed": expected}
        if expected < 12:
            stream.next_micro_batch()


def test_resume_on_another_world_size_continues_the_stream():
    full = run((2, 2, 2), steps=6)
    resumed = run((2, 1, 4), steps=3, consumed=3 * 8)
    assert resumed == full[3:]


def test_resume_midway_replays_the_interrupted_step():
    ds = dataset()
    stream = TrainStream(ds, 3, 2, 2, 0, 1)
    stream.next_micro_batch()
    stream.next_micro_batch()
    x_step1, _ = stream.next_micro_batch()  # first micro batch of step 1; then "crash"
    state = stream.state_dict()
    fresh = TrainStream(ds, 3, 2, 2, 0, 1)
    fresh.load_state_dict(state)
    assert state == {"samples_consumed": 4}
    assert torch.equal(fresh.next_micro_batch()[0], x_step1)


def test_batches_are_long_tensors_of_seq_len():
    x, y = TrainStream(dataset(), 0, 3, 1, 0, 1).next_micro_batch()
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (3, SEQ)


def test_bad_stream_arguments():
    with pytest.raises(MarjaraError, match="rank 2 is outside world size 2"):
        TrainStream(dataset(), 0, 1, 1, 2, 2)
    with pytest.raises(MarjaraError, match="grad_accum must be >= 1"):
        TrainStream(dataset(), 0, 1, 0, 0, 1)
    with pytest.raises(MarjaraError, match="samples_consumed"):
        TrainStream(dataset(), 0, 1, 1, 0, 1).load_state_dict({"samples_consumed": -1})


@pytest.mark.parametrize("world", [1, 2, 4])
def test_validation_set_is_fixed_and_shared_out(world):
    ds = dataset()
    per_rank = [validation_batches(ds, 2, 4, r, world) for r in range(world)]
    union = [w for batches in per_rank for x, _ in batches for w in windows_of(x)]
    assert union == [j * 23 // 8 for j in range(8)]  # spread over the set, the same for every world
    assert all(len(b) == len(per_rank[0]) for b in per_rank)
    assert windows_of(validation_batches(ds, 2, 4, 0, world)[0][0]) == windows_of(per_rank[0][0][0])


def test_validation_ranks_match_when_world_does_not_divide():
    ds = dataset()
    shapes = [[tuple(x.shape) for x, _ in validation_batches(ds, 2, 3, r, 4)] for r in range(4)]
    assert all(s == shapes[0] for s in shapes)  # same forward passes on every rank (ZeRO-3, MoE)
    union = {w for r in range(4) for x, _ in validation_batches(ds, 2, 3, r, 4) for w in windows_of(x)}
    assert union == {j * 23 // 6 for j in range(6)}


def test_validation_cycles_a_small_set():
    x, y = validation_batches(dataset(3), 5, 1, 0, 1)[0]
    assert windows_of(x) == [0, 1, 2, 0, 1] and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_validation_set_counts_each_window_once_whatever_the_world_size(world_size):
    dataset = TokenDataset(np.arange(4001) % 97, 16, "val")
    counted = sorted(
        tuple(x[i, :3].tolist())
        for rank in range(world_size)
        for x, y in validation_batches(dataset, 4, 2, rank, world_size)
        for i in range(len(x))
        if (y[i] != -1).all()
    )
    reference = sorted(tuple(x[i, :3].tolist()) for x, _ in validation_batches(dataset, 4, 2, 0, 1) for i in range(len(x)))
    assert counted == reference
