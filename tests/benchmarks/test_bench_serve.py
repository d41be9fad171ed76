"""``diptych bench serve`` against a real cluster (cost-model engine, tiny inputs): timelines file and summary."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
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


CONTEXT = 512  # the tiny model's max_position_embeddings (the sim engine serves a longer context)


def server_context(cluster) -> int:
    resp = httpx.get(cluster.spec.http_url + "/v1/models", headers={"Authorization": "Bearer ka"}, timeout=10)
    return resp.json()["data"][0]["max_model_len"]


def bench_serve(cluster, tmp_path, over: str, *argv: str) -> subprocess.CompletedProcess:
    """``diptych bench serve`` of 12 requests of the two keyed clients, over the SDK (told the tiny model's context)
    or HTTP (which asks the server for it)."""
    client_keys = tmp_path / "client-keys.json"
    client_keys.write_text(json.dumps({"client0": "ka", "client1": "kb"}))
    endpoint = cluster.spec.sdk_addr if over == "sdk" else cluster.spec.http_url
    context = ["--max-context", str(CONTEXT)] if over == "sdk" else []
    return subprocess.run(
        [sys.executable, "-m", "diptych", "bench", "serve", "--endpoint", endpoint, "--qps", "20", "--num-requests",
         "12", "--clients", "2", "--client-keys", str(client_keys), "--output", str(tmp_path / "run.json"), *context,
         *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("over", ["sdk", "http"])
def test_bench_serve_writes_timelines_and_prints_the_summary(sim_cluster, tmp_path, over):
    proc = bench_serve(sim_cluster, tmp_path, over, "--workload", "fixed:300:20", "--tiers", "slai")
    assert proc.returncode == 0, proc.stderr
    assert "TTFT median" in proc.stdout and "| tier |" in proc.stdout
    timelines, meta = load_timelines(tmp_path / "run.json")
    assert len(timelines) == 12 and meta["workload"] == "fixed:300:20"
    assert meta["max_tokens"] == "2048"  # min(2048, context - 300): the 20 tokens come from stop_after_tokens
    assert meta["max_context"] == (CONTEXT if over == "sdk" else server_context(sim_cluster))
    assert all(t.status == "finished" and len(t.token_times) == 20 for t in timelines)
    assert all(t.arrival <= t.admitted <= t.prefill_start <= t.prefill_end <= t.handoff_end for t in timelines)
    assert {t.client_id for t in timelines} == {"client0", "client1"}


@pytest.mark.parametrize("over,policy,tokens", [("http", "context", 20), ("sdk", "oracle", 20), ("http", "8", 8),
                                                ("sdk", "context", 20)])
def test_bench_serve_max_tokens_policies(sim_cluster, tmp_path, over, policy, tokens):
    """The output follows the workload (stop_after_tokens) whatever max_tokens the scheduler sees; a fixed cap
    below it truncates the output, as a client's cap would."""
    proc = bench_serve(sim_cluster, tmp_path, over, "--workload", "fixed:100:20", "--max-tokens", policy)
    assert proc.returncode == 0, proc.stderr
    timelines, meta = load_timelines(tmp_path / "run.json")
    assert meta["max_tokens"] == policy
    assert all(t.status == "finished" and len(t.token_times) == tokens for t in timelines), \
        [len(t.token_times) for t in timelines]


def test_sampling_fields_send_the_cap_and_the_hidden_output_length():
    from diptych.benchmarks.serve_load import sampling_fields
    from diptych.workloads.spec import RequestSpec

    assert sampling_fields(RequestSpec("a", 0.0, 10, 7, max_tokens=2048)) == {
        "max_tokens": 2048, "stop_after_tokens": 7, "ignore_eos": True, "temperature": 0.0}


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
    for policy in ("lots", "0"):
        proc = subprocess.run([sys.executable, "-m", "diptych", "bench", "serve", "--max-tokens", policy],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--max-tokens" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "diptych", "bench", "serve", "--max-tokens", "context"],
                          capture_output=True, text=True, timeout=60)  # over the SDK: no context to fill
    assert proc.returncode == 2 and "--max-context" in proc.stderr, proc.stderr
