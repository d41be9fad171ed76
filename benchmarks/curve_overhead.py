"""What CURVE costs on the two hot paths, measured against the same run with CURVE off (``docs/benchmarks.md``).

- KV frames: one ``KVHandoff`` of a 2048-token prompt of a Mistral-7B-shaped model (32 layers, 8 KV heads of 128,
  bf16: 128 blocks of 16 tokens, 2 MiB each, 268 MB) from a PUSH socket to a KV ingress PULL socket made by
  ``make_socket`` exactly as the workers make them (two ZeroMQ contexts, tcp loopback), sent with ``send_message``
  and received with ``recv_authenticated``; the time from the send until the message is decoded.
- Token streaming: a real cluster (``Cluster``, ``--engine sim``: one prefill and one decode worker) streaming
  ``--streams`` concurrent SDK generations of ``--tokens`` tokens each (``diptych.client.AsyncClient``); output
  tokens per second over the whole run.

The clock is this script's ``time.perf_counter``, outside the code measured.
``diptych bench curve [--repeats 10] [--streams 16] [--tokens 512]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import zmq
import zmq.asyncio

from diptych import proto
from diptych.services.common.security import KeySet, ZapAuthenticator, generate_key_set
from diptych.services.common.sockets import KV_MAX_MSG_BYTES, make_socket, recv_authenticated, send_message

BLOCK_BYTES = 32 * 2 * 16 * 8 * 128 * 2
"""One 16-token KV block of a Mistral-7B-shaped model in bf16 (2 MiB)."""
PROMPT_TOKENS = 2048


async def kv_handoff_seconds(keys: KeySet | None, repeats: int) -> list[float]:
    server_ctx, client_ctx = zmq.asyncio.Context(), zmq.asyncio.Context()
    auth = ZapAuthenticator(server_ctx, keys) if keys is not None else None
    if auth is not None:
        auth.start()
    pull = make_socket(server_ctx, zmq.PULL, bind="tcp://127.0.0.1:0", max_msg_bytes=KV_MAX_MSG_BYTES,
                       security=keys.server("decode-0") if keys is not None else None)
    push = make_socket(client_ctx, zmq.PUSH, connect=pull.getsockopt_string(zmq.LAST_ENDPOINT),
                       security=keys.client("prefill-0", "decode-0") if keys is not None else None)
    blocks = [bytes(BLOCK_BYTES) for _ in range(PROMPT_TOKENS // 16)]
    request = proto.Request(request_id="bench", client_id="c", prompt_token_ids=list(range(PROMPT_TOKENS)),
                            sampling=proto.SamplingParams(max_tokens=1), arrival_time=0.0,
                            stream_addr="tcp://127.0.0.1:1")
    msg = proto.KVHandoff(request=request, first_token_id=1, first_token_time=0.0, num_tokens=PROMPT_TOKENS,
                          layout=proto.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16,
                                                dtype="bfloat16"), blocks=blocks)
    times = []
    try:
        for _ in range(repeats + 1):  # the first one also connects
            start = time.perf_counter()
            await send_message(push, msg)
            received = await recv_authenticated(pull)
            times.append(time.perf_counter() - start)
            assert isinstance(received.message, proto.KVHandoff), received.message
            assert received.user_id == ("prefill-0" if keys is not None else None)
        return times[1:]
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        if auth is not None:
            await auth.stop()
        server_ctx.term()
        client_ctx.term()


async def stream_tokens_per_s(insecure: bool, streams: int, tokens: int) -> float:
    from diptych.client import AsyncClient
    from diptych.launcher import Cluster, ClusterSpec, with_free_ports

    spec = with_free_ports(ClusterSpec(engine="sim", insecure_no_curve=insecure, log_level="WARNING"))
    with tempfile.TemporaryDirectory() as logs:
        cluster = Cluster(spec, log_dir=logs)
        cluster.start()
        try:
            await asyncio.to_thread(cluster.wait_ready, 180)
            async with AsyncClient(spec.sdk_addr) as client:
                await client.complete(prompt_token_ids=[1] * 16, max_tokens=8)  # warm up every path

                async def one() -> int:
                    count = 0
                    async for chunk in client.stream(prompt_token_ids=[1] * 64, max_tokens=tokens,
                                                     ignore_eos=True):
                        count += len(chunk.token_ids)
                    return count

                start = time.perf_counter()
                counts = await asyncio.gather(*(one() for _ in range(streams)))
                elapsed = time.perf_counter() - start
            assert all(c == tokens for c in counts), counts
            return sum(counts) / elapsed
        finally:
            cluster.stop()


def add_parser(kinds: argparse._SubParsersAction) -> None:
    """``diptych bench curve``."""
    p = kinds.add_parser("curve", help="what ZeroMQ CURVE costs on the KV frames path and on SDK token streaming",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)
    p.add_argument("--repeats", type=int, default=10, help="KV handoffs per run (median) [%(default)s]")
    p.add_argument("--streams", type=int, default=16, help="concurrent SDK streams [%(default)s]")
    p.add_argument("--tokens", type=int, default=512, help="tokens per stream [%(default)s]")
    p.add_argument("--skip-stream", action="store_true", help="measure the KV path only")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        keys = generate_key_set(tmp, ["coordinator", "frontend", "prefill-0", "decode-0"])
        mb = BLOCK_BYTES * PROMPT_TOKENS // 16 / 1e6
        for name, key_set in (("off", None), ("on", keys), ("off", None), ("on", keys)):
            times = asyncio.run(kv_handoff_seconds(key_set, args.repeats))
            median = statistics.median(times)
            print(f"KV frames, CURVE {name:>3}: {PROMPT_TOKENS} tokens, {mb:.0f} MB: median {median * 1e3:.1f} ms "
                  f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) = {mb / 1e3 / median:.2f} GB/s")
    if not args.skip_stream:
        for insecure in (True, False, True, False):
            rate = asyncio.run(stream_tokens_per_s(insecure, args.streams, args.tokens))
            print(f"SDK stream, CURVE {'off' if insecure else 'on':>3}: {args.streams} streams x {args.tokens} "
                  f"tokens: {rate:.0f} tokens/s")
    return 0
