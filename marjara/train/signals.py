"""SIGTERM/SIGINT during training: a request to save and stop cleanly, agreed on by every rank."""

from __future__ import annotations

import signal

import torch

from marjara import distributed


class StopRequests:
    """A context manager that catches SIGTERM and SIGINT while training. The previous handlers come
    back when it exits, so nothing outside the loop keeps the Learner (and its engine) alive."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
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
        all of them save and stop together. This is the loop's one host sync per optimizer step:
        a one-element all-reduce on the accelerator's device, at every world size."""
        return int(distributed.all_reduce(torch.tensor([self._signum], dtype=torch.int64), op="max").item())
