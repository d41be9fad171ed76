"""The report of ``pd-split-gpu``: served and simulated tables side by side, handoff shares and counters, RAD's
moves, the figures, and the computed comparison of the two rankings of the layouts.

A run record (``runs``) is a dict with ``layout``, ``workload``, ``level`` (below / near / above / quick), ``qps``,
``requests``, ``served`` and ``sim`` (summaries: seconds, requests/s). Goodput is requests meeting both SLOs per
second of the run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from diptych.experiments.common import fmt, md_table, save_figure
from diptych.experiments.pd_split_gpu_runs import PROMPT_BUCKETS

NAME = "pd-split-gpu"
TIE = 0.05
"""Goodputs within this fraction of the larger are a tie in the rankings."""


def best_goodput(runs: list[dict], workload: str, source: str) -> dict[str, float]:
    """Per layout, the highest goodput of ``source`` (``served`` or ``sim``) over the workload's rates."""
    best: dict[str, float] = {}
    for r in runs:
        if r["workload"] == workload:
            best[r["layout"]] = max(best.get(r["layout"], 0.0), r[source]["goodput"])
    return best


def order(goodput: dict[str, float], a: str, b: str) -> int:
    """1 when layout ``a`` has the higher goodput, -1 when ``b`` has, 0 when they are within ``TIE`` of each
    other (relative to the larger)."""
    x, y = goodput[a], goodput[b]
    if abs(x - y) <= TIE * max(abs(x), abs(y)):
        return 0
    return 1 if x > y else -1


def ranking(goodput: dict[str, float]) -> str:
    """Layouts from the highest goodput to the lowest, ``>`` between distinct ones, ``~`` between ties."""
    names = sorted(goodput, key=lambda name: -goodput[name])
    text = names[0] if names else ""
    for prev, name in itertools.pairwise(names):
        text += (" ~ " if order(goodput, prev, name) == 0 else " > ") + name
    return text


def agreement(runs: list[dict], workloads: list[str]) -> str:
    """One line per workload: both rankings and each pair of layouts they order differently (one side ranks ``a``
    above ``b``, the other ties them or ranks ``b`` above). Computed from ``runs``."""
    lines = []
    for w in workloads:
        served, sim = best_goodput(runs, w, "served"), best_goodput(runs, w, "sim")
        names = list(served)
        differ = [(a, b, order(served, a, b), order(sim, a, b)) for i, a in enumerate(names) for b in names[i + 1:]
                  if order(served, a, b) != order(sim, a, b)]
        words = {1: "above", 0: "level with", -1: "below"}
        verdict = "The rankings agree." if not differ else "The rankings disagree: " + "; ".join(
            f"served {a} {words[s]} {b}, simulator {a} {words[p]} {b}" for a, b, s, p in differ) + "."
        lines.append(f"- `{w}` (best goodput over its rates, ties within {100 * TIE:.0f}%): served "
                     f"{ranking(served)} ({', '.join(f'{n} {fmt(served[n])}' for n in names)} req/s); simulator "
                     f"{ranking(sim)} ({', '.join(f'{n} {fmt(sim[n])}' for n in names)} req/s). {verdict}")
    return "\n".join(lines)


def side_by_side(runs: list[dict]) -> str:
    rows = [(r["workload"], r["layout"], r["level"], r["qps"], r["requests"],
             r["served"]["ttft_p50"], r["sim"]["ttft_p50"], r["served"]["ttft_p99"], r["sim"]["ttft_p99"],
             r["served"]["tbt_p99"], r["sim"]["tbt_p99"], r["served"]["goodput"], r["sim"]["goodput"],
             r["served"]["slo_attainment"], r["sim"]["slo_attainment"]) for r in runs]
    return md_table(["workload", "layout", "rate", "req/s", "requests", "TTFT p50 served", "sim", "TTFT p99 served",
                     "sim", "TBT p99 served", "sim", "goodput served", "sim", "SLO attainment served", "sim"], rows)


def handoff_table(runs: list[dict]) -> str:
    labels = [label for _, _, label in PROMPT_BUCKETS]
    rows = [(r["workload"], r["layout"], r["level"],
             *(r[side]["handoff_share_by_prompt"][b] for b in labels for side in ("served", "sim"))) for r in runs]
    return md_table(["workload", "layout", "rate", *(f"{side}, prompt {b}" if side == "served" else "sim"
                                                     for b in labels for side in ("served", "sim"))], rows)


