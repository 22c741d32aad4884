"""User-facing errors: one line that names the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_USAGE = 2


class MarjaraError(Exception):
    """A problem with the user's input or environment (not a bug). Its message is one line."""


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI main(): a MarjaraError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except MarjaraError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE) from None

    return wrapper
