"""KV memory on demand in the simulator (``engine.kv_rules``): admission takes the prefill's blocks under the
watermark, decodes take a block when their position starts one, plans preempt by recompute under pressure, decode
reservations wait for blocks, and every block comes back (stretches against exact mode under preemption:
``test_simulator``)."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.cluster.blocks import blocks_for
from diptych.engine import kv_rules
from diptych.metrics.results import STATUS_CODES
from diptych.policies.batch import SarathiBatching, SequenceState
from diptych.policies.slai import SLAIBatching
from diptych.sim import stretch
from diptych.sim.simulator import Simulator, simulate
from tests.sim.helpers import colocated, disaggregated, request, specs

BATCH = ["sarathi", "slai", "rad", "prefill-first"]


class Recording(SarathiBatching):
    """Sarathi, recording what it is shown: (free, watermark, total, states of running, states of waiting)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def schedule(self, waiting, running, kv, now):
        self.seen.append((kv.free_blocks, kv.watermark_blocks, kv.total_blocks,
                          [(s.prompt_len, s.num_output, s.num_computed, s.blocks_held, s.blocks_to_step, s.in_prefill)
                           for s in running],
                          [(s.prefill_len, s.blocks_to_admit) for s in waiting]))
        return super().schedule(waiting, running, kv, now)


def test_the_policy_sees_blocks_allocated_on_demand_and_the_watermark():
    workload = [request("a", 0.0, 100, 70), request("b", 0.01, 300, 40), request("c", 0.02, 17, 50)]
    sim = Simulator(colocated(1, kv_blocks=1000, kv_watermark=0.05, exact=True), workload)
    policy = Recording()
    sim.workers[0].set_policy(policy)
    assert sim.run().finished.all()
    decoding = 0
    for free, watermark, total, running, waiting in policy.seen:
        assert watermark == (50 if running else 0)
        assert free + sum(held for *_, held, _, _ in running) == total
        for prefill_len, blocks_to_admit in waiting:
            assert blocks_to_admit == blocks_for(prefill_len, 16)
        for prompt, outputs, computed, held, to_step, in_prefill in running:
            if in_prefill:
                assert held == blocks_for(prompt, 16)  # the whole prompt at admission, later chunks take none
                continue
            decoding += 1
            position = prompt + outputs - 1  # the newest token's, computed by the next decode
            assert computed == position and held == blocks_for(position, 16)
            assert to_step == (1 if position % 16 == 0 else 0)
    assert decoding > 100


@pytest.mark.parametrize("watermark", [0.0, 0.2])
def test_admission_leaves_the_watermark_free_while_sequences_run(watermark):
    # a takes 60 of 100 blocks (then grows to 64); b's 25 prompt blocks fit the 40 free, not with 20 kept free
    workload = [request("a", 0.0, 960, 50), request("b", 0.001, 400, 10)]
    r = simulate(colocated(1, kv_blocks=100, kv_watermark=watermark), workload)
    assert r.finished.all() and r.meta["preemptions"] == 0
    a_finish, b_start = r.times["finish"][0], r.times["prefill_start"][1]
    assert (b_start >= a_finish) if watermark else (b_start < a_finish)


@pytest.mark.parametrize("policy", BATCH)
def test_a_small_pool_preempts_repeatedly_and_every_request_finishes_exactly(policy):
    # prompt + output <= 2300 tokens: each fits the 4800-token pool alone, so no request stops at the pool's size
    workload = specs(50, qps=8, name="uniform:200-1500:100-800", tiers="none", seed=3)
    knobs = {"token_budget": 256, "max_decodes": 8} if policy != "prefill-first" else {"max_decodes": 8}
    sim = Simulator(colocated(1, policy, knobs=knobs, kv_blocks=300, colocated_reserve=False,
                              max_prefill_backlog_tokens=None), workload)
    r = sim.run()
    assert r.finished.all() and (r.num_tokens == r.output_len).all()
    assert (r.num_gaps == r.output_len - 1).all()  # a recompute's token is a regular one, not a second first token
    counts = np.array(r.meta["request_preemptions"])
    assert (counts >= 2).sum() >= 2 and r.meta["preemptions"] == counts.sum() > 0
    assert r.meta["recomputed_tokens"] > 0
    preempted = ~np.isnan(r.times["preempted"])
    assert (preempted == (counts > 0)).all()
    assert (r.times["preempted"][preempted] > r.times["prefill_start"][preempted]).all()
    assert (r.times["finish"][preempted] > r.times["preempted"][preempted]).all()
    for w in sim.workers:
        assert w.free_blocks == w.total_blocks and not w.running and not w.waiting
        assert w.preemptions == r.meta["kv_workers"][w.worker_id]["preemptions"]
    assert 1 < r.meta["peak_running"] <= 128


