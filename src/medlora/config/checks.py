"""The checks a setting can carry, each failing with one message: the key, the value, the fix."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class MedloraError(Exception):
    """A problem the user can fix: the message names the value and the fix."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise MedloraError(message)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_positive(value, key: str, fix: str, allow_zero: bool = False) -> None:
    good = is_number(value) and (value >= 0 if allow_zero else value > 0)
    bound = ">= 0" if allow_zero else "> 0"
    require(good, f"{key}={value!r} is invalid: it must be a number {bound}. {fix}")


@dataclass(frozen=True)
class Rule:
    """`ok(value)` or `{key}={value!r} is invalid: {says}`."""

    ok: Callable[[Any], bool]
    says: str

    def __call__(self, key: str, value) -> None:
        require(self.ok(value), f"{key}={value!r} is invalid: {self.says}")


@dataclass(frozen=True)
class Positive:
    """A finite number above zero (or at least zero), with the fix the message ends in."""

    fix: str
    allow_zero: bool = False

    def __call__(self, key: str, value) -> None:
        require_positive(value, key, self.fix, self.allow_zero)


def one_of(*choices: str, says: str | None = None) -> Rule:
    return Rule(lambda v: v in choices, says or f"use one of {', '.join(choices)}.")


def positive_int(says: str = "it must be a positive integer.", optional: bool = False) -> Rule:
    return Rule(lambda v: (optional and v is None) or (is_int(v) and v > 0), says)


def fraction(says: str, low_open: bool = False, high_closed: bool = False) -> Rule:
    """A number in [0, 1), or (0, 1) / (0, 1] / [0, 1] as the flags say."""

    def ok(v) -> bool:
        return is_number(v) and (v > 0 if low_open else v >= 0) and (v <= 1 if high_closed else v < 1)

    return Rule(ok, says)


BOOLEAN = Rule(lambda v: isinstance(v, bool), "use true or false.")
