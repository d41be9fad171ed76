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


LAYOUT = KVLayout(2, 2, 8, 16, "float32")
LOAD = WorkerLoad(free_blocks=10, total_blocks=10, num_waiting=0, num_running=0, waiting_prompt_tokens=0)


@pytest.mark.parametrize("msg", [
    SubmitRequest(request()),
    SubmitRequest(request(sampling=sampling(temperature=0.0, top_p=1.0, top_k=0, seed=-(2 ** 63)))),
    ClientGenerate("c1", "hi", None, sampling(max_tokens=0, top_k=-1, temperature=-1.0)),  # ranges: the frontend's
    ClientError("", 400, "bad frame"),
    TokenBatch([TokenOutput("r1", 0, [5], "stop", [1.0], {"prefill_end": 2.0})]),
    ReserveKV("r1", 0),
])
def test_messages_in_range_decode(msg):
    assert round_trip(msg) == msg


@pytest.mark.parametrize("msg, match", [
    (SubmitRequest(request(sampling=sampling(max_tokens=-100))), "max_tokens"),
    (SubmitRequest(request(sampling=sampling(max_tokens=0))), "max_tokens"),
    (SubmitRequest(request(sampling=sampling(max_tokens=2 ** 40))), "max_tokens"),
    (SubmitRequest(request(sampling=sampling(temperature=-0.5))), "temperature"),
    (SubmitRequest(request(sampling=sampling(temperature=math.nan))), "temperature"),
    (SubmitRequest(request(sampling=sampling(top_p=0.0))), "top_p"),
    (SubmitRequest(request(sampling=sampling(top_p=1.5))), "top_p"),
    (SubmitRequest(request(sampling=sampling(top_k=-1))), "top_k"),
    (SubmitRequest(request(sampling=sampling(stop=["s"] * (v.MAX_STOP_STRINGS + 1)))), "stop"),
    (SubmitRequest(request(sampling=sampling(stop=["s" * (v.MAX_STOP_CHARS + 1)]))), "stop"),
    (SubmitRequest(request(request_id="")), "request_id"),
    (SubmitRequest(request(client_id="c" * (v.MAX_ID_CHARS + 1))), "client_id"),
    (SubmitRequest(request(prompt_token_ids=[])), "prompt_token_ids"),
    (SubmitRequest(request(prompt_token_ids=[1, -1])), "prompt_token_ids"),
    (SubmitRequest(request(prompt_token_ids=[2 ** 40])), "prompt_token_ids"),
    (SubmitRequest(request(weight=0.0)), "weight"),
    (SubmitRequest(request(arrival_time=math.inf)), "arrival_time"),
    (SubmitRequest(request(slo=SLO(tbt_s=-1.0))), "slo"),
    (ReserveKV("r1", -6), "num_blocks"),
    (ReserveKV("", 1), "request_id"),
    (RequestFailed("r1", 42, "x"), "code"),
    (TokenBatch([TokenOutput("r1", -1, [5])]), "index"),
    (TokenBatch([TokenOutput("r1", 0, [-5])]), "token_ids"),
    (TokenBatch([TokenOutput("", 0, [5])]), "request_id"),
    (TokenBatch([TokenOutput("r1", 0, [5], "exploded")]), "finish_reason"),
    (TokenReport("decode-0", {"r1": -3}), "counts"),
    (Heartbeat("decode-0", dataclasses.replace(LOAD, free_blocks=11), 1.0), "free_blocks"),
    (Heartbeat("decode-0", dataclasses.replace(LOAD, num_running=-1), 1.0), "num_running"),
    (RegisterWorker("w", "janitor", "m", LAYOUT, "", LOAD, 512), "role"),
    (RegisterWorker("w", "decode", "m", dataclasses.replace(LAYOUT, block_size=0), "", LOAD, 512), "block_size"),
    (KVHandoff(request(), 5, 1.0, 0, LAYOUT), "num_tokens"),
    (KVHandoff(request(), 5, 1.0, 3, LAYOUT, path="carrier_pigeon"), "path"),
    (ClientGenerate("c" * 1000, "hi", None, SamplingParams()), "request_id"),
    (ClientGenerate("c1", None, [-1], SamplingParams()), "prompt_token_ids"),
    (ClientGenerate("c1", "hi", None, SamplingParams(), api_key="k" * 5000), "api_key"),
    (ClientChunk("c1", "", [], "maybe"), "finish_reason"),
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
        proto.decode(proto.encode(ClientError("", 400, "m" * 11)))
    with pytest.raises(proto.ProtocolError, match="list"):
        proto.decode(proto.encode(ClientChunk("c1", "", [1] * 11)))
    with pytest.raises(proto.ProtocolError, match="list"):
        proto.decode(proto.encode(ClientGenerate("c1", "hi", None, SamplingParams(stop=["s"] * 11))))


def test_check_message_is_the_decoders_check():
    proto.check_message(SubmitRequest(request()))
    with pytest.raises(proto.ProtocolError):
        proto.check_message(SubmitRequest(request(sampling=sampling(max_tokens=-1))))
