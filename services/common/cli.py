"""Command-line helpers shared by the services: policy knobs as ``key=value`` and env-var defaults."""

from __future__ import annotations

import argparse
import os
from typing import Any


def parse_knobs(items: list[str] | None) -> dict[str, Any]:
    """``["w_p=1", "client_queue_order=spf", "strict=true"]`` -> ``{"w_p": 1, "client_queue_order": "spf",
    "strict": True}``; numbers become int or float, true/false become bool."""
    knobs: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"policy option {item!r} is not key=value")
        knobs[key.replace("-", "_")] = _parse_value(raw)
    return knobs


def _parse_value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def env_default(name: str, default: Any) -> Any:
    """The value of ``DIPTYCH_<NAME>`` if set and not empty (docker-compose configuration), else ``default``."""
    value = os.environ.get(f"DIPTYCH_{name.upper()}")
    if not value:
        return default
    return type(default)(value) if default is not None and not isinstance(default, bool) else _parse_value(value)
