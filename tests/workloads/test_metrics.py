"""Run metrics: histogram quantiles, timelines round trip, the summary's definitions on a hand-made run, fairness
metrics, and that a simulated run summarised directly or through its timelines gives the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.metrics.fairness import service_curves, service_difference, table2_metric, window_service
from diptych.metrics.histogram import LogHistogram
from diptych.metrics.results import RunResult
from diptych.metrics.summary import format_summary, summarize
from diptych.metrics.timeline import RequestTimeline, from_service_timeline, load_timelines, save_timelines
from diptych.sim.config import ClusterConfig
from diptych.sim.simulator import simulate
from diptych.workloads.catalog import WorkloadConfig, build_workload
from diptych.workloads.spec import RequestSpec


def test_histogram_quantiles_and_linear_series():
    values = np.random.default_rng(0).lognormal(-4, 1, 100_000)
    h = LogHistogram()
    h.add_array(values)
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.005)
    assert h.total == len(values) and h.mean == pytest.approx(values.mean()) and h.max == values.max()
    series = LogHistogram()
    series.add_linear(0.01, 1e-5, 1, 400, count=3)
    reference = LogHistogram()
    reference.add_array(0.01 + 1e-5 * np.arange(1, 400), count=3)
    assert sum(abs(a - b) for a, b in zip(series.counts, reference.counts)) <= 6  # edge rounding only
    assert series.total == reference.total and series.sum == pytest.approx(reference.sum)
    assert series.fraction_above(0.0135) == pytest.approx(reference.fraction_above(0.0135), abs=0.01)
    assert np.isnan(LogHistogram().quantile(0.5))


def _timelines() -> list[RequestTimeline]:
    return [
        RequestTimeline("a", "alice", 0.0, 100, 3, tier="strict", tbt_slo_s=0.1, ttft_slo_s=1.0, admitted=0.1,
                        prefill_start=0.2, prefill_end=0.5, handoff_start=0.5, handoff_end=0.6,
                        token_times=[0.5, 0.7, 0.75], finish=0.75, status="finished"),
        RequestTimeline("b", "bob", 1.0, 50, 2, tier="relaxed", tbt_slo_s=0.5, admitted=1.0, prefill_start=1.0,
                        prefill_end=1.2, token_times=[1.2, 1.3], finish=1.3, status="finished"),
        RequestTimeline("c", "bob", 1.5, 10, 5, status="rejected", finish=1.5),
    ]


def test_timelines_round_trip(tmp_path):
    save_timelines(_timelines(), tmp_path / "t.json", meta={"x": 1})
    loaded, meta = load_timelines(tmp_path / "t.json")
    assert loaded == _timelines() and meta == {"x": 1}
    assert loaded[0].ttft == 0.5 and loaded[0].num_tokens == 3
    with pytest.raises(ValueError, match="status"):
        RequestTimeline("x", "c", 0, 1, 1, status="weird")


def test_summary_definitions():
    s = summarize(RunResult.from_timelines(_timelines()))
    assert s["requests"] == 3 and s["finished"] == 2 and s["rejected"] == 1
    assert s["ttft_p50"] == pytest.approx(0.35) and s["sched_delay_p50"] == pytest.approx(0.1)
    assert s["span_s"] == pytest.approx(1.3)
    # a: gaps 0.2 (> 0.1 target: 1 of 2 gaps over, more than 1%) fails; b meets its 0.5 s target
    assert s["slo_attainment"] == pytest.approx(1 / 3) and s["goodput"] == pytest.approx(1 / 1.3)
    assert s["tiers"]["strict"]["tbt_p99"] == pytest.approx(0.2, rel=0.01)
    assert s["throughput_tps"] == pytest.approx((103 + 52) / 1.3)
    assert s["clients"]["bob"]["rejected"] == 1 and s["clients"]["alice"]["service_tps"] == pytest.approx(106 / 1.3)
    assert s["handoff_share_of_ttft"] == pytest.approx(0.1 / 0.6)
    text = format_summary(s)
    assert "| strict |" in text and "| bob |" in text and "TTFT median / P99" in text


def test_fairness_metrics_on_two_clients():
    # two backlogged clients; alice is served at twice bob's rate
    timelines = []
    for i in range(10):
        timelines.append(RequestTimeline(f"a{i}", "alice", 0.0, 10, 10, admitted=i, first_token=i, finish=i + 1,
                                         num_tokens=10, status="finished"))
    for i in range(5):
        timelines.append(RequestTimeline(f"b{i}", "bob", 0.0, 10, 10, admitted=2 * i, first_token=2 * i,
                                         finish=2 * i + 2, num_tokens=10, status="finished"))
    result = RunResult.from_timelines(timelines, end_time=10.0)
    grid, curves = service_curves(result, 1.0)
    assert curves["alice"][-1] == pytest.approx(300) and curves["bob"][-1] == pytest.approx(150)
    grid, diff = service_difference(result, 1.0)
    assert diff[grid == 4.0][0] == pytest.approx(120 - 60)
    assert np.isnan(diff[-1])  # bob stopped waiting at t = 8: no two clients wait together
    _, rates = window_service(result, 5.0)
    assert rates["alice"][0] == pytest.approx(30) and rates["bob"][0] == pytest.approx(15)
    worst, average = table2_metric(result, 5.0)
    assert worst >= average > 0


def test_simulated_and_timeline_summaries_agree():
    specs = build_workload(WorkloadConfig("sharegpt4", qps=20, num_requests=120, tiers="slai", clients=2))
    result = simulate(ClusterConfig(prefill_workers=1, decode_workers=2, record_tokens=True), specs)
    direct = summarize(result)
    via = summarize(RunResult.from_timelines(result.to_timelines(), end_time=result.end_time))
    for key in ("ttft_p50", "ttft_p99", "sched_delay_p50", "tbt_p99", "goodput", "throughput_tps", "slo_attainment",
                "service_diff_max"):
        assert via[key] == pytest.approx(direct[key], rel=0.01), key
    for tier in direct["tiers"]:
        assert via["tiers"][tier]["tbt_p99"] == pytest.approx(direct["tiers"][tier]["tbt_p99"], rel=0.01)


def test_service_timelines_convert():
    spec = RequestSpec("r1", 0.0, 100, 3, client_id="alice", tier="strict", tbt_slo_s=0.1)
    service = {"arrival": 100.0, "admitted": 100.1, "prefill_start": 100.1, "prefill_end": 100.3,
               "handoff_start": 100.3, "handoff_end": 100.32, "first_token": 100.3,
               "token_times": [100.3, 100.4, 100.45], "finish": 100.45, "finish_reason": "length"}
    timeline = from_service_timeline(spec, service)
    assert timeline.status == "finished" and timeline.ttft == pytest.approx(0.3) and timeline.num_tokens == 3
    assert timeline.handoff_end == 100.32 and timeline.client_id == "alice" and timeline.tbt_slo_s == 0.1
    assert from_service_timeline(spec, None, status="rejected").status == "rejected"
    assert from_service_timeline(spec, {"arrival": 1.0, "finish_reason": "abort"}).status == "failed"
