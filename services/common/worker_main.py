"""The entry point both worker kinds share: parse flags, build the engine, run until SIGTERM."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from diptych.services.common.lifecycle import run_service, setup_logging
from diptych.services.common.worker import Worker, add_worker_arguments, build_engine

GIL_SWITCH_INTERVAL_S = 0.0005
"""How long the event loop thread may hold the GIL while the engine thread waits for it (Python's default is 5 ms,
as long as a whole decode iteration on a fast GPU): shipping one iteration's tokens must not delay the next."""


def worker_main(role: str, description: str, worker_cls: type[Worker] | Callable[[argparse.Namespace], type],
                extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"diptych {role}-worker", description=description)
    add_worker_arguments(parser, role)
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args(argv)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    setup_logging(args.worker_id, args.log_level)
    try:
        engine = build_engine(args)
    except (ValueError, KeyError, TypeError) as exc:
        parser.error(str(exc))

    cls = worker_cls if isinstance(worker_cls, type) else worker_cls(args)

    async def serve(stop):
        await cls(args, engine).run(stop)

    run_service(serve)
