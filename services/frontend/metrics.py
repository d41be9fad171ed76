"""Prometheus metrics of the cluster, served by the frontend at ``GET /metrics`` (``docs/metrics.md`` lists them).

Two sources, one registry per frontend (never the process-global one):

- requests as this frontend saw them (``RequestMetrics``): latency histograms per SLO tier, observed once per request
  when it leaves the tracker, from the same ``Timeline`` the client gets; outcomes and tokens as counters;
- the coordinator's ``ClusterStatus`` (``ClusterCollector``), asked for at scrape time and reused for at most
  ``STATUS_MAX_AGE_S`` (so a burst of scrapes costs one query): queue gauges, KV and handoffs per worker, service per
  client, pool moves. When the coordinator does not answer, ``diptych_coordinator_up`` is 0 and the cluster
  families are absent from that scrape.

Units are seconds, bytes and tokens; KV usage is a fraction in [0, 1] (vLLM's ``kv_cache_usage_perc`` convention).
Names are vLLM's, with a ``diptych_`` prefix, where vLLM has the same quantity.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from itertools import pairwise
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from diptych import proto
from diptych.services.frontend.timeline import Timeline
from diptych.services.frontend.tracker import RequestState

STATUS_MAX_AGE_S = 1.0
"""A scrape reuses a ``ClusterStatus`` fetched at most this long ago (seconds)."""

STATUS_TIMEOUT_S = 1.0
"""How long a scrape waits for the coordinator (seconds)."""

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0)
"""Histogram buckets (seconds) of TTFT, end-to-end and queue time; vLLM's, with 1 ms added."""

ITL_BUCKETS_S = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0)
"""Histogram buckets (seconds) of the gap between consecutive output tokens."""

FINISHED = ("stop", "length")
"""Outcomes of a request that completed; any other outcome is counted but observes no latency."""


class RequestMetrics:
    """Per-request families, fed by ``observe(tier, prompt_tokens, timeline, outcome)`` once per request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        tier = ["tier"]
        self.ttft = Histogram("diptych_time_to_first_token_seconds", "Time from arrival at the frontend to the first "
                              "output token, per completed request", tier, buckets=LATENCY_BUCKETS_S,
                              registry=registry)
        self.itl = Histogram("diptych_inter_token_latency_seconds", "Gap between consecutive output tokens of a "
                             "completed request (one observation per gap)", tier, buckets=ITL_BUCKETS_S,
                             registry=registry)
        self.e2e = Histogram("diptych_e2e_request_latency_seconds", "Time from arrival to the end of a completed "
                             "request", tier, buckets=LATENCY_BUCKETS_S, registry=registry)
        self.queue = Histogram("diptych_request_queue_time_seconds", "Time from arrival until a prefill worker "
                               "admitted the request (completed requests)", tier, buckets=LATENCY_BUCKETS_S,
                               registry=registry)
        self.success = Counter("diptych_request_success", "Requests that completed, by finish reason",
                               ["tier", "finished_reason"], registry=registry)
        self.prompt_tokens = Counter("diptych_prompt_tokens", "Prompt tokens of completed requests", tier,
                                     registry=registry)
        self.generation_tokens = Counter("diptych_generation_tokens", "Output tokens delivered to clients "
                                         "(all requests)", tier, registry=registry)
        self.rejected = Counter("diptych_requests_rejected", "Requests that ended with an HTTP error status: 429 "
                                "and 503 refusals (rate limit, load shedding, queue timeout), 500 worker errors, "
                                "504 frontend timeouts", ["code"], registry=registry)
        self.client_rejected = Counter("diptych_client_requests_rejected", "Requests of a client that ended with "
                                       "an HTTP error status", ["client", "code"], registry=registry)
        self.cancelled = Counter("diptych_requests_cancelled", "Requests the frontend gave up on (client gone, "
                                 "stop string, timeout)", ["reason"], registry=registry)

    def on_retire(self, state: RequestState, outcome: str) -> None:
        """The request tracker's callback: ``state`` left the frontend with ``outcome``."""
        self.observe(state.tier, state.client.client_id, state.prompt_len, state.timeline, outcome)

    def observe(self, tier: str, client_id: str, prompt_tokens: int, timeline: Timeline, outcome: str) -> None:
        """``outcome``: the tracker's ("stop", "length", "cancelled:<reason>" or "error:<HTTP status>")."""
        self.generation_tokens.labels(tier).inc(len(timeline.token_times))
        kind, _, detail = outcome.partition(":")
        if kind == "error":
            self.rejected.labels(detail).inc()
            self.client_rejected.labels(client_id, detail).inc()
            return
        if kind == "cancelled":
            self.cancelled.labels(detail).inc()
            return
        if outcome not in FINISHED:
            return
        self.success.labels(tier, outcome).inc()
        self.prompt_tokens.labels(tier).inc(prompt_tokens)
        times = timeline.token_times
        if times:
            self.ttft.labels(tier).observe(times[0] - timeline.arrival)
        for earlier, later in pairwise(times):
            self.itl.labels(tier).observe(later - earlier)
        if timeline.finish is not None:
            self.e2e.labels(tier).observe(timeline.finish - timeline.arrival)
        admitted = timeline.phases.get("admitted")
        if admitted is not None:
            self.queue.labels(tier).observe(max(0.0, admitted - timeline.arrival))


