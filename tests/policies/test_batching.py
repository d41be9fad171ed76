"""Sarathi-Serve (stall-free), vLLM-style prefill-first, and RAD tile-aligned packing."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from diptych.policies.batch import BATCH_POLICIES, SarathiBatching, SequenceState
from diptych.policies.prefill_first import PrefillFirstBatching
from diptych.policies.rad_batching import RADBatching
from tests.policies.helpers import decode, kv, partial, waiting

running_specs = st.lists(
    st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 4), st.integers(1, 900)), max_size=30)
waiting_specs = st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 6)), max_size=10)


def build(running_spec, waiting_spec) -> tuple[list[SequenceState], list[SequenceState]]:
    running = []
    for i, (is_decode, to_step, held, remaining) in enumerate(running_spec):
        if is_decode:
            running.append(decode(f"r{i}", arrival=i, blocks_to_step=to_step, blocks_held=held))
        else:
            running.append(partial(f"r{i}", prompt=remaining + 10, computed=10, arrival=i, blocks_held=held))
    queue = [waiting(f"w{i}", prompt=prompt, arrival=100 + i, blocks=blocks)
             for i, (prompt, blocks) in enumerate(waiting_spec)]
    return running, queue


def check_block_accounting(plan, running, queue, free) -> None:
    by_id = {seq.request_id: seq for seq in running + queue}
    admitted = [rid for rid, _ in plan.prefill_chunks if rid.startswith("w")]
    taken = sum(by_id[rid].blocks_to_step for rid in plan.decodes) + sum(by_id[rid].blocks_to_admit for rid in admitted)
    assert taken <= free + sum(by_id[rid].blocks_held for rid in plan.preempt)
    scheduled = plan.decodes + [rid for rid, _ in plan.prefill_chunks] + plan.preempt
    assert len(scheduled) == len(set(scheduled)), "a sequence appears twice in one plan"
    assert [seq.request_id for seq in queue[:len(admitted)]] == admitted, "admission skipped ahead"


# ---------------------------------------------------------------------------------------------- Sarathi


@settings(max_examples=300, deadline=None, database=None)
@given(running_specs, waiting_specs, st.integers(0, 12), st.sampled_from([64, 512, 2048]))
def test_sarathi_never_stalls_a_running_decode(running_spec, waiting_spec, free, budget):
    running, queue = build(running_spec, waiting_spec)
    plan = SarathiBatching(token_budget=budget).schedule(queue, running, kv(free), now=0.0)
    decodes = {seq.request_id for seq in running if not seq.in_prefill}
    assert decodes <= set(plan.decodes) | set(plan.preempt)      # each decode runs or is preempted, never skipped
    check_block_accounting(plan, running, queue, free)
    prefill_tokens = plan.num_tokens - len(plan.decodes)
    assert prefill_tokens <= max(0, budget - len(plan.decodes))
    if sum(seq.blocks_to_step for seq in running if not seq.in_prefill) <= free:
        assert not plan.preempt and set(plan.decodes) == decodes


def test_sarathi_decodes_ignore_the_budget_and_prefills_fill_it():
    running = [decode(f"d{i}") for i in range(10)] + [partial("p", prompt=500, computed=0)]
    plan = SarathiBatching(token_budget=64).schedule([waiting("w")], running, kv(), now=0)
    assert len(plan.decodes) == 10 and plan.prefill_chunks == [("p", 54)]
    plan = SarathiBatching(token_budget=8).schedule([], running, kv(), now=0)
    assert len(plan.decodes) == 10 and plan.prefill_chunks == []


def test_sarathi_preempts_most_recent_admission_and_admits_nothing_then():
    running = [decode("old", blocks_to_step=1), partial("mid", arrival=1, blocks_held=3), decode("new", arrival=2)]
    plan = SarathiBatching().schedule([waiting("w", blocks=0)], running, kv(free=0), now=0)
    assert plan.decodes == ["old"] and plan.preempt == ["new"]   # "new" holds a block: enough for "old"
    assert plan.prefill_chunks == [("mid", 511)]


# ---------------------------------------------------------------------------------------------- prefill-first


def test_prefill_first_runs_whole_prompts_without_decodes():
    policy = BATCH_POLICIES.create("prefill-first")
    assert isinstance(policy, PrefillFirstBatching) and policy.max_num_batched_tokens == 2048
    running = [decode("d1"), decode("d2")]
    queue = [waiting("a", prompt=1000), waiting("b", prompt=1000), waiting("c", prompt=100)]
    plan = policy.schedule(queue, running, kv(), now=0)
    assert plan.prefill_chunks == [("a", 1000), ("b", 1000)] and plan.decodes == []   # "c" would exceed 2048


def test_prefill_first_runs_an_overlong_prompt_whole_and_stops_on_kv():
    policy = PrefillFirstBatching()
    plan = policy.schedule([waiting("huge", prompt=5000), waiting("small", prompt=10)], [], kv(), now=0)
    assert plan.prefill_chunks == [("huge", 5000)]
    plan = policy.schedule([waiting("big", prompt=10, blocks=9), waiting("small", prompt=10)], [decode("d")],
                           kv(free=5), now=0)
    assert plan.prefill_chunks == [] and plan.decodes == ["d"]     # head does not fit: decode iteration


def test_prefill_first_decode_iteration_when_nothing_waits():
    running = [decode("d1"), decode("d2", blocks_to_step=1)]
    plan = PrefillFirstBatching().schedule([], running, kv(free=0), now=0)
    assert plan.decodes == ["d1"] and plan.preempt == ["d2"] and plan.prefill_chunks == []


# ---------------------------------------------------------------------------------------------- RAD


def test_rad_fills_one_prompts_tail_with_the_next_prompt():
    policy = BATCH_POLICIES.create("rad")
    assert isinstance(policy, RADBatching) and policy.tile_quantum == 128 and policy.decode_tile is None
    plan = policy.schedule([waiting("a", prompt=300), waiting("b", prompt=300)], [], kv(), now=0)
    assert plan.prefill_chunks == [("a", 300), ("b", 212)]


def test_rad_rounds_down_to_the_quantum_but_runs_short_tails():
    policy = RADBatching()
    assert policy.schedule([waiting("a", prompt=300)], [], kv(), now=0).prefill_chunks == [("a", 256)]
    assert policy.schedule([], [partial("a", prompt=300, computed=256)], kv(), now=0).prefill_chunks == [("a", 44)]
    plan = policy.schedule([waiting("a", prompt=100), waiting("b", prompt=40)], [], kv(), now=0)
    assert plan.prefill_chunks == [("a", 100), ("b", 28)]           # 140 -> 128
    plan = policy.schedule([waiting("a", prompt=130), waiting("b", prompt=5)], [], kv(), now=0)
    assert plan.prefill_chunks == [("a", 128)]                      # b's chunk cut to zero: b not admitted


def test_rad_aligns_prefill_to_budget_left_after_decodes():
    running = [decode(f"d{i}") for i in range(10)]
    plan = RADBatching().schedule([waiting("a", prompt=4000)], running, kv(), now=0)
    assert plan.prefill_chunks == [("a", 384)] and len(plan.decodes) == 10   # 502 left -> 384
    crowded = [decode(f"d{i}") for i in range(450)]
    plan = RADBatching(max_decodes=450, max_running=512).schedule([waiting("a", prompt=4000)], crowded, kv(), now=0)
    assert plan.prefill_chunks == [("a", 62)]                       # under one quantum left: used unaligned


def test_rad_decode_tile_rounds_decode_batches_down():
    running = [decode(f"d{i}", t_end=float(i)) for i in range(130)]
    plan = RADBatching(token_budget=1024, max_decodes=256, decode_tile=128).schedule([], running, kv(), now=200)
    assert len(plan.decodes) == 128 and {"d128", "d129"}.isdisjoint(plan.decodes)   # most recent tokens wait
    few = RADBatching(decode_tile=128).schedule([], running[:100], kv(), now=200)
    assert len(few.decodes) == 100


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.integers(1, 1500), min_size=1, max_size=8), st.integers(0, 100),
       st.sampled_from([64, 128, 256]), st.sampled_from([512, 1024, 2048]))
def test_rad_prefill_totals_are_multiples_of_the_quantum(prompts, num_decodes, quantum, budget):
    running = [decode(f"d{i}") for i in range(num_decodes)]
    queue = [waiting(f"w{i}", prompt=p, arrival=i) for i, p in enumerate(prompts)]
    plan = RADBatching(token_budget=budget, tile_quantum=quantum).schedule(queue, running, kv(), now=0)
    total = plan.num_tokens - len(plan.decodes)
    target = (budget - num_decodes) // quantum * quantum
    assert total > 0                                                # work waits: never an empty prefill
    assert total % quantum == 0 or total < quantum
    if sum(prompts) >= target:
        assert total == target
    check_block_accounting(plan, running, queue, free=1000)