def test_a_sequence_stops_at_the_pool_size_or_the_context_length():
    # 20 blocks of 16: 320 positions; prompt 300 stops after 20 outputs, as the engine stops at max_positions
    r = simulate(colocated(1, kv_blocks=20), [request("a", 0.0, 300, 100)])
    assert r.finished.all() and r.num_tokens[0] == 20
    r = simulate(colocated(1, kv_blocks=100, max_model_len=310), [request("a", 0.0, 300, 100),
                                                                    request("b", 0.0, 311, 5)])
    assert r.num_tokens[0] == 10 and r.status[1] == STATUS_CODES["rejected"]  # longer than the context
    with pytest.raises(ValueError, match="max_model_len"):
        colocated(1, max_model_len=1).validate()


def test_a_decode_reservation_waits_for_blocks_and_the_prefill_waits_for_it():
    # a grows past its expected footprint to ~90 of the decode worker's 100 blocks; b is placed at once (its
    # footprint fits the core's accounting) but its 20 prompt blocks only fit once a has finished
    workload = [request("a", 0.0, 160, 1400), request("b", 4.5, 320, 20)]
    sim = Simulator(disaggregated(1, 1, kv_blocks=100), workload)
    r = sim.run()
    assert r.finished.all() and r.meta["preemptions"] == 0
    assert r.times["admitted"][1] == 4.5
    assert r.times["prefill_start"][1] == pytest.approx(r.times["finish"][0])
    assert all(w.free_blocks == w.total_blocks and not w.pending_reservations for w in sim.workers)


class UtilizationRecording(SLAIBatching):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, list[str]]] = []

    def schedule(self, waiting, running, kv, now):
        self.seen.append((kv.utilization, [s.request_id for s in running]))
        return super().schedule(waiting, running, kv, now)


def test_slai_kv_utilization_counts_blocks_in_use():
    workload = specs(300, qps=6, seed=1)
    total = 6000
    sim = Simulator(colocated(1, "slai", kv_blocks=total, colocated_reserve=False, max_prefill_backlog_tokens=None),
                    workload)
    policy = UtilizationRecording()
    sim.workers[0].set_policy(policy)
    assert sim.run().finished.all()
    used = np.array([u for u, _ in policy.seen])
    assert used.max() < 0.9 and used.mean() < 0.6  # below SLAI's 0.96 pressure threshold
    # reserving prompt + max_tokens, as before KV on demand, the same running sets would have saturated the pool
    spec = {s.request_id: s for s in workload}
    reserved = [sum(blocks_for(spec[i].prompt_len + spec[i].max_tokens, 16) for i in ids) / total
                for _, ids in policy.seen]
    assert max(reserved) > 0.96


def test_every_request_finishing_is_reported_with_its_worker_figures():
    sim = Simulator(disaggregated(1, 2), specs(40, qps=8))
    r = sim.run()
    assert r.meta["preemptions"] == r.meta["recomputed_tokens"] == 0 and np.isnan(r.times["preempted"]).all()
    assert set(r.meta["kv_workers"]) == {w.worker_id for w in sim.workers}
    assert r.meta["peak_running"] == max(w.peak_running for w in sim.workers) >= 1
    assert (r.status == STATUS_CODES["finished"]).all()


def test_stretch_growth_and_length_match_decoding_step_by_step():
    rng = np.random.default_rng(0)
    for _ in range(200):
        seqs = []
        for j in range(int(rng.integers(1, 6))):
            computed = int(rng.integers(1, 200))
            seqs.append(SequenceState(f"s{j}", 0.0, prompt_len=computed, num_computed=computed,
                                      blocks_held=blocks_for(computed, 16) + int(rng.integers(0, 2))))
        most, free = int(rng.integers(1, 100)), int(rng.integers(0, 12))
        taken, fits = 0, 0
        positions = [(s.num_computed, s.blocks_held) for s in seqs]
        for k in range(1, most + 1):  # decode one iteration at a time, as exact mode does
            for n, (computed, held) in enumerate(positions):
                more = kv_rules.blocks_to_step(computed, held, 16)
                taken += more
                positions[n] = (computed + 1, held + more)
            assert stretch.growth(seqs, k, 16) == taken
            if taken <= free:
                fits = k
        assert stretch.feasible_iterations(seqs, most, free, 16) == fits
