"""User-facing errors: one line that names the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable

EXIT_USAGE = 2
EXIT_NON_FINITE = 3


class MarjaraError(Exception):
    """A problem with the user's input or environment (not a bug). Its message is one line."""


class AgreedError(MarjaraError):
    """A MarjaraError every rank of a launched job raises alike, after agreeing on it (e.g. through
    an all-reduce): only rank 0 prints it, the others exit with the same code quietly."""


class TrainingDiverged(AgreedError):
    """Training stopped on non-finite losses or weights (marjara/train/nonfinite.py): exit 3."""

    exit_code = EXIT_NON_FINITE


def _quiet_rank(exc: MarjaraError) -> bool:
    return isinstance(exc, AgreedError) and os.environ.get("RANK", "0") != "0"


def cause_in_brief(exc: BaseException, limit: int = 240) -> str:
    """A library exception's first line for quoting inside one of our lines: whole sentences only
    (a long line is cut after its last full sentence within `limit`, never mid-word)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()  # no terminal colour codes
    line = lines[0].strip() if lines else type(exc).__name__
    if len(line) <= limit:
        return line
    end = max(line.rfind(". ", 0, limit), line.rfind("; ", 0, limit))
    if end > 0:
        return line[: end + 1].rstrip(";") + " ..."
    return line  # one long sentence: whole, rather than cut in the middle


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI main(): a MarjaraError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except MarjaraError as exc:
            if not _quiet_rank(exc):
                print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(getattr(exc, "exit_code", EXIT_USAGE)) from None

    return wrapper
