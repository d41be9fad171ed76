"""``pd-split``: which prefill:decode split of N GPUs serves a workload best; colocated serving and RAD's dynamic
split against every static one.

For each cluster size (default 4, 8, 16 GPUs) and workload (ShareGPT4-like, Azure conversation, Azure code, and a
workload that shifts from conversation to code at mid-run), the goodput of every static split P:D (P = 1 .. N-1), of
N colocated workers and of RAD (``rad`` pool policy, starting from N/2:N/2) is found by capacity search: the highest
Poisson load at which at least 90% of requests meet their SLOs (DistServe's goodput). A request meets its SLOs when
its TTFT is within ``--ttft-slo`` and at most 1% of its token gaps exceed ``--tbt-slo``.

Workers (H200 cost model by default): prefill workers run Sarathi chunks of 2048 tokens; decode workers Sarathi with
up to 1024 decodes per iteration; colocated workers Sarathi with a 512-token budget and up to 256 sequences; the
coordinator's placement rules are the services' (4096-token prefill backlog per worker, decode KV reserved at
placement, at most 1024 requests per decode worker). RAD [Diptych]: ``decode_batch_target`` 512, ``min_dwell_s``
``--rad-dwell`` (5 s, so that a run of a few minutes can converge), other knobs at their defaults, a pool decision
every second; moved workers drain first.

A second part runs the shifting workload at one load on ``--shift-gpus`` GPUs (``--shift-qps``; default 90% of the
smaller of the two phases' best static goodputs, a load that a split following the phases can serve) and plots
RAD's split over time against the SLO attainment of every static split and colocated serving in each phase.
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
    parse_numbers,
    pyplot,
    save_figure,
    write_markdown,
)

NAME = "pd-split"
HELP = "every static prefill:decode split, colocated and RAD on 4/8/16 GPUs: goodput under SLOs per workload"
WORKLOADS = ("sharegpt4", "azure-conv", "azure-code", "shift")
DECODE_BATCH = 1024  # decodes per iteration of a decode worker, and requests the coordinator places on one
SHIFT = "shift"  # shorthand for the workload shift:azure-conv,azure-code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", default="4,8,16", help="cluster sizes [%(default)s]")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="workloads; 'shift' is conversation then code (shift:azure-conv,azure-code) [%(default)s]")
    p.add_argument("--run-seconds", type=float, default=120.0, help="seconds of arrivals per run [%(default)s]")
    p.add_argument("--warmup", type=float, default=30.0,
                   help="requests arriving in the first seconds of a run are not scored [%(default)s]")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target, s [%(default)s]")
    p.add_argument("--tbt-slo", type=float, default=0.1, help="TBT target (per-request P99), s [%(default)s]")
    p.add_argument("--cost-model", default="h200-mistral-7b", help="cost model preset or file [%(default)s]")
    p.add_argument("--rad-dwell", type=float, default=5.0, help="RAD min_dwell_s [%(default)s]")
    p.add_argument("--tolerance", type=float, default=0.04, help="capacity search tolerance [%(default)s]")
    p.add_argument("--shift-gpus", type=int, default=8, help="cluster size of the fixed-load shift run [%(default)s]")
    p.add_argument("--shift-qps", type=float, default=None,
                   help="load of the fixed-load shift run [90%% of the phases' smaller best static goodput]")
    p.add_argument("--shift-duration", type=float, default=600.0, help="seconds of the fixed-load shift run")
    add_max_tokens_argument(p, NAME)


def configs(gpus: int) -> list[str]:
    return [f"{p}:{gpus - p}" for p in range(1, gpus)] + ["colocated", "rad"]


def cluster(name: str, gpus: int, cost_model: str, rad_dwell: float):
    from diptych.sim.config import ClusterConfig, PolicySpec
    from diptych.sim.cost_model import resolve

    cost = resolve(cost_model)
    decode = PolicySpec("sarathi", {"token_budget": 512, "max_decodes": DECODE_BATCH, "max_running": DECODE_BATCH})
    if name == "colocated":
        return ClusterConfig(prefill_workers=0, decode_workers=0, colocated_workers=gpus, cost_model=cost,
                             colocated_policy=PolicySpec("sarathi", {"token_budget": 512, "max_decodes": 256,
                                                                     "max_running": 256}))
    if name == "rad":
        prefill = gpus // 2
        pool = PolicySpec("rad", {"min_dwell_s": rad_dwell, "decode_batch_target": 512})
        return ClusterConfig(prefill_workers=prefill, decode_workers=gpus - prefill, cost_model=cost,
                             decode_policy=decode, pool_policy=pool, pool_tick_s=1.0,
                             max_decode_sequences=DECODE_BATCH)
    p, d = (int(x) for x in name.split(":"))
    return ClusterConfig(prefill_workers=p, decode_workers=d, cost_model=cost, decode_policy=decode,
                         max_decode_sequences=DECODE_BATCH)


def workload(name: str, qps: float, requests: int, ttft: float, tbt: float, max_tokens: str, context: int | None,
             seed: int = 0):
    """The named workload with its SLOs, ``max_tokens`` the policy (``workloads.max_tokens``) within ``context``
    tokens."""
    from diptych.workloads.catalog import WorkloadConfig, build_workload

    name = "shift:azure-conv,azure-code" if name == SHIFT else name
    return build_workload(WorkloadConfig(name, qps=qps, num_requests=requests, tiers=f"default:1:{tbt}:{ttft}",
                                         seed=seed, max_tokens=max_tokens, model_context=context))


def estimate(workload_name: str, config_name: str, gpus: int, cost_model: str, max_tokens: str) -> float:
    """A rough capacity (requests/s) to start the search from: per-worker prefill and decode rates from the cost
    model at the workload's mean lengths (decode: as many sequences as fit in KV, at most 1024)."""
    from diptych.sim.cli import simulated_context
    from diptych.sim.cost_model import resolve

    cost = resolve(cost_model)
    context = simulated_context(cluster(config_name, gpus, cost_model, rad_dwell=1.0))
    specs = workload(workload_name, 1.0, 2000, 1.0, 0.1, max_tokens, context)
    prompt = float(np.mean([s.prompt_len for s in specs]))
    output = float(np.mean([s.output_len for s in specs]))
    prefill_rate = cost.prefill_throughput_tps(2048, int(prompt)) / prompt
    batch = max(1, min(1024, int(0.9 * cost.kv_capacity_tokens() / (prompt + output))))
    step = cost.iteration_time(0, batch, int(batch * (prompt + output / 2)))
    decode_rate = batch / step / output
    if ":" in config_name:
        p, d = (int(x) for x in config_name.split(":"))
        return min(p * prefill_rate, d * decode_rate)
    return gpus / (1 / prefill_rate + 1 / decode_rate)


