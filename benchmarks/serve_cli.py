"""The ``diptych bench serve`` command line: workload options, the target, the output file and the summary."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from diptych.workloads.catalog import add_workload_arguments, build_workload, workload_from_args

if TYPE_CHECKING:
    from diptych.benchmarks.serve_load import LoadTarget


def add_serve_parser(kinds: argparse._SubParsersAction) -> None:
    s = kinds.add_parser(
        "serve", help="open-loop load against a running Diptych (SDK or HTTP): timelines and a summary table",
        description="Send a workload to a running Diptych at its arrival times (open loop), keep every request's "
                    "timeline, write them to one JSON file and print the summary (TTFT, TBT per tier, scheduling "
                    "delay, goodput, throughput, per-client service, service differences).")
    s.set_defaults(run=run_serve)
    s.add_argument("--endpoint", default="tcp://127.0.0.1:5601",
                   help="SDK address (tcp://...) or HTTP base URL (http://...) of the frontend [%(default)s]")
    s.add_argument("--model", default=None, help="model name for HTTP requests [the server's first model]")
    s.add_argument("--client-keys", default=None,
                   help='JSON file {"<workload client id>": "<API key>"} so the server sees the workload clients')
    s.add_argument("--output", default="bench-serve.json", help="timelines file to write [%(default)s]")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one reply [%(default)s]")
    add_workload_arguments(s, qps=1.0, num_requests=200)
    s.set_defaults(max_context=None)
    s.epilog = ("Over HTTP, requests longer than the server's context (GET /v1/models: max_model_len) are clipped to "
                "it unless --max-context is given, and --max-tokens fills that context; over the SDK give "
                "--max-context for a small-context model (and for --max-tokens context). Each request also sends "
                "stop_after_tokens = its workload output length, so the output follows the workload whatever "
                "max_tokens the scheduler sees.")


def run_serve(args: argparse.Namespace) -> int:
    from diptych.benchmarks.serve_load import FAILURES, LoadTarget, load_client_keys, run_load
    from diptych.metrics.results import RunResult
    from diptych.metrics.summary import format_summary, summarize
    from diptych.metrics.timeline import save_timelines

    if not args.endpoint.startswith(("tcp://", "ipc://", "http://", "https://")):
        print(f"diptych bench serve: --endpoint must be tcp://, ipc:// or http(s)://, got {args.endpoint!r}",
              file=sys.stderr)
        return 2
    try:
        config = workload_from_args(args)
        target = LoadTarget(args.endpoint, load_client_keys(args.client_keys), args.model, args.timeout)
        if config.max_context is None and target.over_http:
            config.max_context = server_context(target)
            print(f"requests fitted to the server's context of {config.max_context} tokens", file=sys.stderr)
        specs = build_workload(config)
    except (ValueError, OSError) as exc:
        print(f"diptych bench serve: {exc}", file=sys.stderr)
        return 2
    try:
        timelines = asyncio.run(run_load(specs, target, seed=config.seed))
    except ValueError as exc:
        print(f"diptych bench serve: {exc}", file=sys.stderr)
        return 2
    if FAILURES:
        print(f"{sum(FAILURES.values())} requests failed or were refused:", file=sys.stderr)
        for reason, count in FAILURES.most_common(5):
            print(f"  {count} x {reason}", file=sys.stderr)
    meta = {"workload": config.name, "qps": config.qps, "endpoint": args.endpoint, "requests": len(specs),
            "max_tokens": config.max_tokens, "max_context": config.max_context}
    save_timelines(timelines, args.output, meta=meta)
    print(format_summary(summarize(RunResult.from_timelines(timelines, meta=meta))))
    print(f"timelines written to {args.output}")
    return 0


def server_context(target: LoadTarget) -> int:
    """The served model's context (tokens) from ``GET /v1/models``; sets ``target.model`` if unset."""
    import httpx

    key = next(iter(target.client_keys.values()), None)
    try:
        resp = httpx.get(f"{target.endpoint.rstrip('/')}/v1/models", timeout=10,
                         headers={"Authorization": f"Bearer {key}"} if key else {})
    except httpx.HTTPError as exc:
        raise ValueError(f"GET /v1/models failed: {exc}") from None
    if resp.status_code != 200:
        raise ValueError(f"GET /v1/models answered {resp.status_code}: {resp.text[:200]}")
    model = resp.json()["data"][0]
    target.model = target.model or model["id"]
    return int(model["max_model_len"])
