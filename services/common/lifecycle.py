"""Process lifecycle shared by the services: logging with the service name (text or JSON lines), uvloop, clean stop
on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

LOG_FORMATS = ("text", "json")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` (default ``DIPTYCH_LOG_FORMAT``, else text), read by ``setup_logging``."""
    parser.add_argument("--log-format", default=os.environ.get("DIPTYCH_LOG_FORMAT") or "text", choices=LOG_FORMATS,
                        help="text lines, or one JSON object per line [%(default)s]")


def setup_logging(service: str, level: str | None = None, log_format: str | None = None) -> None:
    """Text lines look like ``12:00:01.123 INFO coordinator[4242] req=ab12 dispatched to prefill-0``: request ids
    are written by the call sites as ``req=<id>``. ``log_format`` "json" (default ``DIPTYCH_LOG_FORMAT``, else
    "text") writes one object per line: ``{"time": <unix s>, "level", "service", "pid", "logger", "message"}``
    (plus ``"exc"`` with a traceback). Third-party progress bars (model download and loading) are switched off:
    a service log holds log lines only."""
    level = (level or os.environ.get("DIPTYCH_LOG_LEVEL", "INFO")).upper()
    log_format = log_format or os.environ.get("DIPTYCH_LOG_FORMAT") or "text"
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers on import
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)s {service}[%(process)d] %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``setup_logging`` lists the keys)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname, "service": self.service,
                 "pid": record.process, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


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
