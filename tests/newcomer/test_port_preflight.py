"""A port clash fails at once, names the port and loads no model (a real ``diptych serve`` while the port is held)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from diptych.launcher import free_port_block

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("held", ["http", "kv"])
def test_serve_with_a_taken_port_fails_fast_naming_it(held: str) -> None:
    base = free_port_block(8)
    port = base if held == "http" else base + 4
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "diptych", "serve", "--http-port", str(base), "--coordinator-port",
             str(base + 1), "--sdk-port", str(base + 2), "--stream-port", str(base + 3), "--kv-base-port",
             str(base + 4)], capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert f"port {port} " in output, output
    assert "Diptych is up" not in output
    assert "KV pool" not in output and "Loading" not in output and "registering" not in output, output
    assert elapsed < 20, f"took {elapsed:.1f} s"
