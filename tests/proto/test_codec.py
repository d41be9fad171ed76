"""The wire codec: round trips, payload frames, and ProtocolError (never another exception) on bad input."""

import contextlib
import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, strategies as st

from diptych import proto
from diptych.proto.codec import _REGISTRY
from diptych.proto.messages import (
    HANDOFF_CUDA_IPC,
    SLO,
    CancelRequest,
    ClientGenerate,
    ClusterStatus,
    KVHandoff,
    KVLayout,
    KVPushAborted,
    KVReserved,
    PrefillTask,
    Request,
    SamplingParams,
    SubmitRequest,
    TokenBatch,
    TokenOutput,
    TokenReport,
)

SHARE = {"host": "h/boot", "device_uuid": "GPU-1", "device_index": 1, "handle": b"\x00\x01ipc", "shape": [8, 2]}


def make_request(**kw: Any) -> Request:
    base: dict[str, Any] = dict(request_id="r1", client_id="alice", prompt_token_ids=[1, 2, 3],
                sampling=SamplingParams(max_tokens=8, temperature=0.0, stop=["\n"], seed=7),
                arrival_time=1700000000.25, stream_addr="tcp://127.0.0.1:5602",
                slo=SLO(tier="strict", ttft_s=1.0, tbt_s=0.1))
    base.update(kw)
    return Request(**base)


@pytest.mark.parametrize("msg", [
    SubmitRequest(request=make_request()),
    CancelRequest(request_id="r1", reason="stop"),
    TokenReport(worker_id="decode-0", counts={"r1": 3, "r2": 1}),
    TokenBatch(outputs=[
        TokenOutput(request_id="r1", index=0, token_ids=[5], finish_reason=None, timestamps=[1.5]),
        TokenOutput(request_id="r2", index=3, token_ids=[6, 7], finish_reason="length", timestamps=[2.0, 2.5]),
    ]),
    ClientGenerate(request_id="r9", prompt="hi", prompt_token_ids=None, sampling=SamplingParams(), api_key=None,
                   slo=None),
    ClusterStatus(prefill_workers=1, decode_workers=2, waiting=0, in_flight=0, admission={"counters": {"a": 1.5}}),
    KVReserved(request_id="r1", worker_id="decode-0", ok=True, block_ids=[7, 3, 9]),
    PrefillTask(request=make_request(), decode_worker_id="decode-0", decode_kv_addr="tcp://x:1", admitted_time=2.0,
                decode_blocks=[7, 3], decode_kv_share=SHARE),
    KVHandoff(request=make_request(), first_token_id=5, first_token_time=1.0, num_tokens=3,
              layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="bfloat16"), blocks=[],
              sent_time=0.5, path=HANDOFF_CUDA_IPC),
    KVPushAborted(request_id="r1", worker_id="prefill-0"),
])
def test_round_trip(msg):
    assert proto.decode(proto.encode(msg)) == msg


def test_payload_frames_travel_raw_and_in_order():
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="float32")
    blocks = [bytes([i]) * 100 for i in range(3)]
    frames = proto.encode(KVHandoff(request=make_request(), first_token_id=42, first_token_time=1.0, num_tokens=20,
                                    layout=layout, blocks=blocks))
    assert len(frames) == 4 and [bytes(f) for f in frames[1:]] == blocks
    back = proto.decode([memoryview(f) if i else f for i, f in enumerate(frames)])
    assert [bytes(b) for b in back.blocks] == blocks and back.layout == layout and back.first_token_id == 42


def test_every_message_type_round_trips_with_defaults():
    for tag, cls in _REGISTRY.items():
        fields = dataclasses.fields(cls)
        if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING for f in fields):
            assert proto.decode(proto.encode(cls())) == cls(), tag


def header(v=proto.PROTOCOL_VERSION, t="cancel", b=None):
    return msgpack.packb({"v": v, "t": t, "b": {"request_id": "x"} if b is None else b})


@pytest.mark.parametrize("frames, match", [
    ([], "empty"),
    ([b"\xc1\xc1"], "msgpack"),
    ([msgpack.packb([1, 2])], "map"),
    ([header(v=99)], "version"),
    ([header(t="no_such_type")], "unknown message type"),
    ([header(b={})], "missing field"),
    ([header(b={"request_id": 5})], "expected str"),
    ([header(), b"extra"], "extra frames"),
    ([header(t="tokens", b={"outputs": [{"request_id": "r", "index": "zero", "token_ids": []}]})], "integer"),
    ([header(t="kv_handoff", b={"blocks": 3})], "missing field|payload"),
])
def test_bad_input_raises_protocol_error(frames, match):
    with pytest.raises(proto.ProtocolError, match=match):
        proto.decode(frames)


def test_wrong_version_is_a_version_error():
    with pytest.raises(proto.ProtocolVersionError):
        proto.decode([header(v=0)])


@given(st.lists(st.binary(max_size=64), max_size=4))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(frames):
    with contextlib.suppress(proto.ProtocolError):
        proto.decode(frames)


def test_unregistered_type_cannot_be_encoded():
    with pytest.raises(TypeError):
        proto.encode(make_request())
