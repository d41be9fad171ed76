"""Name -> class registries for pluggable policies, so services, the simulator and tests pick them by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from diptych.policies.knobs import Knob, check_knobs, describe_knobs

T = TypeVar("T")


class Registry(Generic[T]):
    """A named family of policy classes. ``create(name, **knobs)`` builds one; unknown names raise ``KeyError``
    listing the choices, so a command line can show them; unknown knobs or knobs of the wrong type raise
    ``ValueError`` naming the valid ones (each class's ``knobs`` schema, ``policies.knobs``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ValueError(f"{self.kind} policy {name!r} registered twice")
            self._classes[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return add

    def names(self) -> list[str]:
        return sorted(self._classes)

    def describe(self) -> str:
        """One line per policy: its name and its ``summary`` class attribute (for ``--help``)."""
        return "\n".join(f"  {name:14} {getattr(self._classes[name], 'summary', '')}" for name in self.names())

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} policy {name!r}; choose one of: {', '.join(self.names())}") from None

    def knobs(self, name: str) -> tuple[Knob, ...]:
        """The knob schema of policy ``name`` (empty when it takes none)."""
        return tuple(getattr(self.get(name), "knobs", ()))

    def check(self, name: str, knobs: dict[str, Any]) -> dict[str, Any]:
        """``knobs`` validated for policy ``name`` (``KeyError`` for an unknown name, ``ValueError`` for a bad knob)."""
        return check_knobs(self.knobs(name), knobs, f"{self.kind} policy {name!r}")

    def describe_knobs(self, name: str) -> str:
        """The policy's summary line, then one line per knob: name, type, default, help."""
        summary = getattr(self.get(name), "summary", "")
        return f"{self.kind} policy {name}: {summary}\n{describe_knobs(self.knobs(name))}"

    def create(self, name: str, **knobs: Any) -> T:
        return self.get(name)(**self.check(name, knobs))
