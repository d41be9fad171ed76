"""Pool allocation: the RAD rule's pressures and projections, the move that lowers the larger pressure (with a
margin, dwell time, no decision during a drain, never emptying a pool), undoing an overshoot, requests waiting for
decode KV counted as decode pressure; static never moves. Time is a fake clock: ``now`` is passed in."""

from __future__ import annotations

import itertools

import pytest

from diptych.policies.pool import POOL_POLICIES, PoolStats, RADPools, StaticPools


def stats(prefill=2, decode=2, queued=0, tps=10_000.0, kv=0.2, decodes=10, slack=None, arrivals=None,
          kv_waiting=0.0, decode_tps=None, decode_capacity=None, draining=0) -> PoolStats:
    return PoolStats(prefill_workers=prefill, decode_workers=decode, queued_prompt_tokens=queued,
                     prefill_throughput_tps=tps, decode_kv_utilization=kv, running_decodes=decodes, tbt_slack=slack,
                     prompt_arrival_tps=arrivals, kv_waiting=kv_waiting, decode_tokens_per_s=decode_tps,
                     decode_capacity_tps=decode_capacity, draining_workers=draining)


def split_after(decision, prefill, decode):
    if decision is None:
        return prefill, decode
    step = decision.workers if decision.to_pool == "prefill" else -decision.workers
    return prefill + step, decode - step


def test_registry_and_static():
    assert POOL_POLICIES.names() == ["rad", "static"]
    assert isinstance(POOL_POLICIES.create("static"), StaticPools)
    assert StaticPools().decide(stats(queued=10**9), now=0) is None


def test_pressures_combine_their_terms():
    policy = RADPools()
    assert policy.prefill_pressure(stats(queued=5000, tps=10_000.0))[0] == pytest.approx(0.5)
    assert policy.prefill_pressure(stats(queued=1, tps=0.0))[0] == float("inf")
    assert policy.prefill_pressure(stats(queued=0, tps=0.0))[0] == 0.0
    assert policy.prefill_pressure(stats(queued=0, tps=10_000.0, arrivals=9_000.0))[0] == pytest.approx(1.0)
    assert policy.decode_pressure(stats(kv=0.45, decodes=64, slack=0.6))[0] == pytest.approx(0.5)
    assert policy.decode_pressure(stats(kv=0.45, decodes=64, slack=-0.2))[0] == pytest.approx(1.5)
    assert policy.decode_pressure(stats(kv=0.45, decodes=300))[0] == pytest.approx(300 / 256)   # batch fill
    # decode utilisation: 4,000 of 10,000 tok/s against a target of 0.8
    assert policy.decode_pressure(stats(kv=0.1, decode_tps=4_000.0, decode_capacity=10_000.0))[0] == pytest.approx(0.5)
    assert policy.decode_pressure(stats(kv=0.1, decode_tps=4_000.0))[0] == pytest.approx(0.1 / 0.9)  # unknown: out


def test_prefill_backlog_pulls_decode_workers_with_a_reason():
    decision = RADPools().decide(stats(queued=30_000, tps=10_000.0, kv=0.2), now=100)   # 3 s backlog, target 1 s
    assert decision is not None and (decision.from_pool, decision.to_pool) == ("decode", "prefill")
    assert "prefill is the bottleneck" in decision.reason and "3.00 s" in decision.reason
    assert "2:2 -> 3:1" in decision.reason


def test_moves_as_many_workers_as_lower_the_larger_pressure_most():
    # prefill 160% busy on 8 workers (pressure 1.78), decode nearly idle: 15:1 spreads prefill thinnest
    busy = stats(prefill=8, decode=8, tps=80_000.0, arrivals=128_000.0, kv=0.01, decodes=8,
                 decode_tps=1_000.0, decode_capacity=80_000.0)
    decision = RADPools().decide(busy, now=0)
    assert split_after(decision, 8, 8) == (15, 1)
    # decode 50% busy on 8 workers (0.625): 12:4 gives prefill 1.19, decode 1.25; 11:5 prefill 1.29; 13:3 decode 1.67
    half = stats(prefill=8, decode=8, tps=80_000.0, arrivals=128_000.0, kv=0.01, decodes=8,
                 decode_tps=40_000.0, decode_capacity=80_000.0)
    assert split_after(RADPools().decide(half, now=0), 8, 8) == (12, 4)
    # at most max_workers_per_move at once
    assert split_after(RADPools(max_workers_per_move=2).decide(busy, now=0), 8, 8) == (10, 6)


