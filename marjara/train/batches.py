"""Micro-batches on the training device, each one's copy started before the previous one is used.

The stream's next batch is cut from the token files on the host while the device computes the
current one (nothing waits on the device in between); on a GPU its tensors go through pinned
memory with non_blocking copies, so the copy overlaps compute too. The state a checkpoint
records (state_dict) is that of the batches handed out, not of the one fetched ahead, so resume
is unchanged.
"""

from __future__ import annotations

import torch

from typing import Callable

from marjara.data import TrainStream

Batch = tuple[torch.Tensor, torch.Tensor]


class DeviceBatches:
    """`shard`: what this rank takes of each micro-batch the stream cuts (sequence parallelism's
    slice of every sample; all of it otherwise)."""

    def __init__(self, stream: TrainStream, device: torch.device, shard: Callable[[Batch], Batch] | None = None) -> None:
        self.stream = stream
        self.device = torch.device(device)
        self.shard = shard or (lambda batch: batch)
        self._ahead: tuple[torch.Tensor, torch.Tensor, dict] | None = None
        self._state = stream.state_dict()

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x, y = self.shard(self.stream.next_micro_batch())
        state = self.stream.state_dict()
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), state

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch (x, y) on the device."""
        x, y, self._state = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = None
        return x, y

    def prefetch(self) -> None:
        """Start on the micro-batch after the one last handed out (call once the current one's
        work is queued on the device)."""
        if self._ahead is None:
            self._ahead = self._fetch()

    def state_dict(self) -> dict:
        """The stream's state after the batches handed out so far (what a checkpoint records)."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() (a checkpoint's); a batch fetched ahead is dropped."""
        self.stream.load_state_dict(state)
        self._ahead, self._state = None, self.stream.state_dict()

    def skip(self, samples: int) -> None:
        """Step over the next `samples` global samples (--skip_samples)."""
        self.stream.skip(samples)
        self._ahead, self._state = None, self.stream.state_dict()

    @property
    def samples_consumed(self) -> int:
        """The global sample index the next step's data begins at."""
        return self._state["samples_consumed"]
