"""Range and size checks on decode (``proto.validation``): out-of-range fields raise ``ProtocolError``."""

from __future__ import annotations

import dataclasses
import math

import pytest

from diptych import proto
from diptych.proto import validation as v
from diptych.proto.messages import (
    SLO,
    ClientChunk,
    ClientError,
    ClientGenerate,
    Heartbeat,
    KVHandoff,
    KVLayout,
    RegisterWorker,
    Request,
    RequestFailed,
    ReserveKV,
    SamplingParams,
    SubmitRequest,
    TokenBatch,
    TokenOutput,
    TokenReport,
    WorkerLoad,
)


def request(**changes) -> Request:
    base = Request(request_id="r1", client_id="alice", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(),
                   arrival_time=1.0, stream_addr="tcp://127.0.0.1:5602")
    return dataclasses.replace(base, **changes)


def sampling(**changes) -> SamplingParams:
    return dataclasses.replace(SamplingParams(), **changes)


def round_trip(msg):
    return proto.decode(proto.encode(msg))


LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16, dtype="float32")
LOAD = WorkerLoad(free_blocks=10, total_blocks=10, num_waiting=0, num_running=0, waiting_prompt_tokens=0)


@pytest.mark.parametrize("msg", [
    SubmitRequest(request=request()),
    SubmitRequest(request=request(sampling=sampling(temperature=0.0, top_p=1.0, top_k=0, seed=-(2 ** 63)))),
    # sampling ranges of the SDK's request are the frontend's to check (its 400 carries the SDK's request id)
    ClientGenerate(request_id="c1", prompt="hi", prompt_token_ids=None,
                   sampling=sampling(max_tokens=0, top_k=-1, temperature=-1.0)),
    ClientError(request_id="", code=400, message="bad frame"),
    TokenBatch(outputs=[TokenOutput(request_id="r1", index=0, token_ids=[5], finish_reason="stop", timestamps=[1.0],
                                    events={"prefill_end": 2.0})]),
    ReserveKV(request_id="r1", num_blocks=0),
])
def test_messages_in_range_decode(msg):
    assert round_trip(msg) == msg