def test_decode_pressure_pulls_prefill_workers():
    decision = RADPools().decide(stats(queued=1000, kv=0.95), now=0)
    assert decision is not None and (decision.from_pool, decision.to_pool) == ("prefill", "decode")
    assert "decode is the bottleneck" in decision.reason and "KV 95%" in decision.reason
    tbt = RADPools().decide(stats(queued=0, kv=0.3, slack=0.1), now=0)       # TBT headroom below 20%
    assert tbt is not None and tbt.to_pool == "decode"
    util = RADPools().decide(stats(queued=0, kv=0.1, decode_tps=9_000.0, decode_capacity=10_000.0), now=0)
    assert util is not None and util.to_pool == "decode"


def test_requests_waiting_for_decode_kv_are_decode_pressure():
    # the same queue of 30,000 prompt tokens: waiting for prefill, it pulls a decode worker to prefill ...
    assert RADPools().decide(stats(queued=30_000, kv=0.85), now=0).to_pool == "prefill"
    # ... waiting for decode KV (the builder then reports it as KV waiting, not as prefill backlog), it pulls a
    # prefill worker to decode
    waiting = RADPools().decide(stats(queued=0, kv=0.85, kv_waiting=0.3), now=0)
    assert waiting is not None and waiting.to_pool == "decode"
    assert "KV 85% + 30% waiting" in waiting.reason
    assert RADPools().decode_pressure(stats(kv=0.6, kv_waiting=0.3))[0] == pytest.approx(1.0)


def test_a_busy_prefill_pool_without_queue_is_not_a_donor():
    busy = stats(prefill=2, decode=2, queued=0, tps=20_000.0, arrivals=15_000.0, kv=0.99)
    assert RADPools().decide(busy, now=0) is None              # 75% busy on 2 workers, 150% on one
    idle = stats(prefill=2, decode=2, queued=0, tps=20_000.0, arrivals=5_000.0, kv=0.99)
    assert RADPools().decide(idle, now=0).to_pool == "decode"


def test_never_empties_a_pool():
    assert RADPools().decide(stats(decode=1, queued=10**7, kv=0.0, decodes=0), now=0) is None
    assert RADPools().decide(stats(prefill=1, kv=0.99), now=0) is None


def test_margin_and_comfort_keep_the_split():
    # prefill 1.0 vs decode 0.55: 3:1 would give max(0.67, 1.1), worse
    assert RADPools().decide(stats(queued=10_000, kv=0.5, decodes=0), now=0) is None
    # prefill 1.0 vs decode 0.47 on 2:2; 3:1 gives max(0.67, 0.94): 6% lower, inside the 10% margin
    assert RADPools().decide(stats(queued=10_000, kv=0.42, decodes=0), now=0) is None
    assert RADPools(min_gain=0.05).decide(stats(queued=10_000, kv=0.42, decodes=0), now=0) is not None
    # everything below min_pressure: a comfortable cluster does not move, however lopsided
    assert RADPools().decide(stats(queued=4_000, kv=0.0, decodes=0), now=0) is None
    assert RADPools(min_pressure=0.3).decide(stats(queued=4_000, kv=0.0, decodes=0), now=0) is not None


def test_invalid_knobs_are_refused():
    for knobs in ({"min_gain": 0.0}, {"min_gain": 1.0}, {"min_pressure": -1}, {"max_workers_per_move": 0},
                  {"decode_util_target": 0.0}, {"kv_target": 1.5}, {"min_dwell_s": -1}, {"backlog_target_s": 0}):
        with pytest.raises(ValueError):
            RADPools(**knobs)


