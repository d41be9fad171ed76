"""Process lifecycle shared by the services: logging with the service name, uvloop, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable


def setup_logging(service: str, level: str | None = None) -> None:
    """Log lines look like ``12:00:01.123 INFO coordinator[4242] req=ab12 dispatched to prefill-0``: request ids
    are written by the call sites as ``req=<id>``."""
    level = (level or os.environ.get("DIPTYCH_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s.%(msecs)03d %(levelname)s {service}[%(process)d] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run_service(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop_event)`` on uvloop (when available). SIGTERM and SIGINT set ``stop_event``; ``main`` is
    expected to return promptly after it is set, having closed its sockets and freed its resources."""
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(runner())
    else:
        uvloop.run(runner())