def _search(job: dict[str, Any]) -> dict[str, Any]:
    from diptych.sim.capacity import capacity_search
    from diptych.sim.cli import simulated_context
    from diptych.sim.simulator import simulate

    config = cluster(job["config"], job["gpus"], job["cost_model"], job["rad_dwell"])
    context = simulated_context(config)

    def one(qps: float) -> dict:
        requests = max(job["min_requests"], int(qps * job["run_seconds"]))
        specs = workload(job["workload"], qps, requests, job["ttft"], job["tbt"], job["max_tokens"], context)
        return steady_summary(simulate(config, specs), job["warmup"])

    est = job["estimate"]
    result = capacity_search(one, "goodput90", 0.5 * est, est, rel_tol=job["tolerance"], max_runs=10)
    best = result.best_summary()
    return {**{k: job[k] for k in ("config", "gpus", "workload")}, "capacity": result.qps,
            "attainment": best["slo_attainment"] if best else float("nan"), "runs": len(result.runs)}


def steady_summary(result, warmup_s: float) -> dict[str, Any]:
    """What the goodput criterion needs, over requests that arrived after ``warmup_s`` (the cluster starts empty;
    RAD starts from an even split)."""
    from diptych.metrics.results import STATUS_CODES

    arrival = result.times["arrival"]
    keep = arrival >= arrival[0] + warmup_s
    if keep.sum() < 20:
        keep = np.ones(len(arrival), dtype=bool)
    status = result.status[keep]
    return {"unfinished": int((status == STATUS_CODES["unfinished"]).sum()),
            "rejected": int((status == STATUS_CODES["rejected"]).sum()),
            "failed": int((status == STATUS_CODES["failed"]).sum()),
            "slo_attainment": float(result.meets_slo()[keep].mean()), "moves": len(result.meta["pool_moves"])}


