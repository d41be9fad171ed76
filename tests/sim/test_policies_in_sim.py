"""The registered policies inside the simulator: the stationarity the stretch fast-forward relies on (property),
VTC's bounded service difference vs FCFS's growing one, and RAD pool moves with drain."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from diptych.metrics.fairness import service_difference
from diptych.policies.batch import BATCH_POLICIES, KVState, SequenceState
from diptych.sim.config import PolicySpec
from diptych.sim.cost_model import PRESETS
from diptych.sim.simulator import Simulator, simulate
from diptych.workloads.vtc import vtc_scenario
from tests.sim.helpers import colocated, disaggregated, specs


def _decodes(lasts: list[float], tbts: list[float | None]) -> list[SequenceState]:
    return [SequenceState(f"s{i}", float(i), prompt_len=64, num_computed=64, num_output=1 + i, blocks_held=4,
                          last_token_time=last, tbt_slo_s=tbt) for i, (last, tbt) in enumerate(zip(lasts, tbts))]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(BATCH_POLICIES.names()), n=st.integers(1, 40), budget=st.integers(8, 600),
       max_decodes=st.integers(1, 64), util=st.floats(0.0, 1.0), data=st.data())
def test_all_decode_plans_are_stationary(name, n, budget, max_decodes, util, data):
    """A decode-only worker whose plan ran every sequence keeps running every sequence, whatever the time, the
    token times (all advanced by one iteration) and the iteration-time mean."""
    knobs = {"max_decodes": max_decodes} | ({} if name == "prefill-first" else {"token_budget": budget})
    policy = BATCH_POLICIES.create(name, **knobs)
    lasts = data.draw(st.lists(st.floats(0, 5), min_size=n, max_size=n))
    tbts = data.draw(st.lists(st.sampled_from([None, 0.1, 0.5]), min_size=n, max_size=n))
    total = 1000
    kv = KVState(int(total * (1 - util)), total, 16)
    running = _decodes(lasts, tbts)
    now = max(lasts) + 0.01
    plan = policy.schedule([], running, kv, now)
    policy.on_iteration_end(0.01, now + 0.01)
    if plan.prefill_chunks or plan.preempt or len(plan.decodes) != n:
        return
    for _ in range(1, 4):
        duration = data.draw(st.floats(0.001, 0.2))
        now += duration
        for seq in running:
            seq.last_token_time, seq.num_output = now, seq.num_output + 1
        policy.on_iteration_end(duration, now)
        again = policy.schedule([], running, kv, now + data.draw(st.floats(0, 1)))
        assert sorted(again.decodes) == sorted(plan.decodes) and not again.prefill_chunks and not again.preempt


def test_vtc_bounds_the_service_difference_where_fcfs_grows():
    workload = vtc_scenario("overload", duration_s=240)
    base = colocated(1, "sarathi", cost_model=PRESETS["a10g-llama-2-7b"])
    diffs = {}
    for admission in ("fcfs", "vtc"):
        result = simulate(base.__class__(**{**base.__dict__, "admission": PolicySpec(admission)}), workload, until=240)
        grid, diff = service_difference(result, 1.0)
        diffs[admission] = (grid, diff)
    grid, fcfs = diffs["fcfs"]
    _, vtc = diffs["vtc"]
    late = grid > 200
    early = (grid > 60) & (grid < 80)
    assert np.nanmean(fcfs[late]) > 2.5 * np.nanmean(fcfs[early])  # FCFS: grows with time
    kv_tokens = base.blocks_per_worker() * base.block_size
    bound = 2 * max(256, 2 * kv_tokens)
    assert np.nanmax(vtc[grid > 30]) < bound and np.nanmax(vtc) < np.nanmax(fcfs) / 3


def test_rad_moves_workers_with_drain_and_keeps_the_cluster_size():
    workload = specs(1500, qps=30, name="azure-code", tiers="none")  # prompt-heavy: one prefill worker is short
    config = disaggregated(1, 3, pool_policy=PolicySpec("rad", {"min_dwell_s": 5.0}), pool_tick_s=0.5)
    sim = Simulator(config, workload)
    result = sim.run()
    assert result.finished.all()
    history = result.meta["pool_history"]
    assert len(result.meta["pool_moves"]) >= 1 and all(p + d == 4 for _, p, d in history)
    assert all(p >= 1 and d >= 1 for _, p, d in history)
    for move in result.meta["pool_moves"]:
        assert "bottleneck" in move["reason"]
    assert result.meta["pool_moves"][0]["to"] == "prefill" and history[-1][1] >= 2
    for w in sim.workers:
        assert w.draining_to is None or w.num_requests or w.busy


def test_static_pool_never_moves():
    result = simulate(disaggregated(1, 3), specs(100, qps=10))
    assert result.meta["pool_moves"] == [] and result.meta["pool_history"] == []
