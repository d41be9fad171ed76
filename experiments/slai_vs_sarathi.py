"""``slai-vs-sarathi``: SLAI variants against Sarathi-Serve (FCFS and SPF) on one colocated GPU: median TTFT at fixed
loads and serving capacity.

Setup (the SLAI paper's): one GPU's cost model (default ``rtx6000ada-mistral-7b``, the paper's RTX 6000 Ada with
Mistral-7B), ShareGPT4 lengths (``workloads.lengths``), 5% strict requests (TBT 0.1 s) and 95% relaxed (0.5 s),
Poisson arrivals with gaps capped at 3x the mean (the papers' generator), token budget 512, at most 128 decodes and
128 running sequences. Every arrived request reaches the worker (no coordinator backlog limit, no reservation at
placement), so the batch policy's own admission order applies, except for Sarathi-SPF, whose shortest-prompt-first
order is the coordinator's: ``spf`` admission with the services' placement rules (each request's expected KV
footprint accounted at placement, at most 4096 prompt tokens queued on the worker), so the queue forms in the
coordinator, in SPF order. KV is allocated on demand and sequences are preempted by recompute (``engine.kv_rules``);
``--max-tokens`` sets what requests ask for (default a 2048-token cap; ``context`` = the model's 32768-token context
minus the prompt).

Variants: ``sarathi-fcfs`` (Sarathi-Serve), ``sarathi-spf``, ``slai`` (dynamic offset Theta 5 / 10 at 96% KV),
``slai-fixed`` (Theta 10 always), ``slai-strict-first`` (strict tier first, then shortest prompt), ``slai-aging``
(a request waiting over 10 s goes first: Diptych's starvation guard, off in the paper).

Capacity: the highest load with median TTFT < 0.5 s and each tier's P99 TBT within its target (SLAI's criterion),
by binary search, once per workload seed. With ``--seeds N`` every figure is the mean over seeds 0..N-1 with its
range (min..max). Published: SLAI cuts median TTFT by 53% and raises capacity by 26% over Sarathi-Serve.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from diptych.experiments.common import (
    add_max_tokens_argument,
    fmt,
    md_table,
    parallel_map,
    parse_names,
    parse_numbers,
    pyplot,
    save_figure,
    write_markdown,
)

NAME = "slai-vs-sarathi"
HELP = "SLAI vs Sarathi-Serve on one GPU: median TTFT at fixed loads and capacity (SLAI criterion)"
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {  # batch policy, knobs, admission
    "sarathi-fcfs": ("sarathi", {}, "fcfs"),
    "sarathi-spf": ("sarathi", {}, "spf"),
    "slai": ("slai", {}, "fcfs"),
    "slai-fixed": ("slai", {"fixed_offset": True}, "fcfs"),
    "slai-strict-first": ("slai", {"strict_tier_first": True}, "fcfs"),
    "slai-aging": ("slai", {"aging_s": 10.0}, "fcfs"),
}
COMMON = {"token_budget": 512, "max_running": 128, "max_decodes": 128}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants [%(default)s]")
    p.add_argument("--loads", default="0.5,1,1.5,2,2.5", help="fixed loads, requests/s [%(default)s]")
    p.add_argument("--requests", type=int, default=2048, help="requests per run [%(default)s]")
    p.add_argument("--cost-model", default="rtx6000ada-mistral-7b", help="cost model preset or file [%(default)s]")
    p.add_argument("--seeds", type=int, default=1,
                   help="workload seeds 0..N-1 per point and per capacity search; the report gives each figure's "
                        "mean and range [%(default)s]")
    p.add_argument("--no-capacity", action="store_true", help="skip the capacity searches")
    p.add_argument("--tolerance", type=float, default=0.02, help="capacity search tolerance [%(default)s]")
    add_max_tokens_argument(p, NAME)


def config_for(variant: str, cost_model: str):
    from diptych.sim.config import ClusterConfig, PolicySpec
    from diptych.sim.cost_model import resolve

    policy, knobs, admission = VARIANTS[variant]
    spf = admission == "spf"
    return ClusterConfig(prefill_workers=0, decode_workers=0, colocated_workers=1, cost_model=resolve(cost_model),
                         admission=PolicySpec(admission), colocated_policy=PolicySpec(policy, {**COMMON, **knobs}),
                         colocated_reserve=spf, max_prefill_backlog_tokens=4096 if spf else None)


def workload(qps: float, requests: int, seed: int, max_tokens: str, context: int | None):
    """The experiment's ShareGPT4 workload, ``max_tokens`` the policy (``workloads.max_tokens``) within ``context``
    tokens."""
    from diptych.workloads.catalog import WorkloadConfig, build_workload

    return build_workload(WorkloadConfig("sharegpt4", qps=qps, num_requests=requests, arrivals="poisson-capped",
                                         tiers="slai", seed=seed, max_tokens=max_tokens, model_context=context))


def _point(job: dict[str, Any]) -> dict[str, Any]:
    from diptych.metrics.summary import summarize
    from diptych.sim.cli import simulated_context
    from diptych.sim.simulator import simulate

    config = config_for(job["variant"], job["cost_model"])
    out = []
    for seed in range(job["seeds"]):
        specs = workload(job["qps"], job["requests"], seed, job["max_tokens"], simulated_context(config))
        out.append(summarize(simulate(config, specs), fairness_metrics=False))
    return {"variant": job["variant"], "qps": job["qps"], "summaries": out}


def _capacity(job: dict[str, Any]) -> dict[str, Any]:
    from diptych.metrics.summary import summarize
    from diptych.sim.capacity import capacity_search
    from diptych.sim.cli import simulated_context
    from diptych.sim.simulator import simulate

    config = config_for(job["variant"], job["cost_model"])
    context = simulated_context(config)

    def one(qps: float) -> dict:
        specs = workload(qps, job["requests"], job["seed"], job["max_tokens"], context)
        return summarize(simulate(config, specs), fairness_metrics=False)

    result = capacity_search(one, "slai", job["lo"], job["hi"], rel_tol=job["tolerance"], max_runs=14)
    return {"variant": job["variant"], "seed": job["seed"], "capacity": result.qps,
            "runs": [(r["qps"], r["ok"], r["reason"]) for r in result.runs]}


def _values(summaries: list[dict], key: str, tier: str | None = None) -> list[float]:
    return [s["tiers"][tier][key] if tier else s[key] for s in summaries if (not tier or tier in s["tiers"])]


def _mean(summaries: list[dict], key: str, tier: str | None = None) -> float:
    values = _values(summaries, key, tier)
    return float(np.mean(values)) if values else float("nan")


def _spread(values: list[float]) -> str:
    """``mean`` of one value, ``mean (min..max)`` of several (3 significant digits)."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} ({fmt(min(values))}..{fmt(max(values))})"