def _fixed(job: dict[str, Any]) -> dict[str, Any]:
    from diptych.sim.cli import simulated_context
    from diptych.sim.simulator import simulate

    config = cluster(job["config"], job["gpus"], job["cost_model"], job["rad_dwell"])
    specs = workload(SHIFT, job["qps"], int(job["qps"] * job["duration"]), job["ttft"], job["tbt"],
                     job["max_tokens"], simulated_context(config), seed=1)
    result = simulate(config, specs)
    meets = result.meets_slo()
    arrival = result.times["arrival"]
    mid = arrival[-1] / 2
    edges = np.arange(0, arrival[-1] + 30, 30.0)
    which = np.digitize(arrival, edges) - 1
    rolling = [float(meets[which == k].mean()) if (which == k).any() else float("nan") for k in range(len(edges) - 1)]
    return {"config": job["config"], "attainment": float(meets.mean()),
            "phase1": float(meets[arrival < mid].mean()), "phase2": float(meets[arrival >= mid].mean()),
            "goodput": float(meets.sum()) / max(1e-9, float(np.nanmax(result.times["finish"]) - arrival[0])),
            "edges": edges[:-1], "rolling": rolling, "pool_history": result.meta["pool_history"],
            "moves": len(result.meta["pool_moves"])}


def run(args: argparse.Namespace, out_dir: Path) -> list[Path]:
    from diptych.workloads.max_tokens import parse_max_tokens

    max_tokens = str(parse_max_tokens(args.max_tokens))
    gpu_counts = parse_numbers(args.gpus, "--gpus", int)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if min(gpu_counts) < 2:
        raise ValueError("--gpus needs cluster sizes of at least 2")
    if args.ttft_slo <= 0 or args.tbt_slo <= 0 or args.run_seconds <= 0 or args.warmup < 0:
        raise ValueError("SLOs and --run-seconds must be > 0, --warmup >= 0")
    from diptych.workloads.catalog import length_distribution

    for name in names:
        if name != SHIFT:
            length_distribution(name)  # validates
    run_seconds, warmup, shift_gpus, duration = args.run_seconds, args.warmup, args.shift_gpus, args.shift_duration
    min_requests = 300
    if args.quick:
        gpu_counts, shift_gpus = [2], 2
        run_seconds, warmup, duration, min_requests = min(run_seconds, 15.0), min(warmup, 3.0), min(duration, 40.0), 60
    jobs = [{"config": c, "gpus": n, "workload": w, "run_seconds": run_seconds, "warmup": warmup,
             "min_requests": min_requests, "cost_model": args.cost_model, "rad_dwell": args.rad_dwell,
             "ttft": args.ttft_slo, "tbt": args.tbt_slo, "tolerance": args.tolerance, "max_tokens": max_tokens,
             "estimate": estimate(w, c, n, args.cost_model, max_tokens)}
            for w in names for n in gpu_counts for c in configs(n)]
    jobs.sort(key=lambda j: -j["gpus"])  # big ones first: better packing over the processes
    results = parallel_map(_search, jobs, args.jobs, "pd-split capacity searches", progress=not args.no_progress)
    by = {(r["workload"], r["gpus"], r["config"]): r for r in results}
    shift = None
    if SHIFT in names:
        qps = args.shift_qps or shift_load(by, shift_gpus, args.cost_model, max_tokens)
        fixed_jobs = [{"config": c, "gpus": shift_gpus, "qps": qps, "duration": duration, "cost_model": args.cost_model,
                       "rad_dwell": args.rad_dwell, "ttft": args.ttft_slo, "tbt": args.tbt_slo,
                       "max_tokens": max_tokens}
                      for c in configs(shift_gpus)]
        shift = {"qps": qps, "gpus": shift_gpus, "duration": duration,
                 "runs": parallel_map(_fixed, fixed_jobs, args.jobs, "pd-split shift run",
                                      progress=not args.no_progress)}
    files = []
    plt = pyplot()
    if plt is not None:
        files.append(_plot_goodput(plt, out_dir, names, gpu_counts, by))
        if shift is not None:
            files.append(_plot_shift(plt, out_dir, shift))
    files.append(write_markdown(out_dir, NAME, _report(args, names, gpu_counts, by, shift, run_seconds, warmup)))
    return files


def shift_load(by: dict, gpus: int, cost_model: str, max_tokens: str) -> float:
    """90% of the load that each phase's own best static split sustains (the smaller of the two): a split that
    follows the phases can serve it; one static split serves it only if it is best for both phases."""
    best = []
    for phase in ("azure-conv", "azure-code"):
        static = [by[(phase, gpus, c)]["capacity"] for c in configs(gpus) if ":" in c and (phase, gpus, c) in by]
        if static:
            best.append(max(static))
    if len(best) == 2 and min(best) > 0:
        return 0.9 * min(best)
    return 0.8 * estimate(SHIFT, "rad", gpus, cost_model, max_tokens)


