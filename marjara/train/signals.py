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

    def agreed_with(self, flag: torch.Tensor) -> tuple[int, bool]:
        """(the signal any rank received, whether any rank's `flag` is set), in one all-reduce: the
        loop's one host sync per optimizer step."""
        both = torch.stack([torch.tensor(self._signum, dtype=torch.int64, device=flag.device), flag.to(torch.int64)])
        signum, any_flag = distributed.all_reduce(both, op="max").tolist()
        return int(signum), bool(any_flag)
