"""The simulator against the services' semantics: phase order and times, reservation and backlog rules, head-of-line
admission, handoff time, conservation of KV, the stretch fast-forward against exact mode, and `until`."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.metrics.results import STATUS_CODES
from diptych.policies.batch import BatchPlan, BatchPolicy
from diptych.sim.config import ClusterConfig, PolicySpec
from diptych.sim.simulator import Simulator, simulate
from diptych.sim.token_accounting import _count_over
from tests.sim.helpers import DEFAULT, colocated, disaggregated, replace, request, specs

BATCH = ["sarathi", "slai", "rad", "prefill-first"]


def test_one_request_timeline_follows_the_cost_model():
    config = disaggregated(1, 1, handoff_latency_s=0.002, handoff_bandwidth_Bps=10e9, record_tokens=True)
    r = simulate(config, [request("a", 1.0, 1000, 4)])
    t = {k: v[0] for k, v in r.times.items()}
    prefill = DEFAULT.iteration_time(1000)  # one 1000-token chunk (budget 2048)
    assert t["admitted"] == t["prefill_start"] == 1.0
    assert t["prefill_end"] == t["first_token"] == pytest.approx(1.0 + prefill)
    transfer = 0.002 + 63 * 16 * 131072 / 10e9  # whole blocks travel
    assert t["handoff_start"] == t["prefill_end"] and t["handoff_end"] == pytest.approx(t["handoff_start"] + transfer)
    tokens = r.token_times[0]
    assert len(tokens) == 4 and r.num_tokens[0] == 4 and r.status[0] == STATUS_CODES["finished"]
    assert tokens[1] == pytest.approx(t["handoff_end"] + DEFAULT.iteration_time(0, 1, 1001))
    assert tokens[2] - tokens[1] == pytest.approx(DEFAULT.iteration_time(0, 1, 1002))
    assert t["finish"] == tokens[-1]
    assert r.num_gaps[0] == 3 and r.max_tbt[0] == pytest.approx(tokens[1] - tokens[0])


@pytest.mark.parametrize("cluster", [disaggregated(1, 1), colocated(1)], ids=["disaggregated", "colocated"])
def test_dispatch_latency_delays_the_prefill_by_the_control_path(cluster):
    r0 = simulate(cluster, [request("a", 1.0, 1000, 4)])
    r1 = simulate(replace(cluster, dispatch_latency_s=0.004), [request("a", 1.0, 1000, 4)])
    assert r1.times["admitted"][0] == 1.0  # the coordinator decides at once
    assert r1.times["prefill_start"][0] == pytest.approx(1.004)
    assert r1.times["finish"][0] == pytest.approx(r0.times["finish"][0] + 0.004)
    with pytest.raises(ValueError, match="dispatch_latency_s"):
        replace(cluster, dispatch_latency_s=-1.0).validate()


def test_single_token_request_finishes_at_prefill_and_frees_the_reservation():
    sim = Simulator(disaggregated(1, 1), [request("a", 0.0, 100, 1)])
    r = sim.run()
    assert r.status[0] == STATUS_CODES["finished"] and np.isnan(r.times["handoff_start"][0])
    decode = sim.workers[1]
    assert sim.core_state(decode).reserved_blocks == 0 and decode.free_blocks == decode.total_blocks


@pytest.mark.parametrize("cluster", ["disaggregated", "colocated"])
def test_everything_finishes_and_every_block_comes_back(cluster):
    config = disaggregated(2, 2) if cluster == "disaggregated" else colocated(2)
    config = replace(config, kv_blocks=1500)  # tight: admission waits for memory
    sim = Simulator(config, specs(120, qps=30))
    r = sim.run()
    assert r.finished.all() and (r.num_tokens == r.output_len).all()
    for w in sim.workers:
        assert w.free_blocks == w.total_blocks
        assert sim.core_state(w).reserved_blocks == 0 and sim.core_state(w).backlog_tokens == 0
        assert not w.running and not w.waiting and w.num_requests == 0
    t = r.times
    assert (t["admitted"] >= t["arrival"]).all() and (t["prefill_start"] >= t["admitted"]).all()
    assert (t["first_token"] >= t["prefill_start"]).all() and (t["finish"] >= t["first_token"]).all()


@pytest.mark.parametrize("policy", BATCH)
@pytest.mark.parametrize("cluster", ["disaggregated", "colocated"])
@pytest.mark.parametrize("pool", ["roomy", "tight"])
def test_stretch_fast_forward_equals_exact_mode(policy, cluster, pool):
    """Tight pools (400 blocks) make sequences grow into each other: stretches stop where blocks run out and
    plans preempt."""
    knobs = {"token_budget": 256, "max_decodes": 8} if policy != "prefill-first" else {"max_decodes": 8}
    if cluster == "disaggregated":
        base = disaggregated(1, 2, decode_policy=PolicySpec(policy, knobs), kv_blocks=3000, record_tokens=True)
    else:
        base = colocated(1, policy, knobs=knobs, kv_blocks=6000, record_tokens=True, colocated_reserve=False,
                         max_prefill_backlog_tokens=None)
    if pool == "tight":
        base = replace(base, kv_blocks=400)
    workload = specs(50, qps=8)
    fast = simulate(base, workload)
    exact = simulate(replace(base, exact=True), workload)
    assert fast.meta["events"] < exact.meta["events"]
    assert (exact.meta["preemptions"] > 0) == (pool == "tight")
    for key in ("preemptions", "recomputed_tokens", "peak_running", "request_preemptions", "kv_workers"):
        assert fast.meta[key] == exact.meta[key]
    assert (fast.num_tokens == exact.num_tokens).all()
    for phase in fast.times:
        np.testing.assert_allclose(fast.times[phase], exact.times[phase], rtol=0, atol=1e-9)
    for a, b in zip(fast.token_times, exact.token_times):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    assert (fast.tbt_violations == exact.tbt_violations).all() and (fast.num_gaps == exact.num_gaps).all()
    for tier in fast.tbt_hist:
        assert fast.tbt_hist[tier].total == exact.tbt_hist[tier].total
        assert fast.tbt_hist[tier].quantile(0.99) == pytest.approx(exact.tbt_hist[tier].quantile(0.99), rel=0.01)


def test_slai_iteration_mean_is_updated_every_iteration_in_stretches():
    workload = specs(30, qps=5)
    sims = [Simulator(disaggregated(1, 1, decode_policy=PolicySpec("slai"), exact=exact), workload)
            for exact in (False, True)]
    for sim in sims:
        sim.run()
    fast, exact = (s.workers[1].policy for s in sims)
    assert fast.urgency.timer.count == exact.urgency.timer.count
    assert fast.mean_iteration_s == pytest.approx(exact.mean_iteration_s)


def test_admission_stops_at_the_first_request_that_cannot_be_placed():
    # decode pool of 100 blocks: the 90-block head waits for memory; the small request behind it must not pass it
    config = disaggregated(1, 1, kv_blocks=100, max_prefill_backlog_tokens=None)
    workload = [request("big1", 0.0, 700, 740), request("big2", 0.1, 700, 740), request("small", 0.2, 16, 16)]
    r = simulate(config, workload)
    admitted = dict(zip(r.request_ids, r.times["admitted"]))
    assert admitted["big2"] == pytest.approx(r.times["finish"][0])  # when big1 released its reservation
    assert admitted["small"] >= admitted["big2"]
    # shortest prompt first lets the small one go first once memory frees
    r = simulate(replace(config, admission=PolicySpec("spf")), workload)
    admitted = dict(zip(r.request_ids, r.times["admitted"]))
    assert admitted["small"] < admitted["big2"]


def test_prefill_backlog_limit_keeps_requests_in_the_coordinator():
    workload = [request(f"r{i}", 0.0, 3000, 8) for i in range(4)]
    r = simulate(disaggregated(1, 1, max_prefill_backlog_tokens=4096), workload)
    # an idle worker takes one 3000-token prompt; the next waits until that prefill ends
    assert r.times["admitted"][1] == pytest.approx(r.times["prefill_end"][0])
    r = simulate(disaggregated(1, 1, max_prefill_backlog_tokens=None), workload)
    assert (r.times["admitted"] == 0.0).all()


def test_requests_larger_than_any_pool_and_rate_limits_are_rejected():
    r = simulate(disaggregated(1, 1, kv_blocks=10), [request("huge", 0.0, 500, 10), request("ok", 0.0, 50, 10)])
    assert list(r.status) == [STATUS_CODES["rejected"], STATUS_CODES["finished"]]
    workload = [request(f"r{i}", i * 0.1, 64, 4, client_id="c") for i in range(8)]
    r = simulate(disaggregated(1, 1, admission=PolicySpec("rpm", {"limit": 5})), workload)
    assert (r.status == STATUS_CODES["rejected"]).sum() == 3


def test_max_tokens_reserves_nothing_the_decode_worker_takes_the_prompt_blocks():
    # max_tokens of 1600 tokens (100 blocks) on 100-block pools: only the prompt's blocks are taken at dispatch
    sim = Simulator(disaggregated(1, 1, kv_blocks=100), [request("a", 0.0, 160, 40, max_tokens=1600)])
    r = sim.run()
    assert r.status[0] == STATUS_CODES["finished"] and r.num_tokens[0] == 40
    assert sim.req_blocks[0] == 10
    assert all(w.free_blocks == w.total_blocks for w in sim.workers)


def test_until_stops_the_run_with_unfinished_requests():
    r = simulate(disaggregated(1, 1), specs(200, qps=50), until=3.0)
    assert r.end_time == 3.0 and (r.status == STATUS_CODES["unfinished"]).any()
    assert np.nanmax(r.times["finish"]) <= 3.0


def test_a_plan_that_preempts_is_applied_and_the_request_recomputes():
    class PreemptOnce(BatchPolicy):
        """Prefills whole, decodes everything, and preempts ``a`` once, in the iteration after its third token."""

        def schedule(self, waiting, running, kv, now):
            seq = running[0] if running else None
            if seq is not None and seq.num_output == 3 and not seq.in_prefill and not self.done:
                self.done = True
                return BatchPlan(preempt=[seq.request_id])
            if waiting:
                return BatchPlan(prefill_chunks=[(waiting[0].request_id, waiting[0].remaining_prompt)])
            return BatchPlan(decodes=[s.request_id for s in running if not s.in_prefill])

        done = False

    sim = Simulator(colocated(1, kv_blocks=50, record_tokens=True, exact=True), [request("a", 0.0, 40, 8)])
    sim.workers[0].set_policy(PreemptOnce())
    r = sim.run()
    worker = sim.workers[0]
    assert r.status[0] == STATUS_CODES["finished"] and r.num_tokens[0] == 8 and len(r.token_times[0]) == 8
    assert worker.preemptions == r.meta["preemptions"] == r.meta["request_preemptions"][0] == 1
    # dropped: the prompt and the first two outputs' positions (the third's KV was not computed yet)
    assert worker.recomputed_tokens == r.meta["recomputed_tokens"] == 42
    assert r.times["preempted"][0] == pytest.approx(r.token_times[0][2])
    # the recompute prefill (40 + 3 positions) ends with the 4th token: a regular token, not a first token
    assert r.times["first_token"][0] == r.token_times[0][0] and r.num_gaps[0] == 7
    recompute = DEFAULT.iteration_time(43, 0, 0, 43 * 44 / 2, 1)
    assert r.token_times[0][3] == pytest.approx(r.times["preempted"][0] + recompute)
    assert worker.free_blocks == worker.total_blocks


def test_invalid_configs_are_refused_with_clear_messages():
    with pytest.raises(ValueError, match="either disaggregated"):
        ClusterConfig(prefill_workers=1, decode_workers=1, colocated_workers=1).validate()
    with pytest.raises(ValueError, match="unknown batch policy"):
        disaggregated(decode_policy=PolicySpec("nope")).validate()
    with pytest.raises(ValueError, match="bad option"):
        disaggregated(decode_policy=PolicySpec("sarathi", {"bogus": 1})).validate()
    with pytest.raises(ValueError, match="unique"):
        Simulator(disaggregated(), [request("a", 0, 1, 1), request("a", 1, 1, 1)])


def test_count_over_matches_enumeration():
    for a, b, k, slo in [(0.01, 0.001, 30, 0.02), (0.05, 0.0, 10, 0.01), (0.01, 0.0, 10, 0.02), (0.01, 1e-4, 1, 0.0),
                         (0.01, 2e-4, 500, 0.05)]:
        assert _count_over(a, b, k, slo) == sum(1 for j in range(1, k) if a + b * j > slo)


def test_deterministic():
    a = simulate(disaggregated(1, 2), specs(80, qps=15))
    b = simulate(disaggregated(1, 2), specs(80, qps=15))
    for phase in a.times:
        np.testing.assert_array_equal(a.times[phase], b.times[phase])
