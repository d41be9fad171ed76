"""``diptych profile``: measure engine iteration times over a grid and fit the simulator's cost model."""

from __future__ import annotations

import argparse

from diptych.commands.bench import _ints


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure iteration times and fit the simulator's cost model",
                       description="Time packed iterations (prefill tokens x decodes x context) of the engine, find "
                                   "the matmul tile quantum, fit sim.cost_model and write both as JSON.")
    p.set_defaults(run=run)
    p.add_argument("--model", default="mistral-7b-shape", help="as for 'bench engine' [%(default)s]")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu [%(default)s]")
    p.add_argument("--prefill", type=_ints0, default=[0, 128, 512, 1024, 2048], help="prefill tokens grid")
    p.add_argument("--decodes", type=_ints0, default=[0, 8, 32, 64, 128], help="decode counts grid")
    p.add_argument("--context", type=_ints, default=[256, 1024, 2048], help="context per decode grid")
    p.add_argument("--held-out", type=int, default=24, help="random off-grid points for the error [%(default)s]")
    p.add_argument("--sweep-step", type=int, default=16, help="tile sweep step in tokens [%(default)s]")
    p.add_argument("--sweep-max", type=int, default=1024, help="tile sweep up to this many tokens [%(default)s]")
    p.add_argument("--kv-gb", type=float, default=40.0, help="KV pool size in GiB [%(default)s]")
    p.add_argument("--out-dir", default="benchmarks/data", help="where the JSON files go [%(default)s]")


def _ints0(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from diptych.benchmarks import profile

    profile.run(args)
    return 0
