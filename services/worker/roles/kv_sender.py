"""How a prefill worker hands a request's KV to its decode worker, and which path it takes.

- ``cuda_ipc`` when the decode worker shares its GPU pool (``PrefillTask.decode_kv_share``) and this engine can reach
  that GPU (same host, same device numbering, peer access: ``engine.kv_transfer.select_path``). The blocks are pushed
  GPU to GPU into the decode worker's reservation while prefill runs: after every iteration, each block whose
  positions are all computed (``advance``); the rest once the prompt is done (``finish``).
- ``zmq_frames`` otherwise: the KV is exported to pinned host memory and travels as frames of the ``KVHandoff``.

The path chosen for each decode worker is logged once with its reason, and a push that fails falls back to frames
with an error in the log. Every handoff is counted per path (``counts``, sent in heartbeats as
``WorkerLoad.handoffs``): no slow path is silent.

Invariant: once a push into a decode worker's blocks has started, it ends in exactly one of ``finish`` (every copy
has landed before the ``KVHandoff`` is sent) or ``abandon`` (the copies issued have landed and no more will be).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from diptych.engine.protocol import WorkerEngine
from diptych.proto.messages import HANDOFF_CUDA_IPC, HANDOFF_FRAMES

log = logging.getLogger("diptych.prefill")


class KVSender:
    """Owns the pushers to decode workers' pools and the pushes in flight. Its methods must run between iterations
    (the worker calls them from ``after_step`` of an output that needs the engine, or through ``engine_call``): they
    read the engine's block tables and issue copies behind its work."""

    def __init__(self, engine: WorkerEngine) -> None:
        self.engine = engine
        self._routes: dict[str, tuple[bytes, Any]] = {}
        """Decode worker id -> (the IPC handle it shared, a ``KVPusher`` into its pool or None for frames)."""
        self._pushes: dict[str, Any] = {}
        """Request id -> its ``StreamingHandoff``, from ``begin`` until ``finish`` or ``abandon``."""
        self.counts: dict[str, dict[str, float]] = {}

    def begin(self, request_id: str, decode_worker_id: str, share: dict, dst_blocks: list[int]) -> str:
        """Choose the path for a request about to be prefilled and, on ``cuda_ipc``, open its push into
        ``dst_blocks`` (the decode worker's reservation). Returns the path."""
        pusher = self._pusher(decode_worker_id, share) if share and dst_blocks else None
        if pusher is None:
            return HANDOFF_FRAMES
        self._pushes[request_id] = pusher.start(dst_blocks)
        return HANDOFF_CUDA_IPC

    def has_pushes(self) -> bool:
        return bool(self._pushes)

    def advance(self) -> None:
        """After an iteration: issue the copies of every block completed since the last call, for every push whose
        prefill has started. A failing push is dropped (its request falls back to frames at ``finish``)."""
        for request_id, push in list(self._pushes.items()):
            try:
                table, computed = self.engine.computed_blocks(request_id)
            except KeyError:
                continue  # still waiting for its first chunk
            try:
                push.advance(table, computed)
            except Exception as exc:  # noqa: BLE001  CUDA errors surface as RuntimeError; keep serving on the frame path
                self._drop(request_id, exc)

    def finish(self, request_id: str, num_tokens: int) -> tuple[str, list[Any]]:
        """The request is prefilled: complete its handoff and free its blocks here. Returns ``(path, frames)``:
        frames are empty on ``cuda_ipc`` (the KV is in place), the exported blocks on ``zmq_frames``."""
        started = time.perf_counter()
        push = self._pushes.pop(request_id, None)
        if push is not None:
            try:
                report = push.finish(self.engine.computed_blocks(request_id)[0], num_tokens)
            except Exception as exc:  # noqa: BLE001  any failure of the push: frames still work
                log.error("req=%s GPU-to-GPU KV push failed, sending frames instead: %r", request_id, exc)
            else:
                self.engine.release(request_id)
                self._count(HANDOFF_CUDA_IPC, report.num_bytes, report.tail_s)
                return HANDOFF_CUDA_IPC, []
        frames = self.engine.export_kv(request_id)
        self.engine.release(request_id)
        self._count(HANDOFF_FRAMES, sum(memoryview(f).nbytes for f in frames), time.perf_counter() - started)
        return HANDOFF_FRAMES, frames

    def abandon(self, request_id: str) -> None:
        """The request was aborted: stop its push, if any, once the copies already issued have landed."""
        push = self._pushes.pop(request_id, None)
        if push is not None:
            try:
                push.abandon()
            except Exception as exc:  # noqa: BLE001  logged; the request is aborted anyway
                log.error("req=%s waiting for an abandoned KV push failed: %r", request_id, exc)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {path: dict(entry) for path, entry in self.counts.items()}

    def _count(self, path: str, num_bytes: int, seconds: float) -> None:
        entry = self.counts.setdefault(path, {"requests": 0, "bytes": 0, "seconds": 0.0})
        entry["requests"] += 1
        entry["bytes"] += num_bytes
        entry["seconds"] += seconds

    def _drop(self, request_id: str, exc: Exception) -> None:
        log.error("req=%s GPU-to-GPU KV push failed, its KV will travel as frames: %r", request_id, exc)
        self.abandon(request_id)

    def _pusher(self, decode_worker_id: str, share: dict) -> Any:
        """The pusher into that decode worker's pool (opened once per shared pool), or None for the frame path."""
        handle = share.get("handle", b"")
        route = self._routes.get(decode_worker_id)
        if route is not None and route[0] == handle:
            return route[1]
        pusher = None
        pool = getattr(self.engine.kv, "pool", None)
        if pool is None:
            log.info("KV handoff path to %s: %s (this engine holds no KV tensors)", decode_worker_id, HANDOFF_FRAMES)
        else:
            from diptych.engine.kv_transfer import KVPusher, select_path  # imports torch: only engines with KV tensors

            if select_path(pool.device, share, decode_worker_id)[0] == HANDOFF_CUDA_IPC:
                try:
                    pusher = KVPusher(self.engine.kv, share)  # type: ignore[arg-type]  # has tensors: a KVCachePool
                except Exception as exc:  # noqa: BLE001  the peer pool cannot be opened: frames
                    log.error("KV handoff to %s: cannot open its GPU pool (%r); sending frames", decode_worker_id,
                              exc)
        self._routes[decode_worker_id] = (handle, pusher)
        return pusher
