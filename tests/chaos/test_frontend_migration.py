"""The frontend's side of request migration, without processes: a lost request is resubmitted as prompt + the tokens
already streamed, its stream continues with no token lost or repeated, late outputs of the lost attempt are dropped,
a request lost too often fails with 503, and a coordinator restart resubmits every running request."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from diptych import proto
from diptych.services.frontend.api_errors import APIError
from diptych.services.frontend.identity import ANONYMOUS
from diptych.services.frontend.migration import MAX_MIGRATIONS, CoordinatorWatch, resubmission
from diptych.services.frontend.model_info import ModelInfo
from diptych.services.frontend.tracker import Delta, RequestTracker
from diptych.services.frontend.validation import Generation


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def post(self, msg: Any) -> None:
        self.sent.append(msg)


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    from diptych.engine.tiny_model import default_model_path

    return ModelInfo.load(default_model_path(), "tiny")


def out(rid: str, index: int, *ids: int, finish: str | None = None) -> proto.TokenOutput:
    return proto.TokenOutput(request_id=rid, index=index, token_ids=list(ids), finish_reason=finish)


def test_resubmission_appends_the_streamed_tokens_and_keeps_the_total_length():
    original = proto.Request(request_id="r", client_id="c", prompt_token_ids=[1, 2], arrival_time=5.0,
                             sampling=proto.SamplingParams(max_tokens=6, temperature=0.0), stream_addr="tcp://x:1")
    again = resubmission(original, [7, 8], attempt=1)
    assert again is not None and again.request_id == "r-m1" and again.prompt_token_ids == [1, 2, 7, 8]
    assert again.sampling.max_tokens == 4 and again.arrival_time == 5.0 and original.sampling.max_tokens == 6
    assert resubmission(original, [7, 8], attempt=MAX_MIGRATIONS + 1) is None
    assert resubmission(original, [1] * 6, attempt=1) is None


async def test_a_lost_request_continues_its_stream_from_the_resubmission(info):
    link = FakeLink()
    tracker = RequestTracker(info, link, "tcp://127.0.0.1:1", timeout_s=5.0)  # type: ignore[arg-type]
    state = tracker.submit(ANONYMOUS, Generation([1, 5, 9], proto.SamplingParams(max_tokens=5, temperature=0.0,
                                                                                ignore_eos=True)),
                           proto.SLO(), arrival=0.0, source="test")
    rid = state.request_id
    tracker.on_output(out(rid, 0, 11))
    tracker.on_output(out(rid, 2, 13))  # ahead of its turn: buffered, then lost with its attempt
    tracker.on_lost(proto.RequestLost(request_id=rid, reason="worker decode-0 was lost"))
    again = link.sent[-1]
    assert isinstance(again, proto.SubmitRequest) and again.request.request_id == f"{rid}-m1"
    assert again.request.prompt_token_ids == [1, 5, 9, 11] and again.request.sampling.max_tokens == 4
    tracker.on_output(out(rid, 1, 12))  # late output of the lost attempt: dropped
    new = again.request.request_id
    tracker.on_output(out(new, 0, 22))
    tracker.on_output(out(new, 1, 23, 24, 25, finish="length"))
    ids: list[int] = []
    while True:
        delta = await asyncio.wait_for(tracker.next_event(state), 1)
        assert isinstance(delta, Delta)
        ids += delta.token_ids
        if delta.finish_reason:
            break
    assert ids == [11, 22, 23, 24, 25] and delta.finish_reason == "length" and len(tracker) == 0
    assert not any(isinstance(m, proto.CancelRequest) for m in link.sent)


async def test_a_request_lost_too_often_fails_with_503_and_a_cancel_names_its_current_attempt(info):
    link = FakeLink()
    tracker = RequestTracker(info, link, "tcp://127.0.0.1:1", timeout_s=5.0)  # type: ignore[arg-type]
    gen = Generation([1, 2], proto.SamplingParams(max_tokens=8, temperature=0.0))
    state = tracker.submit(ANONYMOUS, gen, proto.SLO(), arrival=0.0, source="test")
    tracker.on_lost(proto.RequestLost(request_id=state.request_id, reason="lost"))
    assert tracker.cancel(state.request_id, "abort")
    assert link.sent[-1] == proto.CancelRequest(request_id=f"{state.request_id}-m1", reason="abort")

    state = tracker.submit(ANONYMOUS, gen, proto.SLO(), arrival=0.0, source="test")
    for attempt in range(MAX_MIGRATIONS + 1):
        cluster_id = state.request_id if attempt == 0 else f"{state.request_id}-m{attempt}"
        tracker.on_lost(proto.RequestLost(request_id=cluster_id, reason="lost"))
    with pytest.raises(APIError) as failure:
        await asyncio.wait_for(tracker.next_event(state), 1)
    assert failure.value.status == 503 and len(tracker) == 0


def test_the_watch_reports_a_new_coordinator_instance_once():
    watch = CoordinatorWatch()
    status = proto.ClusterStatus(prefill_workers=1, decode_workers=1, waiting=0, in_flight=0, instance="a")
    assert not watch.changed(status) and not watch.changed(None) and not watch.changed(status)
    restarted = dataclasses.replace(status, instance="b")
    assert watch.changed(restarted) and not watch.changed(restarted)


async def test_after_a_coordinator_restart_every_running_request_is_resubmitted(info):
    link = FakeLink()
    tracker = RequestTracker(info, link, "tcp://127.0.0.1:1", timeout_s=5.0)  # type: ignore[arg-type]
    gen = Generation([1, 2], proto.SamplingParams(max_tokens=8, temperature=0.0))
    states = [tracker.submit(ANONYMOUS, gen, proto.SLO(), arrival=0.0, source="test") for _ in range(2)]
    tracker.on_output(out(states[0].request_id, 0, 40))
    link.sent.clear()
    tracker.migrate_all("the coordinator restarted")
    cancels = [m.request_id for m in link.sent if isinstance(m, proto.CancelRequest)]
    submits = {m.request.request_id: m.request for m in link.sent if isinstance(m, proto.SubmitRequest)}
    assert cancels == [s.request_id for s in states]
    assert submits[f"{states[0].request_id}-m1"].prompt_token_ids == [1, 2, 40]
    assert submits[f"{states[1].request_id}-m1"].prompt_token_ids == [1, 2] and len(tracker) == 2
