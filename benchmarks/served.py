"""A ``diptych serve`` process for benchmarks that drive a server from outside: started on free ports, its merged
output followed on a thread (the "up" banner, each worker's KV pool line), stopped with SIGTERM (then SIGKILL)."""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from diptych.launcher import free_port_block

POOL_LINE = re.compile(r"KV pool: (\d+) blocks of (\d+) tokens = (\d+) tokens")
UP_LINE = "Diptych is up"


def add_served_arguments(parser: argparse.ArgumentParser, request_timeout_s: float, serve_arg_example: str) -> None:
    """The options every benchmark that starts its own ``diptych serve`` takes: timeouts, extra serve flags, where
    to write the numbers and the server's output."""
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for 'up' [%(default)s]")
    parser.add_argument("--request-timeout", type=float, default=request_timeout_s,
                        help="seconds per request [%(default)s]")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help=f"extra argument for diptych serve, repeatable ({serve_arg_example})")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--server-log", default=None, help="write the server's output to this file")


@dataclass
class ServerLog:
    """Lines of the server's merged output, read on a thread; ``up`` is set at the banner."""

    lines: list[str] = field(default_factory=list)
    up: threading.Event = field(default_factory=threading.Event)
    up_at: float | None = None

    def follow(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if UP_LINE in line and not self.up.is_set():
                self.up_at = time.perf_counter()
                self.up.set()

    def pool_tokens(self) -> list[int]:
        """Each worker's KV pool size in tokens, in log order."""
        return [int(m.group(3)) for line in self.lines if (m := POOL_LINE.search(line))]


@dataclass
class Served:
    """A running server: its HTTP base URL, its log, and when it was started (``time.perf_counter``)."""

    url: str
    log: ServerLog
    started: float


class ServerFailed(RuntimeError):
    """The server exited or did not print its banner in time; the message ends with its last log lines."""


@contextlib.contextmanager
def serve(args: list[str], startup_timeout_s: float, log_path: str | None = None) -> Iterator[Served]:
    """Run ``diptych serve ARGS`` on free ports until the block exits; ``ServerFailed`` if it is not up within
    ``startup_timeout_s`` seconds. ``log_path``: where to write its whole output afterwards."""
    base = free_port_block(16)
    cmd = [sys.executable, "-m", "diptych", "serve", "--http-port", str(base), "--coordinator-port", str(base + 1),
           "--sdk-port", str(base + 2), "--stream-port", str(base + 3), "--kv-base-port", str(base + 4), *args]
    print("starting:", " ".join(cmd), file=sys.stderr)
    started = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = ServerLog()
    threading.Thread(target=log.follow, args=(server.stdout,), daemon=True).start()
    try:
        deadline = time.perf_counter() + startup_timeout_s
        while not log.up.wait(0.5):
            if server.poll() is not None or time.perf_counter() > deadline:
                tail = "\n".join(log.lines[-30:])
                raise ServerFailed(f"the server did not come up:\n{tail}")
        yield Served(f"http://127.0.0.1:{base}", log, started)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if log_path:
            with open(log_path, "w") as f:
                f.write("\n".join(log.lines) + "\n")
