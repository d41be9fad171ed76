"""``vtc-fairness``: the VTC paper's multi-client scenarios under FCFS, LCF, VTC (weighted where clients have
weights) and an RPM limit; service-difference curves over time and Table-2 style metrics.

Setup (the VTC paper's scale): one colocated worker with the ``a10g-llama-2-7b`` cost model (an A10G with
Llama-2-7B: 24 GB, about 15k tokens of KV), Sarathi batching (512-token budget), the coordinator reserving each
request's KV at placement and keeping at most 4096 prompt tokens queued on the worker (the services' defaults), so
requests queue in the coordinator, where the admission policy decides who is served next. Each scenario runs for its
duration (600 s; ``dist_shift`` 900 s) and stops; requests still queued then are left unfinished. RPM admits at most
``--rpm-limit`` requests per client per minute (the paper's RPM baseline; its limit is ours).

Published (``workloads.md``): in ``overload`` VTC's service gap stayed between 1.1k and 9.1k weighted tokens while
FCFS's grew to 235k by 540 s (per-client service VTC 684/668 tok/s, FCFS 437/876).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from diptych.experiments.common import (
    add_max_tokens_argument,
    md_table,
    parallel_map,
    parse_names,
    pyplot,
    save_figure,
    write_markdown,
)

NAME = "vtc-fairness"
HELP = "VTC scenarios under FCFS, LCF, VTC and RPM: service differences over time, Table-2 metrics"
POLICIES = ("fcfs", "lcf", "vtc", "rpm")
QUICK_SCENARIOS = ("overload", "on_off_overload", "weighted")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diptych.workloads.vtc import SCENARIOS

    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated VTC scenarios [all: %(default)s]")
    p.add_argument("--policies", default=",".join(POLICIES), help="admission policies [%(default)s]")
    p.add_argument("--duration", type=float, default=None, help="seconds per scenario [600; dist_shift 900]")
    p.add_argument("--rpm-limit", type=int, default=60, help="RPM baseline: requests per client per minute [60]")
    p.add_argument("--cost-model", default="a10g-llama-2-7b", help="cost model preset or file [%(default)s]")
    p.add_argument("--token-budget", type=int, default=512, help="Sarathi token budget [%(default)s]")
    add_max_tokens_argument(p, NAME)


def _job(job: dict[str, Any]) -> dict[str, Any]:
    from diptych.metrics.fairness import service_difference, table2_metric, window_service
    from diptych.metrics.summary import summarize
    from diptych.sim.cli import simulated_context
    from diptych.sim.config import ClusterConfig, PolicySpec
    from diptych.sim.cost_model import resolve
    from diptych.sim.simulator import simulate
    from diptych.workloads.max_tokens import apply_max_tokens
    from diptych.workloads.vtc import DEFAULT_DURATION_S, vtc_scenario

    duration = job["duration"] or DEFAULT_DURATION_S.get(job["scenario"], 600.0)
    knobs = {"limit": job["rpm_limit"]} if job["policy"] == "rpm" else {}
    config = ClusterConfig(prefill_workers=0, decode_workers=0, colocated_workers=1,
                           cost_model=resolve(job["cost_model"]), admission=PolicySpec(job["policy"], knobs),
                           colocated_policy=PolicySpec("sarathi", {"token_budget": job["token_budget"]}),
                           colocated_reserve=True, max_prefill_backlog_tokens=4096)
    specs = apply_max_tokens(vtc_scenario(job["scenario"], duration, seed=0), job["max_tokens"],
                             simulated_context(config))
    result = simulate(config, specs, until=duration)
    grid, diff = service_difference(result, 1.0)
    starts, rates = window_service(result, 30.0)
    worst, average = table2_metric(result, 60.0)
    s = summarize(result, fairness_metrics=False)
    valid = diff[~np.isnan(diff)]
    return {
        **{k: job[k] for k in ("scenario", "policy")}, "duration": duration,
        "grid": grid, "diff": diff, "window_starts": starts, "window_rates": rates,
        "diff_max": float(valid.max()) if len(valid) else float("nan"),
        "diff_avg": float(valid.mean()) if len(valid) else float("nan"),
        "table2_max": worst, "table2_avg": average,
        "throughput": s["throughput_tps"],
        "service": {c: v["service_tps"] for c, v in s["clients"].items()},
        "ttft": {c: v["ttft_mean"] for c, v in s["clients"].items()},
        "rejected": s["rejected"], "kv_tokens": config.blocks_per_worker() * config.block_size,
    }


def run(args: argparse.Namespace, out_dir: Path) -> list[Path]:
    from diptych.workloads.max_tokens import parse_max_tokens
    from diptych.workloads.vtc import SCENARIOS

    max_tokens = str(parse_max_tokens(args.max_tokens))
    scenarios = parse_names(args.scenarios, SCENARIOS, "scenario")
    policies = parse_names(args.policies, POLICIES, "policy")
    duration = args.duration
    if args.quick:
        if args.scenarios == ",".join(SCENARIOS):
            scenarios = list(QUICK_SCENARIOS)
        duration = duration or 120.0
    if duration is not None and not duration > 0:
        raise ValueError("--duration must be > 0")
    if args.rpm_limit < 1:
        raise ValueError("--rpm-limit must be >= 1")
    jobs = [{"scenario": s, "policy": p, "duration": duration, "rpm_limit": args.rpm_limit,
             "cost_model": args.cost_model, "token_budget": args.token_budget, "max_tokens": max_tokens}
            for s in scenarios for p in policies]
    results = parallel_map(_job, jobs, args.jobs, "vtc-fairness", progress=not args.no_progress)
    by = {(r["scenario"], r["policy"]): r for r in results}
    files = []
    plt = pyplot()
    if plt is not None:
        for scenario in scenarios:
            files.append(_plot(plt, out_dir, scenario, [by[(scenario, p)] for p in policies]))
    files.append(write_markdown(out_dir, NAME, _report(scenarios, policies, by, args)))
    return files


def _plot(plt: Any, out_dir: Path, scenario: str, runs: list[dict[str, Any]]) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        left.plot(r["grid"], r["diff"], label=r["policy"].upper())
    left.set_yscale("symlog", linthresh=1000)
    left.set_xlabel("time (s)")
    left.set_ylabel("service difference since both backlogged\n(weighted tokens per unit weight)")
    left.set_title(f"{scenario}: service difference")
    left.legend()
    styles = {"fcfs": "--", "vtc": "-"}
    for r in runs:
        if r["policy"] not in styles:
            continue
        for client, rates in sorted(r["window_rates"].items()):
            right.step(r["window_starts"], rates, where="post", linestyle=styles[r["policy"]],
                       label=f"{r['policy'].upper()} {client}")
    right.set_xlabel("time (s)")
    right.set_ylabel("service rate (weighted tokens/s, 30 s windows)")
    right.set_title(f"{scenario}: per-client service, FCFS (dashed) vs VTC")
    right.legend(fontsize=7, ncol=2)
    return save_figure(fig, out_dir, f"{NAME}-{scenario}")


def _report(scenarios: list[str], policies: list[str], by: dict, args: argparse.Namespace) -> str:
    rows = []
    for s in scenarios:
        for p in policies:
            r = by[(s, p)]
            service = " / ".join(f"{v:.0f}" for _, v in sorted(r["service"].items()))
            ttft = " / ".join(f"{v:.1f}" for _, v in sorted(r["ttft"].items()))
            rows.append((s, p.upper(), r["diff_max"], r["diff_avg"], r["table2_max"], r["table2_avg"],
                         r["throughput"], service, ttft, r["rejected"]))
    kv = next(iter(by.values()))["kv_tokens"]
    text = [
        f"# {NAME}",
        "",
        "Generated by `diptych experiment vtc-fairness"
        + (" --quick" if args.quick else "") + "` (one A10G-class colocated worker, "
        f"{kv:,} tokens of KV, Sarathi 512-token batches, VTC costs w_p = 1, w_q = 2).",
        "",
        "Service difference: for each pair of clients and each stretch of time in which both had a queued request, "
        "the difference of the weighted service (per unit of client weight) they received since the stretch began; "
        "max and time-average of the largest pair. Table-2 metric: per 60 s window, sum over clients of "
        "min(gap to the best-served client, unmet demand); max and average over windows. Service: weighted tokens/s "
        "per client (client1 / client2 / ...). TTFT: mean per client, seconds.",
        "",
        md_table(["scenario", "policy", "diff max", "diff avg", "T2 max", "T2 avg", "throughput (tok/s)",
                  "service per client", "mean TTFT per client", "rejected"], rows),
    ]
    if ("overload", "vtc") in by and ("overload", "fcfs") in by:
        vtc, fcfs = by[("overload", "vtc")], by[("overload", "fcfs")]
        settled = (vtc["grid"] >= 30) & ~np.isnan(vtc["diff"])
        at = fcfs["grid"] <= 540
        fcfs_540 = float(np.nanmax(fcfs["diff"][at])) if at.any() else float("nan")
        vtc_range = (f"{np.min(vtc['diff'][settled]):,.0f} - {np.max(vtc['diff'][settled]):,.0f}"
                     if settled.any() else "-")
        text += ["", "## overload against the paper", "",
                 md_table(["", "published (VTC paper)", "Diptych simulator"], [
                     ("VTC service gap after warm-up", "1.1k - 9.1k", vtc_range),
                     ("FCFS service gap by 540 s", "235k", f"{fcfs_540:,.0f}"),
                     ("VTC per-client service (tok/s)", "684 / 668",
                      " / ".join(f"{v:.0f}" for _, v in sorted(vtc["service"].items()))),
                     ("FCFS per-client service (tok/s)", "437 / 876",
                      " / ".join(f"{v:.0f}" for _, v in sorted(fcfs["service"].items()))),
                 ])]
    text += ["", "Figures: " + ", ".join(f"`{NAME}-{s}.png`" for s in scenarios)]
    return "\n".join(text)
