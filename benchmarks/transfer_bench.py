"""``diptych bench transfer``: KV handoff of one prompt from a prefill engine to a decode pool in another process.

Paths, per prompt size:

- GPU to GPU (``engine.kv_transfer``, CUDA IPC): the decode process shares its pool; the prefill engine pushes each
  completed block while the next chunk computes, then the rest at the end. "Added" = time from the end of prefill
  until the KV is in place ("tail"); "added" = TTFT with the push running + tail - TTFT without any handoff,
  also as a share of the latter.
- ZeroMQ frames: ``Engine.export_kv`` (pinned device-to-host), frames over a ZeroMQ socket, ``import_blocks`` on the
  decode side (host-to-device). Added = all of it (nothing overlaps prefill).
- Plain copies of the same bytes: device-to-device on one GPU, and GPU to GPU in one process.
GB/s counts the KV bytes once.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from typing import TYPE_CHECKING

import torch

from diptych.benchmarks.common import build_model, environment, median, random_prompts, sync, table, write_json
from diptych.cluster.blocks import blocks_for
from diptych.engine.kv_cache import KVCachePool
from diptych.engine.kv_transfer import CUDA_IPC, FRAMES, KVPusher, select_path, share_pool
from diptych.proto.messages import KVLayout, SamplingParams

if TYPE_CHECKING:
    import zmq


def _receiver(device: str, layout: dict, num_blocks: int, dtype: str, endpoint: str, conn) -> None:
    """The decode side: a pool on ``device``, driven by commands over ``conn``."""
    pool = KVCachePool(KVLayout(**layout), num_blocks, getattr(torch, dtype), device)
    share = share_pool(pool) if pool.pool.device.type == "cuda" else None
    conn.send(share)
    socket: zmq.Socket[bytes] | None = None
    while True:
        command, arg = conn.recv()
        if command == "stop":
            break
        if command == "reserve":
            conn.send(pool.allocator.allocate(arg))
        elif command == "free":
            pool.allocator.free(arg)
            conn.send(True)
        elif command == "checksum":
            sync(device)
            conn.send(float(pool.pool[torch.tensor(arg, device=device)].double().sum()))
        elif command == "zmq":
            import zmq

            if socket is None:
                socket = zmq.Context.instance().socket(zmq.PULL)
                socket.bind(endpoint)
                conn.send("bound")
                continue
            frames = socket.recv_multipart(copy=False)
            pool.import_blocks(arg, frames[1:])
            sync(device)
            conn.send(time.perf_counter())


def run(args) -> dict:
    from diptych.benchmarks.engine_bench import make_engine

    device = args.prefill_device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    env = environment(device)
    mut = build_model(args.model, device, dtype)
    max_len = max(args.prompts) + 16
    engine = make_engine(mut, device, 1, kv_gb=max(1.0, 1.5 * max_len * mut.kv_bytes_per_token / 2**30),
                         max_model_len=max_len, token_budget=args.chunk, graphs=False)
    layout = engine.layout
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    decode_blocks = 2 * blocks_for(max_len, layout.block_size)
    proc = ctx.Process(target=_receiver, args=(args.decode_device, dataclasses.asdict(layout), decode_blocks,
                                               layout.dtype, args.zmq_endpoint, child), daemon=True)
    proc.start()
    try:
        share = parent.recv()
        path, reason = select_path(device, share)
        env.update(model=args.model, prefill_device=device, decode_device=args.decode_device, path=path,
                   path_reason=reason, chunk=args.chunk)
        kv = engine.kv
        if not isinstance(kv, KVCachePool):
            raise TypeError(f"the engine's KV pool is a {type(kv).__name__}, not a KVCachePool")
        pusher = KVPusher(kv, share) if path == CUDA_IPC else None
        zmq_ok = _zmq_setup(parent, args.zmq_endpoint)
        rows = [_point(engine, mut, parent, pusher, zmq_ok, n, args) for n in args.prompts]
        parent.send(("stop", None))
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
    result = {"environment": env, "rows": rows}
    write_json(args.json, result)
    print(format_report(result))
    return result


def _zmq_setup(conn, endpoint: str):
    try:
        import zmq
    except ImportError:
        return None
    conn.send(("zmq", None))
    conn.recv()
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


def _prefill(engine, prompt: list[int], request_id: str, handoff=None) -> tuple[float, float]:
    """Prefill ``prompt`` as a prefill-only request; returns (TTFT seconds, tail seconds after it)."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=2, ignore_eos=True), prefill_only=True)
    while engine.has_work():
        output = engine.step()
        if handoff is not None and request_id not in output.prefilled:
            handoff.advance(*engine.computed_blocks(request_id))
    ttft = time.perf_counter() - start
    tail = 0.0
    if handoff is not None:
        tail = handoff.finish(engine.computed_blocks(request_id)[0], len(prompt)).tail_s
    return ttft, tail


