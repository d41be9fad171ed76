"""KV handoff path selection and block streaming logic (CPU); the CUDA IPC copy itself runs in
``diptych bench transfer`` on GPUs."""

from __future__ import annotations

import torch

from diptych.engine.kv_transfer import CUDA_IPC, FRAMES, StreamingHandoff, select_path


def test_frames_path_without_a_shared_gpu_pool(caplog):
    caplog.set_level("INFO")
    assert select_path("cpu", None)[0] == FRAMES
    assert select_path("cpu", {"host": "x", "device_index": 0, "device_uuid": "u"})[0] == FRAMES
    assert "KV handoff path: zmq_frames" in caplog.text
    assert CUDA_IPC != FRAMES


class _FakePusher:
    def __init__(self, block_size: int) -> None:
        self.local = type("Pool", (), {"block_size": block_size, "bytes_per_block": 100})()
        self.copied: list[tuple[list[int], list[int]]] = []

    def synchronize(self):
        pass

    def copy(self, src, dst):
        self.copied.append((list(src), list(dst)))
        return 1


def test_streaming_pushes_only_completed_blocks_then_the_rest():
    pusher = _FakePusher(block_size=4)
    handoff = StreamingHandoff(pusher, dst_blocks=[20, 21, 22, 23])
    table = [5, 6, 7, 8, 9]
    handoff.advance(table, 3)  # no block complete yet
    handoff.advance(table, 9)  # blocks 0 and 1 complete
    assert pusher.copied == [([5, 6], [20, 21])]
    report = handoff.finish(table, 13)  # 13 positions: 4 blocks, the last partial
    assert pusher.copied[-1] == ([7, 8], [22, 23])
    assert report.num_bytes == 400 and report.path == CUDA_IPC


def test_engine_exposes_blocks_for_streaming(tiny_llama, make_engine, random_prompts):
    from diptych.proto.messages import SamplingParams

    engine = make_engine(tiny_llama, token_budget=8)
    prompt = random_prompts([20])[0]
    engine.add_request("r", prompt, SamplingParams(max_tokens=4), prefill_only=True)
    engine.step()
    table, computed = engine.computed_blocks("r")
    assert computed == 8 and len(table) == 3
    assert engine.reserve("d", 2) and len(engine.reserved_blocks("d")) == 2
    assert torch.is_tensor(engine.kv.pool)


def test_add_prefilled_without_frames_uses_kv_already_in_place(tiny_llama, make_engine, random_prompts):
    from tests.engine.test_exactness import GREEDY, NEW_TOKENS, hf_greedy

    prompt = random_prompts([29], seed=3)[0]
    prefill, decode = make_engine(tiny_llama), make_engine(tiny_llama)
    prefill.add_request("r", prompt, GREEDY, prefill_only=True)
    first = None
    while prefill.has_work():
        first = next((t.token_id for t in prefill.step().tokens), first)
    assert decode.reserve("r", decode.blocks_needed(len(prompt)))
    blocks = decode.reserved_blocks("r")
    decode.kv.import_blocks(blocks[:4], prefill.export_kv("r"))  # what a GPU-to-GPU push does
    prefill.release("r")
    decode.add_prefilled("r", prompt, first, GREEDY, None, len(prompt))
    outputs = [first]
    while decode.has_work():
        outputs += [t.token_id for t in decode.step().tokens]
    assert outputs == hf_greedy(tiny_llama, [prompt], NEW_TOKENS)[0]