def _plot_goodput(plt: Any, out_dir: Path, names: list[str], gpu_counts: list[int], by: dict) -> Path:
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.0), squeeze=False)
    for ax, w in zip(axes[0], names):
        for n in gpu_counts:
            splits = [c for c in configs(n) if ":" in c]
            x = [int(c.split(":")[0]) / n for c in splits]
            y = [by[(w, n, c)]["capacity"] / n for c in splits]
            line = ax.plot(x, y, marker="o", markersize=3, label=f"{n} GPUs static")[0]
            ax.axhline(by[(w, n, "rad")]["capacity"] / n, color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{n} GPUs RAD")
            ax.axhline(by[(w, n, "colocated")]["capacity"] / n, color=line.get_color(), linestyle=":",
                       linewidth=1, label=f"{n} GPUs colocated")
        ax.set(xlabel="prefill share of GPUs", ylabel="goodput per GPU (req/s, 90% SLO)", title=w)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out_dir, NAME)


def _plot_shift(plt: Any, out_dir: Path, shift: dict) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    styles: dict[str, dict[str, Any]] = {"rad": dict(linewidth=2.2, color="black"), "colocated": dict(linestyle=":")}
    for r in shift["runs"]:
        style = styles.get(r["config"], dict(linewidth=0.8))
        top.plot(r["edges"], r["rolling"], label=r["config"], **style)
        if r["config"] == "rad" and r["pool_history"]:
            t = [h[0] for h in r["pool_history"]] + [r["edges"][-1]]
            p = [h[1] for h in r["pool_history"]] + [r["pool_history"][-1][1]]
            bottom.step(t, p, where="post", color="black", label="RAD prefill workers")
    top.set(ylabel="SLO attainment (30 s windows)", ylim=(-0.02, 1.02),
            title=f"conversation -> code at mid-run, {shift['gpus']} GPUs, {shift['qps']:.1f} req/s")
    top.legend(fontsize=7, ncol=4)
    bottom.set(xlabel="arrival time (s)", ylabel="prefill workers", ylim=(0, shift["gpus"]))
    bottom.legend(fontsize=8)
    return save_figure(fig, out_dir, f"{NAME}-shift")


def _report(args: argparse.Namespace, names: list[str], gpu_counts: list[int], by: dict, shift: dict | None,
            run_seconds: float, warmup: float) -> str:
    text = [f"# {NAME}", "",
            f"Generated by `diptych experiment {NAME}" + (" --quick" if args.quick else "")
            + f"` (cost model `{args.cost_model}`, runs of {run_seconds:g} s of Poisson arrivals scored after a "
            f"{warmup:g} s warm-up, SLOs: "
            f"TTFT <= {args.ttft_slo:g} s and per-request P99 TBT <= {args.tbt_slo:g} s; goodput = highest load "
            "with 90% of requests meeting both).", "",
            "## Best configuration per workload and cluster size", ""]
    rows = []
    for w in names:
        for n in gpu_counts:
            static = {c: by[(w, n, c)]["capacity"] for c in configs(n) if ":" in c}
            best = max(static, key=static.__getitem__)
            rad, colo = by[(w, n, "rad")]["capacity"], by[(w, n, "colocated")]["capacity"]
            rows.append((w, n, best, static[best], colo, rad,
                         f"{100 * (rad / static[best] - 1):+.0f}%" if static[best] else "-",
                         "yes" if all(rad > v for v in static.values()) else "no"))
    text.append(md_table(["workload", "GPUs", "best static split", "its goodput (req/s)", "colocated (req/s)",
                          "RAD (req/s)", "RAD vs best static", "RAD ahead of every static"], rows))
    text += ["", "## Goodput of every configuration (req/s)", ""]
    for n in gpu_counts:
        cols = configs(n)
        text.append(f"{n} GPUs:")
        text.append("")
        text.append(md_table(["workload", *cols], [[w, *(by[(w, n, c)]["capacity"] for c in cols)] for w in names]))
        text.append("")
    if shift is not None:
        shift_rows = [(r["config"], r["attainment"], r["phase1"], r["phase2"], r["goodput"], r["moves"])
                      for r in shift["runs"]]
        text += [f"## Shifting workload at a fixed load ({shift['gpus']} GPUs, {shift['qps']:.1f} req/s, "
                 f"{shift['duration']:.0f} s: conversation, then code)", "",
                 md_table(["config", "SLO attainment", "conversation phase", "code phase", "goodput (req/s)",
                           "pool moves"], shift_rows), ""]
    text.append(f"Figures: `{NAME}.png`" + (f", `{NAME}-shift.png`" if shift is not None else ""))
    return "\n".join(text)
