"""A worker survives a refused registration and registers again with backoff; its KV ingress takes a request's KV
only from the prefill worker the coordinator named for it."""

from __future__ import annotations

import asyncio

from diptych.proto.messages import KVPushAborted, RegisterAck, RegisterWorker, ReserveKV
from diptych.proto.roles import WorkerRole
from diptych.services.worker import worker as worker_module
from diptych.services.worker.roles.decode import DecodeRole
from tests.workers.test_role_composition import make_worker


async def test_a_refused_registration_is_retried_not_fatal(monkeypatch):
    monkeypatch.setattr(worker_module, "REGISTER_BACKOFF_S", (0.01, 0.02))
    worker, links = make_worker(WorkerRole.DECODE)
    worker._register_answer = asyncio.get_running_loop().create_future()
    await worker._register()
    worker._registering = asyncio.create_task(worker._register_until_accepted(sent=True))
    await worker._on_register_ack(RegisterAck(ok=False, error="refused"))  # logged, not raised
    await asyncio.sleep(0.1)
    assert not worker._registering.done()
    await worker._on_register_ack(RegisterAck(ok=True))
    await asyncio.wait_for(worker._registering, 1)
    assert len([m for m in links.control if isinstance(m, RegisterWorker)]) == 2


async def test_kv_only_from_the_named_prefill_worker():
    worker, _ = make_worker(WorkerRole.DECODE)
    decode = next(r for r in worker.roles if isinstance(r, DecodeRole))
    await decode.handle(ReserveKV(request_id="r1", num_blocks=1, prefill_worker_id="prefill-0"))
    assert decode._may_push("prefill-0", KVPushAborted(request_id="r1", worker_id="prefill-0"))
    assert not decode._may_push("prefill-1", KVPushAborted(request_id="r1", worker_id="prefill-1"))
    # nothing reserved for r2
    assert not decode._may_push("prefill-0", KVPushAborted(request_id="r2", worker_id="prefill-0"))