class StatusCache:
    """The coordinator's latest ``ClusterStatus``, fetched again when older than ``max_age_s`` (``clock`` in
    seconds, monotonic). ``None`` when the coordinator did not answer the last query."""

    def __init__(self, query: Callable[[float], Awaitable[proto.ClusterStatus | None]],
                 max_age_s: float = STATUS_MAX_AGE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._query = query
        self._max_age_s = max_age_s
        self._clock = clock
        self._fetched_at = float("-inf")
        self.status: proto.ClusterStatus | None = None

    async def refresh(self) -> proto.ClusterStatus | None:
        if self._clock() - self._fetched_at > self._max_age_s:
            self.status = await self._query(STATUS_TIMEOUT_S)
            self._fetched_at = self._clock()
        return self.status


class ClusterCollector(Collector):
    """Families built from ``cache.status`` at collection time (``StatusCache.refresh`` runs just before)."""

    def __init__(self, cache: StatusCache) -> None:
        self._cache = cache
        self._moves_seen: set[tuple[Any, ...]] = set()
        self._move_counts: dict[tuple[str, str], int] = {}

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families depend on the status: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        status = self._cache.status
        up = GaugeMetricFamily("diptych_coordinator_up", "1 when the coordinator answered the last status query")
        up.add_metric([], 0.0 if status is None else 1.0)
        yield up
        if status is None:
            return
        yield from _queue_families(status)
        yield from _worker_families(status.workers)
        yield from _client_families(status.clients, status.admission)
        yield self._pool_moves(status.pools.get("moves", []))

    def _pool_moves(self, moves: list[dict[str, Any]]) -> Metric:
        """Counts each move once (by time, worker and pools); the coordinator keeps only its recent moves, so a move
        made and dropped between two scrapes is missed."""
        for move in moves:
            key = (move.get("time"), move.get("worker"), move.get("from"), move.get("to"))
            if key not in self._moves_seen:
                self._moves_seen.add(key)
                pair = (str(move.get("from")), str(move.get("to")))
                self._move_counts[pair] = self._move_counts.get(pair, 0) + 1
        family = CounterMetricFamily("diptych_pool_moves", "Workers moved between pools that this frontend has seen "
                                     "(in the coordinator's recent moves)", labels=["from_pool", "to_pool"])
        for (source, target), count in sorted(self._move_counts.items()):
            family.add_metric([source, target], count)
        return family


def _queue_families(status: proto.ClusterStatus) -> Iterator[Metric]:
    running = GaugeMetricFamily("diptych_num_requests_running", "Requests the coordinator has sent to workers and "
                                "not yet ended (prefill, handoff or decode)")
    running.add_metric([], status.in_flight)
    waiting = GaugeMetricFamily("diptych_num_requests_waiting", "Requests waiting in the coordinator's admission "
                                "queue")
    waiting.add_metric([], status.waiting)
    workers = GaugeMetricFamily("diptych_workers", "Workers registered with the coordinator, per pool",
                                labels=["pool"])
    for pool, count in (("prefill", status.prefill_workers), ("decode", status.decode_workers),
                        ("colocated", status.colocated_workers)):
        workers.add_metric([pool], count)
    yield from (running, waiting, workers)


def _worker_families(workers: dict[str, Any]) -> Iterator[Metric]:
    labels = ["worker", "pool"]
    usage = GaugeMetricFamily("diptych_kv_cache_usage_perc", "Fraction of the worker's KV blocks in use (0 to 1)",
                              labels=labels)
    free = GaugeMetricFamily("diptych_kv_cache_free_blocks", "Free KV blocks of the worker", labels=labels)
    total = GaugeMetricFamily("diptych_kv_cache_total_blocks", "KV blocks of the worker's pool", labels=labels)
    reserved = GaugeMetricFamily("diptych_kv_cache_reserved_blocks", "KV blocks the coordinator has accounted to "
                                 "the requests placed on the worker (their expected footprints)", labels=labels)
    held = GaugeMetricFamily("diptych_worker_requests", "Requests the coordinator has placed on the worker",
                             labels=labels)
    preemptions = CounterMetricFamily("diptych_num_preemptions", "Sequences the worker preempted (by recompute) "
                                      "since it started", labels=labels)
    recomputed = CounterMetricFamily("diptych_recomputed_tokens", "Positions whose KV the worker dropped on "
                                     "preemption and computes again, since it started", labels=labels)
    refused = CounterMetricFamily("diptych_kv_reservations_refused", "Handoff reservations the worker refused for "
                                  "lack of free KV blocks (the coordinator retries each), since it registered",
                                  labels=labels)
    path_labels = ["worker", "path"]
    handoffs = CounterMetricFamily("diptych_kv_handoffs", "KV handoffs the worker made, per transfer path",
                                   labels=path_labels)
    handoff_bytes = CounterMetricFamily("diptych_kv_handoff_bytes", "KV bytes the worker handed off, per path",
                                        labels=path_labels)
    handoff_seconds = CounterMetricFamily("diptych_kv_handoff_seconds", "Seconds from prefill end until the KV was "
                                          "sent or in place, summed over handoffs, per path", labels=path_labels)
    for worker_id, w in sorted(workers.items()):
        values = [worker_id, str(w.get("pool", ""))]
        total_blocks, free_blocks = int(w.get("total_blocks", 0)), int(w.get("free_blocks", 0))
        usage.add_metric(values, (total_blocks - free_blocks) / total_blocks if total_blocks else 0.0)
        free.add_metric(values, free_blocks)
        total.add_metric(values, total_blocks)
        reserved.add_metric(values, w.get("reserved_blocks", 0))
        held.add_metric(values, w.get("requests", 0))
        preemptions.add_metric(values, w.get("preemptions", 0))
        recomputed.add_metric(values, w.get("recomputed_tokens", 0))
        refused.add_metric(values, w.get("refused_reservations", 0))
        for path, counts in sorted((w.get("kv_handoffs") or {}).items()):
            handoffs.add_metric([worker_id, path], counts.get("requests", 0))
            handoff_bytes.add_metric([worker_id, path], counts.get("bytes", 0))
            handoff_seconds.add_metric([worker_id, path], counts.get("seconds", 0.0))
    yield from (usage, free, total, reserved, held, preemptions, recomputed, refused, handoffs, handoff_bytes,
                handoff_seconds)


def _client_families(clients: dict[str, Any], admission: dict[str, Any]) -> Iterator[Metric]:
    client = ["client"]
    requests = CounterMetricFamily("diptych_client_requests", "Requests of the client the cluster served "
                                   "(the coordinator's ledger)", labels=client)
    prompt = CounterMetricFamily("diptych_client_prompt_tokens", "Prompt tokens served to the client",
                                 labels=client)
    generation = CounterMetricFamily("diptych_client_generation_tokens", "Output tokens served to the client",
                                     labels=client)
    service = CounterMetricFamily("diptych_client_service", "Service delivered to the client: input tokens + 2 x "
                                  "output tokens", labels=client)
    for client_id, c in sorted(clients.items()):
        requests.add_metric([client_id], c.get("requests", 0))
        prompt.add_metric([client_id], c.get("input_tokens", 0))
        generation.add_metric([client_id], c.get("output_tokens", 0))
        service.add_metric([client_id], c.get("service", 0.0))
    yield from (requests, prompt, generation, service)
    counters = admission.get("counters")
    if isinstance(counters, dict):  # VTC and LCF: the fairness counters that order admission
        vtc = GaugeMetricFamily("diptych_client_vtc_counter", "The admission policy's virtual token counter of the "
                                "client (VTC/LCF; may be lifted, so a gauge)", labels=client)
        for client_id, value in sorted(counters.items()):
            vtc.add_metric([client_id], value)
        yield vtc


class FrontendMetrics:
    """Everything ``GET /metrics`` shows. ``requests.on_retire`` is the request tracker's ``on_retire`` callback."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, query_status: Callable[[float], Awaitable[proto.ClusterStatus | None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry)
        self._cache = StatusCache(query_status, clock=clock)
        self.registry.register(ClusterCollector(self._cache))

    async def render(self) -> bytes:
        """The Prometheus text exposition, with a coordinator status at most ``STATUS_MAX_AGE_S`` old."""
        await self._cache.refresh()
        return generate_latest(self.registry)
