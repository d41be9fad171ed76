"""``diptych simulate``: run a workload on a simulated cluster (the services' policies, virtual time), or search for
the highest load that meets a criterion (``--capacity``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diptych.workloads.catalog import WorkloadConfig


def register(sub: argparse._SubParsersAction) -> None:
    from diptych.sim.capacity import CRITERIA
    from diptych.sim.cli import add_cluster_arguments
    from diptych.workloads.catalog import add_workload_arguments

    p = sub.add_parser(
        "simulate", help="simulate a cluster serving a workload (discrete-event, same policies as the services)",
        description="Simulate a Diptych cluster in virtual time: the coordinator's admission policy, each worker's "
                    "batch policy and the pool policy are the services' own objects; iterations take the cost "
                    "model's time. Prints the run summary; --capacity searches for the highest load meeting a "
                    "criterion instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(run=run)
    add_workload_arguments(p)
    add_cluster_arguments(p)
    g = p.add_argument_group("run and output")
    g.add_argument("--until", type=float, default=None,
                   help="stop the simulation at this virtual time, seconds (requests still running are unfinished)")
    g.add_argument("--timelines", default=None, metavar="FILE",
                   help="write every request's timeline as JSON (metrics.timeline format)")
    g.add_argument("--record-tokens", action="store_true",
                   help="keep every token time in the timelines (memory grows with output tokens)")
    g.add_argument("--summary-json", default=None, metavar="FILE",
                   help="write the summary (or capacity search) as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = p.add_argument_group("capacity search")
    c.add_argument("--capacity", default=None, choices=sorted(CRITERIA),
                   help="binary-search --qps for the highest load meeting this criterion (slai: median TTFT < 0.5 s "
                        "and P99 TBT per tier; sarathi: P99 TBT per tier and median scheduling delay <= 2 s; "
                        "goodput90: 90%% of requests meet their SLOs)")
    c.add_argument("--qps-lo", type=float, default=0.25, help="lower end of the initial bracket")
    c.add_argument("--qps-hi", type=float, default=4.0, help="upper end of the initial bracket")
    c.add_argument("--tolerance", type=float, default=0.02, help="stop when the bracket is this fraction of its top")
    c.add_argument("--max-runs", type=int, default=14, help="most simulations in one search")


def _max_tokens_text(workload: WorkloadConfig) -> str:
    """``"max_tokens POLICY"``, with the context it fills (tokens) for a policy other than ``oracle``."""
    from diptych.workloads.max_tokens import ORACLE, parse_max_tokens

    context = workload.max_context if workload.max_context is not None else workload.model_context
    if parse_max_tokens(workload.max_tokens).kind == ORACLE or context is None:
        return f"max_tokens {workload.max_tokens}"
    return f"max_tokens {workload.max_tokens} (context {context})"


def run(args: argparse.Namespace) -> int:
    from diptych.metrics.summary import format_summary, kv_figures_text, summarize
    from diptych.sim.capacity import capacity_search
    from diptych.sim.cli import cluster_from_args
    from diptych.sim.config import replace
    from diptych.sim.simulator import simulate
    from diptych.workloads.catalog import build_workload, workload_from_args

    try:
        workload = workload_from_args(args)
        config = cluster_from_args(args)
        if args.record_tokens:
            config = replace(config, record_tokens=True)
        if args.until is not None and not args.until > 0:
            raise ValueError("--until must be > 0")
        if args.capacity and not 0 < args.qps_lo < args.qps_hi:
            raise ValueError("--qps-lo and --qps-hi must satisfy 0 < lo < hi")
        specs = build_workload(workload)
    except (ValueError, OSError) as exc:
        print(f"diptych simulate: {exc}", file=sys.stderr)
        return 2
    print(f"cluster: {json.dumps(config.describe())}")
    if args.capacity:
        def one(qps: float) -> dict:
            workload.qps = qps
            return summarize(simulate(config, build_workload(workload), args.until), fairness_metrics=False)

        def report(record: dict) -> None:
            kv = kv_figures_text(record["summary"])
            print(f"  {record['qps']:8.3f} req/s: {'pass' if record['ok'] else 'FAIL'}  ({record['reason']})"
                  + (f"  [{kv}]" if kv else ""), flush=True)

        started = time.perf_counter()
        print(f"capacity search ({args.capacity}) on {workload.name}, {_max_tokens_text(workload)}, "
              f"{len(specs)} requests per run:")
        found = capacity_search(one, args.capacity, args.qps_lo, args.qps_hi, args.tolerance, args.max_runs, report)
        print(f"capacity: {found.qps:.3f} req/s ({len(found.runs)} runs, {time.perf_counter() - started:.1f} s)")
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump({"capacity_qps": found.qps, "criterion": found.criterion, "runs": found.runs}, f,
                          indent=1, default=float)
        return 0
    print(f"workload: {workload.name}, {_max_tokens_text(workload)}, {len(specs)} requests over "
          f"{specs[-1].arrival_time:.1f} s")
    started = time.perf_counter()
    result = simulate(config, specs, args.until, progress=not args.no_progress)
    wall = time.perf_counter() - started
    summary = summarize(result)
    print(format_summary(summary))
    print(f"\nsimulated {result.end_time:.1f} s in {wall:.2f} s of wall time ({result.meta['events']} events)")
    if result.meta["pool_moves"]:
        print(f"pool moves: {len(result.meta['pool_moves'])}; final split "
              f"{result.meta['pool_history'][-1][1]}P:{result.meta['pool_history'][-1][2]}D")
    if args.timelines:
        from diptych.metrics.timeline import save_timelines

        save_timelines(result.to_timelines(), args.timelines,
                       meta={"source": "diptych simulate", "cluster": config.describe(), "workload": vars(workload)})
        print(f"timelines: {args.timelines}")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({"summary": summary, "cluster": config.describe(), "workload": vars(workload),
                       "wall_s": wall}, f, indent=1, default=float)
    return 0
