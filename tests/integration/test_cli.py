"""The ``diptych`` command itself: ``serve`` brings a cluster up and down cleanly; every service has ``--help``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.conftest import free_port_block

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("command", [[], ["serve"], ["coordinator"], ["frontend"], ["prefill-worker"],
                                     ["decode-worker"]])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "diptych", *command, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and len(out.stdout) > 200


def test_serve_runs_and_stops_on_sigterm(tiny_llama, tmp_path):
    base = free_port_block(8)
    cmd = [sys.executable, "-m", "diptych", "serve", "--model", tiny_llama, "--http-port", str(base),
           "--coordinator-port", str(base + 1), "--sdk-port", str(base + 2), "--stream-port", str(base + 3),
           "--kv-base-port", str(base + 4), "--num-blocks", "128", "--log-dir", str(tmp_path),
           "--admission", "fcfs", "--admission-opt", "unused=1"]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0  # an unknown policy option is refused before anything starts serving
    cmd = cmd[:-2]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        banner = ""
        while "Diptych is up" not in banner and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert "Diptych is up" in banner, banner
        model = httpx.get(f"http://127.0.0.1:{base}/v1/models").json()["data"][0]["id"]
        resp = httpx.post(f"http://127.0.0.1:{base}/v1/completions", timeout=30,
                          json={"model": model, "prompt": "Hello", "max_tokens": 4})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    pids = subprocess.run(["pgrep", "-f", f"--coordinator-addr tcp://127.0.0.1:{base + 1}"], capture_output=True,
                          text=True).stdout.split()
    assert pids == []  # no child process left behind


def test_device_list_is_given_to_workers_in_turn():
    from diptych.launcher import Cluster, ClusterSpec

    commands = Cluster(ClusterSpec(prefill_workers=1, decode_workers=2, device="cuda:0, cuda:1")).commands()
    devices = {name: cmd[cmd.index("--device") + 1] for name, cmd in commands.items() if "--device" in cmd}
    assert devices == {"prefill-0": "cuda:0", "decode-0": "cuda:1", "decode-1": "cuda:0"}
