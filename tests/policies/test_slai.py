"""SLAI: b_bar, Theta switching, LST and criticality, iteration composition, preemption, decode-only use."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from diptych.policies.batch import BATCH_POLICIES
from diptych.policies.slai import SLAIBatching
from diptych.policies.slai_urgency import IterationTimer
from tests.policies.helpers import decode, kv, partial, waiting


def slai_with_mean(mean_s: float, **knobs) -> SLAIBatching:
    policy = SLAIBatching(**knobs)
    policy.on_iteration_end(mean_s, 0.0)
    return policy


def test_registered_with_paper_defaults():
    policy = BATCH_POLICIES.create("slai")
    assert isinstance(policy, SLAIBatching)
    assert (policy.token_budget, policy.max_decodes, policy.max_running) == (512, 128, 128)
    urgency = policy.urgency
    assert (urgency.theta_lo, urgency.theta_hi, urgency.kv_threshold, urgency.default_tbt_s) == (5, 10, 0.96, 0.2)
    assert policy.mean_iteration_s == 0.0


def test_mean_iteration_time_cumulative_and_ewma():
    cumulative = IterationTimer("cumulative")
    ewma = IterationTimer("ewma", ewma_alpha=0.5)
    for duration in (0.02, 0.02, 0.05):
        cumulative.observe(duration)
        ewma.observe(duration)
    assert cumulative.mean_s == pytest.approx(0.03)
    assert ewma.mean_s == pytest.approx(0.035)        # 0.02, 0.02, then halfway to 0.05
    with pytest.raises(ValueError):
        IterationTimer("median")


def test_lst_and_theta_switch_at_kv_threshold():
    policy = slai_with_mean(0.02)
    urgency = policy.urgency
    seq = decode("d", t_end=10.0, tbt=0.5)
    assert urgency.theta(0.959) == 5 and urgency.theta(0.96) == 10
    assert urgency.last_schedulable_time(seq, 0.5) == pytest.approx(10.0 + 0.5 - 5 * 0.02)
    assert urgency.last_schedulable_time(seq, 0.97) == pytest.approx(10.0 + 0.5 - 10 * 0.02)
    assert urgency.last_schedulable_time(decode("x", t_end=1.0), 0.5) == pytest.approx(1.0 + 0.2 - 0.1)  # default
    assert urgency.last_schedulable_time(decode("new", t_end=None), 0.5) == float("-inf")
    fixed = slai_with_mean(0.02, fixed_offset=True).urgency
    assert fixed.theta(0.0) == 10


def _prefill_hungry(policy: SLAIBatching, decodes, now: float, free: int = 1000, total: int = 2000):
    """Schedule with a long prompt waiting, so non-critical decodes give their budget to it."""
    return policy.schedule([waiting("p", prompt=10_000)], decodes, kv(free, total), now)


def test_critical_iff_now_reaches_lst_and_theta_follows_utilisation():
    # LST at low utilisation: 0 + 0.2 - 5 * 0.03 = 0.05; at >= 96% KV: 0.2 - 10 * 0.03 = -0.1
    low = _prefill_hungry(slai_with_mean(0.03), [decode("d", t_end=0.0)], now=0.0)
    assert low.decodes == [] and low.prefill_chunks == [("p", 512)]       # deferred: not critical yet
    before_lst = _prefill_hungry(slai_with_mean(0.03), [decode("d", t_end=0.0)], now=0.0499)
    assert before_lst.decodes == []
    at_lst = _prefill_hungry(slai_with_mean(0.03), [decode("d", t_end=0.0)], now=0.05 + 1e-12)
    assert at_lst.decodes == ["d"]
    high = _prefill_hungry(slai_with_mean(0.03), [decode("d", t_end=0.0)], now=0.0, free=80, total=2000)
    assert high.decodes == ["d"] and high.prefill_chunks == [("p", 511)]  # u = 0.96: Theta = 10, critical


def test_deferred_decode_keeps_its_lst_until_it_gets_a_token():
    policy = slai_with_mean(0.01)                           # LST = 0 + 0.5 - 0.05 = 0.45
    seq = decode("d", t_end=0.0, tbt=0.5)
    assert _prefill_hungry(policy, [seq], now=0.3).decodes == []
    for _ in range(50):
        policy.on_iteration_end(0.2, 0.3)                   # b_bar ~ 0.19: a fresh LST would be < 0
    assert _prefill_hungry(policy, [seq], now=0.3).decodes == []   # kept LST 0.45
    assert _prefill_hungry(policy, [seq], now=0.45).decodes == ["d"]
    seq.last_token_time = 0.45                              # a new token: LST recomputed, 0.95 - 5 * b_bar < 0.45
    assert _prefill_hungry(policy, [seq], now=0.46).decodes == ["d"]


def test_order_critical_by_lst_then_arrival_then_prefills_then_admissions_then_noncritical():
    policy = slai_with_mean(0.02)                           # Theta * b_bar = 0.1
    decodes = [
        decode("late", t_end=0.9, tbt=0.2, arrival=3),      # LST 1.0  -> critical at now 1.01
        decode("urgent", t_end=0.5, tbt=0.2, arrival=4),    # LST 0.6
        decode("tie-old", t_end=0.8, tbt=0.2, arrival=1),   # LST 0.9
        decode("tie-new", t_end=0.8, tbt=0.2, arrival=2),   # LST 0.9
        decode("slack", t_end=0.9, tbt=0.5, arrival=0),     # LST 1.3  -> not critical
    ]
    running = [partial("part", prompt=300, computed=100), *decodes]
    queue = [waiting("w-long", prompt=200, arrival=0), waiting("w-short", prompt=50, arrival=5)]
    plan = policy.schedule(queue, running, kv(), now=1.01)
    assert plan.decodes == ["urgent", "tie-old", "tie-new", "late", "slack"]
    assert plan.prefill_chunks == [("part", 200), ("w-short", 50), ("w-long", 200)]
    bigger = policy.schedule([waiting("w-huge", prompt=5000)], running, kv(), now=1.01)
    assert bigger.decodes == ["urgent", "tie-old", "tie-new", "late"]      # no budget left for "slack"
    assert bigger.prefill_chunks == [("part", 200), ("w-huge", 308)] and bigger.num_tokens == 512


def test_noncritical_decodes_deferred_while_prefills_wait_and_run_when_budget_left():
    policy = slai_with_mean(0.02)
    decodes = [decode("crit", t_end=0.0, tbt=0.1), decode("free", t_end=0.0, tbt=0.5)]
    busy = policy.schedule([waiting("p", prompt=4096)], decodes, kv(), now=0.05)
    assert busy.decodes == ["crit"] and busy.prefill_chunks == [("p", 511)]
    quiet = policy.schedule([waiting("p", prompt=100)], decodes, kv(), now=0.05)
    assert quiet.decodes == ["crit", "free"]


def test_admission_order_knobs_strict_tier_first_and_aging():
    queue = [waiting("old-long", prompt=300, arrival=0.0), waiting("strict", prompt=200, arrival=5.0, tbt=0.1),
             waiting("short", prompt=100, arrival=9.0)]
    ids = lambda plan: [rid for rid, _ in plan.prefill_chunks]  # noqa: E731
    assert ids(SLAIBatching(token_budget=300).schedule(queue, [], kv(), now=10)) == ["short", "strict"]
    strict = SLAIBatching(token_budget=300, strict_tier_first=True)
    assert ids(strict.schedule(queue, [], kv(), now=10)) == ["strict", "short"]
    aged = SLAIBatching(token_budget=300, aging_s=5.0)
    assert ids(aged.schedule(queue, [], kv(), now=10)) == ["old-long"]


def test_admission_stops_at_head_of_line_kv_and_max_running():
    policy = SLAIBatching()
    queue = [waiting("small", prompt=10, blocks=1), waiting("big", prompt=20, blocks=50),
             waiting("tiny", prompt=5, blocks=1)]   # SPF order: tiny, small, big
    plan = policy.schedule(queue, [], kv(free=2), now=0)
    assert plan.prefill_chunks == [("tiny", 5), ("small", 10)]
    plan = policy.schedule(queue, [], kv(free=100), now=0)
    assert [rid for rid, _ in plan.prefill_chunks] == ["tiny", "small", "big"]
    capped = SLAIBatching(max_running=1).schedule(queue, [partial("r")], kv(), now=0)
    assert capped.prefill_chunks == [("r", 512)]


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1.0)), min_size=1, max_size=60),
       st.floats(0.02, 0.1), st.integers(0, 8000))
def test_strict_tier_decode_is_never_deferred(specs, mean_s, waiting_prompt):
    policy = slai_with_mean(mean_s)
    now = 1.0
    running = [decode(f"d{i}", t_end=now - age, tbt=0.1 if strict else 0.5, arrival=i)
               for i, (strict, age) in enumerate(specs)]
    queue = [waiting("p", prompt=waiting_prompt)] if waiting_prompt else []
    plan = policy.schedule(queue, running, kv(), now)
    strict_ids = {seq.request_id for seq, (strict, _) in zip(running, specs) if strict}
    assert strict_ids <= set(plan.decodes)


def test_preemption_order_partial_prefills_newest_first_then_most_slack():
    policy = slai_with_mean(0.02)
    running = [
        partial("part-old", arrival=0), partial("part-new", arrival=1),
        decode("crit-1", t_end=0.0, tbt=0.1, blocks_to_step=1),      # LST 0.0
        decode("crit-2", t_end=0.05, tbt=0.1, blocks_to_step=1),     # LST 0.05
        decode("crit-3", t_end=0.08, tbt=0.1, blocks_to_step=1),     # LST 0.08
        decode("slack", t_end=0.9, tbt=0.5, blocks_to_step=1),       # LST 1.3
        decode("more-slack", t_end=1.0, tbt=0.5, blocks_to_step=1),  # LST 1.4
    ]
    plan = policy.schedule([waiting("w")], running, kv(free=0), now=1.0)
    assert plan.decodes == ["crit-1", "crit-2", "crit-3"]
    assert plan.preempt == ["part-new", "part-old", "more-slack"]
    assert plan.prefill_chunks == []    # no prefill continues or starts in an iteration that preempted


def test_critical_decode_preempts_itself_last():
    policy = slai_with_mean(0.02)
    running = [decode("a", t_end=0.0, tbt=0.1, blocks_to_step=1), decode("b", t_end=0.01, tbt=0.1, blocks_to_step=1)]
    plan = policy.schedule([], running, kv(free=0), now=1.0)
    assert plan.decodes == ["a"] and plan.preempt == ["b"]         # b has more slack: it gives way
    alone = policy.schedule([], running[:1], kv(free=0), now=1.0)
    assert alone.decodes == [] and alone.preempt == ["a"]


def test_noncritical_decode_without_a_block_is_deferred_not_preempting():
    policy = slai_with_mean(0.02)
    running = [decode("free", t_end=0.9, tbt=0.5, blocks_to_step=1), decode("other", t_end=0.9, tbt=0.5)]
    plan = policy.schedule([], running, kv(free=0), now=1.0)
    assert plan.decodes == ["other"] and plan.preempt == []


def test_an_iteration_that_would_run_nothing_takes_the_most_urgent_decode_preempting_the_most_slack():
    policy = slai_with_mean(0.02)
    running = [decode("urgent", t_end=0.9, tbt=0.5, blocks_to_step=1, arrival=0),
               decode("slack", t_end=0.95, tbt=0.5, blocks_to_step=1, arrival=1)]
    plan = policy.schedule([], running, kv(free=0), now=1.0)  # neither is critical and no block is free
    assert plan.decodes == ["urgent"] and plan.preempt == ["slack"]
    alone = policy.schedule([], running[:1], kv(free=0), now=1.0)
    assert alone.decodes == [] and alone.preempt == ["urgent"]  # it gives way itself and recomputes


def test_decode_without_a_token_yet_is_critical():
    plan = _prefill_hungry(slai_with_mean(0.0), [decode("fresh", t_end=None)], now=0.0)
    assert plan.decodes == ["fresh"]


def test_decode_only_worker_defers_most_slack_beyond_max_decodes():
    policy = slai_with_mean(0.02, max_decodes=2)
    running = [decode("slack", t_end=0.9, tbt=0.5), decode("crit", t_end=0.0, tbt=0.1),
               decode("mid", t_end=0.9, tbt=0.2)]
    assert policy.schedule([], running, kv(), now=1.0).decodes == ["crit", "mid"]


def test_order_handoffs_most_urgent_first_fifo_by_default():
    pending = [decode("relaxed", t_end=1.0, tbt=0.5, arrival=0), decode("strict", t_end=1.0, tbt=0.1, arrival=1),
               decode("no-token", t_end=None, arrival=2), decode("older-token", t_end=0.7, tbt=0.5, arrival=3)]
    assert slai_with_mean(0.02).order_handoffs(pending, now=1.1) == ["no-token", "strict", "older-token", "relaxed"]
    fifo = BATCH_POLICIES.create("sarathi").order_handoffs(pending, now=1.1)
    assert fifo == ["relaxed", "strict", "no-token", "older-token"]
