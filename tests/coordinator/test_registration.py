"""With CURVE, registration is idempotent for the worker itself and refusals reveal nothing."""

from __future__ import annotations

from typing import Any

from diptych.launcher import free_port_block
from diptych.proto.messages import KVLayout, RegisterAck, RegisterWorker, WorkerLoad
from diptych.services.common.security import generate_key_set
from diptych.services.coordinator.config import CoordinatorConfig
from diptych.services.coordinator.server import Coordinator

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16, dtype="float32")


def registration(worker_id: str, model: str = "/models/secret-path", layout: KVLayout = LAYOUT) -> RegisterWorker:
    return RegisterWorker(worker_id=worker_id, role="decode", model=model, layout=layout, kv_addr="tcp://h:1",
                          load=WorkerLoad(free_blocks=64, total_blocks=64, num_waiting=0, num_running=0,
                                          waiting_prompt_tokens=0), max_model_len=128)


async def test_registering_again_replaces_the_entry_and_refusals_say_nothing(tmp_path):
    keys = generate_key_set(tmp_path, ["coordinator", "frontend", "decode-0", "decode-1"])
    coordinator = Coordinator(CoordinatorConfig(address=f"tcp://127.0.0.1:{free_port_block(1)}"), keys=keys)
    sent: list[tuple[bytes, Any]] = []

    async def record(identity: bytes, msg: Any) -> bool:
        sent.append((identity, msg))
        return True

    coordinator._send = record  # type: ignore[method-assign]
    try:
        await coordinator.handle(b"decode-0", registration("decode-0"), "decode-0")
        await coordinator.handle(b"decode-0", registration("decode-0"), "decode-0")  # a lost ack, a restart
        await coordinator.handle(b"decode-1", registration("decode-0"), "decode-1")  # not its own id
        other = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=16, dtype="float32")
        await coordinator.handle(b"decode-1", registration("decode-1", layout=other), "decode-1")
        acks = [msg for _, msg in sent if isinstance(msg, RegisterAck)]
        assert [a.ok for a in acks] == [True, True, False, False]
        assert {a.error for a in acks[2:]} == {"refused"}  # no model path, no layout
        assert list(coordinator.workers.workers) == ["decode-0"]
    finally:
        coordinator.sock.close(linger=0)
        assert coordinator.authenticator is not None
        coordinator.authenticator.close()
        coordinator.ctx.term()
