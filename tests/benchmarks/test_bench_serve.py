"""``diptych bench serve`` against a real cluster (cost-model engine, tiny inputs): timelines file and summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diptych.metrics.timeline import load_timelines
from tests.integration.conftest import cluster_spec, start_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sim_cluster(tmp_path_factory):
    from diptych.engine.tiny_model import build_tiny_model

    path = str(tmp_path_factory.mktemp("models") / "tiny")
    build_tiny_model(path)
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"clients": {"ka": {"client_id": "client0"}, "kb": {"client_id": "client1"}}}))
    cluster = start_cluster(cluster_spec(path, engine="sim", api_keys_file=str(keys), admission="vtc"),
                            tmp_path_factory.mktemp("logs"))
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("over", ["sdk", "http"])
def test_bench_serve_writes_timelines_and_prints_the_summary(sim_cluster, tmp_path, over):
    spec = sim_cluster.spec
    client_keys = tmp_path / "client-keys.json"
    client_keys.write_text(json.dumps({"client0": "ka", "client1": "kb"}))
    out = tmp_path / "run.json"
    endpoint = spec.sdk_addr if over == "sdk" else spec.http_url
    proc = subprocess.run(
        [sys.executable, "-m", "diptych", "bench", "serve", "--endpoint", endpoint, "--workload", "fixed:300:20",
         "--qps", "20", "--num-requests", "12", "--clients", "2", "--tiers", "slai", "--client-keys",
         str(client_keys), "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT median" in proc.stdout and "| tier |" in proc.stdout
    timelines, meta = load_timelines(out)
    assert len(timelines) == 12 and meta["workload"] == "fixed:300:20"
    assert all(t.status == "finished" and len(t.token_times) == 20 for t in timelines)
    assert all(t.arrival <= t.admitted <= t.prefill_start <= t.prefill_end <= t.handoff_end for t in timelines)
    assert {t.client_id for t in timelines} == {"client0", "client1"}


def test_failures_are_counted_with_their_reason(sim_cluster, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diptych", "bench", "serve", "--endpoint", sim_cluster.spec.sdk_addr,
                           "--workload", "fixed:10:5", "--num-requests", "3", "--output", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "3 requests failed" in proc.stderr and "401" in proc.stderr  # keys are configured, none was sent


def test_bench_serve_rejects_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diptych", "bench", "serve", "--endpoint", "nowhere",
                           "--num-requests", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--endpoint" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "diptych", "bench", "serve", "--qps", "-1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "qps" in proc.stderr
