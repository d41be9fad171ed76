"""KV memory on demand in the engine state machine: blocks taken as positions are computed, the watermark, the
capacity cap, preemption by recompute (tokens kept, stream continuous) and every block returned."""

from __future__ import annotations

import pytest

from diptych.engine import kv_rules
from diptych.engine.block_pool import BlockAllocator
from diptych.engine.outputs import StepOutput
from diptych.engine.scheduler import Scheduler
from diptych.engine.sequence import FINISH_LENGTH
from diptych.policies.batch import BatchPlan, BatchPolicy, SarathiBatching
from diptych.policies.slai import SLAIBatching
from diptych.proto.messages import SamplingParams

BLOCK = 4


def scheduler(policy: BatchPolicy | None = None, num_blocks: int = 32, max_model_len: int = 1024,
              watermark: float = 0.0) -> Scheduler:
    return Scheduler(policy or SarathiBatching(token_budget=64), BlockAllocator(num_blocks), block_size=BLOCK,
                     vocab_size=1000, max_model_len=max_model_len, eos_token_ids=set(), clock=lambda: 0.0,
                     watermark=watermark)


def step(s: Scheduler, now: float = 1.0) -> StepOutput:
    """One iteration in which each sampling sequence samples a token that encodes (request, output index), so a
    recomputed, lost or repeated token shows."""
    planned = s.plan_iteration(now)
    sequences = s.advance(planned)
    output = StepOutput(admitted=planned.admitted, preempted=list(planned.plan.preempt))
    tokens = [(int(seq.request_id[1:]) * 100 + len(seq.output_token_ids)) % 1000 for seq in sequences]
    s.record_tokens(sequences, tokens, now, output)
    return output


def run(s: Scheduler, limit: int = 5000) -> list[StepOutput]:
    outputs = []
    while s.has_work():
        outputs.append(step(s, now=float(len(outputs))))
        assert len(outputs) < limit
    return outputs


def test_decodes_take_a_block_when_their_position_starts_one() -> None:
    s = scheduler()
    s.add_request("r0", [1] * 6, SamplingParams(max_tokens=10, ignore_eos=True))
    step(s)  # prefill: positions 0..5 in 2 blocks, first token sampled
    held = [len(s.running["r0"].block_table)]
    while s.has_work():
        step(s)
        if "r0" in s.running:
            held.append(len(s.running["r0"].block_table))
    # the decode computing position p holds blocks_for(p + 1): positions 6, 7 -> 2 blocks, 8..11 -> 3, 12, 13 -> 4
    # (the last decode, position 14, finishes the request and frees its blocks)
    assert held == [2, 2, 2, 3, 3, 3, 3, 4, 4]
    assert s.blocks.num_free == 32


def test_max_tokens_is_not_read_by_admission() -> None:
    s = scheduler(num_blocks=8)  # 32 positions
    for i in range(4):  # each could reach 8 + 500 positions: admitted on their prompts alone
        s.add_request(f"r{i}", [1] * 8, SamplingParams(max_tokens=500, stop_after_tokens=3))
    assert step(s).admitted == ["r0", "r1", "r2", "r3"]
    assert s.blocks.num_free == 0


def test_watermark_holds_back_admission_only_while_sequences_run() -> None:
    s = scheduler(num_blocks=20, watermark=0.1)  # 2 blocks
    assert s.watermark_blocks == 2
    s.add_request("r0", [1] * 72, SamplingParams(max_tokens=4))  # 18 blocks: admitted alone, nothing runs
    assert step(s).admitted == ["r0"]
    s.add_request("r1", [1] * 4, SamplingParams(max_tokens=4))  # 1 block would leave 1 < 2 free
    assert step(s).admitted == []  # r0's last prompt chunk runs
    assert not s.reserve("handoff", 1)  # a handoff reservation respects it too
    assert step(s).admitted == [] and len(s.running["r0"].block_table) == 19  # r0 grows into the watermark
    assert s.blocks.num_free == 1
    run(s)
    assert s.blocks.num_free == 20


def test_a_sequence_alone_never_outgrows_its_pool() -> None:
    s = scheduler(num_blocks=4)  # 16 positions
    s.add_request("r0", [1] * 10, SamplingParams(max_tokens=100))
    tokens = [t for o in run(s) for t in o.tokens]
    assert len(tokens) == 6 and tokens[-1].finish_reason == FINISH_LENGTH  # 10 + 6 = 16 positions
    with pytest.raises(ValueError, match="larger than the KV pool"):
        s.add_request("big", [1] * 17, SamplingParams(max_tokens=1))


def test_stop_after_tokens_stops_like_max_tokens() -> None:
    s = scheduler()
    s.add_request("r0", [1] * 3, SamplingParams(max_tokens=50, stop_after_tokens=4))
    s.add_request("r1", [1] * 3, SamplingParams(max_tokens=2, stop_after_tokens=4))
    ends = {t.request_id: t.index for o in run(s) for t in o.tokens if t.finish_reason == FINISH_LENGTH}
    assert ends == {"r0": 3, "r1": 1}


