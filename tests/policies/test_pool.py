"""Pool allocation: the RAD rule's pressures, hysteresis, dwell time, never emptying a pool; static never moves."""

from __future__ import annotations

import pytest

from policies.pool import POOL_POLICIES, PoolStats, RADPools, StaticPools


def stats(prefill=2, decode=2, queued=0, tps=10_000.0, kv=0.2, decodes=10, slack=None, arrivals=None) -> PoolStats:
    return PoolStats(prefill_workers=prefill, decode_workers=decode, queued_prompt_tokens=queued,
                     prefill_throughput_tps=tps, decode_kv_utilization=kv, running_decodes=decodes, tbt_slack=slack,
                     prompt_arrival_tps=arrivals)


def test_registry_and_static():
    assert POOL_POLICIES.names() == ["rad", "static"]
    assert isinstance(POOL_POLICIES.create("static"), StaticPools)
    assert StaticPools().decide(stats(queued=10**9), now=0) is None


def test_prefill_backlog_pulls_a_decode_worker_with_a_reason():
    policy = RADPools()
    decision = policy.decide(stats(queued=30_000, tps=10_000.0, kv=0.2), now=100)   # 3 s backlog, target 1 s
    assert decision is not None and (decision.from_pool, decision.to_pool) == ("decode", "prefill")
    assert "prefill is the bottleneck" in decision.reason and "3.00 s" in decision.reason


def test_decode_pressure_pulls_a_prefill_worker():
    policy = RADPools()
    decision = policy.decide(stats(queued=1000, kv=0.95), now=0)
    assert decision is not None and (decision.from_pool, decision.to_pool) == ("prefill", "decode")
    assert "KV 95%" in decision.reason
    tbt = RADPools().decide(stats(queued=0, kv=0.3, slack=0.1), now=0)       # TBT headroom below 20%
    assert tbt is not None and tbt.to_pool == "decode"
    batch = RADPools().decide(stats(queued=0, kv=0.3, decodes=300), now=0)  # 150 decodes per worker > 128
    assert batch is not None and batch.to_pool == "decode"


def test_pressures_combine_kv_batch_fill_and_tbt():
    policy = RADPools()
    assert policy.prefill_pressure(stats(queued=5000, tps=10_000.0))[0] == pytest.approx(0.5)
    assert policy.prefill_pressure(stats(queued=1, tps=0.0))[0] == float("inf")
    assert policy.prefill_pressure(stats(queued=0, tps=0.0))[0] == 0.0
    assert policy.prefill_pressure(stats(queued=0, tps=10_000.0, arrivals=9_000.0))[0] == pytest.approx(1.0)
    assert policy.decode_pressure(stats(kv=0.45, decodes=64, slack=0.6))[0] == pytest.approx(0.5)
    assert policy.decode_pressure(stats(kv=0.45, decodes=64, slack=-0.2))[0] == pytest.approx(1.5)


def test_a_busy_prefill_pool_without_queue_is_not_a_donor():
    busy = stats(prefill=2, decode=2, queued=0, tps=20_000.0, arrivals=15_000.0, kv=0.99)
    assert RADPools().decide(busy, now=0) is None              # 75% busy on 2 workers, 150% on one
    idle = stats(prefill=2, decode=2, queued=0, tps=20_000.0, arrivals=5_000.0, kv=0.99)
    assert RADPools().decide(idle, now=0).to_pool == "decode"


def test_never_empties_a_pool():
    assert RADPools().decide(stats(decode=1, queued=10**7, kv=0.0, decodes=0), now=0) is None
    assert RADPools().decide(stats(prefill=1, kv=0.99), now=0) is None


def test_hysteresis_donor_must_stay_comfortable_with_one_worker_fewer():
    # decode pressure 0.5 over 2 workers -> 1.0 over one: above down_threshold 0.7, so no move
    assert RADPools().decide(stats(queued=50_000, kv=0.45, decodes=0), now=0) is None
    # 0.3 over 2 workers -> 0.6 over one: the move happens
    assert RADPools().decide(stats(queued=50_000, kv=0.27, decodes=0), now=0) is not None
    # below up_threshold, nothing moves even with an idle donor
    assert RADPools().decide(stats(queued=9_000, kv=0.0, decodes=0), now=0) is None
    with pytest.raises(ValueError):
        RADPools(up_threshold=0.7, down_threshold=0.8)


def test_dwell_time_between_moves():
    policy = RADPools(min_dwell_s=30.0)
    pressed = stats(prefill=2, decode=6, queued=100_000, kv=0.1, decodes=0)
    assert policy.decide(pressed, now=100) is not None
    assert policy.decide(pressed, now=110) is None and policy.decide(pressed, now=129.9) is None
    assert policy.decide(pressed, now=130) is not None


def test_shifting_workload_follows_the_bottleneck_without_oscillating():
    """A toy cluster of 8 workers: a prefill-heavy phase, then a decode-heavy one. Each worker prefills 10k tok/s
    and holds 100 sequences of KV."""
    policy = RADPools(min_dwell_s=10.0)
    prefill_workers, decode_workers, backlog, moves = 4, 4, 0.0, []
    for tick in range(400):
        now = float(tick)
        prompt_rate, active = (60_000.0, 150) if tick < 200 else (10_000.0, 600)
        backlog = max(0.0, backlog + prompt_rate - 10_000.0 * prefill_workers)
        kv = min(1.0, active / (100 * decode_workers))
        decision = policy.decide(stats(prefill_workers, decode_workers, int(backlog), 10_000.0 * prefill_workers,
                                       kv, active, arrivals=prompt_rate), now)
        if decision is None:
            continue
        moves.append((now, decision.to_pool))
        step = 1 if decision.to_pool == "prefill" else -1
        prefill_workers, decode_workers = prefill_workers + step, decode_workers - step
        assert prefill_workers >= 1 and decode_workers >= 1
    first_phase = [pool for t, pool in moves if t < 200]
    second_phase = [pool for t, pool in moves if t >= 200]
    assert first_phase and set(first_phase) == {"prefill"}       # prefill-heavy: only moves towards prefill
    assert second_phase and set(second_phase) == {"decode"}      # decode-heavy: only moves towards decode
    assert all(b - a >= 10.0 for (a, _), (b, _) in zip(moves, moves[1:]))
    assert (prefill_workers, decode_workers) == (2, 6)   # prefill keeps enough workers for its 10k tok/s
