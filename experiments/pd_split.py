"""``pd-split``: which prefill:decode split of N GPUs serves a workload best; colocated serving and RAD's dynamic
split against every static one.

For each cluster size (default 4, 8, 16 GPUs) and workload (ShareGPT4-like, Azure conversation, Azure code, and a
workload that shifts from conversation to code at mid-run), the goodput of every static split P:D (P = 1 .. N-1), of
N colocated workers and of RAD (``rad`` pool policy, starting from N/2:N/2) is found by capacity search: the highest
Poisson load at which at least 90% of requests meet their SLOs (DistServe's goodput). A request meets its SLOs when
its TTFT is within ``--ttft-slo`` and at most 1% of its token gaps exceed ``--tbt-slo``.

Workers (H200 cost model by default): prefill workers run Sarathi chunks of 2048 tokens; decode workers Sarathi with
up to 256 decodes per iteration; colocated workers Sarathi with a 512-token budget and up to 256 sequences; the
coordinator's placement rules are the services' (4096-token prefill backlog per worker, decode KV reserved at
placement). RAD [Diptych]: ``decode_batch_target`` 256, ``min_dwell_s`` ``--rad-dwell`` (5 s, so that a run of a few
minutes can converge), a pool decision every second; a moved worker drains first.

A second part runs the shifting workload at one load (``--shift-qps``, default 80% of RAD's capacity on it) and plots
RAD's split over time against the SLO attainment of the static splits in each phase.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from experiments.common import md_table, parallel_map, pyplot, save_figure, write_markdown

NAME = "pd-split"
HELP = "every static prefill:decode split, colocated and RAD on 4/8/16 GPUs: goodput under SLOs per workload"
WORKLOADS = ("sharegpt4", "azure-conv", "azure-code", "shift")
SHIFT = "shift"  # shorthand for the workload shift:azure-conv,azure-code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", default="4,8,16", help="cluster sizes [%(default)s]")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="workloads; 'shift' is conversation then code (shift:azure-conv,azure-code) [%(default)s]")
    p.add_argument("--requests-per-gpu", type=int, default=400, help="requests per run per GPU [%(default)s]")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target, s [%(default)s]")
    p.add_argument("--tbt-slo", type=float, default=0.1, help="TBT target (per-request P99), s [%(default)s]")
    p.add_argument("--cost-model", default="h200-mistral-7b", help="cost model preset or file [%(default)s]")
    p.add_argument("--rad-dwell", type=float, default=5.0, help="RAD min_dwell_s [%(default)s]")
    p.add_argument("--tolerance", type=float, default=0.04, help="capacity search tolerance [%(default)s]")
    p.add_argument("--shift-gpus", type=int, default=8, help="cluster size of the fixed-load shift run [%(default)s]")
    p.add_argument("--shift-qps", type=float, default=None, help="load of the fixed-load shift run [80%% of RAD's]")
    p.add_argument("--shift-duration", type=float, default=600.0, help="seconds of the fixed-load shift run")


def configs(gpus: int) -> list[str]:
    return [f"{p}:{gpus - p}" for p in range(1, gpus)] + ["colocated", "rad"]


def cluster(name: str, gpus: int, cost_model: str, rad_dwell: float):
    from sim.config import ClusterConfig, PolicySpec
    from sim.cost_model import resolve

    cost = resolve(cost_model)
    decode = PolicySpec("sarathi", {"token_budget": 512, "max_decodes": 256, "max_running": 256})
    if name == "colocated":
        return ClusterConfig(prefill_workers=0, decode_workers=0, colocated_workers=gpus, cost_model=cost,
                             colocated_policy=PolicySpec("sarathi", {"token_budget": 512, "max_decodes": 256,
                                                                     "max_running": 256}))
    if name == "rad":
        prefill = gpus // 2
        pool = PolicySpec("rad", {"min_dwell_s": rad_dwell, "decode_batch_target": 256})
        return ClusterConfig(prefill_workers=prefill, decode_workers=gpus - prefill, cost_model=cost,
                             decode_policy=decode, pool_policy=pool, pool_tick_s=1.0)
    p, d = (int(x) for x in name.split(":"))
    return ClusterConfig(prefill_workers=p, decode_workers=d, cost_model=cost, decode_policy=decode)


def workload(name: str, qps: float, requests: int, ttft: float, tbt: float, seed: int = 0):
    from workloads.catalog import WorkloadConfig, build_workload

    name = "shift:azure-conv,azure-code" if name == SHIFT else name
    return build_workload(WorkloadConfig(name, qps=qps, num_requests=requests, tiers=f"default:1:{tbt}:{ttft}",
                                         seed=seed))


def estimate(workload_name: str, gpus: int, cost_model: str) -> float:
    """A rough throughput bound (requests/s) to start the search from: prefill and decode time per request on one
    GPU, the best split in between."""
    from sim.cost_model import resolve

    cost = resolve(cost_model)
    specs = workload(workload_name, 1.0, 2000, 1.0, 0.1)
    prompt = np.mean([s.prompt_len for s in specs])
    output = np.mean([s.output_len for s in specs])
    prefill_s = prompt / cost.prefill_throughput_tps(2048, int(prompt))
    batch = 128
    step = cost.iteration_time(0, batch, int(batch * (prompt + output / 2)))
    decode_s = output * step / batch
    return gpus / (prefill_s + decode_s)


def _search(job: dict[str, Any]) -> dict[str, Any]:
    from metrics.summary import summarize
    from sim.capacity import capacity_search
    from sim.simulator import simulate

    config = cluster(job["config"], job["gpus"], job["cost_model"], job["rad_dwell"])
    requests = job["requests"]

    def one(qps: float) -> dict:
        specs = workload(job["workload"], qps, requests, job["ttft"], job["tbt"])
        return summarize(simulate(config, specs), fairness_metrics=False)

    est = job["estimate"]
    result = capacity_search(one, "goodput90", 0.3 * est, 1.2 * est, rel_tol=job["tolerance"], max_runs=14)
    best = result.best_summary()
    return {**{k: job[k] for k in ("config", "gpus", "workload")}, "capacity": result.qps,
            "attainment": best["slo_attainment"] if best else float("nan"),
            "ttft_p50": best["ttft_p50"] if best else float("nan"),
            "tbt_p99": best["tbt_p99"] if best else float("nan"), "runs": len(result.runs)}


def _fixed(job: dict[str, Any]) -> dict[str, Any]:
    from sim.simulator import simulate

    config = cluster(job["config"], job["gpus"], job["cost_model"], job["rad_dwell"])
    specs = workload(SHIFT, job["qps"], int(job["qps"] * job["duration"]), job["ttft"], job["tbt"], seed=1)
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
    try:
        gpu_counts = [int(x) for x in args.gpus.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpus must be comma-separated integers, got {args.gpus!r}") from None
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not gpu_counts or min(gpu_counts) < 2:
        raise ValueError("--gpus needs cluster sizes of at least 2")
    if args.ttft_slo <= 0 or args.tbt_slo <= 0 or args.requests_per_gpu < 10:
        raise ValueError("SLOs must be > 0 and --requests-per-gpu >= 10")
    from workloads.catalog import length_distribution

    for name in names:
        if name != SHIFT:
            length_distribution(name)  # validates
    per_gpu, shift_gpus, duration = args.requests_per_gpu, args.shift_gpus, args.shift_duration
    if args.quick:
        gpu_counts, per_gpu, shift_gpus, duration = [4], min(per_gpu, 60), 4, min(duration, 120.0)
    estimates = {(w, n): estimate(w, n, args.cost_model) for w in names for n in gpu_counts}
    jobs = [{"config": c, "gpus": n, "workload": w, "requests": per_gpu * n, "cost_model": args.cost_model,
             "rad_dwell": args.rad_dwell, "ttft": args.ttft_slo, "tbt": args.tbt_slo, "tolerance": args.tolerance,
             "estimate": estimates[(w, n)]}
            for w in names for n in gpu_counts for c in configs(n)]
    jobs.sort(key=lambda j: -j["gpus"])  # big ones first: better packing over the processes
    results = parallel_map(_search, jobs, args.jobs, "pd-split capacity searches", progress=not args.no_progress)
    by = {(r["workload"], r["gpus"], r["config"]): r for r in results}
    shift = None
    if SHIFT in names:
        rad = by.get((SHIFT, shift_gpus, "rad"))
        qps = args.shift_qps or (0.8 * rad["capacity"] if rad and rad["capacity"] else estimates[(SHIFT, gpu_counts[0])])
        fixed_jobs = [{"config": c, "gpus": shift_gpus, "qps": qps, "duration": duration, "cost_model": args.cost_model,
                       "rad_dwell": args.rad_dwell, "ttft": args.ttft_slo, "tbt": args.tbt_slo}
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
    files.append(write_markdown(out_dir, NAME, _report(args, names, gpu_counts, by, shift, per_gpu)))
    return files


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
    for r in shift["runs"]:
        style = {"rad": dict(linewidth=2.2, color="black"), "colocated": dict(linestyle=":")}.get(r["config"],
                                                                                                  dict(linewidth=0.8))
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
            per_gpu: int) -> str:
    text = [f"# {NAME}", "",
            f"Generated by `diptych experiment {NAME}" + (" --quick" if args.quick else "")
            + f"` (cost model `{args.cost_model}`, {per_gpu} requests per GPU per run, Poisson arrivals, SLOs: "
            f"TTFT <= {args.ttft_slo:g} s and per-request P99 TBT <= {args.tbt_slo:g} s; goodput = highest load "
            "with 90% of requests meeting both).", "",
            "## Best configuration per workload and cluster size", ""]
    rows = []
    for w in names:
        for n in gpu_counts:
            static = {c: by[(w, n, c)]["capacity"] for c in configs(n) if ":" in c}
            best = max(static, key=static.get)
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
        text.append(md_table(["workload"] + cols, [[w] + [by[(w, n, c)]["capacity"] for c in cols] for w in names]))
        text.append("")
    if shift is not None:
        rows = [(r["config"], r["attainment"], r["phase1"], r["phase2"], r["goodput"], r["moves"])
                for r in shift["runs"]]
        text += [f"## Shifting workload at a fixed load ({shift['gpus']} GPUs, {shift['qps']:.1f} req/s, "
                 f"{shift['duration']:.0f} s: conversation, then code)", "",
                 md_table(["config", "SLO attainment", "conversation phase", "code phase", "goodput (req/s)",
                           "pool moves"], rows), ""]
    text.append(f"Figures: `{NAME}.png`" + (f", `{NAME}-shift.png`" if shift is not None else ""))
    return "\n".join(text)