def test_dwell_time_and_drains_between_moves():
    policy = RADPools(min_dwell_s=30.0, max_workers_per_move=1)
    pressed = stats(prefill=2, decode=6, queued=100_000, kv=0.1, decodes=0)
    assert policy.decide(pressed, now=100) is not None
    assert policy.decide(pressed, now=110) is None and policy.decide(pressed, now=129.9) is None
    assert policy.decide(stats(prefill=2, decode=6, queued=100_000, kv=0.1, decodes=0, draining=1), now=130) is None
    assert policy.decide(pressed, now=130) is not None


def test_an_overshoot_is_undone():
    """The cluster starts empty, so decode looks idle and workers go to prefill; then the decode pool saturates and
    the rule gives them back, although both pools are busy by then."""
    policy = RADPools(min_dwell_s=5.0)
    early = stats(prefill=4, decode=4, tps=40_000.0, arrivals=38_000.0, kv=0.05, decodes=40,
                  decode_tps=5_000.0, decode_capacity=40_000.0)
    prefill, decode = split_after(policy.decide(early, now=1), 4, 4)
    assert (prefill, decode) == (7, 1)
    # decode demand settles at 30,000 tok/s = 75% of 4 workers: on 1 worker 300% busy and its KV full
    late = stats(prefill=7, decode=1, tps=70_000.0, arrivals=38_000.0, kv=1.0, decodes=400, kv_waiting=0.5,
                 decode_tps=10_000.0, decode_capacity=10_000.0)
    decision = policy.decide(late, now=20)
    assert decision is not None and decision.from_pool == "prefill"
    prefill, decode = split_after(decision, 7, 1)
    assert (prefill, decode) == (5, 3)   # prefill 0.84, decode 1.04 (400 decodes); 4:4 would put prefill at 1.06


def test_shifting_workload_follows_the_bottleneck_without_oscillating():
    """A toy cluster of 8 workers: a prefill-heavy phase, then a decode-heavy one. Each worker prefills 10k tok/s
    and decodes 5k tok/s at most; every moved worker drains for 3 s."""
    policy = RADPools(min_dwell_s=10.0)
    prefill_workers, decode_workers, backlog, moves, draining_until = 4, 4, 0.0, [], -1.0
    for tick in range(400):
        now = float(tick)
        prompt_rate, decode_rate = (60_000.0, 5_000.0) if tick < 200 else (10_000.0, 25_000.0)
        backlog = max(0.0, backlog + prompt_rate - 10_000.0 * prefill_workers)
        served = min(decode_rate, 5_000.0 * decode_workers)
        decision = policy.decide(stats(prefill_workers, decode_workers, int(backlog), 10_000.0 * prefill_workers,
                                       kv=0.5 * served / (5_000.0 * decode_workers), decodes=0,
                                       arrivals=prompt_rate, decode_tps=served,
                                       decode_capacity=5_000.0 * decode_workers,
                                       draining=int(now < draining_until)), now)
        if decision is None:
            continue
        moves.append((now, decision.to_pool))
        prefill_workers, decode_workers = split_after(decision, prefill_workers, decode_workers)
        draining_until = now + 3
        assert prefill_workers >= 1 and decode_workers >= 1
    first_phase = [pool for t, pool in moves if t < 200]
    second_phase = [pool for t, pool in moves if t >= 200]
    assert first_phase and set(first_phase) == {"prefill"}       # prefill-heavy: only moves towards prefill
    assert second_phase and set(second_phase) == {"decode"}      # decode-heavy: only moves towards decode
    assert all(b - a >= 10.0 for (a, _), (b, _) in itertools.pairwise(moves))
    assert (prefill_workers, decode_workers) == (2, 6)   # 10k tok/s of prompts on 2, 25k of decodes on 6
