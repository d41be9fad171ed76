"""Per-request timelines: the fake workers send phase events and token timestamps as real ones do (prefill worker:
the first token with admitted/prefill_start/prefill_end; decode worker: the rest, handoff_start/handoff_end on its
first output), and the timeline comes back complete and ordered through the SDK (always) and HTTP (opt-in)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from diptych import proto
from diptych.client import AsyncClient
from tests.frontend.conftest import text_ids
from tests.frontend.test_http_generation import sse_events

ORDER = ["arrival", "admitted", "prefill_start", "prefill_end", "handoff_start", "handoff_end", "first_token",
         "token_times", "finish", "finish_reason"]
PHASES = ORDER[1:6]
CHAT = [{"role": "user", "content": "Hi!"}]


class TimedWorkers:
    """A responder sending ``text`` with events and timestamps spread between the request's arrival and now (so the
    frontend's finish comes after them): the first token alone with the prefill phases, then (when there are more
    tokens) batches of ``per_batch``, the first with the handoff phases. Keeps what it sent per request id, to
    compute the expected timeline."""

    def __init__(self, tokenizer, text: str, *, per_batch: int = 3) -> None:
        self.ids = text_ids(tokenizer, text)
        self.per_batch = per_batch
        self.sent: dict[str, tuple[proto.Request, dict[str, float], list[float]]] = {}

    def __call__(self, request: proto.Request) -> list[proto.TokenBatch]:
        time.sleep(0.01)  # the made-up times below lie strictly between the arrival and now
        start, span = request.arrival_time, time.time() - request.arrival_time
        n = len(self.ids)
        steps = 5 + n  # admitted, prefill_start, prefill_end = token 0, handoff start/end, decode tokens
        at = [start + span * (k + 1) / (steps + 1) for k in range(steps)]
        phases = dict(zip(["admitted", "prefill_start", "prefill_end"], at[:3]))
        token_times = [at[2], *at[5:5 + n - 1]]
        first = proto.TokenOutput(request_id=request.request_id, index=0, token_ids=self.ids[:1],
                                  finish_reason=None if n > 1 else "length",
                                  timestamps=token_times[:1], events=dict(phases))
        outputs = [first]
        if n > 1:
            phases.update(handoff_start=at[3], handoff_end=at[4])
            for index in range(1, n, self.per_batch):
                last = min(index + self.per_batch, n)
                events = {"handoff_start": at[3], "handoff_end": at[4]} if index == 1 else {}
                outputs.append(proto.TokenOutput(request_id=request.request_id, index=index,
                                                 token_ids=self.ids[index:last],
                                                 finish_reason="length" if last == n else None,
                                                 timestamps=token_times[index:last], events=events))
        self.sent[request.request_id] = (request, phases, token_times)
        return [proto.TokenBatch(outputs=[o]) for o in outputs]

    def expected(self, request_id: str) -> dict:
        """The timeline the frontend must return, less ``finish`` (its own clock)."""
        request, phases, token_times = self.sent[request_id]
        return {"arrival": request.arrival_time, **phases, "first_token": token_times[0],
                "token_times": token_times, "finish_reason": "length"}


def assert_complete_and_ordered(timeline: dict, expected: dict) -> None:
    assert list(timeline) == [key for key in ORDER if key in timeline]  # documented key order
    assert {k: v for k, v in timeline.items() if k != "finish"} == expected
    moments = [timeline[k] for k in ORDER[:6] if k in timeline]
    assert moments == sorted(moments)
    tokens = timeline["token_times"]
    assert tokens == sorted(tokens) and timeline["first_token"] == tokens[0] == timeline["prefill_end"]
    assert all(t >= timeline.get("handoff_end", 0) for t in tokens[1:])
    assert tokens[-1] <= timeline["finish"] <= time.time()


async def test_sdk_complete_has_the_whole_timeline(anon, tokenizer):
    workers = anon.cluster.responder = TimedWorkers(tokenizer, "abcdefgh")
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        done = await client.complete("x", max_tokens=8)
        without = await client.complete("x", max_tokens=8, timeline=False)
    request = anon.cluster.wait_submit()
    assert set(PHASES) <= set(done.timeline) and len(done.timeline["token_times"]) == 8
    assert_complete_and_ordered(done.timeline, workers.expected(request.request_id))
    assert without.text == "abcdefgh" and without.timeline is None


async def test_sdk_stream_has_the_timeline_on_the_last_chunk(anon, tokenizer):
    workers = anon.cluster.responder = TimedWorkers(tokenizer, "0123456", per_batch=2)
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        chunks = [c async for c in client.stream("x", max_tokens=7)]
    assert all(c.timeline is None for c in chunks[:-1]) and chunks[-1].finish_reason == "length"
    assert_complete_and_ordered(chunks[-1].timeline, workers.expected(anon.cluster.wait_submit().request_id))


async def test_request_finishing_at_its_first_token_has_no_handoff(anon, tokenizer):
    workers = anon.cluster.responder = TimedWorkers(tokenizer, "a")
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        done = await client.complete("x", max_tokens=1)
    assert "handoff_start" not in done.timeline and "handoff_end" not in done.timeline
    assert_complete_and_ordered(done.timeline, workers.expected(anon.cluster.wait_submit().request_id))


@pytest.mark.parametrize("chat", [False, True])
async def test_http_timeline_opt_in_non_streamed(anon, tokenizer, chat):
    workers = anon.cluster.responder = TimedWorkers(tokenizer, "Hello!")
    path, body = ("/v1/chat/completions", {"messages": CHAT}) if chat else ("/v1/completions", {"prompt": "x"})
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(anon.http_url + path, json=body | {"model": "tiny", "max_tokens": 6,
                                                                  "diptych": {"timeline": True}})
    assert resp.status_code == 200, resp.text
    assert_complete_and_ordered(resp.json()["timeline"], workers.expected(resp.headers["x-request-id"]))


@pytest.mark.parametrize("chat", [False, True])
async def test_http_timeline_opt_in_streamed_is_on_the_finish_chunk(anon, tokenizer, chat):
    workers = anon.cluster.responder = TimedWorkers(tokenizer, "Hello!", per_batch=2)
    path, body = ("/v1/chat/completions", {"messages": CHAT}) if chat else ("/v1/completions", {"prompt": "x"})
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(anon.http_url + path, json=body | {
            "model": "tiny", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True},
            "diptych": {"timeline": True}})
    events = sse_events(resp.text)
    chunks, usage_chunk = events[:-2], events[-2]
    finish_chunk = chunks[-1]
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert all("timeline" not in c for c in chunks[:-1]) and "timeline" not in usage_chunk
    assert_complete_and_ordered(finish_chunk["timeline"], workers.expected(resp.headers["x-request-id"]))


@pytest.mark.parametrize("extension", [{}, {"diptych": {}}, {"diptych": {"timeline": False, "tier": "strict"}}])
async def test_http_timeline_absent_unless_requested(anon, tokenizer, extension):
    anon.cluster.responder = TimedWorkers(tokenizer, "Hello!")
    async with httpx.AsyncClient(timeout=10) as http:
        for stream in (False, True):
            resp = await http.post(anon.http_url + "/v1/completions", json={
                "model": "tiny", "prompt": "x", "max_tokens": 6, "stream": stream, **extension})
            assert resp.status_code == 200
            if stream:
                assert all("timeline" not in e for e in sse_events(resp.text)[:-1])
            else:
                assert "timeline" not in resp.json()


async def test_out_of_order_outputs_missing_timestamps_and_a_stop_string(anon, tokenizer):
    """Decode outputs overtake the first token; one carries no timestamps (the frontend's receipt time stands in);
    the prefill worker reports an unmeasured phase as 0 (absent); a stop string cuts the last output."""
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        task = asyncio.create_task(client.complete("x", max_tokens=20, stop="!"))
        request = await asyncio.to_thread(anon.cluster.wait_submit)
        t0 = request.arrival_time
        ids = text_ids(tokenizer, "abcdef!gh")
        pushed_at = time.time()
        anon.cluster.push(request, proto.TokenOutput(request_id=request.request_id, index=1, token_ids=ids[1:4],
                                                     finish_reason=None, timestamps=[],
                                                     events={"handoff_start": t0 + 1e-4, "handoff_end": t0 + 2e-4}))
        anon.cluster.push(request, proto.TokenOutput(request_id=request.request_id, index=4, token_ids=ids[4:],
                                                     finish_reason=None, timestamps=[t0 + 3e-4] * 5))
        anon.cluster.push(request, proto.TokenOutput(request_id=request.request_id, index=0, token_ids=ids[:1],
                                                     finish_reason=None, timestamps=[t0 + 5e-5], events={
            "admitted": t0 + 1e-5, "prefill_start": 0.0, "prefill_end": t0 + 5e-5, "unknown_phase": t0}))
        done = await task
    timeline = done.timeline
    assert done.text == "abcdef" and done.finish_reason == "stop"
    assert list(timeline) == ["arrival", "admitted", "prefill_end", "handoff_start", "handoff_end", "first_token",
                              "token_times", "finish", "finish_reason"]
    tokens = timeline["token_times"]
    assert len(tokens) == done.usage.completion_tokens == 7  # up to the token completing the stop string
    assert tokens[0] == t0 + 5e-5 and tokens[4:] == [t0 + 3e-4] * 3
    assert all(pushed_at <= t <= timeline["finish"] for t in tokens[1:4])  # receipt times
    assert timeline["finish_reason"] == "stop"


async def test_finish_log_line_has_ttft_mean_tbt_and_queueing(anon, tokenizer):
    workers = anon.cluster.responder = TimedWorkers(tokenizer, "abcdef")
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        done = await client.complete("x", max_tokens=6)
    request_id = anon.cluster.wait_submit().request_id
    tl = workers.expected(request_id)
    times = tl["token_times"]
    expected = (f"ttft={tl['first_token'] - tl['arrival']:.3f}s "
                f"tbt_mean={(times[-1] - times[0]) / (len(times) - 1):.3f}s "
                f"queueing={tl['admitted'] - tl['arrival']:.3f}s latency=")
    deadline = time.monotonic() + 5
    while f"req={request_id} finished" not in anon.log() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    line = next(line for line in anon.log().splitlines() if f"req={request_id} finished" in line)
    assert f"finish=length {expected}" in line, line
    assert done.timeline is not None