def counters_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        for path, c in sorted(r["served"]["kv_handoffs"].items()):
            rows.append((r["workload"], r["layout"], r["level"], path, int(c["requests"]), c["bytes"] / 2**20,
                         c["seconds"], c["seconds"] / c["requests"] if c["requests"] else float("nan")))
    if not rows:
        return "No KV handoffs were counted (colocated layouts hand nothing off)."
    return md_table(["workload", "layout", "rate", "path", "handoffs", "MiB", "seconds", "s per handoff"], rows)


def moves_table(runs: list[dict]) -> str:
    rows = [(r["workload"], r["layout"], r["level"], m["time"], m["worker"], f"{m['from']} -> {m['to']}",
             m["completed"], m["reason"]) for r in runs for m in r["served"]["move_log"]]
    if not rows:
        return "RAD moved no worker during the loads."
    return md_table(["workload", "layout", "rate", "started (s)", "worker", "move", "in new pool (s)", "reason"], rows)


def plot_goodput(plt: Any, out_dir: Path, runs: list[dict], workloads: list[str]) -> Path:
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.0), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for i, layout in enumerate(dict.fromkeys(r["layout"] for r in runs if r["workload"] == w)):
            for source, style in (("served", "-o"), ("sim", "--x")):
                mine = sorted((r["qps"], r[source]["goodput"]) for r in runs
                              if r["workload"] == w and r["layout"] == layout)
                ax.plot([q for q, _ in mine], [g for _, g in mine], style, color=f"C{i}", markersize=4,
                        label=f"{layout} ({source})")
        ax.set(xlabel="offered load (req/s)", ylabel="goodput (req/s)", title=w)
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, NAME)


def plot_moves(plt: Any, out_dir: Path, run: dict, arrivals: list[float], gpus: int) -> Path:
    """RAD's prefill-pool size over the load (from ``/admin/status`` polls) and its moves, above the arrival rate
    in 10 s windows (a load under 100 s: a tenth of it, at least 1 s); a dashed line at the workload's phase
    change."""
    import numpy as np

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    history = run["served"]["pool_history"]
    if history:
        top.step([t for t, _ in history], [p for _, p in history], where="post", color="black",
                 label="prefill-pool workers")
    for m in run["served"]["move_log"]:
        top.axvline(m["time"], color="tab:red" if m["to"] == "prefill" else "tab:blue", linewidth=0.8)
        top.annotate(f"{m['worker']} -> {m['to']}", (m["time"], gpus - 0.3), fontsize=6, rotation=90, va="top")
    top.set(ylabel="prefill workers", ylim=(0, gpus), title=f"{run['layout']}, {run['workload']}, "
                                                            f"{run['qps']:.2f} req/s")
    window = 10.0
    if arrivals:
        last = max(arrivals)
        window = 10.0 if last >= 100 else max(1.0, last / 10)
        edges = np.arange(0.0, last + window, window)
        counts, _ = np.histogram(arrivals, bins=edges)
        bottom.stairs(counts / window, edges, color="tab:green")
        for ax in (top, bottom):  # the shifting workload changes phase at mid-run (pd-split's definition)
            ax.axvline(last / 2, color="grey", linestyle="--", linewidth=0.8,
                       label="conversation -> code" if ax is top else None)
    top.legend(fontsize=8)
    bottom.set(xlabel="time since the load started (s)", ylabel=f"arrivals (req/s, {window:g} s windows)")
    return save_figure(fig, out_dir, f"{NAME}-moves")


def report(meta: dict[str, Any], runs: list[dict], workloads: list[str], figures: list[str]) -> str:
    text = [f"# {NAME}", "",
            f"Served layouts on {meta['gpus']} devices against the simulator's prediction of the same requests on "
            f"the same layout (cost model `{meta['cost_model']}`).", "",
            f"- command: `{meta['command']}`", f"- commit: `{meta['commit']}`", f"- date: {meta['date']}",
            f"- devices: {', '.join(meta['device_names'])}", f"- model: {meta['model']}",
            f"- SLOs: TTFT <= {meta['ttft_slo']:g} s, per-request P99 TBT <= {meta['tbt_slo']:g} s", "",
            "Rates: " + meta["rates_note"], "",
            *(f"Layout {name} was not measured: {why}." for name, why in meta["failed"].items()),
            "## Served vs simulator", "", side_by_side(runs), "",
            "## Layout rankings (computed)", "", agreement(runs, workloads), "",
            "## Handoff share of TTFT per prompt length (mean of (handoff end - handoff start) / TTFT)", "",
            handoff_table(runs), "",
            "## KV handoffs per transfer path (/admin/status, during each load)", "", counters_table(runs), "",
            "## RAD's pool moves (/admin/status, times from the start of the load)", "", moves_table(runs), ""]
    if figures:
        text.append("Figures: " + ", ".join(f"`{f}`" for f in figures))
    return "\n".join(text)
