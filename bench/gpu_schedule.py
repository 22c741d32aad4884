"""The order and timing of bench/gpu_check.py's checks: consecutive checks that may share the GPU
run PARALLEL at a time, every other check alone, and a check whose estimate no longer fits in
the budget is not started (reported SKIP)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PARALLEL = 4  # small runs at once on the one GPU (each needs about 1 GiB of its 139)


@dataclass
class Check:
    name: str
    commands: list[list[str]]
    verify: Callable[[Path, list[str]], str]  # (work dir, each command's stdout) -> detail line
    estimate_s: int  # expected on an H200, start-up included; --budget_s skips a check that would not fit
    parallel: bool = False  # may share the GPU with the checks beside it that may too
    needs: str | None = None  # a check whose output this one reads
    execute: Callable[[Path, float], tuple[str, str]] | None = None  # (work, deadline) -> verdict; else commands


def groups(checks: list[Check]) -> list[list[Check]]:
    """Consecutive parallel checks together; every other check alone."""
    out: list[list[Check]] = []
    for check in checks:
        if check.parallel and out and out[-1][0].parallel:
            out[-1].append(check)
        else:
            out.append([check])
    return out


def group_estimate(group: list[Check]) -> float:
    """Expected seconds of a group: PARALLEL at a time, no less than its longest chain of needs."""
    by_name = {c.name: c for c in group}
    chains = [c.estimate_s + (by_name[c.needs].estimate_s if c.needs in by_name else 0) for c in group]
    return max(max(chains), sum(c.estimate_s for c in group) / PARALLEL) if group else 0.0


def admit(group: list[Check], left: float) -> list[Check]:
    """The group's checks, in order, whose expected time still fits in `left` seconds (a check
    that only reads what earlier runs left, estimate 0, always does)."""
    admitted: list[Check] = []
    for check in group:
        needs_met = check.needs is None or check.needs in {c.name for c in admitted} or len(group) == 1
        if needs_met and group_estimate(admitted + [check]) <= max(left, 0.0):
            admitted.append(check)
    return admitted


def run_group(group: list[Check], run_check: Callable[[Check], tuple[str, str]], deadline: float,
              report: Callable[[str, str, str, float], None]) -> None:
    """Run the group's checks that fit before `deadline` (PARALLEL at a time), report each as it ends."""
    admitted = admit(group, deadline - time.monotonic())
    for check in group:
        if check not in admitted:
            report("SKIP", check.name, f"needs about {check.estimate_s} s; not started within --budget_s", 0.0)
    futures = {}

    def timed(check: Check) -> tuple[str, str, float]:
        if check.needs in futures:
            needed = futures[check.needs].result()[0]
            if needed != "PASS":
                return ("FAIL" if needed == "FAIL" else "SKIP"), f"needs {check.needs}, which did not pass", 0.0
        began = time.monotonic()
        return (*run_check(check), time.monotonic() - began)

    with ThreadPoolExecutor(max_workers=PARALLEL if len(admitted) > 1 else 1) as pool:
        for check in admitted:
            futures[check.name] = pool.submit(timed, check)
            time.sleep(0.5 if len(admitted) > 1 else 0)  # staggered: each picks its free port in turn
        names = {future: name for name, future in futures.items()}
        for future in as_completed(futures.values()):
            verdict, detail, seconds = future.result()
            report(verdict, names[future], detail, seconds)
