"""Capacity search: bracket widening, bisection to tolerance, criteria, and a small simulated search."""

from __future__ import annotations

import math

import pytest

from diptych.metrics.summary import summarize
from diptych.sim.capacity import capacity_search, goodput_criterion, sarathi_criterion, slai_criterion
from diptych.sim.cost_model import PRESETS
from diptych.sim.simulator import simulate
from tests.sim.helpers import colocated, specs


def fake(threshold: float):
    calls = []

    def run(qps: float) -> dict:
        calls.append(qps)
        return {"qps": qps}

    def criterion(s: dict) -> tuple[bool, str]:
        return s["qps"] <= threshold, "ok" if s["qps"] <= threshold else "too much"

    return run, criterion, calls


@pytest.mark.parametrize("threshold", [0.3, 1.7, 3.0, 9.5])
def test_search_finds_the_threshold_within_tolerance(threshold):
    run, criterion, calls = fake(threshold)
    result = capacity_search(run, criterion, 1.0, 2.0, rel_tol=0.01, max_runs=30)
    assert result.qps <= threshold and result.qps >= threshold * 0.98
    assert len(calls) == len(set(calls)) == len(result.runs)


def test_search_reports_zero_when_nothing_passes_and_respects_the_budget():
    run, criterion, calls = fake(0.0)
    assert capacity_search(run, criterion, 1.0, 2.0, max_runs=6).qps == 0.0 and len(calls) == 6
    run, criterion, calls = fake(100.0)
    result = capacity_search(run, criterion, 1.0, 2.0, max_runs=3)
    assert len(calls) == 3 and result.qps == 8.0


def test_bad_arguments():
    run, criterion, _ = fake(1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        capacity_search(run, criterion, 2.0, 1.0)
    with pytest.raises(ValueError, match="unknown criterion"):
        capacity_search(run, "nope", 1.0, 2.0)


def _summary(**over) -> dict:
    s = {"unfinished": 0, "rejected": 0, "failed": 0, "ttft_p50": 0.2, "sched_delay_p50": 1.0, "slo_attainment": 0.95,
         "tiers": {"strict": {"tbt_slo": 0.1, "tbt_p99": 0.05}, "relaxed": {"tbt_slo": 0.5, "tbt_p99": 0.3},
                   "default": {"tbt_slo": math.nan, "tbt_p99": 9.0}}}
    s.update(over)
    return s


def test_criteria():
    assert slai_criterion(_summary())[0] and sarathi_criterion(_summary())[0] and goodput_criterion(_summary())[0]
    assert not slai_criterion(_summary(ttft_p50=0.5))[0]
    bad_tier = _summary(tiers={"strict": {"tbt_slo": 0.1, "tbt_p99": 0.11}})
    ok, reason = slai_criterion(bad_tier)
    assert not ok and "strict" in reason and not sarathi_criterion(bad_tier)[0]
    assert not sarathi_criterion(_summary(sched_delay_p50=2.5))[0]
    assert not goodput_criterion(_summary(slo_attainment=0.89))[0]
    assert not slai_criterion(_summary(unfinished=1))[0]


def test_simulated_search_is_monotone_in_its_runs():
    config = colocated(1, "sarathi", cost_model=PRESETS["rtx6000ada-mistral-7b"])

    def run(qps: float) -> dict:
        return summarize(simulate(config, specs(150, qps=qps)), fairness_metrics=False)

    result = capacity_search(run, "sarathi", 1.0, 4.0, rel_tol=0.1, max_runs=8)
    assert result.qps > 0
    passed = [r["qps"] for r in result.runs if r["ok"]]
    failed = [r["qps"] for r in result.runs if not r["ok"]]
    assert max(passed) == result.qps and (not failed or min(failed) > result.qps)