@pytest.mark.parametrize("msg, match", [
    (SubmitRequest(request=request(sampling=sampling(max_tokens=-100))), "max_tokens"),
    (SubmitRequest(request=request(sampling=sampling(max_tokens=0))), "max_tokens"),
    (SubmitRequest(request=request(sampling=sampling(max_tokens=2 ** 40))), "max_tokens"),
    (SubmitRequest(request=request(sampling=sampling(temperature=-0.5))), "temperature"),
    (SubmitRequest(request=request(sampling=sampling(temperature=math.nan))), "temperature"),
    (SubmitRequest(request=request(sampling=sampling(top_p=0.0))), "top_p"),
    (SubmitRequest(request=request(sampling=sampling(top_p=1.5))), "top_p"),
    (SubmitRequest(request=request(sampling=sampling(top_k=-1))), "top_k"),
    (SubmitRequest(request=request(sampling=sampling(stop=["s"] * (v.MAX_STOP_STRINGS + 1)))), "stop"),
    (SubmitRequest(request=request(sampling=sampling(stop=["s" * (v.MAX_STOP_CHARS + 1)]))), "stop"),
    (SubmitRequest(request=request(request_id="")), "request_id"),
    (SubmitRequest(request=request(client_id="c" * (v.MAX_ID_CHARS + 1))), "client_id"),
    (SubmitRequest(request=request(prompt_token_ids=[])), "prompt_token_ids"),
    (SubmitRequest(request=request(prompt_token_ids=[1, -1])), "prompt_token_ids"),
    (SubmitRequest(request=request(prompt_token_ids=[2 ** 40])), "prompt_token_ids"),
    (SubmitRequest(request=request(weight=0.0)), "weight"),
    (SubmitRequest(request=request(arrival_time=math.inf)), "arrival_time"),
    (SubmitRequest(request=request(slo=SLO(tbt_s=-1.0))), "slo"),
    (ReserveKV(request_id="r1", num_blocks=-6), "num_blocks"),
    (ReserveKV(request_id="", num_blocks=1), "request_id"),
    (RequestFailed(request_id="r1", code=42, message="x"), "code"),
    (TokenBatch(outputs=[TokenOutput(request_id="r1", index=-1, token_ids=[5])]), "index"),
    (TokenBatch(outputs=[TokenOutput(request_id="r1", index=0, token_ids=[-5])]), "token_ids"),
    (TokenBatch(outputs=[TokenOutput(request_id="", index=0, token_ids=[5])]), "request_id"),
    (TokenBatch(outputs=[TokenOutput(request_id="r1", index=0, token_ids=[5], finish_reason="exploded")]),
     "finish_reason"),
    (TokenReport(worker_id="decode-0", counts={"r1": -3}), "counts"),
    (Heartbeat(worker_id="decode-0", load=dataclasses.replace(LOAD, free_blocks=11), time=1.0), "free_blocks"),
    (Heartbeat(worker_id="decode-0", load=dataclasses.replace(LOAD, num_running=-1), time=1.0), "num_running"),
    (RegisterWorker(worker_id="w", role="janitor", model="m", layout=LAYOUT, kv_addr="", load=LOAD,
                    max_model_len=512), "role"),
    (RegisterWorker(worker_id="w", role="decode", model="m", layout=dataclasses.replace(LAYOUT, block_size=0),
                    kv_addr="", load=LOAD, max_model_len=512), "block_size"),
    (KVHandoff(request=request(), first_token_id=5, first_token_time=1.0, num_tokens=0, layout=LAYOUT), "num_tokens"),
    (KVHandoff(request=request(), first_token_id=5, first_token_time=1.0, num_tokens=3, layout=LAYOUT,
               path="carrier_pigeon"), "path"),
    (ClientGenerate(request_id="c" * 1000, prompt="hi", prompt_token_ids=None, sampling=SamplingParams()),
     "request_id"),
    (ClientGenerate(request_id="c1", prompt=None, prompt_token_ids=[-1], sampling=SamplingParams()),
     "prompt_token_ids"),
    (ClientGenerate(request_id="c1", prompt="hi", prompt_token_ids=None, sampling=SamplingParams(),
                    api_key="k" * 5000), "api_key"),
    (ClientChunk(request_id="c1", text="", token_ids=[], finish_reason="maybe"), "finish_reason"),
])
def test_out_of_range_fields_raise_protocol_error(msg, match):
    frames = proto.encode(msg)
    with pytest.raises(proto.ProtocolError, match=match):
        proto.decode(frames)


def test_every_string_and_list_is_capped_by_the_codec(monkeypatch):
    from diptych.proto import codec

    monkeypatch.setattr(codec, "MAX_TEXT_CHARS", 10)
    monkeypatch.setattr(codec, "MAX_LIST_ITEMS", 10)
    with pytest.raises(proto.ProtocolError, match="characters"):
        proto.decode(proto.encode(ClientError(request_id="", code=400, message="m" * 11)))
    with pytest.raises(proto.ProtocolError, match="list"):
        proto.decode(proto.encode(ClientChunk(request_id="c1", text="", token_ids=[1] * 11)))
    with pytest.raises(proto.ProtocolError, match="list"):
        proto.decode(proto.encode(ClientGenerate(request_id="c1", prompt="hi", prompt_token_ids=None,
                                                 sampling=SamplingParams(stop=["s"] * 11))))


def test_check_message_is_the_decoders_check():
    proto.check_message(SubmitRequest(request=request()))
    with pytest.raises(proto.ProtocolError):
        proto.check_message(SubmitRequest(request=request(sampling=sampling(max_tokens=-1))))