def run(args: argparse.Namespace, out_dir: Path) -> list[Path]:
    from diptych.workloads.max_tokens import parse_max_tokens

    max_tokens = str(parse_max_tokens(args.max_tokens))
    variants = parse_names(args.variants, VARIANTS, "variant")
    loads = parse_numbers(args.loads, "--loads")
    requests, seeds = args.requests, args.seeds
    if args.quick:
        requests, loads = min(requests, 150), loads[::2]
    if requests < 10 or seeds < 1:
        raise ValueError("--requests must be >= 10 and --seeds >= 1")
    started = time.perf_counter()
    jobs = [{"variant": v, "qps": q, "requests": requests, "seeds": seeds, "cost_model": args.cost_model,
             "max_tokens": max_tokens} for v in variants for q in loads]
    points = parallel_map(_point, jobs, args.jobs, "slai-vs-sarathi loads", progress=not args.no_progress)
    capacities: dict[str, dict] = {}
    if not args.no_capacity:
        cap_jobs = [{"variant": v, "seed": seed, "requests": requests, "cost_model": args.cost_model,
                     "lo": min(loads), "hi": max(loads), "tolerance": args.tolerance if not args.quick else 0.1,
                     "max_tokens": max_tokens} for v in variants for seed in range(seeds)]
        for r in parallel_map(_capacity, cap_jobs, args.jobs, "slai-vs-sarathi capacity",
                              progress=not args.no_progress):
            capacities.setdefault(r["variant"], {"per_seed": [], "runs": []})
            capacities[r["variant"]]["per_seed"].append(r["capacity"])
            capacities[r["variant"]]["runs"].append(r["runs"])
        for c in capacities.values():
            c["capacity"] = float(np.mean(c["per_seed"]))
    if base_capacity := capacities.get("sarathi-fcfs", {}).get("capacity"):
        base_capacity = round(base_capacity, 3)
        extra = [{"variant": v, "qps": base_capacity, "requests": requests, "seeds": seeds,
                  "cost_model": args.cost_model, "max_tokens": max_tokens} for v in variants]
        points += parallel_map(_point, extra, args.jobs, "slai-vs-sarathi at Sarathi's capacity",
                               progress=not args.no_progress)
        if base_capacity not in loads:
            loads = sorted([*loads, base_capacity])
    table = {(p["variant"], p["qps"]): p["summaries"] for p in points}
    files = []
    plt = pyplot()
    if plt is not None:
        files.append(_plot(plt, out_dir, variants, loads, table, capacities))
    wall = time.perf_counter() - started
    files.append(write_markdown(out_dir, NAME, _report(args, variants, loads, requests, seeds, max_tokens, table,
                                                       capacities, wall)))
    return files


