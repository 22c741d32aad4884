"""A setting's valid values, stated once: the test, and the words every message about it uses.

The same Rule refuses a bad flag (`--lr must be > 0 (got 0)`), a bad DeepSpeed JSON value
(`ds.json: "optimizer.params.lr" must be a number > 0 (or "auto"), not 0`) and a bad model config
field (`d_model must be > 0 (got 0)`). A flag's message leaves the kind out ("a number"), since
argparse has checked the type already; a JSON value can be of any type, so its message says it.
The model room and the training room both read rules from here, so it imports nothing of either.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """A value as a message quotes it: strings quoted, pairs as the flag takes them (0.9 0.95)."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    bound: str  # what the value must be, said of a value of the right type: "> 0", "in [0, 1)", "1 or 2"
    kind: str = ""  # the type a value read from a file must have: "a number", "an integer"
    hint: str = ""  # appended after "; ", e.g. what 0 means
    allowed: tuple | None = None  # a rule of a few values: they are also the flag's argparse choices

    def holds(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:  # a value of another type (a string where a number belongs)
            return False

    @property
    def described(self) -> str:
        return f"{self.kind} {self.bound}" if self.kind else self.bound

    def problem(self, label: str, value: Any) -> str:
        """`label must be BOUND (got VALUE)`, for a typed value: a flag, a model config field."""
        return f"{label} must be {self.bound} (got {shown(value)})" + (f"; {self.hint}" if self.hint else "")


def _kind(integer: bool) -> tuple[Callable[[Any], bool], str]:
    return (is_integer, "an integer") if integer else (is_number, "a number")


def at_least(low: float, *, integer: bool = False, hint: str = "") -> Rule:
    typed, kind = _kind(integer)
    return Rule(lambda v: typed(v) and v >= low, f">= {low}", kind, hint)


def above(low: float, *, integer: bool = False, hint: str = "") -> Rule:
    """Strictly above `low` and finite (nan and inf refused)."""
    typed, kind = _kind(integer)
    return Rule(lambda v: typed(v) and low < v < math.inf, f"> {low}", kind, hint)


def fraction(*, closed: bool = False, hint: str = "") -> Rule:
    """In [0, 1), or [0, 1] when closed."""
    if closed:
        return Rule(lambda v: is_number(v) and 0 <= v <= 1, "in [0, 1]", "a number", hint)
    return Rule(lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)", "a number", hint)


def pair_of(rule: Rule) -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(rule.holds(x) for x in v),
                f"two numbers {rule.bound}", "", rule.hint)


def one_of(values: Iterable[Any], text: str | None = None, *, hint: str = "") -> Rule:
    """One of `values` (argparse's choices of the flag, too); `text` words them where the default
    'one of a, b' reads badly ("1 or 2")."""
    allowed = tuple(values)
    return Rule(lambda v: not isinstance(v, bool) and v in allowed,
                text or "one of " + ", ".join(map(str, allowed)), "", hint, allowed)


def true_or_false() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false")
