"""The engine's request state machine on its own: no model, tokens chosen by the test."""

from __future__ import annotations

import threading

import pytest

from diptych.engine.block_pool import BlockAllocator, BlockCounter, OutOfBlocksError
from diptych.engine.outputs import StepOutput
from diptych.engine.scheduler import Scheduler, check_plan
from diptych.engine.sequence import FINISH_LENGTH, FINISH_STOP
from diptych.policies.batch import BatchPlan, BatchPolicy, SarathiBatching
from diptych.proto.messages import SamplingParams

EOS = 99
BLOCK = 4
POOL = 32


def scheduler(policy: BatchPolicy | None = None, num_blocks: int = POOL, max_model_len: int = 64) -> Scheduler:
    return Scheduler(policy or SarathiBatching(token_budget=64), BlockAllocator(num_blocks), block_size=BLOCK,
                     vocab_size=100, max_model_len=max_model_len, eos_token_ids={EOS}, clock=lambda: 0.0)


def step(s: Scheduler, token: int = 7, now: float = 1.0) -> StepOutput:
    """One iteration in which every sampling sequence samples ``token``."""
    planned = s.plan_iteration(now)
    sequences = s.advance(planned)
    output = StepOutput(admitted=planned.admitted)
    s.record_tokens(sequences, [token] * len(sequences), now, output)
    return output


def run_to_end(s: Scheduler, token: int = 7) -> list[StepOutput]:
    outputs = []
    while s.has_work():
        outputs.append(step(s, token))
        assert len(outputs) < 1000
    return outputs


class FixedPlan(BatchPolicy):
    """Returns the plan it is given, whatever the state."""

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan

    def schedule(self, waiting, running, kv, now):
        return self.plan


def test_plan_admits_takes_prompt_blocks_and_every_block_returns() -> None:
    s = scheduler()
    s.add_request("a", [1] * 6, SamplingParams(max_tokens=3))
    s.add_request("b", [2] * 9, SamplingParams(max_tokens=2))
    first = step(s)
    assert first.admitted == ["a", "b"]
    assert [len(s.running[r].block_table) for r in ("a", "b")] == [2, 3]  # ceil(6/4), ceil(9/4): prompts only
    assert s.blocks.num_free == POOL - 5
    outputs = [first, *run_to_end(s)]
    finished = [r for o in outputs for r in o.finished]
    assert sorted(finished) == ["a", "b"]
    assert sum(len([t for t in o.tokens if t.request_id == "a"]) for o in outputs) == 3
    assert s.blocks.num_free == POOL
    assert s.request_ids() == []


def test_finish_rules_stop_token_eos_max_tokens_and_context_length() -> None:
    s = scheduler(max_model_len=12)
    s.add_request("eos", [1, 2], SamplingParams(max_tokens=5))
    s.add_request("ignore", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True))
    s.add_request("stop", [1, 2], SamplingParams(max_tokens=5, stop_token_ids=[EOS]))
    reasons = {t.request_id: t.finish_reason for o in run_to_end(s, token=EOS) for t in o.tokens if t.finish_reason}
    assert reasons == {"eos": FINISH_STOP, "ignore": FINISH_LENGTH, "stop": FINISH_STOP}
    s.add_request("context", [1] * 10, SamplingParams(max_tokens=2))
    tokens = [t for o in run_to_end(s) for t in o.tokens]
    assert [t.finish_reason for t in tokens] == [None, FINISH_LENGTH]  # 10 + 2 reaches max_model_len 12
    assert s.blocks.num_free == POOL


def test_prefill_only_request_is_prefilled_until_released() -> None:
    s = scheduler()
    s.add_request("p", [3] * 10, SamplingParams(max_tokens=8), prefill_only=True)
    output = step(s)
    assert output.prefilled == ["p"] and not s.has_work()
    assert len(s.prefilled_sequence("p").block_table) == 3  # the prompt only: its decode runs elsewhere
    assert s.computed_blocks("p")[1] == 10
    assert s.release("p") and not s.release("p")
    assert s.blocks.num_free == POOL


