"""The simulator's decode placement cap (``max_decode_sequences``, as ``cluster/placement.py``) and the
pool statistics it gives the pool policy: a queue waiting for decode KV counts as decode KV, not prefill backlog;
the decode token count is the same with stretches fast-forwarded as in exact mode."""

from __future__ import annotations

import pytest

from diptych.cluster.blocks import blocks_for
from diptych.cluster.placement import DEFAULT_EXPECTED_OUTPUT_TOKENS, expected_tokens
from diptych.sim.simulator import Simulator, simulate
from tests.sim.helpers import disaggregated, replace, request, specs


def test_decode_placement_is_capped_at_max_decode_sequences():
    workload = [request(f"r{i}", 0.0, 32, 200) for i in range(7)]
    config = disaggregated(1, 2, max_decode_sequences=2, max_prefill_backlog_tokens=None)
    r = simulate(config, workload)
    assert r.finished.all()
    admitted, finish = r.times["admitted"], r.times["finish"]
    assert (admitted == 0.0).sum() == 4  # two per decode worker, though KV holds all seven
    for i in range(len(workload)):  # at no admission does a decode worker hold more than two requests
        for worker in set(r.decode_worker):
            holding = [j for j in range(len(workload)) if r.decode_worker[j] == worker
                       and admitted[j] <= admitted[i] < finish[j]]
            assert len(holding) <= 2
    # the fifth request waits for the first release, not for memory
    assert sorted(admitted)[4] == pytest.approx(sorted(finish)[0])
    assert (simulate(replace(config, max_decode_sequences=1024), workload).times["admitted"] == 0.0).all()


def test_invalid_cap_is_refused():
    with pytest.raises(ValueError, match="max_decode_sequences"):
        simulate(disaggregated(1, 1, max_decode_sequences=0), [request("a", 0.0, 16, 4)])


def test_a_queue_waiting_for_decode_kv_is_decode_pressure_not_prefill_backlog():
    # decode pool of 100 blocks: big1's expected footprint takes more than half, big2 (700-token prompt, 44 prompt
    # blocks, the same footprint) waits for KV
    workload = [request("big1", 0.0, 700, 740), request("big2", 0.01, 700, 740)]
    footprint = blocks_for(expected_tokens(700, 740, DEFAULT_EXPECTED_OUTPUT_TOKENS), 16)
    assert 50 < footprint <= 100
    sim = Simulator(disaggregated(1, 1, kv_blocks=100), workload, until=0.5)
    sim.run()
    stats = sim.pool_moves.stats(0.5)
    assert sim.core.waiting_for_kv
    assert stats.kv_waiting == pytest.approx(44 / 100)
    assert stats.decode_kv_utilization == pytest.approx(footprint / 100)
    assert stats.queued_prompt_tokens == 0  # big1's prefill is done; big2's prompt is not prefill backlog
    # the same queue waiting for a prefill worker (the backlog limit) stays prefill backlog
    workload = [request(f"r{i}", 0.0, 3000, 8) for i in range(3)]
    sim = Simulator(disaggregated(1, 1, max_prefill_backlog_tokens=4096), workload, until=0.01)
    sim.run()
    stats = sim.pool_moves.stats(0.01)
    assert not sim.core.waiting_for_kv and stats.kv_waiting == 0.0
    assert stats.queued_prompt_tokens == 9000


def test_decode_token_count_is_the_same_with_stretches_and_in_exact_mode():
    workload = specs(40, qps=8)
    config = disaggregated(1, 2, kv_blocks=3000)
    counts = []
    for exact in (False, True):
        sim = Simulator(replace(config, exact=exact), workload)
        r = sim.run()
        assert sum(w.decode_tokens for w in sim.workers) == int((r.num_tokens - 1).sum())  # first tokens: prefill
        counts.append((sum(w.decode_tokens for w in sim.workers), sum(w.decode_context_tokens for w in sim.workers)))
    assert counts[0] == counts[1]


def test_decode_rate_and_capacity_statistics():
    sim = Simulator(disaggregated(1, 2, kv_blocks=3000), specs(200, qps=10), until=20.0)
    sim.run()
    stats = sim.pool_moves.stats(20.0)
    produced = sum(w.decode_tokens for w in sim.workers)  # iterations ended by 20 s (a stretch may be in flight)
    assert produced > 0 and stats.decode_tokens_per_s == pytest.approx(produced / 20.0, rel=0.1)
    # two workers at a full batch (the default sarathi decode policy: 128 decodes per iteration) of sequences at
    # a context between 0 and the longest request's
    longest = max(s.prompt_len + s.output_len for s in sim.specs)
    at_context = [2 * 128 / sim.cost.iteration_time(0, 128, 128 * c) for c in (longest, 0)]
    assert at_context[0] < stats.decode_capacity_tps < at_context[1]
