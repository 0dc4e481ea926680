"""Value rules, written beside each setting's default in a schema: `batch_size: int = checked(128, at_least(1))`.

Plain Python, so that any layer may declare a schema (the objectives declare theirs beside their code); config/
checks every composed config against them (config/rules.py: check_rules) and names the key, the value and the fix.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

REQUIRED = "???"  # omegaconf's MISSING: a field without a default is required

NUMPY_SEED_MAX = 2**32 - 1  # numpy's SeedSequence and Lightning's seed_everything take seeds in [0, 2**32 - 1]


@dataclass(frozen=True)
class Rule:
    """A predicate on a field's value and how a message says it ("an integer >= 1")."""

    ok: Callable[[Any], bool]
    text: str


def checked(default: Any = REQUIRED, rule: Rule | None = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a rule: `batch_size: int = checked(128, at_least(1))` (no default: required, ???)."""
    meta = {"rule": rule} if rule is not None else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def at_least(low: float, integer: bool = True) -> Rule:
    kind = "an integer" if integer else "a number"
    return Rule(lambda x: _number(x) and x >= low, f"{kind} >= {low:g}")


def positive() -> Rule:
    return Rule(lambda x: _number(x) and x > 0, "a number > 0")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """low <= x <= high, either end open."""
    def ok(x: Any) -> bool:
        return _number(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)

    return Rule(ok, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(*choices: Any) -> Rule:
    return Rule(lambda x: x in choices, f"one of {list(choices)}")


def optional(rule: Rule) -> Rule:
    """None (null) or what `rule` allows."""
    return Rule(lambda x: x is None or rule.ok(x), f"null or {rule.text}")


def nonempty_text() -> Rule:
    return Rule(lambda x: isinstance(x, str) and x.strip() != "", "a non-empty string")


def each(rule: Rule, *, size: int | None = None, nonempty: bool = True) -> Rule:
    """A list whose every item obeys `rule` (of exactly `size` items, or at least one)."""
    def ok(x: Any) -> bool:
        if not isinstance(x, Sequence) or isinstance(x, str):
            return False
        if (size is not None and len(x) != size) or (nonempty and len(x) == 0):
            return False
        return all(rule.ok(item) for item in x)

    count = f"{size} items" if size is not None else "a non-empty list" if nonempty else "a list"
    return Rule(ok, f"{count}, each {rule.text}")


def seed() -> Rule:
    return Rule(lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= NUMPY_SEED_MAX,
                f"an integer in [0, {NUMPY_SEED_MAX}] (numpy's seed range)")


def parse_numbers(value: Any) -> list[int] | None:
    """'0-49999', '0-9,20,30-39', 7 or [1, 2, 5] -> the integers they name, in order (ranges inclusive, EDM's
    `--seeds` syntax); None stays None; anything else (a negative number, a range running down, text): ValueError."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, str):
        parts = []
        for item in value.replace(" ", "").split(","):
            low, dash, high = item.partition("-")
            if not low.isdigit() or (dash and not high.isdigit()) or (dash and int(high) < int(low)):
                raise ValueError(item)
            parts += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    elif isinstance(value, Sequence) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        parts = list(value)
    else:
        raise ValueError(value)
    if not parts or min(parts) < 0:
        raise ValueError(value)
    return parts


def numbers() -> Rule:
    """Image numbers as `parse_numbers` reads them, or null."""
    def ok(x: Any) -> bool:
        try:
            parse_numbers(x)
        except ValueError:
            return False
        return True

    return Rule(ok, "null or image numbers >= 0 like 0-49999 or 0-9,20,30-39 (ranges inclusive)")
