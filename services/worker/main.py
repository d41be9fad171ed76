"""What every worker entry point runs: parse flags, build the engine, compose the roles of ``--role``, run until
SIGTERM. Entry points: ``services.prefill_worker`` (a prefill worker) and ``services.decode_worker`` (``--role
decode|colocated|flex``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from diptych.proto.roles import WorkerRole
from diptych.services.common.cli import check_curve_arguments
from diptych.services.common.lifecycle import run_service, setup_logging
from diptych.services.common.security import load_keys
from diptych.services.worker.arguments import add_worker_arguments, build_engine
from diptych.services.worker.links import WorkerLinks
from diptych.services.worker.role import Role
from diptych.services.worker.roles.colocated import ColocatedRole
from diptych.services.worker.roles.decode import DecodeRole
from diptych.services.worker.roles.prefill import PrefillRole
from diptych.services.worker.worker import Worker

GIL_SWITCH_INTERVAL_S = 0.0005
"""How long the event loop thread may hold the GIL while the engine thread waits for it (Python's default is 5 ms,
as long as a whole decode iteration on a fast GPU): shipping one iteration's tokens must not delay the next."""


def compose_roles(role: WorkerRole, links: WorkerLinks, kv_addr: str = "") -> list[Role]:
    """The roles a worker registered as ``role`` runs (``kv_addr``: KV ingress of roles that decode).

    - prefill: prefill. decode: decode.
    - colocated: colocated, handing its requests to decode at their first token.
    - flex: all three, so it serves whichever pool the coordinator puts it in (``services.worker.worker``).
    """
    if role is WorkerRole.PREFILL:
        return [PrefillRole(links)]
    decode = DecodeRole(links, kv_addr)
    if role is WorkerRole.DECODE:
        return [decode]
    colocated = ColocatedRole(links, adopt=decode.adopt)
    if role is WorkerRole.COLOCATED:
        return [colocated, decode]
    return [PrefillRole(links), colocated, decode]


def worker_main(name: str, description: str, default_role: WorkerRole,
                extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                argv: list[str] | None = None) -> None:
    """Run one worker: ``name`` is its program's (``diptych <name>-worker``); its role is ``--role`` where
    ``extra_arguments`` adds that flag, else ``default_role``."""
    parser = argparse.ArgumentParser(prog=f"diptych {name}-worker", description=description)
    add_worker_arguments(parser, name)
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args(argv)
    check_curve_arguments(parser, args)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    setup_logging(args.worker_id, args.log_level, args.log_format)
    key_name = args.key_name or args.worker_id
    try:
        keys = load_keys(None if args.insecure_no_curve else args.keys_dir, key_name)
        engine = build_engine(args)
    except (ValueError, KeyError, TypeError) as exc:
        parser.error(str(exc))
    role = WorkerRole(getattr(args, "role", default_role))

    async def serve(stop: asyncio.Event) -> None:
        links = WorkerLinks(args.worker_id, engine, args.coordinator_addr, keys, key_name)
        roles = compose_roles(role, links, getattr(args, "kv_addr", ""))
        await Worker(links, role, roles, args.heartbeat_interval).run(stop)

    run_service(serve)
