"""``diptych serve`` with HTTPS and operator keys, on real processes: the banner lists every bound address, the
official ``openai`` client works over HTTPS, operator and client keys stay apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from diptych.launcher import free_port_block
from tests.security.certs import self_signed_certificate
from tests.security.listening import is_loopback, listening_addresses

pytestmark = pytest.mark.integration


def test_serve_over_https_with_operator_keys(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"clients": {"sk-a": {"client_id": "a"}, "sk-b": {"client_id": "b"}},
                                     "admins": ["ak-ops"]}))
    base = free_port_block(8)
    cmd = [sys.executable, "-m", "diptych", "serve", "--engine", "sim", "--http-port", str(base),
           "--coordinator-port", str(base + 1), "--sdk-port", str(base + 2), "--stream-port", str(base + 3),
           "--kv-base-port", str(base + 4), "--log-dir", str(tmp_path / "logs"), "--api-keys-file", str(keys_file),
           "--ssl-certfile", cert, "--ssl-keyfile", key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"https://127.0.0.1:{base}"
    try:
        banner = ""
        deadline = time.time() + 120
        while "Press Ctrl-C" not in banner and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert "Press Ctrl-C" in banner, banner
        for port in (base, base + 1, base + 2, base + 3, base + 4):
            assert f"127.0.0.1:{port}" in banner, banner
        assert f"{url}/v1" in banner
        listening = listening_addresses([proc.pid, *_children(proc.pid)])
        assert listening and all(is_loopback(ip) for ip, _ in listening), listening

        with httpx.Client(verify=cert) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-a", http_client=http, max_retries=0)
            done = client.completions.create(model=client.models.list().data[0].id, prompt="Hello", max_tokens=4)
            assert done.usage.completion_tokens >= 1
            assert http.get(f"{url}/admin/status", headers={"Authorization": "Bearer sk-a"}).status_code == 403
            status = http.get(f"{url}/admin/status", headers={"Authorization": "Bearer ak-ops"})
            assert status.status_code == 200 and "a" in status.json()["clients"]
            own = http.get(f"{url}/v1/usage", headers={"Authorization": "Bearer sk-a"}).json()
            assert own["client_id"] == "a" and own["requests"] == 1 and own["output_tokens"] >= 1
            assert http.get(f"{url}/v1/usage", headers={"Authorization": "Bearer sk-b"}).json()["requests"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
