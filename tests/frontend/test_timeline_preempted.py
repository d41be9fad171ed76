"""The ``preempted`` phase of a request's timeline: the decoding worker reports each preemption (its KV dropped under
memory pressure, then recomputed) on the output that follows it; the timeline shows how many and the first time, in
the client's timeline and the log's summary."""

from __future__ import annotations

import httpx

from diptych import proto
from diptych.services.frontend.timeline import Timeline
from tests.frontend.test_timeline import ORDER, TimedWorkers

T0 = 1_700_000_000.0


def output(index: int, events: dict) -> proto.TokenOutput:
    return proto.TokenOutput(request_id="r", index=index, token_ids=[7], timestamps=[T0 + index], events=events)


def test_preemptions_reported_on_later_outputs_add_up_and_keep_the_first_time():
    timeline = Timeline(arrival=T0)
    timeline.record(output(0, {"prefill_end": T0}), 1, T0)
    assert "preempted" not in timeline.as_dict() and "preempted" not in timeline.summary()
    timeline.record(output(1, {"preempted": T0 + 0.5, "preemptions": 2}), 1, T0 + 1)  # two since the last output
    timeline.record(output(2, {}), 1, T0 + 2)
    timeline.record(output(3, {"preempted": T0 + 2.5}), 1, T0 + 3)  # one, no count given
    timeline.close("length", T0 + 4)
    out = timeline.as_dict()
    assert out["preempted"] == {"count": 3, "first": T0 + 0.5}
    assert list(out) == ["arrival", "prefill_end", "first_token", "token_times", "preempted", "finish",
                         "finish_reason"]
    assert timeline.summary().endswith(" preempted=3")


def test_a_list_of_times_counts_one_each_and_bad_values_count_nothing():
    timeline = Timeline(arrival=T0)
    timeline.record(output(0, {"preempted": [T0 + 3, T0 + 1]}), 1, T0)
    timeline.record(output(1, {"preempted": 0.0}), 1, T0)  # "not measured"
    timeline.record(output(2, {"preempted": "soon"}), 1, T0)
    timeline.record(output(3, {"preempted": T0 + 4, "preemptions": -1}), 1, T0)
    assert timeline.as_dict()["preempted"] == {"count": 2, "first": T0 + 1}


class PreemptedWorkers(TimedWorkers):
    """``TimedWorkers`` whose decode worker reports one preemption on its second decode output."""

    def __call__(self, request: proto.Request) -> list[proto.TokenBatch]:
        batches = super().__call__(request)
        later = batches[2].outputs[0]
        self.preempted_at = later.timestamps[0] - 1e-4
        later.events = {"preempted": self.preempted_at}
        return batches


async def test_the_client_gets_the_preempted_phase(anon, tokenizer):
    workers = anon.cluster.responder = PreemptedWorkers(tokenizer, "Hello, world", per_batch=2)
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(anon.http_url + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "max_tokens": 12, "diptych": {"timeline": True}})
    assert resp.status_code == 200, resp.text
    timeline = resp.json()["timeline"]
    assert timeline["preempted"] == {"count": 1, "first": workers.preempted_at}
    assert [k for k in timeline if k != "preempted"] == [k for k in ORDER if k in timeline]
