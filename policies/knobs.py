"""Typed knob schemas: what a policy's constructor takes, for ``--help``, validation and the docs.

A policy class declares ``knobs: tuple[Knob, ...]``, one entry per keyword argument of its ``__init__``, in the same
order and with the same defaults (``tests/policies/test_knobs.py`` checks every registered policy). ``check_knobs``
validates a ``{name: value}`` mapping against a schema before the constructor runs, so a bad knob is one line naming
the valid ones instead of a ``TypeError`` from Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knob:
    """One constructor keyword. ``type`` is int, float, bool or str; ``optional``: None is also accepted (the
    default may then be None); ``choices``: the accepted strings of a str knob (empty: any)."""

    name: str
    type: type
    default: Any
    help: str
    optional: bool = False
    choices: tuple[str, ...] = ()

    @property
    def type_name(self) -> str:
        base = "|".join(self.choices) if self.choices else self.type.__name__
        return f"{base} or None" if self.optional else base

    def check(self, value: Any) -> Any:
        """``value`` as this knob takes it (an int is accepted for a float knob, and converted); ``ValueError``
        with a one-line message otherwise."""
        if value is None and self.optional:
            return None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise ValueError(f"knob {self.name!r} must be {self.type_name}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"knob {self.name!r} must be one of {', '.join(self.choices)}; got {value!r}")
        return value

    def describe(self) -> str:
        """``name (type, default D): help`` on one line."""
        return f"{self.name} ({self.type_name}, default {self.default!r}): {self.help}"


def check_knobs(schema: Sequence[Knob], values: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """``values`` checked against ``schema`` (``owner`` names the policy in messages, e.g. "batch policy 'sarathi'").
    Raises ``ValueError`` with one line naming the valid knobs when a name is unknown or a value has the wrong type."""
    by_name = {knob.name: knob for knob in schema}
    checked: dict[str, Any] = {}
    for name, value in values.items():
        knob = by_name.get(name)
        if knob is None:
            valid = ", ".join(by_name) if by_name else "none"
            raise ValueError(f"bad option for {owner}: no knob {name!r}; valid knobs: {valid}")
        try:
            checked[name] = knob.check(value)
        except ValueError as exc:
            raise ValueError(f"bad option for {owner}: {exc}") from None
    return checked


def describe_knobs(schema: Sequence[Knob], indent: str = "  ") -> str:
    """One line per knob (``Knob.describe``), or "(no knobs)"."""
    return "\n".join(indent + knob.describe() for knob in schema) or f"{indent}(no knobs)"
