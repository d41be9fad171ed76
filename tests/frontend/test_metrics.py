"""``GET /metrics``: a real cluster (coordinator, prefill and decode workers, frontend) under a small load, scraped
and parsed with prometheus_client's parser; the numbers agree with the timelines the clients got. Plus unit tests of
the status cache and the pool-move counter with a fake coordinator and clock."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from diptych import proto
from diptych.launcher import Cluster, ClusterSpec, free_port_block
from diptych.services.frontend.metrics import FrontendMetrics

ADMIN = "ak-metrics-operator"
KEYS = {"sk-alice": {"client_id": "alice", "tier": "strict"}, "sk-bob": {"client_id": "bob"}}
RPM_LIMIT = 8
"""Admission is ``rpm`` with this limit per client and minute, so alice's extra request is refused with 429."""

LONG_OUTPUT = 440
"""Output tokens of one long request (the tiny model's context is 512), running for seconds: longer than the 1 s
the frontend reuses a coordinator status, so a scrape sees it running."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/metrics", headers=headers, timeout=10)


def parse(text: str) -> tuple[set[str], Samples]:
    """Family names and every sample by (name, sorted labels)."""
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from diptych.engine.tiny_model import build_tiny_model

    tmp = tmp_path_factory.mktemp("metrics")
    model = build_tiny_model(tmp / "tiny-llama", family="llama")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"clients": KEYS, "admins": [ADMIN],
                                "tiers": {"strict": {"tbt_s": 0.1}}}))
    base = free_port_block(16)
    spec = ClusterSpec(model=str(model), http_port=base, coordinator_port=base + 1, sdk_port=base + 2,
                       stream_port=base + 3, kv_base_port=base + 4, num_blocks=256, api_keys_file=str(keys),
                       admission="rpm", admission_opts=[f"limit={RPM_LIMIT}"], log_level="INFO")
    started = Cluster(spec, log_dir=str(tmp / "logs"))
    started.start()
    try:
        started.wait_ready(timeout_s=120)
        yield started
    finally:
        started.stop()


def complete(url: str, key: str, max_tokens: int) -> httpx.Response:
    body = {"model": served_model(url, key), "prompt": "metrics " * 6, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "diptych": {"timeline": True}}
    return httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def served_model(url: str, key: str) -> str:
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    return models["data"][0]["id"]


@pytest.mark.integration
def test_metrics_follow_a_small_load(cluster: Cluster):
    url = cluster.spec.http_url
    assert scrape(url, key=None).status_code == 401
    assert scrape(url, key="sk-bob").status_code == 403  # operator only once keys are configured
    first = scrape(url)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
    families, before = parse(first.text)
    assert {"diptych_coordinator_up", "diptych_kv_cache_usage_perc", "diptych_num_requests_running",
            "diptych_num_requests_waiting", "diptych_num_preemptions", "diptych_recomputed_tokens",
            "diptych_kv_reservations_refused", "diptych_kv_cache_free_blocks"} <= families
    assert total(before, "diptych_coordinator_up") == 1
    assert len([k for k in before if k[0] == "diptych_kv_cache_usage_perc"]) == 2  # one per worker

    results: list[tuple[str, httpx.Response]] = []
    lock = threading.Lock()

    def client(key: str, count: int, max_tokens: int) -> None:
        for _ in range(count):
            response = complete(url, key, max_tokens)
            with lock:
                results.append((key, response))

    threads = [threading.Thread(target=client, args=("sk-alice", RPM_LIMIT, 24))]
    threads += [threading.Thread(target=client, args=("sk-bob", 3, 32)) for _ in range(2)]
    threads.append(threading.Thread(target=client, args=("sk-bob", 1, LONG_OUTPUT)))
    for t in threads:
        t.start()
    running_seen, deadline = 0.0, time.time() + 120
    while any(t.is_alive() for t in threads) and time.time() < deadline:
        _, mid = parse(scrape(url).text)
        running_seen = max(running_seen, total(mid, "diptych_num_requests_running"))
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results if r.status_code != 200]
    refused = complete(url, "sk-alice", 4)  # over alice's requests-per-minute limit
    assert refused.status_code == 429, refused.text

    done = [(key, r.json()) for key, r in results]
    timelines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key, body in done:
        timelines[KEYS[key].get("tier", "default")].append(body["timeline"])

    after: Samples = {}
    generated = sum(body["usage"]["completion_tokens"] for _, body in done)
    for _ in range(50):  # the coordinator's ledger and the workers' heartbeats trail the responses a little
        _, after = parse(scrape(url).text)
        if total(after, "diptych_client_requests_total") == len(done) and \
                total(after, "diptych_kv_handoffs_total") >= len(done) and \
                total(after, "diptych_client_generation_tokens_total") >= generated:
            break
        time.sleep(0.2)

    assert running_seen >= 1  # some scrape during the load saw a request in the cluster
    for tier, lines in timelines.items():
        n = len(lines)
        ttfts = [t["first_token"] - t["arrival"] for t in lines]
        gaps = sum(len(t["token_times"]) - 1 for t in lines)
        assert total(after, "diptych_time_to_first_token_seconds_count", tier=tier) == n
        assert total(after, "diptych_time_to_first_token_seconds_sum", tier=tier) == pytest.approx(sum(ttfts),
                                                                                                     abs=1e-3 * n)
        assert total(after, "diptych_inter_token_latency_seconds_count", tier=tier) == gaps
        itl_sum = sum(t["token_times"][-1] - t["token_times"][0] for t in lines)
        assert total(after, "diptych_inter_token_latency_seconds_sum", tier=tier) == pytest.approx(itl_sum, abs=1e-3)
        e2e = sum(t["finish"] - t["arrival"] for t in lines)
        assert total(after, "diptych_e2e_request_latency_seconds_sum", tier=tier) == pytest.approx(e2e, abs=1e-3)
        assert total(after, "diptych_e2e_request_latency_seconds_count", tier=tier) == n
        queued = sum(t["admitted"] - t["arrival"] for t in lines)
        assert total(after, "diptych_request_queue_time_seconds_count", tier=tier) == n
        assert total(after, "diptych_request_queue_time_seconds_sum", tier=tier) == pytest.approx(queued, abs=1e-3)
        assert total(after, "diptych_request_success_total", tier=tier, finished_reason="length") == n
        assert total(after, "diptych_generation_tokens_total", tier=tier) == sum(len(t["token_times"]) for t in lines)
    assert total(after, "diptych_requests_rejected_total", code="429") == 1
    assert total(after, "diptych_client_requests_rejected_total", client="alice", code="429") == 1
    assert total(after, "diptych_time_to_first_token_seconds_bucket", le="+Inf") == len(done)

    usage = {key: [b for k, b in done if k == key] for key in KEYS}
    for key, bodies in usage.items():
        client_id = KEYS[key]["client_id"]
        assert total(after, "diptych_client_requests_total", client=client_id) == len(bodies)
        assert total(after, "diptych_client_prompt_tokens_total", client=client_id) == \
            sum(b["usage"]["prompt_tokens"] for b in bodies)
        assert total(after, "diptych_client_generation_tokens_total", client=client_id) == \
            sum(b["usage"]["completion_tokens"] for b in bodies)
        assert total(after, "diptych_client_service_total", client=client_id) > 0
    assert total(after, "diptych_kv_handoffs_total") == len(done)  # every request decoded after its first token
    assert total(after, "diptych_kv_handoff_bytes_total") > total(before, "diptych_kv_handoff_bytes_total")
    assert total(after, "diptych_kv_handoff_seconds_total") > 0
    # a few short requests in a 256-block pool: KV never runs short, so nothing is preempted, recomputed or refused
    assert total(after, "diptych_num_preemptions_total") == 0 and total(after, "diptych_recomputed_tokens_total") == 0
    assert total(after, "diptych_kv_reservations_refused_total") == 0
    assert "diptych_pool_moves" in parse(scrape(url).text)[0]


def fake_status(moves: list[dict[str, Any]], waiting: int = 0) -> proto.ClusterStatus:
    worker = {"role": "flex", "pool": "decode", "total_blocks": 100, "free_blocks": 25, "reserved_blocks": 10,
              "requests": 3, "preemptions": 2, "recomputed_tokens": 96, "refused_reservations": 1,
              "kv_handoffs": {"zmq_frames": {"requests": 4, "bytes": 4096, "seconds": 0.5}}}
    return proto.ClusterStatus(prefill_workers=1, decode_workers=1, waiting=waiting, in_flight=3,
                               workers={"flex-0": worker}, pools={"policy": "rad", "moves": moves},
                               clients={"alice": {"requests": 2, "input_tokens": 10, "output_tokens": 5,
                                                  "service": 20.0}},
                               admission={"policy": "vtc", "counters": {"alice": 7.5}})


def test_status_is_cached_for_at_most_a_second_and_moves_are_counted_once():
    now = [0.0]
    queries: list[float] = []
    moves: list[dict[str, Any]] = []

    async def query(timeout_s: float) -> proto.ClusterStatus | None:
        queries.append(timeout_s)
        return fake_status(list(moves), waiting=len(queries))

    metrics = FrontendMetrics(query, clock=lambda: now[0])

    def render() -> Samples:
        return parse(asyncio.run(metrics.render()).decode())[1]

    first = render()
    assert len(queries) == 1 and total(first, "diptych_num_requests_waiting") == 1
    assert total(first, "diptych_kv_cache_usage_perc", worker="flex-0", pool="decode") == pytest.approx(0.75)
    assert total(first, "diptych_num_preemptions_total", worker="flex-0", pool="decode") == 2
    assert total(first, "diptych_recomputed_tokens_total", worker="flex-0", pool="decode") == 96
    assert total(first, "diptych_kv_reservations_refused_total", worker="flex-0") == 1
    assert total(first, "diptych_kv_handoff_bytes_total", path="zmq_frames") == 4096
    assert total(first, "diptych_client_vtc_counter", client="alice") == 7.5
    assert total(first, "diptych_pool_moves_total") == 0
    now[0] = 0.9
    render()
    assert len(queries) == 1  # within a second: the cached status
    moves.append({"time": 5.0, "worker": "flex-0", "from": "prefill", "to": "decode"})
    now[0] = 2.0
    second = render()
    assert len(queries) == 2 and total(second, "diptych_num_requests_waiting") == 2
    now[0] = 3.5
    third = render()
    assert total(third, "diptych_pool_moves_total", from_pool="prefill", to_pool="decode") == 1  # seen twice, once


def test_coordinator_down_is_reported():
    async def query(timeout_s: float) -> proto.ClusterStatus | None:
        return None

    families, samples = parse(asyncio.run(FrontendMetrics(query).render()).decode())
    assert total(samples, "diptych_coordinator_up") == 0
    assert "diptych_kv_cache_usage_perc" not in families
    assert "diptych_time_to_first_token_seconds" in families
