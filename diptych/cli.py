"""The ``diptych`` command. Subcommands live in ``diptych/commands/`` (each module's ``register(subparsers)`` adds
itself); the service names (``coordinator``, ``frontend``, ``prefill-worker``, ``decode-worker``) run one service
alone, as docker-compose does."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import diptych.commands

SERVICES = {
    "coordinator": "diptych.services.coordinator.__main__",
    "frontend": "diptych.services.frontend.__main__",
    "prefill-worker": "diptych.services.prefill_worker.__main__",
    "decode-worker": "diptych.services.decode_worker.__main__",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diptych", description="Diptych: disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(diptych.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"diptych.commands.{info.name}").register(sub)
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service alone (see 'diptych {name} --help')", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:  # hand the rest of the line to the service's own parser (--help included)
        importlib.import_module(SERVICES[argv[0]]).main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
