"""``access.authorize``: who may send what to the coordinator, from the name of the key a message came with."""

from __future__ import annotations

import time

from diptych.cluster.requests import RequestRecord
from diptych.proto.messages import (
    CancelRequest,
    Heartbeat,
    KVReceived,
    KVReserved,
    PrefillDone,
    RegisterWorker,
    Request,
    RequestDone,
    SamplingParams,
    StatusQuery,
    SubmitRequest,
    TokenReport,
    WorkerLoad,
)
from diptych.services.coordinator.access import authorize
from diptych.services.coordinator.endpoints import Submission

LOAD = WorkerLoad(free_blocks=1, total_blocks=1, num_waiting=0, num_running=0, waiting_prompt_tokens=0)


def _record() -> RequestRecord:
    request = Request(request_id="r1", client_id="alice", prompt_token_ids=[1, 2],
                      sampling=SamplingParams(max_tokens=2), arrival_time=time.time(), stream_addr="tcp://127.0.0.1:1")
    record = RequestRecord("r1", "alice", 2, 2, payload=Submission(request, b"fe", "frontend"))
    record.prefill_worker, record.decode_worker = "prefill-0", "decode-0"
    return record


def lookup(request_id: str) -> RequestRecord | None:
    return _record() if request_id == "r1" else None


def test_only_frontend_keys_submit_read_status_and_cancel_their_own():
    submit = SubmitRequest(request=_record().payload.request)
    assert authorize(submit, "frontend", lookup) is None
    assert authorize(StatusQuery(), "frontend-2", lookup) is None
    for worker in ("prefill-0", "decode-0", "coordinator"):
        assert authorize(submit, worker, lookup) is not None
        assert authorize(StatusQuery(), worker, lookup) is not None
        assert authorize(CancelRequest(request_id="r1", reason="abort"), worker, lookup) is not None
    assert authorize(CancelRequest(request_id="r1", reason="abort"), "frontend", lookup) is None
    assert "another frontend" in str(authorize(CancelRequest(request_id="r1", reason="abort"), "frontend-2", lookup))
    assert authorize(StatusQuery(), None, lookup) == "no authenticated key"


def test_a_worker_registers_and_speaks_only_as_itself():
    register = RegisterWorker.__new__(RegisterWorker)
    register.worker_id = "decode-0"
    assert authorize(register, "decode-0", lookup) is None
    assert authorize(register, "decode-1", lookup) is not None
    register.worker_id = "frontend"
    assert authorize(register, "frontend", lookup) is not None  # a frontend key is never a worker
    assert authorize(Heartbeat(worker_id="decode-0", load=LOAD, time=0.0), "decode-0", lookup) is None
    assert "names worker" in str(authorize(Heartbeat(worker_id="decode-0", load=LOAD, time=0.0), "decode-1", lookup))
    assert authorize(TokenReport(worker_id="decode-1", counts={"r1": 1}), "decode-1",
                     lookup) is None  # counts filtered later


def test_request_messages_only_from_the_worker_holding_the_request():
    assert authorize(KVReserved(request_id="r1", worker_id="decode-0", ok=True), "decode-0", lookup) is None
    assert authorize(KVReserved(request_id="r1", worker_id="prefill-0", ok=True), "prefill-0", lookup) is not None
    assert authorize(KVReceived(request_id="r1", worker_id="decode-0", num_tokens=2, transfer_s=0.0), "decode-0",
                     lookup) is None
    assert authorize(PrefillDone(request_id="r1", worker_id="prefill-0", handed_off=True, prefill_start=0.0,
                                 prefill_end=0.0), "prefill-0", lookup) is None
    assert authorize(PrefillDone(request_id="r1", worker_id="decode-0", handed_off=True, prefill_start=0.0,
                                 prefill_end=0.0), "decode-0", lookup) is not None
    for holder in ("prefill-0", "decode-0"):
        assert authorize(RequestDone(request_id="r1", worker_id=holder, finish_reason="stop"), holder, lookup) is None
    assert "not on this worker" in str(authorize(RequestDone(request_id="r1", worker_id="decode-7",
                                                             finish_reason="stop"), "decode-7", lookup))
    assert authorize(RequestDone(request_id="gone", worker_id="decode-7", finish_reason="stop"), "decode-7",
                     lookup) is None  # unknown: harmless
