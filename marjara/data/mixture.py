"""A weighted blend of several training datasets, defined by the global sample index.

The global sample stream is cut into blocks of BLOCK samples. Every block has the same layout:
source j holds c_j of its positions, c_j being weight_j * BLOCK rounded by largest remainder
(at least 1), spread evenly (position keys (2i + 1) / (2 c_j), i < c_j, merged in order). So any
run of n consecutive samples draws n * weight_j of them from source j to within about one sample
per source, and the long-run share is off by at most 1 / BLOCK.

Global sample s = m * BLOCK + r (block m, position r) is sample k = m * c_j + (rank of r among
source j's positions) of source j, and that is window perm_{j,e}[k % N_j] of source j's N_j
windows, with e = k // N_j and perm_{j,e} = numpy.random.default_rng([seed, j + 1, e])
.permutation(N_j): a source smaller than its share is repeated, in a new order every epoch.
Everything is a function of s and the seed, so the blend is the same for any world size,
micro-batch/accumulation split and resume point (see sampler.py for how steps take samples).
"""

from __future__ import annotations

import numpy as np

from marjara.data.datasets import TokenDataset
from marjara.data.sampler import GlobalSampler
from marjara.errors import MarjaraError

BLOCK = 1 << 16


def block_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Positions of each source in a block: largest-remainder rounding, at least one each."""
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * block
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    while (counts == 0).any():  # a weight below 1 / BLOCK still gets a position
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts


class Mixture:
    """Named training datasets with weights (normalised to sum to 1)."""

    def __init__(self, names: list[str], weights: list[float], datasets: list[TokenDataset]) -> None:
        if not names or not len(names) == len(weights) == len(datasets):
            raise MarjaraError("a mixture needs one name, weight and dataset per source")
        if len(names) > BLOCK:
            raise MarjaraError(f"a mixture holds at most {BLOCK} sources (got {len(names)})")
        if len({d.seq_len for d in datasets}) != 1:
            raise MarjaraError("every source of a mixture must use the same seq_len")
        total = float(sum(weights))
        self.names = list(names)
        self.weights = [float(w) / total for w in weights]
        self.datasets = list(datasets)
        self.seq_len = datasets[0].seq_len
        self.counts = block_counts(self.weights)
        sources = np.repeat(np.arange(len(names), dtype=np.int32), self.counts)
        rank_in_source = np.arange(BLOCK, dtype=np.int64) - np.repeat(np.cumsum(self.counts) - self.counts, self.counts)
        keys = (2 * rank_in_source + 1) / (2 * self.counts[sources])
        order = np.argsort(keys, kind="stable")  # ties: the source listed first
        self.block_source = sources[order]
        self.block_rank = rank_in_source[order]

    def __len__(self) -> int:
        return len(self.names)

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index within that source) of global samples [start, stop)."""
        s = np.arange(start, stop, dtype=np.int64)
        block, position = np.divmod(s, BLOCK)
        source = self.block_source[position]
        return source, block * self.counts[source] + self.block_rank[position]

    def samples_from(self, source: int, n_samples: int) -> int:
        """How many of global samples [0, n_samples) source `source` provides."""
        blocks, rest = divmod(int(n_samples), BLOCK)
        return blocks * int(self.counts[source]) + int(np.count_nonzero(self.block_source[:rest] == source))

    def epochs(self, n_samples: int) -> list[float]:
        """Passes over each source's windows that the first n_samples global samples make."""
        return [self.samples_from(j, n_samples) / len(d) for j, d in enumerate(self.datasets)]

    def summary(self, n_samples: int) -> str:
        """One line: each source's weight and the epochs of it that n_samples samples see."""
        return ", ".join(f"{name} {weight:.3g} ({epochs:.3g} epochs of {len(d)} windows)"
                         for name, weight, epochs, d in zip(self.names, self.weights, self.epochs(n_samples),
                                                             self.datasets))

    def sampler(self, seed: int) -> MixtureSampler:
        return MixtureSampler(self, seed)

    def __repr__(self) -> str:
        return f"Mixture({', '.join(f'{n}={w:.3g}' for n, w in zip(self.names, self.weights))})"


class MixtureSampler:
    """Windows of global samples, from each source's own seeded permutation per epoch."""

    def __init__(self, mixture: Mixture, seed: int) -> None:
        self.mixture = mixture
        self.orders = [GlobalSampler(len(d), seed, stream=j + 1) for j, d in enumerate(mixture.datasets)]

    def windows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, seq_len + 1) int64 windows of global samples [start, stop)."""
        source, k = self.mixture.locate(start, stop)
        out = np.empty((stop - start, self.mixture.seq_len + 1), dtype=np.int64)
        for j in np.unique(source):
            rows = np.flatnonzero(source == j)
            first = int(k[rows[0]])  # a source's samples within a range of global samples are consecutive
            indices = self.orders[j].window_indices(first, first + len(rows))
            out[rows] = self.mixture.datasets[j].windows(indices)
        return out

    def sources(self, start: int, stop: int) -> np.ndarray:
        """Which source each of global samples [start, stop) comes from."""
        return self.mixture.locate(start, stop)[0]
