"""SIGTERM/SIGINT during training: a request to save and stop cleanly, agreed on by every rank."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequests:
    """A context manager that catches SIGTERM and SIGINT while training. The previous handlers come
    back when it exits, so nothing outside the loop keeps the Learner (and its engine) alive."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, world: int) -> None:
        self.world = world
        self._signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _request(self, signum, _frame) -> None:
        self._signum = signum

    def agreed(self) -> int:
        """The signal any rank received (0: none). Every rank calls this at the same step, so that
        all of them save and stop together."""
        flag = torch.tensor([self._signum], dtype=torch.int64)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)
