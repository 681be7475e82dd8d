"""Fields declared once with their check, and the checks themselves.

A field of the distillation settings is declared once, as a dataclass field carrying its default,
help and check (`checked_field`). Every class that takes the field inherits the dataclass that
declares it (the model's config, the training arguments, the SiNGER adapter's PEFT config), and
`check_fields` runs the checks, so a value is accepted or refused with the same one-line message
wherever it is given, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

Check = Callable[[Any], "str | None"]
"""Returns None for a valid value, else what valid values are (the message after "name: ")."""


class CheckedField(dataclasses.Field):
    """A dataclass field that carries its check; an ordinary `Field` to dataclasses and HfArgumentParser."""

    __slots__ = ("check",)


def checked_field(default: Any = dataclasses.MISSING, *, help: str, check: Check, default_factory: Any = dataclasses.MISSING):
    """`dataclasses.field(default, metadata={"help": help})` that `check_fields` checks with `check`."""
    plain = dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})
    field = CheckedField.__new__(CheckedField)
    for slot in dataclasses.Field.__slots__:  # whatever this Python's Field holds
        object.__setattr__(field, slot, getattr(plain, slot))
    field.check = check
    return field


def check_value(name: str, value: Any, check: Check) -> None:
    """Raises `ValueError("name: must be ..., got ...")` when `value` fails `check`."""
    problem = check(value)
    if problem is not None:
        raise ValueError(f"{name}: {problem}, got {value!r}")


def check_fields(instance: Any) -> None:
    """Runs the check of every `checked_field` of a dataclass instance."""
    for field in dataclasses.fields(instance):
        if isinstance(field, CheckedField):
            check_value(field.name, getattr(instance, field.name), field.check)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(choices: Iterable | Callable[[], Iterable]) -> Check:
    """`choices`, or a function giving them when checked (a registry that can grow)."""

    def check(value):
        valid = sorted(choices() if callable(choices) else choices)
        return None if value in valid else f"must be one of {valid}"

    return check


def integer_at_least(low: int, optional: bool = False) -> Check:
    return lambda value: None if (value is None and optional) or (_integer(value) and value >= low) else f"must be >= {low} (an integer)"


def number_at_least(low: float, optional: bool = False) -> Check:
    def check(value):
        if value is None and optional:
            return None
        return None if _number(value) and value >= low else f"must be >= {low} (a finite number)"

    return check


def number_above(low: float) -> Check:
    return lambda value: None if _number(value) and value > low else f"must be a finite number > {low}"


def open_interval(low: float, high: float) -> Check:
    return lambda value: None if _number(value) and low < value < high else f"must be in ({low}, {high})"


def block_indices(optional: bool) -> Check:
    """A non-empty list of distinct block indices >= 0 (None allowed when `optional`)."""

    def check(value):
        if value is None:
            return None if optional else "give at least one block index, e.g. [17, 23]"
        if isinstance(value, (str, bytes)) or not all(_integer(layer) for layer in value):
            return "must be a list of block indices (integers >= 0), e.g. [17, 23]"
        if not value:
            return "give at least one block index, e.g. [17, 23]"
        if min(value) < 0:
            return "block indices must be >= 0"
        if len(set(value)) != len(value):
            return "duplicate layers; each block can be distilled once"
        return None

    return check


def channel_values(positive: bool) -> Check:
    """None, or a non-empty list of finite numbers (> 0 when `positive`): per-channel image statistics."""

    def check(value):
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not value or not all(_number(item) for item in value):
            return "must be a list of finite numbers, one per image channel, e.g. [0.485, 0.456, 0.406]"
        if positive and min(value) <= 0:
            return "must be > 0 for every channel"
        return None

    return check
