"""``diptych bench engine`` and ``diptych bench transfer``: speed against HF transformers and the hardware floor;
``diptych bench serve``: load against a running Diptych (``benchmarks/serve_cli.py``); ``diptych bench replay``: the
slai-vs-sarathi setting on the real engine beside the simulator (``benchmarks/replay.py``); ``diptych bench
warm-start``: first-request TTFT right after a fresh ``diptych serve`` is up vs steady state
(``benchmarks/warm_start.py``)."""

from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the engine, the KV handoff, or a running server under load",
                       description="Benchmarks printing Markdown tables: ours vs HF transformers vs the floor.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")

    e = kinds.add_parser("engine", help="decode and prefill speed vs HF generate and the hardware floor")
    e.set_defaults(run=run_engine)
    e.add_argument("--model", default="mistral-7b-shape",
                   help="mistral-7b-shape (random bf16 weights built on the device), tiny, or a hub id/path "
                        "[%(default)s]")
    e.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu [%(default)s]")
    e.add_argument("--batches", type=_ints, default=[1, 16, 64, 128], help="decode batch sizes [1,16,64,128]")
    e.add_argument("--context", type=int, default=1024, help="prompt tokens per decode sequence [%(default)s]")
    e.add_argument("--steps", type=int, default=32, help="timed decode steps per batch [%(default)s]")
    e.add_argument("--hf-steps", type=int, default=16, help="HF generate decode steps per batch [%(default)s]")
    e.add_argument("--prefill-tokens", type=_ints, default=[512, 2048], help="prefill prompt sizes [512,2048]")
    e.add_argument("--chunk", type=int, default=512, help="chunk size for the chunked prefill row [%(default)s]")
    e.add_argument("--prefill-budget", type=int, default=8192,
                   help="token budget per iteration while filling decode batches [%(default)s]")
    e.add_argument("--kv-gb", type=float, default=24.0, help="KV pool size in GiB [%(default)s]")
    e.add_argument("--check-tokens", type=int, default=32,
                   help="greedy tokens compared with HF generate (0 skips) [%(default)s]")
    e.add_argument("--hf-generate-batch", type=int, default=64,
                   help="batch for HF's continuous-batching generate_batch (0 skips) [%(default)s]")
    e.add_argument("--skip-hf", action="store_true", help="do not run the HF baselines")
    e.add_argument("--no-graphs", action="store_true", help="disable CUDA graphs")
    e.add_argument("--no-fused-decode", action="store_true",
                   help="capture the Hugging Face modules instead of the fused decode forward")
    e.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")

    from diptych.benchmarks import curve_overhead
    from diptych.benchmarks.chat_burst import add_chat_burst_parser
    from diptych.benchmarks.replay import add_replay_parser
    from diptych.benchmarks.serve_cli import add_serve_parser
    from diptych.benchmarks.warm_start import add_warm_start_parser

    add_serve_parser(kinds)
    add_replay_parser(kinds)
    add_warm_start_parser(kinds)
    add_chat_burst_parser(kinds)
    curve_overhead.add_parser(kinds)

    t = kinds.add_parser("transfer", help="KV handoff: GPU-to-GPU (CUDA IPC) vs ZeroMQ frames vs a plain copy")
    t.set_defaults(run=run_transfer)
    t.add_argument("--model", default="mistral-7b-shape", help="as for 'bench engine' [%(default)s]")
    t.add_argument("--prefill-device", default="cuda:0", help="prefill engine device [%(default)s]")
    t.add_argument("--decode-device", default="cuda:1", help="decode pool device (a second process) [%(default)s]")
    t.add_argument("--prompts", type=_ints, default=[512, 2048, 8192], help="prompt sizes [512,2048,8192]")
    t.add_argument("--chunk", type=int, default=2048, help="prefill chunk (streaming granularity) [%(default)s]")
    t.add_argument("--repeats", type=int, default=3, help="repeats per point (median) [%(default)s]")
    t.add_argument("--zmq-endpoint", default="ipc:///tmp/diptych-bench-kv", help="ZeroMQ endpoint [%(default)s]")
    t.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")


def run_engine(args: argparse.Namespace) -> int:
    from diptych.benchmarks import engine_bench

    engine_bench.run(args)
    return 0


def run_transfer(args: argparse.Namespace) -> int:
    from diptych.benchmarks import transfer_bench

    transfer_bench.run(args)
    return 0