def _plot(plt: Any, out_dir: Path, variants: list[str], loads: list[float], table: dict, capacities: dict) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for v in variants:
        axes[0].plot(loads, [_mean(table[(v, q)], "ttft_p50") for q in loads], marker="o", label=v)
        axes[1].plot(loads, [_mean(table[(v, q)], "tbt_p99", "strict") for q in loads], marker="o", label=f"{v}")
        axes[1].plot(loads, [_mean(table[(v, q)], "tbt_p99", "relaxed") for q in loads], marker="x", linestyle=":",
                     color=axes[1].lines[-1].get_color())
    axes[0].axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes[0].set(xlabel="load (requests/s)", ylabel="median TTFT (s)", title="median TTFT", yscale="log")
    axes[1].axhline(0.1, color="grey", linewidth=0.8, linestyle="--")
    axes[1].axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes[1].set(xlabel="load (requests/s)", ylabel="P99 TBT (s)", yscale="log",
                title="P99 TBT: strict (o, target 0.1 s), relaxed (x, 0.5 s)")
    axes[0].legend(fontsize=8)
    if capacities:
        names = [v for v in variants if v in capacities]
        means = [capacities[v]["capacity"] for v in names]
        lows = [m - min(capacities[v]["per_seed"]) for m, v in zip(means, names, strict=True)]
        highs = [max(capacities[v]["per_seed"]) - m for m, v in zip(means, names, strict=True)]
        axes[2].bar(range(len(names)), means, yerr=[lows, highs], capsize=3)
        axes[2].set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        axes[2].set(ylabel="capacity (requests/s)", title="capacity: median TTFT < 0.5 s, tier P99 TBT met")
    else:
        axes[2].axis("off")
    return save_figure(fig, out_dir, NAME)


