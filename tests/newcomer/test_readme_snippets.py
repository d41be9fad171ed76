"""The README's newcomer path, as written, against the same ``diptych serve`` that ``make serve`` runs (on free ports:
the README's ports are replaced by them): the banner, curl, the ``openai`` client, both SDK halves and the
``bench serve`` line. Also: each worker is warm before it registers, and the banner comes after that."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from diptych.launcher import free_port_block

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
README_PORTS = {"8000": 0, "5600": 1, "5601": 2, "5602": 3, "5610": 4}
"""README port -> offset from the free base port (the order of ``diptych serve``'s port flags below)."""

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def blocks(language: str | None = None) -> list[str]:
    """The README's fenced code blocks (of ``language`` if given)."""
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S)
            if language is None or lang == language]


def block_with(text: str) -> str:
    return next(b for b in blocks() if text in b)


class Server:
    def __init__(self, base: int) -> None:
        self.base = base
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diptych", "serve", "--http-port", str(base), "--coordinator-port", str(base + 1),
             "--sdk-port", str(base + 2), "--stream-port", str(base + 3), "--kv-base-port", str(base + 4)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.up = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                self.up.set()

    def ports(self, text: str) -> str:
        for port, offset in README_PORTS.items():
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{self.base + offset}")
        return text


@pytest.fixture(scope="module")
def server():
    srv = Server(free_port_block(8))
    try:
        deadline = time.monotonic() + 150
        while not srv.up.wait(0.5):
            assert srv.proc.poll() is None and time.monotonic() < deadline, "\n".join(srv.lines[-40:])
        yield srv
    finally:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()


def run_python(server: Server, code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", server.ports(code)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_banner_is_the_readme_one_and_comes_after_every_worker_is_warm(server: Server) -> None:
    banner = server.ports(block_with("Diptych is up")).strip().splitlines()
    for line in banner:
        assert line in server.lines, f"README banner line not printed: {line!r}\n" + "\n".join(server.lines[-20:])
    up = next(i for i, line in enumerate(server.lines) if line.startswith("Diptych is up"))
    for worker in ("prefill-0", "decode-0"):
        warm = next(i for i, line in enumerate(server.lines) if f"{worker}[" in line and "engine warm" in line)
        registering = next(i for i, line in enumerate(server.lines) if f"{worker}[" in line and "registering" in line)
        assert warm < registering < up
    assert any("KV pool:" in line and "tokens" in line for line in server.lines)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl(server: Server) -> None:
    command = block_with("curl http://127.0.0.1:8000/v1/completions")
    proc = subprocess.run(["bash", "-c", server.ports(command)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"choices"' in proc.stdout, proc.stdout


def test_openai_client(server: Server) -> None:
    pytest.importorskip("openai")
    run_python(server, block_with("from openai import OpenAI"))


def test_sdk_sync_and_asyncio(server: Server) -> None:
    code = block_with("from diptych import AsyncClient")
    assert "asyncio.run(main())" in code
    run_python(server, code)


def test_bench_serve_line(server: Server, tmp_path: Path) -> None:
    line = re.search(r"`(diptych bench serve [^`]*)`", README)
    assert line is not None
    args = server.ports(line.group(1)).split()[1:]
    proc = subprocess.run([sys.executable, "-m", "diptych", *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    requests = re.search(r"requests \(finished / rejected / failed / unfinished\) \| (\d+) \((\d+) / 0 / 0 / 0\)",
                         proc.stdout)
    assert requests is not None and requests.group(1) == requests.group(2), proc.stdout + proc.stderr
    assert "failed or were refused" not in proc.stderr, proc.stderr
    assert (tmp_path / "bench-serve.json").exists()
