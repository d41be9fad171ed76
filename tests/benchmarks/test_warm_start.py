"""``diptych bench warm-start`` on CPU with the tiny model: it starts a server with no KV flags, reads the pool size
from the log and compares the first request's TTFT with the steady state."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from diptych.benchmarks.served import ServerLog


def test_server_log_reads_pool_sizes_and_the_banner() -> None:
    log = ServerLog()
    log.follow(io.BytesIO(b"12:00:00.000 INFO prefill-0[1] KV pool: 100 blocks of 16 tokens = 1600 tokens on cuda\n"
                          b"12:00:00.100 INFO decode-0[2] KV pool: 50 blocks of 16 tokens = 800 tokens on cuda\n"
                          b"Diptych is up: workers 1 prefill, 1 decode, 0 colocated; model m\n"))
    assert log.pool_tokens() == [1600, 800]
    assert log.up.is_set()


@pytest.mark.integration
@pytest.mark.slow
def test_warm_start_runs_on_cpu_with_the_tiny_model(tmp_path) -> None:
    out = tmp_path / "warm.json"
    proc = subprocess.run([sys.executable, "-m", "diptych", "bench", "warm-start", "--device", "cpu", "--requests",
                           "2", "--max-tokens", "8", "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "first / steady" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["kv_pool_tokens"]) == 2 and min(result["kv_pool_tokens"]) > 0
    assert result["first_ttft_s"] > 0 and len(result["steady_ttft_s"]) == 2