def _report(args: argparse.Namespace, variants: list[str], loads: list[float], requests: int, seeds: int,
            max_tokens: str, table: dict, capacities: dict, wall_s: float) -> str:
    base = "sarathi-fcfs"
    rows = []
    for q in loads:
        for v in variants:
            s = table[(v, q)]
            change = ""
            if v != base and (base, q) in table:
                ref = _mean(table[(base, q)], "ttft_p50")
                change = f"{100 * (_mean(s, 'ttft_p50') / ref - 1):+.0f}%"
            rows.append((q, v, _spread(_values(s, "ttft_p50")), change, _mean(s, "ttft_p99"),
                         _mean(s, "tbt_p99", "strict"), _mean(s, "tbt_p99", "relaxed"), _mean(s, "sched_delay_p50"),
                         _mean(s, "throughput_tps"), _mean(s, "preemptions"), _mean(s, "peak_running")))
    seed_text = "seed 0" if seeds == 1 else f"seeds 0..{seeds - 1}: means, with the range (min..max) of median TTFT"
    text = [f"# {NAME}", "",
            f"Generated by `diptych experiment {NAME}" + (" --quick" if args.quick else "")
            + f" --max-tokens {max_tokens} --seeds {seeds}` ({requests} requests per run, {seed_text}; cost model "
            f"`{args.cost_model}`, ShareGPT4 lengths, 5% strict at 0.1 s TBT / 95% relaxed at 0.5 s, capped Poisson "
            f"arrivals; KV on demand; wall time {wall_s / 60:.1f} min).", "",
            "## Fixed loads", "",
            md_table(["load (req/s)", "variant", "median TTFT (s)", "vs sarathi-fcfs", "P99 TTFT (s)",
                      "P99 TBT strict (s)", "P99 TBT relaxed (s)", "median sched. delay (s)", "throughput (tok/s)",
                      "preemptions", "peak running"], rows)]
    if capacities:
        ref = capacities.get(base, {}).get("capacity")
        cap_rows = []
        for v in variants:
            c = capacities[v]["capacity"]
            cap_rows.append((v, _spread(capacities[v]["per_seed"]), f"{100 * (c / ref - 1):+.0f}%" if ref else "-"))
        text += ["", "## Capacity (SLAI criterion: median TTFT < 0.5 s, each tier's P99 TBT within target)", "",
                 md_table(["variant", "capacity (req/s)", "vs sarathi-fcfs"], cap_rows)]
        ref_load = round(ref, 3) if ref else None
        if "slai" in capacities and ref_load and ("slai", ref_load) in table:
            slai_ttft, base_ttft = _values(table[("slai", ref_load)], "ttft_p50"), _values(table[(base, ref_load)],
                                                                                           "ttft_p50")
            cuts = [100 * (a / b - 1) for a, b in zip(slai_ttft, base_ttft, strict=True)]
            gains = [100 * (a / b - 1) for a, b in zip(capacities["slai"]["per_seed"], capacities[base]["per_seed"],
                                                       strict=True)]
            text += ["", md_table(["", "published (SLAI paper)", "Diptych simulator"], [
                ("median TTFT, SLAI vs Sarathi-Serve", "-53%",
                 f"{-100 * (1 - np.mean(slai_ttft) / np.mean(base_ttft)):.0f}% (per seed {min(cuts):+.0f}%.."
                 f"{max(cuts):+.0f}%; at Sarathi-Serve's mean capacity, {ref_load:.3g} req/s)"),
                ("capacity, SLAI vs Sarathi-Serve", "+26%",
                 f"{100 * (capacities['slai']['capacity'] / ref - 1):+.0f}% (per seed {min(gains):+.0f}%.."
                 f"{max(gains):+.0f}%)"),
            ])]
        text += ["", "Capacity search runs (seed: load, pass):", ""]
        for v in variants:
            for seed, runs in enumerate(capacities[v]["runs"]):
                text.append(f"- {v}, seed {seed}: "
                            + "; ".join(f"{q:.3g} {'pass' if ok else 'fail'}" for q, ok, _ in runs))
    text += ["", f"Figure: `{NAME}.png`"]
    return "\n".join(text)


__all__ = ["NAME", "HELP", "add_arguments", "run", "config_for", "workload", "fmt"]