def test_reserve_add_prefilled_abort_and_take_reservation() -> None:
    s = scheduler()
    assert s.reserve("r", 5) and s.reserve("r", 5)  # an identical reservation again is a no-op
    assert s.blocks.num_free == POOL - 5
    assert not s.reserve("big", POOL)
    with pytest.raises(ValueError):
        s.reserve("r", 6)
    written: list[list[int]] = []
    blocks = s.reserved_blocks("r")
    s.add_prefilled("r", [1] * 9, 5, SamplingParams(max_tokens=3), 9, write_kv=written.append)
    assert written == [blocks[:3]] and "r" in s.running and not s.reservations
    outputs = run_to_end(s)
    assert [t.index for o in outputs for t in o.tokens] == [1, 2]
    with pytest.raises(KeyError):
        s.add_prefilled("r", [1], 5, SamplingParams(max_tokens=1), 1)
    assert s.reserve("small", 1)
    with pytest.raises(ValueError):
        s.add_prefilled("small", [1] * 9, 5, SamplingParams(max_tokens=3), 9)
    assert "small" in s.reservations  # kept after a refused handoff
    assert s.abort("small") and not s.abort("small")
    assert s.reserve("peer", 2)
    taken = s.take_reservation("peer")
    assert taken is not None and s.take_reservation("peer") is None
    assert s.blocks.num_free == POOL - 2
    s.free_blocks(taken)
    s.add_request("w", [1] * 4, SamplingParams(max_tokens=4))
    s.add_request("x", [1] * 4, SamplingParams(max_tokens=4))
    step(s)
    s.add_request("y", [1] * 4, SamplingParams(max_tokens=4), prefill_only=True)
    step(s)
    assert "y" in s.prefilled
    assert all(s.abort(r) for r in ("w", "x", "y"))
    assert s.blocks.num_free == POOL and s.request_ids() == []


def test_reserve_runs_beside_an_iteration_under_the_lock() -> None:
    s = scheduler()
    s.add_request("a", [1] * 4, SamplingParams(max_tokens=2))
    with s.blocks_lock:
        planned = s.plan_iteration(0.0)
    done = threading.Event()
    threading.Thread(target=lambda: (s.reserve("r", 2), done.set())).start()
    assert done.wait(5)
    sequences = s.advance(planned)
    with s.blocks_lock:
        s.record_tokens(sequences, [7], 1.0, StepOutput())
    assert s.blocks.num_free == POOL - 2 - 1


def test_bad_requests_are_refused() -> None:
    s = scheduler(num_blocks=4)
    with pytest.raises(ValueError):
        s.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError):
        s.add_request("vocab", [100], SamplingParams())
    with pytest.raises(ValueError):
        s.add_request("pool", [1] * 20, SamplingParams(max_tokens=4))  # 6 blocks, the pool has 4
    s.add_request("a", [1], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError):
        s.add_request("a", [1], SamplingParams(max_tokens=1))


@pytest.mark.parametrize("plan, message", [
    (BatchPlan(preempt=["w"]), "not a preemptible running"),
    (BatchPlan(preempt=["a"], decodes=["a"]), "twice"),
    (BatchPlan(prefill_chunks=[("w", 2), ("w", 2)]), "twice"),
    (BatchPlan(decodes=["w"]), "not decoding"),
    (BatchPlan(prefill_chunks=[("a", 1)]), "not in prefill"),
    (BatchPlan(prefill_chunks=[("w", 2), ("v", 2)]), "blocks with"),
    (BatchPlan(prefill_chunks=[("w", 2)], decodes=["a"]), "blocks with"),
])
def test_plans_the_engine_cannot_execute_are_refused_before_anything_changes(plan, message) -> None:
    s = scheduler(FixedPlan(BatchPlan(prefill_chunks=[("a", 4)])), num_blocks=3)
    s.add_request("a", [1] * 4, SamplingParams(max_tokens=4))
    step(s)  # a holds 1 block; its first decode (position 4) needs a second
    s.add_request("w", [1] * 8, SamplingParams(max_tokens=4))
    s.add_request("v", [1] * 8, SamplingParams(max_tokens=4))
    s.policy = FixedPlan(plan)
    with pytest.raises(RuntimeError, match=message):
        s.plan_iteration(2.0)
    assert list(s.waiting) == ["w", "v"] and s.blocks.num_free == 2


def test_check_plan_reads_policy_states_and_block_counter() -> None:
    s = scheduler()
    s.add_request("w", [1] * 5, SamplingParams(max_tokens=3))
    state = s.waiting["w"].to_state(BLOCK)
    assert check_plan(BatchPlan(prefill_chunks=[("w", 5)]), {"w": state}, 2, "P") == 2
    counter = BlockCounter(4)
    assert counter.allocate(3) == 3 and counter.num_free == 1
    with pytest.raises(OutOfBlocksError):
        counter.allocate(2)
    counter.free(3)
    with pytest.raises(ValueError):
        counter.free(1)
