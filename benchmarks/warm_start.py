"""``diptych bench warm-start``: does the first request after "Diptych is up" run as fast as the ones after it?

Starts ``diptych serve`` (default ``--device cuda``, no KV flags, so the workers size their pools themselves) on free
ports, reads each worker's KV pool size in tokens from the log, sends one chat request without ``max_tokens`` as
soon as the banner is printed, then ``--requests`` more, one at a time, and prints the first request's TTFT beside
the median TTFT of the others (steady state) and their ratio. Times in seconds. Runs on CPU with the tiny model too
(``--device cpu`` without ``--model``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import httpx

from diptych.benchmarks.served import ServerFailed, ServerLog, add_served_arguments, serve

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def add_warm_start_parser(kinds: argparse._SubParsersAction) -> None:
    w = kinds.add_parser("warm-start", help="first-request TTFT right after 'up' vs steady state (starts a server)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.set_defaults(run=run_warm_start)
    w.add_argument("--model", default=None, help="model directory or hub id [built-in tiny model]")
    w.add_argument("--device", default="cuda", help="--device of diptych serve [%(default)s]")
    w.add_argument("--requests", type=int, default=10, help="requests after the first one [%(default)s]")
    w.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens of the steady-state requests [none, like the first request]")
    add_served_arguments(w, 300.0, "--serve-arg=--prefill-workers --serve-arg=2")


def chat_ttft(http: httpx.Client, model: str, max_tokens: int | None) -> tuple[float, int]:
    """Stream one chat request to its end; (seconds to the first event, events with content). The first event
    comes with the first token (the frontend sends nothing before it), even when that token is EOS."""
    body: dict = {"model": model, "messages": PROMPT, "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"chat request answered {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - started
            choices = json.loads(line[6:]).get("choices") or []
            chunks += bool(choices and choices[0].get("delta", {}).get("content"))
    if first is None:
        raise RuntimeError("the chat request's stream was empty")
    return first, chunks


def run_warm_start(args: argparse.Namespace) -> int:
    if args.requests < 1:
        print("diptych bench warm-start: --requests must be >= 1", file=sys.stderr)
        return 2
    serve_args = ["--device", args.device, *(["--model", args.model] if args.model else []), *args.serve_arg]
    try:
        with serve(serve_args, args.startup_timeout, args.server_log) as served:
            with httpx.Client(base_url=served.url, timeout=args.request_timeout) as http:
                model = http.get("/v1/models").json()["data"][0]["id"]
                first, first_chunks = chat_ttft(http, model, None)
                steady = [chat_ttft(http, model, args.max_tokens)[0] for _ in range(args.requests)]
            result = report(served.log, served.started, first, first_chunks, steady)
    except ServerFailed as exc:
        print(f"diptych bench warm-start: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def report(log: ServerLog, started: float, first: float, first_chunks: int, steady: list[float]) -> dict:
    """Print the comparison; returns it as a dict."""
    median = statistics.median(steady)
    pools = log.pool_tokens()
    result = {"startup_s": (log.up_at or started) - started, "kv_pool_tokens": pools,
              "first_ttft_s": first, "first_output_chunks": first_chunks, "steady_ttft_median_s": median,
              "steady_ttft_s": steady, "first_over_steady": first / median if median > 0 else float("inf")}
    print(f"startup to 'up':          {result['startup_s']:.1f} s")
    print(f"KV pool per worker:       {', '.join(str(t) for t in pools) or '?'} tokens")
    print(f"first request TTFT:       {first * 1e3:.1f} ms ({first_chunks} output chunks)")
    print(f"steady-state TTFT median: {median * 1e3:.1f} ms over {len(steady)} requests")
    print(f"first / steady:           {result['first_over_steady']:.2f}x")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diptych.benchmarks.warm_start")
    add_warm_start_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["warm-start", *(argv if argv is not None else sys.argv[1:])])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
