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


NO_KEYS_ERROR = ("no CURVE keys: pass --keys-dir DIR (or DIPTYCH_KEYS_DIR) with a key set made by "
                 "'diptych keys generate DIR --workers N', or --insecure-no-curve on a trusted network")


def add_curve_arguments(parser: argparse.ArgumentParser, default_key_name: str | None) -> None:
    """``--keys-dir`` (env ``DIPTYCH_KEYS_DIR``), ``--key-name`` (env ``DIPTYCH_KEY_NAME``; ``None``: the caller's
    own default, e.g. a worker's id) and ``--insecure-no-curve``: CURVE on every internal socket unless turned off."""
    parser.add_argument("--keys-dir", default=env_default("keys_dir", "") or None, metavar="DIR",
                        help="CURVE key set ('diptych keys generate DIR'): authenticate and encrypt every internal "
                        "socket [required unless --insecure-no-curve]")
    parser.add_argument("--key-name", default=env_default("key_name", "") or default_key_name,
                        help=f"this process's name in the key set [{default_key_name or 'its worker id'}]")
    parser.add_argument("--insecure-no-curve", action="store_true",
                        default=bool(env_default("insecure_no_curve", False)),
                        help="plaintext, unauthenticated internal sockets (anyone who reaches a port can use it)")


def check_curve_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a one-line error (status 2) when neither ``--keys-dir`` nor ``--insecure-no-curve`` was given."""
    if not args.keys_dir and not args.insecure_no_curve:
        parser.exit(2, f"{parser.prog}: error: {NO_KEYS_ERROR}\n")
