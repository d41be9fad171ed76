"""The prefill worker's KV sender on CPU engines: a push streams blocks into the decode reservation while prefill
runs, a failing push falls back to frames, every handoff is counted per path, and the decoded tokens stay exact.
The CUDA IPC copy itself is exercised on GPUs (``tests/integration/test_gpu_handoff.py``, ``diptych bench
transfer``); here a pusher with the same interface copies between two CPU pools."""

from __future__ import annotations

import pytest

from diptych.engine.kv_transfer import StreamingHandoff
from diptych.proto.messages import HANDOFF_CUDA_IPC, HANDOFF_FRAMES
from diptych.services.worker.roles.kv_sender import KVSender
from tests.engine.test_exactness import GREEDY, NEW_TOKENS
from tests.hf_reference import hf_greedy


class CpuPusher:
    """``KVPusher``'s interface over two CPU pools; ``fail_at`` makes that copy call raise."""

    def __init__(self, prefill, decode, fail_at: int | None = None) -> None:
        self.local, self.decode, self.fail_at = prefill.kv, decode, fail_at
        self.copies: list[list[int]] = []
        self.synchronized = 0

    def start(self, dst_blocks):
        return StreamingHandoff(self, dst_blocks)  # type: ignore[arg-type]  # KVPusher's interface

    def copy(self, src_blocks, dst_blocks):
        if self.fail_at is not None and len(self.copies) == self.fail_at:
            raise RuntimeError("peer GPU went away")
        self.decode.kv.import_blocks(dst_blocks, self.local.export_blocks(src_blocks))
        self.copies.append(list(dst_blocks))
        return 1

    def synchronize(self):
        self.synchronized += 1


def hand_over(tiny_llama, make_engine, prompt, pusher_factory=None, share=None):
    """Prefill ``prompt`` in 8-token chunks, hand its KV over through a ``KVSender``, decode it; returns
    ``(tokens, sender, pusher, pushed blocks before prefill ended)``."""
    prefill, decode = make_engine(tiny_llama, token_budget=8), make_engine(tiny_llama)
    sender = KVSender(prefill)
    pusher = pusher_factory(prefill, decode) if pusher_factory else None
    if pusher is not None:
        sender._pusher = lambda decode_worker_id, share: pusher  # type: ignore[method-assign]
    prefill.add_request("r", prompt, GREEDY, prefill_only=True)
    assert decode.reserve("r", decode.blocks_needed(len(prompt)))
    sender.begin("r", "decode-0", share if share is not None else {"handle": b"h"}, decode.reserved_blocks("r"))
    first, pushed_early = None, 0
    while True:
        output = prefill.step()
        sender.advance()
        if output.tokens:
            first = output.tokens[0].token_id
        if "r" in output.prefilled:
            break
        pushed_early = sum(len(c) for c in pusher.copies) if pusher else 0
    path, frames = sender.finish("r", len(prompt))
    decode.add_prefilled("r", prompt, first, GREEDY, None if path == HANDOFF_CUDA_IPC else frames, len(prompt))
    tokens = [first]
    while decode.has_work():
        tokens += [t.token_id for t in decode.step().tokens]
    assert prefill.kv.allocator.num_free == prefill.kv.num_blocks  # released after the handoff
    return tokens, sender, pusher, pushed_early


def test_push_streams_blocks_while_prefill_runs_and_decodes_exactly(tiny_llama, make_engine, random_prompts):
    prompt = random_prompts([29], seed=3)[0]  # 4 blocks of 8, 4 chunks of 8
    tokens, sender, pusher, pushed_early = hand_over(tiny_llama, make_engine, prompt, CpuPusher)
    assert tokens == hf_greedy(tiny_llama, [prompt], NEW_TOKENS)[0]
    assert pushed_early == 3  # three full blocks went before the last chunk ran; the partial one at the end
    assert not sender.has_pushes() and pusher.synchronized == 1
    counts = sender.snapshot()
    assert counts[HANDOFF_CUDA_IPC]["requests"] == 1 and HANDOFF_FRAMES not in counts
    assert counts[HANDOFF_CUDA_IPC]["bytes"] == 4 * pusher.local.bytes_per_block


def test_failing_push_falls_back_to_frames(tiny_llama, make_engine, random_prompts, caplog):
    prompt = random_prompts([29], seed=4)[0]
    tokens, sender, _, _ = hand_over(tiny_llama, make_engine, prompt,
                                     lambda p, d: CpuPusher(p, d, fail_at=1))
    assert tokens == hf_greedy(tiny_llama, [prompt], NEW_TOKENS)[0]
    assert sender.snapshot()[HANDOFF_FRAMES]["requests"] == 1 and HANDOFF_CUDA_IPC not in sender.snapshot()
    assert "push failed" in caplog.text


@pytest.mark.parametrize("share", [{}, {"host": "elsewhere", "device_index": 0, "device_uuid": "u", "handle": b"x"}])
def test_no_shared_gpu_pool_means_frames(tiny_llama, make_engine, random_prompts, share, caplog):
    caplog.set_level("INFO")
    prompt = random_prompts([20], seed=5)[0]
    tokens, sender, _, _ = hand_over(tiny_llama, make_engine, prompt, share=share)
    assert tokens == hf_greedy(tiny_llama, [prompt], NEW_TOKENS)[0]
    assert list(sender.snapshot()) == [HANDOFF_FRAMES]
    if share:
        assert "KV handoff path to decode-0: zmq_frames (this engine is not on a GPU)" in caplog.text


def test_abandon_waits_for_issued_copies_and_stops(tiny_llama, make_engine, random_prompts):
    prefill, decode = make_engine(tiny_llama, token_budget=8), make_engine(tiny_llama)
    pusher = CpuPusher(prefill, decode)
    sender = KVSender(prefill)
    sender._pusher = lambda decode_worker_id, share: pusher  # type: ignore[method-assign]
    prompt = random_prompts([29])[0]
    prefill.add_request("r", prompt, GREEDY, prefill_only=True)
    decode.reserve("r", decode.blocks_needed(len(prompt)))
    assert sender.begin("r", "decode-0", {"handle": b"h"}, decode.reserved_blocks("r")) == HANDOFF_CUDA_IPC
    prefill.step(), prefill.step()
    sender.advance()
    sender.abandon("r")
    assert pusher.synchronized == 1 and not sender.has_pushes() and len(pusher.copies) == 1
    prefill.step()
    sender.advance()  # nothing more is pushed for an abandoned request
    assert len(pusher.copies) == 1 and sender.snapshot() == {}
