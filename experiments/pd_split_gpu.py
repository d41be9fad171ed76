"""``pd-split-gpu``: the ``pd-split`` question on real devices. Served cluster layouts of 2 or 4 GPUs, each run
beside the simulator's prediction of the same requests on the same layout.

2 GPUs: 1 prefill + 1 decode worker (``1p1d``), 2 colocated workers, 2 flex workers under RAD; workloads
``sharegpt4`` and ``azure-code``, each at three rates per layout: 0.6x, 1.0x and 1.4x the goodput90 capacity the
simulator predicts for that layout and workload (below, near, above). 4 GPUs: static splits 1:3, 2:2, 3:1,
4 colocated, 4 flex under RAD, on the ``pd-split`` experiment's shifting workload (conversation, then code) at one
rate: 90% of the smaller of the two phases' best static capacities (``pd_split.shift_load``), for
``--shift-seconds`` of arrivals; RAD's moves are polled from ``/admin/status`` and plotted against time beside the
arrival rate.

Per layout one ``diptych serve`` runs (one worker per GPU; every worker Sarathi with a 512-token budget and up to
256 sequences) and the loads of that layout are sent to it one after the other (``diptych bench serve``'s load
generator, over HTTP). Per load the report gives TTFT p50/p99, TBT p99, goodput and SLO attainment, served and
simulated; the handoff share of TTFT per prompt-length bucket; the KV handoff counters per transfer path; RAD's
moves with their reasons; and which layouts each side ranks first.

Expected run time with a Mistral-7B-shaped model on H200s (estimates, not measurements): 2 GPUs, 3 server starts
of 1-2 min and 18 loads of ``--requests`` 300 (0.5-2 min each): about 30-45 min; 4 GPUs, 5 starts and 5 loads of
``--shift-seconds`` 240 plus draining: about 35-50 min. The simulator's capacity searches add a few minutes
(``--jobs`` in parallel). ``--quick`` (one workload, one small rate per layout, a few requests) runs the whole
pipeline in minutes, also on ``--device cpu`` with the built-in tiny model, whose numbers mean nothing beside the
H200 prediction.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from diptych.benchmarks.served import ServerFailed
from diptych.experiments import pd_split, pd_split_gpu_report as report, pd_split_gpu_runs as runs
from diptych.experiments.common import parallel_map, pyplot, write_markdown
from diptych.workloads.max_tokens import DEFAULT_MAX_TOKENS, MAX_TOKENS_HELP

NAME = report.NAME
HELP = "served P/D layouts on 2 or 4 GPUs beside the simulator's prediction (TTFT, TBT, goodput, handoffs, RAD)"
WORKLOADS_2 = ("sharegpt4", "azure-code")
RATE_LEVELS = (("below", 0.6), ("near", 1.0), ("above", 1.4))
"""Rates of a 2-GPU layout, as factors of its simulated goodput90 capacity."""
QUICK_QPS, QUICK_REQUESTS, QUICK_CONTEXT = 1.0, 6, 256
"""--quick: one rate (req/s), requests per load, and the context (tokens) requests are fitted into."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--gpus", type=int, default=2, help="2 or 4: one worker per GPU [%(default)s]")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, metavar="DIR", help="model directory [built-in tiny model]")
    model.add_argument("--build-model", default=None, metavar="DIR",
                       help="write a random Mistral-7B-shaped bf16 model with the byte tokenizer to DIR, serve it")
    p.add_argument("--device", default="cuda", help="cuda (cuda:0 .. cuda:GPUS-1) or cpu [%(default)s]")
    p.add_argument("--requests", type=int, default=300, help="requests per 2-GPU load [%(default)s]")
    p.add_argument("--shift-seconds", type=float, default=240.0,
                   help="seconds of arrivals of the 4-GPU shifting load [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="workload seed [%(default)s]")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target, s [%(default)s]")
    p.add_argument("--tbt-slo", type=float, default=0.1, help="TBT target (per-request P99), s [%(default)s]")
    p.add_argument("--cost-model", default="h200-mistral-7b", help="simulator cost model [%(default)s]")
    p.add_argument("--rad-dwell", type=float, default=5.0, help="RAD min_dwell_s, served and simulated [%(default)s]")
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between /admin/status polls [%(default)s]")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to come up")
    p.add_argument("--server-logs", default=None, metavar="DIR", help="keep each server's output in DIR")
    p.add_argument("--max-tokens", default=DEFAULT_MAX_TOKENS, metavar="oracle|N|context",
                   help=f"{MAX_TOKENS_HELP}; the context is the served model's [%(default)s]")


