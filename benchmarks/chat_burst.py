"""``diptych bench chat-burst``: many chat requests without ``max_tokens`` at once; are they all served?

A chat request without ``max_tokens`` may run to the end of the context. With KV memory on demand the server must
serve them all as their KV actually grows (waiting, or preempting by recompute, when the pool is full), never
answer a 500 for lack of KV. This benchmark starts ``diptych serve`` (any flags through ``--serve-arg``), sends
``--requests`` chat requests at once with prompt lengths drawn from a workload's length table (one byte-level
token per character with the built-in byte tokenizer), and reports per HTTP status how many came back, the most
sequences running at once and the preemptions (from ``/admin/status``, polled every ``--poll-s`` seconds), and the
latency spread. Each request's output length follows the table too, through the ``stop_after_tokens`` benchmark
knob (read only by the stop rule; the server never sees a ``max_tokens``); ``--free-running`` drops it, so outputs
end by EOS or at the context. ``--build-model DIR`` first writes a random-weight model in Mistral-7B's shape with the
byte tokenizer to DIR (on ``--device``, bf16), the model the GPU figures in docs/benchmarks.md use. Times are
seconds, measured by this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from diptych.benchmarks.served import ServerFailed, add_served_arguments, serve

FILLER = "the quick brown fox jumps over the lazy dog while paged attention keeps its blocks small. "


def add_chat_burst_parser(kinds: argparse._SubParsersAction) -> None:
    c = kinds.add_parser("chat-burst", help="many concurrent chat requests without max_tokens: all served?",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.set_defaults(run=run_chat_burst)
    c.add_argument("--model", default=None, help="model directory or hub id [built-in tiny model]")
    c.add_argument("--build-model", default=None, metavar="DIR",
                   help="write a random Mistral-7B-shaped model with the byte tokenizer to DIR first, and serve it")
    c.add_argument("--device", default="cuda", help="--device of diptych serve [%(default)s]")
    c.add_argument("--requests", type=int, default=48, help="chat requests sent at once [%(default)s]")
    c.add_argument("--lengths", default="sharegpt4", help="length table of prompts and outputs [%(default)s]")
    c.add_argument("--max-prompt", type=int, default=8000, help="longest prompt, characters [%(default)s]")
    c.add_argument("--free-running", action="store_true",
                   help="no stop_after_tokens: outputs end by EOS or at the context")
    c.add_argument("--seed", type=int, default=0, help="seed of the lengths [%(default)s]")
    c.add_argument("--poll-s", type=float, default=0.25, help="seconds between /admin/status polls [%(default)s]")
    add_served_arguments(c, 1800.0, "--serve-arg=--num-blocks --serve-arg=16000")


@dataclass
class Outcome:
    status: int
    seconds: float
    prompt_chars: int
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str = ""


@dataclass
class Peak:
    """The most of each quantity ``/admin/status`` showed at once (running sequences summed over workers) and the
    counters' last values."""

    running: int = 0
    waiting: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0
    refused_reservations: int = 0
    kv_used_fraction: float = 0.0