def _point(engine, mut, conn, pusher, zmq_socket, tokens: int, args) -> dict:
    device = engine.kv.pool.device
    prompt = random_prompts(1, tokens, mut.model.config.vocab_size, seed=tokens)[0]
    n_blocks = blocks_for(tokens, engine.block_size)
    nbytes = n_blocks * engine.kv.bytes_per_block
    row: dict = {"tokens": tokens, "kv_bytes": nbytes}
    ttfts, tails, added, raw, zmq_times, checks = [], [], [], [], [], []
    for rep in range(args.repeats + 1):
        rid = f"t{tokens}-{rep}"
        ttft, tail = _prefill(engine, prompt, rid)
        if pusher is not None:
            engine.release(rid)
            conn.send(("reserve", n_blocks))
            dst = conn.recv()
            ttft_pushed, tail = _prefill(engine, prompt, rid, pusher.start(dst))
            added.append(ttft_pushed + tail - ttft)
            src = engine.computed_blocks(rid)[0][:n_blocks]
            if rep == 0:
                conn.send(("checksum", dst))
                checks.append(abs(conn.recv() - float(engine.kv.pool[torch.tensor(src, device=device)].double().sum())))
            start = time.perf_counter()
            pusher.copy(src, dst)
            pusher.synchronize()
            raw.append(time.perf_counter() - start)
            conn.send(("free", dst))
            conn.recv()
        if zmq_socket is not None:
            conn.send(("reserve", n_blocks))
            dst = conn.recv()
            start = time.perf_counter()
            frames = engine.export_kv(rid)
            conn.send(("zmq", dst))
            zmq_socket.send_multipart([b"kv", *frames], copy=False)
            zmq_times.append(conn.recv() - start)
            conn.send(("free", dst))
            conn.recv()
        engine.release(rid)
        if rep:
            ttfts.append(ttft)
            tails.append(tail)
    row.update(ttft_s=median(ttfts), gpu_tail_s=median(tails) if pusher else None,
               gpu_added_s=median(added[1:]) if pusher else None,
               gpu_raw_GBps=nbytes / median(raw[1:]) / 1e9 if pusher else None,
               gpu_checksum_error=checks[0] if checks else None,
               zmq_s=median(zmq_times[1:]) if zmq_times else None)
    row["zmq_GBps"] = nbytes / row["zmq_s"] / 1e9 if row["zmq_s"] else None
    row.update(_plain_copies(nbytes, device, args.decode_device))
    return row


def _plain_copies(nbytes: int, device: torch.device, other_device: str) -> dict:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    same = torch.empty_like(src)
    out: dict[str, float | None] = {"d2d_GBps": nbytes / _time(lambda: same.copy_(src), device) / 1e9,
                                    "p2p_GBps": None}
    other = torch.device(other_device)
    if device.type == "cuda" and other.type == "cuda" and other.index != device.index and \
            (other.index or 0) < torch.cuda.device_count():
        remote = torch.empty(src.shape, dtype=src.dtype, device=other)
        out["p2p_GBps"] = nbytes / _time(lambda: remote.copy_(src), device, other) / 1e9
    return out


def _time(fn, *devices, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        for d in devices:
            sync(d)
        start = time.perf_counter()
        fn()
        for d in devices:
            sync(d)
        times.append(time.perf_counter() - start)
    return median(times)


def format_report(result: dict) -> str:
    env = result["environment"]
    head = (f"device {env['device']}, model {env['model']}, prefill {env['prefill_device']} -> decode "
            f"{env['decode_device']}, path {env['path']} ({env['path_reason']}), chunk {env['chunk']}, commit "
            f"{env['commit']}, {env['date']}")

    def ms(value):
        return value * 1e3 if value is not None else "-"

    def pct(value, ttft):
        return f"{100 * value / ttft:.2f}%" if value is not None else "-"

    rows = [[r["tokens"], r["kv_bytes"] / 1e6, ms(r["ttft_s"]), ms(r["gpu_tail_s"]), ms(r["gpu_added_s"]),
             pct(r["gpu_added_s"], r["ttft_s"]),
             r["gpu_raw_GBps"] or "-", ms(r["zmq_s"]), pct(r["zmq_s"], r["ttft_s"]), r["zmq_GBps"] or "-",
             r["d2d_GBps"], r["p2p_GBps"] or "-"] for r in result["rows"]]
    checks = [r["gpu_checksum_error"] for r in result["rows"] if r.get("gpu_checksum_error") is not None]
    if checks:
        head += f"; GPU push verified: |checksum difference| per prompt {checks}"
    return head + "\n\n" + table(
        ["prompt tokens", "KV MB", "TTFT ms (no handoff)", "GPU->GPU tail ms", "GPU->GPU added ms", "GPU->GPU added",
         "GPU->GPU GB/s",
         "ZeroMQ added ms", "ZeroMQ added", "ZeroMQ GB/s", "same-GPU copy GB/s", "GPU-GPU copy GB/s"], rows)


__all__ = ["run", "format_report", "FRAMES"]
