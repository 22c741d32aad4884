"""A data order defined by the global sample index, so it survives any change of world size.

Global sample s (0, 1, 2, ...) is window perm_e[s % N] of the dataset, where N is the number of
windows, e = s // N the epoch and perm_e = numpy.random.default_rng([seed, e]).permutation(N).
Optimizer step k with global batch size G = micro * accum * world consumes samples [k*G, (k+1)*G).
Within that step, global batch position j goes to

    rank       j // (micro * accum)
    micro step (j % (micro * accum)) // micro
    row        j % micro

so ranks hold contiguous slices. The stream's whole state is samples_consumed (completed steps
only): resuming from it on any world size or micro/accum split continues the same sample stream.
A Mixture (mixture.py) maps the same global sample indices onto several weighted datasets.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from marjara.data.datasets import TokenDataset
from marjara.errors import MarjaraError

if TYPE_CHECKING:
    import torch


class GlobalSampler:
    """The window order: a seeded permutation per epoch. `stream` gives each source of a mixture
    an order of its own (default_rng([seed, stream, epoch]))."""

    def __init__(self, num_windows: int, seed: int, stream: int | None = None) -> None:
        if num_windows < 1:
            raise MarjaraError(f"the sampler needs at least one window (got {num_windows})")
        self.num_windows = int(num_windows)
        self.seed = int(seed)
        self._key = [self.seed] if stream is None else [self.seed, int(stream)]
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._permutations.get(epoch)
        if perm is None:
            # arange + shuffle is what Generator.permutation(N) does; int32 halves the memory.
            dtype = np.int32 if self.num_windows < 2**31 else np.int64
            perm = np.arange(self.num_windows, dtype=dtype)
            np.random.default_rng([*self._key, epoch]).shuffle(perm)
            if len(self._permutations) >= 2:  # a batch spans at most two epochs' permutations at once
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = perm
        return perm

    def window_index(self, global_sample_index: int) -> int:
        epoch, position = divmod(int(global_sample_index), self.num_windows)
        return int(self.permutation(epoch)[position])

    def window_indices(self, start: int, stop: int) -> np.ndarray:
        """Windows of global samples [start, stop) as an int64 array."""
        out = np.empty(stop - start, dtype=np.int64)
        s = start
        while s < stop:
            epoch, position = divmod(s, self.num_windows)
            take = min(stop - s, self.num_windows - position)
            out[s - start : s - start + take] = self.permutation(epoch)[position : position + take]
            s += take
        return out

    def global_batch(self, k: int, global_batch_size: int) -> np.ndarray:
        return self.window_indices(k * global_batch_size, (k + 1) * global_batch_size)


class DatasetSampler:
    """Windows of global samples from one dataset (a Mixture's sampler() is the blended kind)."""

    def __init__(self, dataset: TokenDataset, seed: int) -> None:
        self.dataset = dataset
        self.order = GlobalSampler(len(dataset), seed)

    def windows(self, start: int, stop: int) -> np.ndarray:
        return self.dataset.windows(self.order.window_indices(start, stop))


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, not at the top: python -m marjara.prepare never pays torch's import

    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y


class TrainStream:
    """This rank's micro-batches; call next_micro_batch() grad_accum times per optimizer step.

    `data` is a TokenDataset or a Mixture (anything with a sampler(seed) giving windows(start, stop)).
    """

    def __init__(self, data, seed: int, micro_batch_size: int, grad_accum: int,
                 rank: int, world_size: int, samples_consumed: int = 0) -> None:
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum),
                            ("world_size", world_size)):
            if value < 1:
                raise MarjaraError(f"{name} must be >= 1 (got {value})")
        if not 0 <= rank < world_size:
            raise MarjaraError(f"rank {rank} is outside world size {world_size}")
        self.data = data
        self.sampler = data.sampler(seed) if hasattr(data, "sampler") else DatasetSampler(data, seed)
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.load_state_dict({"samples_consumed": samples_consumed})

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def sample_indices(self, micro_step: int) -> np.ndarray:
        """Global sample indices of this rank's micro step `micro_step` of the current optimizer step."""
        per_rank = self.micro_batch_size * self.grad_accum
        first = self.samples_consumed + self.rank * per_rank + micro_step * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size)

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) torch.long of shape (micro_batch_size, seq_len); y is x shifted by one token."""
        samples = self.sample_indices(self._micro_step)
        windows = self.sampler.windows(int(samples[0]), int(samples[-1]) + 1)
        self._micro_step += 1
        if self._micro_step == self.grad_accum:
            self._micro_step = 0
            self.samples_consumed += self.global_batch_size
        return _to_xy(windows)

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        consumed = state.get("samples_consumed")
        if not isinstance(consumed, (int, np.integer)) or isinstance(consumed, bool) or consumed < 0:
            raise MarjaraError(f"data stream state needs a non-negative integer samples_consumed (got {consumed!r})")
        self.samples_consumed = int(consumed)
        self._micro_step = 0  # a step interrupted midway is replayed from its start

    def skip(self, samples: int) -> None:
        """Step over the next `samples` global samples (--skip_samples), at a step boundary."""
        self.load_state_dict({"samples_consumed": self.samples_consumed + samples})


def validation_batches(dataset: TokenDataset, batch_size: int, n_batches: int, rank: int,
                       world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of a fixed validation set of n_batches * batch_size windows.

    The set is spread evenly over the dataset (cycling if it has fewer windows) and does not depend
    on the seed. Rank r takes the contiguous share [r*P, (r+1)*P) with P = ceil(T / world_size),
    T = n_batches * batch_size, in batches of at most batch_size. Every rank gets the same number
    and sizes of batches (ZeRO-3 and MoE need matching forward passes), so when world_size does not
    divide T the last shares wrap around to the set's first windows, with targets -1 (to be ignored:
    the set's loss is then the same for every world size).
    """
    if batch_size < 1 or n_batches < 1:
        raise MarjaraError(f"validation needs batch_size >= 1 and n_batches >= 1 (got {batch_size}, {n_batches})")
    if not 0 <= rank < world_size:
        raise MarjaraError(f"rank {rank} is outside world size {world_size}")
    total = batch_size * n_batches
    n = len(dataset)
    per_rank = math.ceil(total / world_size)
    unwrapped = np.arange(rank * per_rank, (rank + 1) * per_rank)
    positions = unwrapped % total
    windows = positions * n // total if total <= n else positions % n
    batches = []
    for i in range(0, per_rank, batch_size):
        x, y = _to_xy(dataset.windows(windows[i : i + batch_size]))
        y[unwrapped[i : i + batch_size] >= total] = -1  # padding rows: ignored by the loss
        batches.append((x, y))
    return batches