def build_model(path: str, device: str) -> str:
    import torch

    from diptych.benchmarks.common import MISTRAL_7B_SHAPE
    from diptych.engine.tiny_model import build_tiny_model

    shape = {k: v for k, v in MISTRAL_7B_SHAPE.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")}
    started = time.perf_counter()
    build_tiny_model(path, family="mistral", dtype=torch.bfloat16, device=device, **shape)
    print(f"built a random Mistral-7B-shaped model in {path} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return path


def burst_requests(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(prompt text, output length)`` per request, from the length table."""
    from diptych.workloads.catalog import length_distribution

    prompts, outputs = length_distribution(args.lengths).sample(args.requests, np.random.default_rng(args.seed))
    text = FILLER * (args.max_prompt // len(FILLER) + 1)
    return [(text[: min(int(p), args.max_prompt)], int(o)) for p, o in zip(prompts, outputs)]


async def one_chat(http: httpx.AsyncClient, model: str, prompt: str, output_len: int | None) -> Outcome:
    body: dict = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if output_len is not None:
        body.update(stop_after_tokens=output_len, ignore_eos=True)
    started = time.perf_counter()
    try:
        resp = await http.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return Outcome(0, time.perf_counter() - started, len(prompt), error=repr(exc))
    seconds = time.perf_counter() - started
    if resp.status_code != 200:
        return Outcome(resp.status_code, seconds, len(prompt), error=resp.text[:300])
    data = resp.json()
    return Outcome(200, seconds, len(prompt), data["usage"]["completion_tokens"], data["choices"][0]["finish_reason"])


async def watch(http: httpx.AsyncClient, peak: Peak, interval_s: float, done: asyncio.Event) -> None:
    while not done.is_set():
        try:
            workers = (await http.get("/admin/status")).json()["workers"].values()
        except (httpx.HTTPError, ValueError, KeyError):
            workers = []
        if workers:
            peak.running = max(peak.running, sum(w.get("running", 0) for w in workers))
            peak.waiting = max(peak.waiting, sum(w.get("waiting", 0) for w in workers))
            peak.preemptions = sum(w.get("preemptions", 0) for w in workers)
            peak.recomputed_tokens = sum(w.get("recomputed_tokens", 0) for w in workers)
            peak.refused_reservations = sum(w.get("refused_reservations", 0) for w in workers)
            used = max(1 - w["free_blocks"] / w["total_blocks"] for w in workers if w.get("total_blocks"))
            peak.kv_used_fraction = max(peak.kv_used_fraction, used)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), interval_s)


async def burst(url: str, args: argparse.Namespace) -> tuple[list[Outcome], Peak, float]:
    requests = burst_requests(args)
    peak = Peak()
    limits = httpx.Limits(max_connections=args.requests + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(http, peak, args.poll_s, done))
        started = time.perf_counter()
        outcomes = await asyncio.gather(*[one_chat(http, model, prompt, None if args.free_running else output)
                                          for prompt, output in requests])
        elapsed = time.perf_counter() - started
        await asyncio.sleep(args.poll_s * 2)  # the counters of the last iterations
        done.set()
        await watcher
    return list(outcomes), peak, elapsed


def report(outcomes: list[Outcome], peak: Peak, elapsed: float) -> dict:
    statuses = Counter(o.status for o in outcomes)
    served = [o for o in outcomes if o.status == 200]
    median = statistics.median(o.seconds for o in served) if served else None
    longest = max((o.seconds for o in served), default=None)
    errors = sorted({o.error for o in outcomes if o.error})[:5]
    result: dict[str, object] = {
        "requests": len(outcomes), "by_status": dict(sorted(statuses.items())), "elapsed_s": elapsed,
        "output_tokens": sum(o.output_tokens for o in served),
        "finish_reasons": dict(Counter(o.finish_reason for o in served)), "peak": asdict(peak),
        "latency_s": {"median": median, "max": longest}, "errors": errors,
    }
    print(f"requests:               {len(outcomes)} sent at once, {elapsed:.1f} s until the last answer")
    print(f"answers by HTTP status: {', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))}")
    print(f"output tokens served:   {result['output_tokens']} (finish reasons {result['finish_reasons']})")
    print(f"peak running sequences: {peak.running} (peak waiting {peak.waiting}); peak KV in use "
          f"{100 * peak.kv_used_fraction:.0f}%")
    print(f"preemptions:            {peak.preemptions} ({peak.recomputed_tokens} positions recomputed); "
          f"reservations refused and retried: {peak.refused_reservations}")
    if median is not None and longest is not None:
        print(f"latency:                median {median:.1f} s, max {longest:.1f} s")
    for error in errors:
        print(f"error: {error}")
    return result


def run_chat_burst(args: argparse.Namespace) -> int:
    if args.requests < 1:
        print("diptych bench chat-burst: --requests must be >= 1", file=sys.stderr)
        return 2
    model = build_model(args.build_model, args.device) if args.build_model else args.model
    serve_args = ["--device", args.device, *(["--model", model] if model else []), *args.serve_arg]
    try:
        with serve(serve_args, args.startup_timeout, args.server_log) as served:
            outcomes, peak, elapsed = asyncio.run(burst(served.url, args))
    except ServerFailed as exc:
        print(f"diptych bench chat-burst: {exc}", file=sys.stderr)
        return 1
    result = report(outcomes, peak, elapsed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(o.status == 200 for o in outcomes) else 1
