"""KV handoff between a prefill and a decode engine: GPU to GPU through CUDA IPC when both sit on GPUs of one host,
otherwise the ZeroMQ frame path (``Engine.export_kv`` -> frames -> ``Engine.add_prefilled``, through pinned memory).

GPU path ("push into a reservation", streamed chunk by chunk):

1. the decode worker publishes its pool once: ``share_pool(engine.kv)`` (a msgpack-able dict: host id, GPU UUID,
   CUDA IPC handle) in a control message;
2. the prefill worker calls ``select_path(engine.kv.pool.device, share)``; on ``cuda_ipc`` it opens the pool once
   (``KVPusher(engine.kv, share)``);
3. per request, once the decode side has reserved blocks (``Engine.reserve`` + ``Engine.reserved_blocks``), the
   prefill worker opens ``pusher.start(dst_blocks)`` and after every ``Engine.step`` calls
   ``handoff.advance(*engine.computed_blocks(request_id))``: every block whose positions are all computed is
   copied GPU to GPU on a side stream while the next chunk computes;
4. when the request is prefilled, ``handoff.finish(...)`` copies the rest, waits for the copies and returns a
   ``HandoffReport``; then the prefill worker releases its blocks and tells the decode worker (ZeroMQ control
   message), which calls ``Engine.add_prefilled(..., frames=None)``; on abort, ``handoff.abandon()`` waits for the
   copies already issued.

The decode worker must keep a reservation's blocks until the sender reports the push finished or abandoned, even if
the request is aborted meanwhile: the sender writes into them. Every selected path is logged with its reason; the
prefill worker counts handoffs per path (``services.worker.roles.kv_sender``), so no slow path is silent.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import torch

from diptych.cluster.blocks import blocks_for
from diptych.engine.kv_cache import KVCachePool
from diptych.proto.messages import HANDOFF_CUDA_IPC as CUDA_IPC, HANDOFF_FRAMES as FRAMES

log = logging.getLogger(__name__)


@dataclass
class HandoffReport:
    """One request's handoff: ``path``, bytes moved, copy calls, and ``tail_s``, the seconds from ``finish`` (the
    end of prefill) until the KV was in place."""

    path: str
    num_bytes: int
    copies: int
    tail_s: float


def host_id() -> str:
    """This machine: hostname plus boot id (two containers of one host share the boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share_pool(pool: KVCachePool) -> dict:
    """What a decode worker publishes so prefill workers on its host can write into its pool (CUDA pools only)."""
    tensor = pool.pool
    if tensor.device.type != "cuda":
        raise ValueError("only a CUDA pool can be shared")
    storage = tensor.untyped_storage()
    (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
     event_sync) = storage._share_cuda_()
    return {
        "host": host_id(), "device_uuid": device_uuid(tensor.device), "device_index": device,
        "handle": bytes(handle), "storage_size": size_bytes, "storage_offset": offset_bytes,
        "ref_handle": bytes(ref_handle), "ref_offset": ref_offset,
        "event_handle": bytes(event_handle) if event_handle else b"", "event_sync": bool(event_sync),
        "shape": list(tensor.shape), "stride": list(tensor.stride()), "offset": tensor.storage_offset(),
        "dtype": str(tensor.dtype).removeprefix("torch."),
    }


def select_path(local_device: torch.device | str, share: dict | None, peer: str = "") -> tuple[str, str]:
    """``(path, reason)``: ``cuda_ipc`` when the peer shared a CUDA pool on this host that this process sees under
    the same device index and can reach (same GPU or peer access), else ``zmq_frames``. Logged, naming ``peer``."""
    path, reason = _select(torch.device(local_device), share)
    log.info("KV handoff path%s: %s (%s)", f" to {peer}" if peer else "", path, reason)
    return path, reason


def _select(local: torch.device, share: dict | None) -> tuple[str, str]:
    if share is None:
        return FRAMES, "the decode worker shares no GPU pool"
    if local.type != "cuda" or not torch.cuda.is_available():
        return FRAMES, "this engine is not on a GPU"
    if share.get("host") != host_id():
        return FRAMES, "the decode worker is on another host"
    index = share.get("device_index", -1)
    if not 0 <= index < torch.cuda.device_count():
        return FRAMES, f"GPU {index} of the decode worker is not visible here"
    if device_uuid(torch.device("cuda", index)) != share.get("device_uuid"):
        return FRAMES, "GPU numbering differs between the workers (set the same CUDA_VISIBLE_DEVICES)"
    local_index = local.index if local.index is not None else torch.cuda.current_device()
    if local_index != index and not torch.cuda.can_device_access_peer(local_index, index):
        return FRAMES, f"no peer access from GPU {local_index} to GPU {index}"
    return CUDA_IPC, f"same host, GPU {local_index} -> GPU {index}"


def open_shared_pool(share: dict) -> torch.Tensor:
    """The peer's pool tensor, mapped into this process (on the peer's device)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dtype = getattr(torch, share["dtype"])
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(share["shape"]), tuple(share["stride"]), share["offset"],
        torch.UntypedStorage, dtype, share["device_index"], share["handle"], share["storage_size"],
        share["storage_offset"], False, share["ref_handle"], share["ref_offset"], share["event_handle"] or None,
        share["event_sync"],
    )


class KVPusher:
    """Copies blocks of ``local`` (this engine's pool) into a peer's shared pool. Blocks travel in groups of up to
    ``group_blocks``: gathered into a staging buffer on this GPU (side stream), one GPU-to-GPU copy into a staging
    buffer on the peer's GPU, scattered there into the peer's blocks. Three large copies per group instead of one
    small cross-device copy per block (whose per-copy synchronisation costs more than the bytes). The staging buffers
    (``group_blocks`` blocks each, 64 MiB for Mistral-7B with 16-token blocks) are allocated once, one of them by
    this process on the peer's GPU."""

    def __init__(self, local: KVCachePool, share: dict, group_blocks: int = 32) -> None:
        self.local = local
        self.remote = open_shared_pool(share)
        if tuple(self.remote.shape[1:]) != tuple(local.pool.shape[1:]) or self.remote.dtype != local.pool.dtype:
            raise ValueError(f"peer pool blocks {tuple(self.remote.shape[1:])} {self.remote.dtype} differ from "
                             f"ours {tuple(local.pool.shape[1:])} {local.pool.dtype}")
        self.device = local.pool.device
        self.remote_device = self.remote.device
        self.stream = torch.cuda.Stream(self.device)
        self.group = group_blocks
        shape = (group_blocks, *local.pool.shape[1:])
        self._src = torch.empty(shape, dtype=local.pool.dtype, device=self.device)
        self._dst = torch.empty(shape, dtype=local.pool.dtype, device=self.remote_device)

    def start(self, dst_blocks: list[int]) -> StreamingHandoff:
        return StreamingHandoff(self, dst_blocks)

    def copy(self, src_blocks: list[int], dst_blocks: list[int]) -> int:
        """Enqueue the copies (after the work already queued on the current stream); returns the number of
        GPU-to-GPU copies."""
        if not src_blocks:
            return 0
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        copies = 0
        with torch.cuda.stream(self.stream):
            # index copies on the streams that use them: the side stream here, the peer GPU's current stream there
            src_all = torch.tensor(src_blocks, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
            with torch.cuda.device(self.remote_device):
                dst_all = torch.tensor(dst_blocks, dtype=torch.long).pin_memory().to(self.remote_device,
                                                                                     non_blocking=True)
            for start in range(0, len(src_blocks), self.group):
                src = src_all[start:start + self.group]
                dst = dst_all[start:start + self.group]
                n = len(src)
                torch.index_select(self.local.pool, 0, src, out=self._src[:n])
                self._dst[:n].copy_(self._src[:n], non_blocking=True)  # orders both devices' streams
                with torch.cuda.device(self.remote_device):
                    self.remote.index_copy_(0, dst, self._dst[:n])
                copies += 1
        return copies

    def synchronize(self) -> None:
        """Wait until every enqueued copy has landed in the peer's pool."""
        self.stream.synchronize()
        torch.cuda.current_stream(self.remote_device).synchronize()


class StreamingHandoff:
    """One request's push: ``advance`` after each prefill step, ``finish`` once prefilled."""

    def __init__(self, pusher: KVPusher, dst_blocks: list[int]) -> None:
        self.pusher = pusher
        self.dst_blocks = list(dst_blocks)
        self.sent = 0
        self.copies = 0

    def advance(self, block_table: list[int], num_computed: int, final: bool = False) -> None:
        """Push the blocks completed since the last call (all covered blocks when ``final``)."""
        block_size = self.pusher.local.block_size
        ready = blocks_for(num_computed, block_size) if final else num_computed // block_size
        if ready > len(self.dst_blocks):
            raise ValueError(f"{ready} KV blocks to push, the decode side reserved {len(self.dst_blocks)}")
        if ready > self.sent:
            self.copies += self.pusher.copy(block_table[self.sent:ready], self.dst_blocks[self.sent:ready])
            self.sent = ready

    def finish(self, block_table: list[int], num_tokens: int) -> HandoffReport:
        """Push what is left of a prompt of ``num_tokens`` positions and wait until all of it has arrived."""
        started = time.perf_counter()
        self.advance(block_table, num_tokens, final=True)
        self.pusher.synchronize()
        return HandoffReport(CUDA_IPC, self.sent * self.pusher.local.bytes_per_block, self.copies,
                             time.perf_counter() - started)

    def abandon(self) -> None:
        """Stop pushing (the request was aborted): wait until the copies already issued have landed, so the
        decode side can reuse its blocks."""
        self.pusher.synchronize()