@pytest.mark.parametrize("policy", [SarathiBatching(token_budget=32), SLAIBatching(token_budget=32)],
                         ids=["sarathi", "slai"])
def test_preemption_recomputes_and_the_stream_stays_continuous(policy) -> None:
    """Six requests growing past a 24-block pool: some are preempted, several more than once; every stream is
    0, 1, 2, ... with no lost or repeated index, every token is the one an undisturbed run gives, and every block
    comes back."""
    s = scheduler(policy, num_blocks=24)
    for i in range(6):
        s.add_request(f"r{i}", [i + 1] * 5, SamplingParams(max_tokens=40, ignore_eos=True))
    outputs = run(s)
    preempted = [r for o in outputs for r in o.preempted]
    assert s.num_preemptions == len(preempted) >= 6
    assert max(preempted.count(r) for r in set(preempted)) >= 2
    assert s.num_recomputed_tokens > 0 and s.load().preemptions == s.num_preemptions
    for i in range(6):
        tokens = [t for o in outputs for t in o.tokens if t.request_id == f"r{i}"]
        assert [t.index for t in tokens] == list(range(40))
        assert [t.token_id for t in tokens] == [(i * 100 + k) % 1000 for k in range(40)]
    assert s.blocks.num_free == 24 and s.request_ids() == []


def test_recompute_prefills_prompt_and_outputs_then_samples_the_next_token() -> None:
    class Script(BatchPolicy):
        def __init__(self) -> None:
            self.plans: list[BatchPlan] = []

        def schedule(self, waiting, running, kv, now):
            return self.plans.pop(0)

    policy = Script()
    s = scheduler(policy)
    s.add_request("r7", [3] * 5, SamplingParams(max_tokens=10, ignore_eos=True))
    policy.plans = [BatchPlan(prefill_chunks=[("r7", 5)]), BatchPlan(decodes=["r7"]), BatchPlan(preempt=["r7"])]
    step(s), step(s), step(s)
    sequence = s.waiting["r7"]
    assert sequence.output_token_ids == [700, 701] and sequence.block_table == [] and sequence.recompute_tokens == 2
    state = sequence.to_state(BLOCK)
    assert (state.prefill_len, state.remaining_prompt, state.blocks_to_admit) == (7, 7, 2)
    assert s.num_recomputed_tokens == 6  # positions 0..5 had KV
    planned = s.plan_iteration(4.0) if not policy.plans.append(BatchPlan(prefill_chunks=[("r7", 4)])) else None
    assert planned is not None and planned.admitted == []  # recomputing is not a new admission
    assert planned.scheduled[0][1].token_ids == [3, 3, 3, 3] and not planned.scheduled[0][1].needs_logits
    s.advance(planned)
    policy.plans.append(BatchPlan(prefill_chunks=[("r7", 3)]))
    planned = s.plan_iteration(5.0)
    item = planned.scheduled[0][1]
    assert item.token_ids == [3, 700, 701] and item.start_position == 4 and item.needs_logits
    sequences = s.advance(planned)
    output = StepOutput()
    s.record_tokens(sequences, [702], 5.0, output)
    assert output.tokens[0].index == 2 and s.running["r7"].recompute_tokens == 0
    assert s.running["r7"].preempted_times == [1.0]


def test_every_block_returns_after_preempted_cancelled_and_completed_requests() -> None:
    s = scheduler(SarathiBatching(token_budget=16), num_blocks=20)
    for i in range(8):
        s.add_request(f"r{i}", [i + 1] * (3 + 2 * i), SamplingParams(max_tokens=30, ignore_eos=True))
    assert s.reserve("h0", 2)
    outputs = [step(s, now=float(k)) for k in range(25)]
    assert any(o.preempted for o in outputs)
    cancelled = [r for r in ("r1", "r4", "r6", "h0") if s.abort(r)]
    assert len(cancelled) == 4
    run(s)
    assert s.blocks.num_free == 20 and s.request_ids() == []
    assert kv_rules.max_positions(1024, 20, BLOCK) == 80


def test_the_policy_sees_utilisation_of_blocks_in_use_not_of_outputs_to_come() -> None:
    """SLAI's Theta switches at 96% KV utilisation: it must count the blocks in use. Two requests that may each
    produce 500 tokens hold 4 of 32 blocks after their prefill: utilisation 1/8, not the whole pool."""
    seen = []

    class Recording(SLAIBatching):
        def schedule(self, waiting, running, kv, now):
            seen.append(kv)
            return super().schedule(waiting, running, kv, now)

    s = scheduler(Recording(token_budget=64), num_blocks=32, watermark=0.1)
    for i in range(2):
        s.add_request(f"r{i}", [1] * 8, SamplingParams(max_tokens=500))
    step(s), step(s)
    assert seen[0].utilization == 0 and seen[0].watermark_blocks == 0  # nothing runs yet: no watermark
    assert seen[1].utilization == 4 / 32 and seen[1].watermark_blocks == 3