def _validate(args: argparse.Namespace) -> list[str]:
    """The devices of the workers; ``ValueError`` with a clear message on a bad argument."""
    runs.layouts(args.gpus)
    if args.requests < 1 or args.shift_seconds <= 0 or args.poll_s <= 0:
        raise ValueError("--requests, --shift-seconds and --poll-s must be positive")
    if args.ttft_slo <= 0 or args.tbt_slo <= 0:
        raise ValueError("--ttft-slo and --tbt-slo must be positive")
    if args.model and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: not a directory")
    return runs.devices(args.device, args.gpus)


def _plan(args: argparse.Namespace, max_tokens: str) -> tuple[list[str], dict[tuple[str, str], list], str]:
    """Workloads, the (level, req/s) loads per (layout, workload), and a sentence saying how the rates were set."""
    layouts = runs.layouts(args.gpus)
    workloads = [WORKLOADS_2[0]] if args.gpus == 2 else [pd_split.SHIFT]
    if args.quick:
        loads = {(lay.name, w): [("quick", QUICK_QPS)] for lay in layouts for w in workloads}
        return workloads, loads, f"--quick: {QUICK_QPS:g} req/s, {QUICK_REQUESTS} requests per load."
    slo = (args.ttft_slo, args.tbt_slo)
    common = {"cost_model": args.cost_model, "rad_dwell": args.rad_dwell, "slo": slo, "max_tokens": max_tokens,
              "seed": args.seed}
    if args.gpus == 2:
        workloads = list(WORKLOADS_2)
        jobs = [{**common, "layout": lay, "workload": w} for lay in layouts for w in workloads]
        found = parallel_map(runs.capacity, jobs, args.jobs, "simulated capacities", progress=not args.no_progress)
        cap = {(c["layout"], c["workload"]): c["capacity"] for c in found}
        loads = {key: [(level, f * c) for level, f in RATE_LEVELS] for key, c in cap.items() if c > 0}
        missing = sorted(key for key, c in cap.items() if c <= 0)
        if missing:
            raise ValueError(f"the simulator found no load meeting the goodput criterion for {missing}")
        note = ("per layout and workload, " + ", ".join(f"{level} = {f:g}x" for level, f in RATE_LEVELS)
                + " the goodput90 capacity the simulator predicts: " + ", ".join(
                    f"{lay} on {w} {c:.2f} req/s" for (lay, w), c in cap.items()) + ".")
        return workloads, loads, note
    statics = [lay for lay in layouts if ":" in lay.sim_name]
    jobs = [{**common, "layout": lay, "workload": phase} for lay in statics for phase in ("azure-conv", "azure-code")]
    found = parallel_map(runs.capacity, jobs, args.jobs, "simulated capacities", progress=not args.no_progress)
    by = {(c["workload"], args.gpus, c["layout"]): {"capacity": c["capacity"]} for c in found}
    qps = pd_split.shift_load(by, args.gpus, args.cost_model, max_tokens)
    loads = {(lay.name, pd_split.SHIFT): [("shift", qps)] for lay in layouts}
    note = (f"{qps:.2f} req/s for {args.shift_seconds:g} s: 90% of the smaller of the two phases' best static "
            "goodput90 capacities in the simulator (" + ", ".join(
                f"{lay} on {w} {v['capacity']:.2f}" for (w, _, lay), v in by.items()) + ").")
    return workloads, loads, note


