"""The frontend's coordinator link survives a message it cannot encode (the frontend used to exit on one)."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from diptych import proto
from diptych.proto.messages import Request, SamplingParams, SubmitRequest
from diptych.services.common.sockets import make_socket, recv_message
from diptych.services.frontend.coordinator_link import CoordinatorLink


def submit(request_id: str, stop: list[str]) -> SubmitRequest:
    return SubmitRequest(request=Request(
        request_id=request_id, client_id="c", prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4, stop=stop), arrival_time=0.0, stream_addr="inproc://stream"))


async def test_an_unencodable_submit_fails_its_request_and_the_next_message_still_goes_out():
    ctx = zmq.asyncio.Context()
    coordinator = make_socket(ctx, zmq.ROUTER, bind="inproc://coordinator-link-test")
    link = CoordinatorLink(ctx, "inproc://coordinator-link-test", "frontend-test")
    failed: list[proto.RequestFailed] = []
    tasks = [asyncio.create_task(link.run_receiver(failed.append))]
    await asyncio.sleep(0)  # the receiver registers the failure callback
    tasks.append(asyncio.create_task(link.run_sender()))
    try:
        link.post(submit("bad", ["a\ud800b"]))  # a lone surrogate cannot be encoded as UTF-8
        link.post(submit("good", ["stop"]))
        _, received = await asyncio.wait_for(recv_message(coordinator, routed=True), 5)
        assert isinstance(received, SubmitRequest) and received.request.request_id == "good"
        assert [(f.request_id, f.code) for f in failed] == [("bad", 400)]
        assert not any(task.done() for task in tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        coordinator.close(0)
        ctx.destroy(0)