def _layout_runs(job: dict[str, Any]) -> list[dict]:
    """Every load of one layout against one server; the server's output goes to ``job['log']``."""
    from diptych.benchmarks.serve_cli import server_context
    from diptych.benchmarks.serve_load import LoadTarget
    from diptych.benchmarks.served import serve

    args, layout = job["args"], job["layout"]
    out = []
    serve_args = runs.serve_args(layout, job["devices"], job["model"], args.rad_dwell)
    with serve(serve_args, args.startup_timeout, job["log"]) as served:
        context = server_context(LoadTarget(served.url, {}))
        if args.quick:
            context = min(context, QUICK_CONTEXT)
        for workload, level, qps in job["loads"]:
            if args.quick:
                count = QUICK_REQUESTS
            elif workload == pd_split.SHIFT:
                count = max(1, int(qps * args.shift_seconds))
            else:
                count = args.requests
            specs = runs.workload_specs(workload, qps, count, (args.ttft_slo, args.tbt_slo), job["max_tokens"],
                                        context, args.seed)
            print(f"{layout.name}: {workload} at {qps:.2f} req/s ({count} requests)", file=sys.stderr)
            timelines, log, before = asyncio.run(runs.served_load(served.url, specs, args.seed, args.poll_s,
                                                                  not args.no_progress))
            served_summary = runs.served_summary(timelines, log, before)
            sim = runs.predict(layout, specs, args.cost_model, args.rad_dwell, context)
            out.append({"layout": layout.name, "workload": workload, "level": level, "qps": qps,
                        "requests": len(specs), "served": served_summary, "sim": sim,
                        "arrivals": [s.arrival_time for s in specs]})
    return out


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option that changes its results)."""
    parts = ["diptych", "experiment", NAME, "--gpus", str(args.gpus), "--device", args.device]
    if args.model or args.build_model:
        parts += ["--model", args.model] if args.model else ["--build-model", args.build_model]
    if args.quick:
        parts.append("--quick")
    parts += ["--requests", str(args.requests), "--shift-seconds", f"{args.shift_seconds:g}", "--seed",
              str(args.seed), "--max-tokens", str(args.max_tokens), "--ttft-slo", f"{args.ttft_slo:g}",
              "--tbt-slo", f"{args.tbt_slo:g}", "--cost-model", args.cost_model, "--rad-dwell",
              f"{args.rad_dwell:g}", "--out-dir", args.out_dir]
    return shlex.join(parts)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace, out_dir: Path) -> list[Path]:
    from diptych.workloads.max_tokens import parse_max_tokens

    device_list = _validate(args)
    max_tokens = str(parse_max_tokens(args.max_tokens))
    model = args.model
    if args.build_model:
        from diptych.benchmarks.chat_burst import build_model

        model = build_model(args.build_model, "cpu" if args.device == "cpu" else device_list[0])
    workloads, loads, rates_note = _plan(args, max_tokens)
    log_dir = Path(args.server_logs) if args.server_logs else Path(tempfile.mkdtemp(prefix="pd-split-gpu-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    failed: dict[str, str] = {}
    for layout in runs.layouts(args.gpus):
        mine = [(w, level, qps) for w in workloads for level, qps in loads[(layout.name, w)]]
        log = log_dir / f"{layout.name.replace(' ', '-')}.log"
        try:
            results += _layout_runs({"args": args, "layout": layout, "devices": device_list, "model": model,
                                     "max_tokens": max_tokens, "loads": mine, "log": str(log)})
        except ServerFailed as exc:  # the other layouts still run; the report names this one
            print(f"{layout.name}: {exc}", file=sys.stderr)
            failed[layout.name] = f"the server did not come up (its output: {log})"
    if not results:
        raise ValueError(f"no layout could be served; the servers' output is in {log_dir}")
    meta = {"gpus": args.gpus, "cost_model": args.cost_model, "command": _command(args),
            "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_names": runs.device_names(device_list), "model": model or "built-in tiny model",
            "ttft_slo": args.ttft_slo, "tbt_slo": args.tbt_slo, "rates_note": rates_note, "failed": failed}
    files, figures = [], []
    plt = pyplot()
    if plt is not None:
        files.append(report.plot_goodput(plt, out_dir, results, workloads))
        rad = [r for r in results if "RAD" in r["layout"]]
        if args.gpus == 4 and rad:
            files.append(report.plot_moves(plt, out_dir, rad[0], rad[0]["arrivals"], args.gpus))
        figures = [f.name for f in files]
    raw = out_dir / f"{NAME}.json"
    raw.write_text(json.dumps({"meta": meta, "runs": results}, indent=1, default=str))
    files.append(raw)
    files.append(write_markdown(out_dir, NAME, report.report(meta, results, workloads, figures)))
    print(f"servers' output: {log_dir}", file=sys.stderr)
    return files
