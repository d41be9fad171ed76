"""``sim-agreement``: does ``diptych simulate`` predict what the real services do? The same workload runs on a real
cluster (every service its own process over ZeroMQ, workers with ``--engine sim``: iterations take the cost model's
time) and in the simulator, with the same policies, KV pool size and handoff model; the report puts median TTFT and
P99 TBT side by side. Agreement: both within ``--tolerance`` (10%).

Settings (each at two loads by default):

- ``slai-vs-sarathi``: the ``slai-vs-sarathi`` experiment's worker (one colocated GPU, ``rtx6000ada-mistral-7b``,
  token budget 512, at most 128 decodes and running sequences), ShareGPT4 lengths, 5%/95% SLAI tiers, capped
  Poisson arrivals, under the ``slai`` batch policy and Sarathi-Serve (``sarathi``). The services reserve each
  request's KV at placement and queue at most 4096 prompt tokens per worker; the simulator is set up alike.
- ``pd-split``: the ``pd-split`` experiment's disaggregated workers on 4 GPUs (2 prefill : 2 decode,
  ``h200-mistral-7b``, prefill chunks of 2048 tokens, up to 1024 decodes per iteration), ShareGPT4 lengths with
  its SLOs (TTFT 1 s, TBT 0.1 s), Poisson arrivals, KV handed off over a modelled 50 GB/s + 1 ms link.

The control path (frontend -> coordinator -> KV reservation round trip -> worker) is measured first on the idle
cluster: a few requests, one at a time, each timed from its arrival to the start of its prefill; the simulator gets
the median as ``dispatch_latency_s``. Queueing behind busy processes under load is not modelled: the runs check it.

Times on the services' side are the workers' own token times (returned in each request's timeline), so the load
generator's and the frontend's delays do not count in TBT; TTFT runs from the frontend's arrival time. Run it on an
otherwise idle machine: the services run in real time, and a loaded CPU delays their iterations.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diptych.experiments.common import (
    add_max_tokens_argument,
    md_table,
    parse_names,
    parse_numbers,
    pyplot,
    save_figure,
    write_markdown,
)

NAME = "sim-agreement"
HELP = "real services with --engine sim vs the simulator on the same workload: median TTFT and P99 TBT"
SLAI_KNOBS = {"token_budget": 512, "max_running": 128, "max_decodes": 128}
PD_KNOBS = {"token_budget": 2048, "max_decodes": 1024, "max_running": 1024}


@dataclass
class Setting:
    """One cluster and workload; ``loads`` in requests/s, ``requests`` per run at each load."""

    name: str
    cost_model: str
    policy: str
    knobs: dict[str, Any]
    workload: str
    arrivals: str
    tiers: str
    loads: tuple[float, ...]
    requests: tuple[int, ...]
    prefill_workers: int = 0
    decode_workers: int = 0
    colocated_workers: int = 0
    notes: list[str] = field(default_factory=list)


SETTINGS = {
    "slai-vs-sarathi/slai": Setting("slai-vs-sarathi/slai", "rtx6000ada-mistral-7b", "slai", SLAI_KNOBS, "sharegpt4",
                                    "poisson-capped", "slai", (1.0, 2.0), (240, 360), colocated_workers=1),
    "slai-vs-sarathi/sarathi": Setting("slai-vs-sarathi/sarathi", "rtx6000ada-mistral-7b", "sarathi", SLAI_KNOBS,
                                       "sharegpt4", "poisson-capped", "slai", (1.0, 2.0), (240, 360),
                                       colocated_workers=1),
    "pd-split/2p2d": Setting("pd-split/2p2d", "h200-mistral-7b", "sarathi", PD_KNOBS, "sharegpt4", "poisson",
                             "default:1:0.1:1.0", (10.0, 20.0), (600, 900), prefill_workers=2, decode_workers=2),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings [%(default)s]")
    p.add_argument("--scale-requests", type=float, default=1.0,
                   help="multiply every run's request count (longer runs, steadier medians) [%(default)s]")
    p.add_argument("--loads", default=None,
                   help="comma-separated loads (req/s) for every setting, each run as long as the setting's first "
                   "[each setting's own two]")
    p.add_argument("--tolerance", type=float, default=0.10, help="agreement threshold, relative [%(default)s]")
    p.add_argument("--seed", type=int, default=1, help="workload seed [%(default)s]")
    p.add_argument("--keep-logs", default=None, help="directory for the services' logs [a temporary one]")
    add_max_tokens_argument(p, NAME, context="the --engine sim workers' context (engine.sim_engine.SIM_CONTEXT_LEN), "
                                             "the same specs going to the simulator")


def workload(setting: Setting, qps: float, requests: int, seed: int, max_tokens: str):
    """The setting's workload, ``max_tokens`` the policy (``workloads.max_tokens``) within the services' context."""
    from diptych.engine.sim_engine import SIM_CONTEXT_LEN
    from diptych.workloads.catalog import WorkloadConfig, build_workload

    return build_workload(WorkloadConfig(setting.workload, qps=qps, num_requests=requests,
                                         arrivals=setting.arrivals, tiers=setting.tiers, seed=seed,
                                         max_tokens=max_tokens, model_context=SIM_CONTEXT_LEN))


def kv_blocks(setting: Setting, block_size: int = 16) -> int:
    from diptych.sim.cost_model import resolve

    return resolve(setting.cost_model).kv_capacity_tokens() // block_size


def simulator_config(setting: Setting, dispatch_latency_s: float = 0.0):
    """The simulator set up as the services run: KV reserved at placement, 4096 prompt tokens of worker backlog,
    one batch policy for every role, the services' handoff model, the measured control path."""
    from diptych.sim.config import ClusterConfig, PolicySpec
    from diptych.sim.cost_model import resolve

    policy = PolicySpec(setting.policy, dict(setting.knobs))
    return ClusterConfig(prefill_workers=setting.prefill_workers, decode_workers=setting.decode_workers,
                         colocated_workers=setting.colocated_workers, cost_model=resolve(setting.cost_model),
                         kv_blocks=kv_blocks(setting), prefill_policy=policy, decode_policy=policy,
                         colocated_policy=policy, colocated_reserve=True, max_prefill_backlog_tokens=4096,
                         handoff_latency_s=1e-3, handoff_bandwidth_Bps=50e9, dispatch_latency_s=dispatch_latency_s,
                         record_tokens=True)


def calibration_specs(specs: list, count: int = 8, gap_s: float = 0.4) -> list:
    """``count`` of the workload's prompts, one every ``gap_s`` seconds with 2 output tokens: each meets an idle
    cluster, so its arrival-to-prefill-start time is the control path alone."""
    from dataclasses import replace

    return [replace(s, request_id=f"calibrate-{i}", arrival_time=i * gap_s, output_len=2, max_tokens=2)
            for i, s in enumerate(specs[:count])]


def run_services(setting: Setting, specs: list, seed: int, log_dir: str, progress: bool):
    """The workload against a real cluster of ``--engine sim`` workers, after the control-path calibration;
    returns its ``RunResult`` and the measured control path (seconds)."""
    from diptych.benchmarks.serve_load import FAILURES, LoadTarget, run_load
    from diptych.launcher import Cluster, ClusterSpec, with_free_ports
    from diptych.metrics.results import RunResult

    spec = with_free_ports(ClusterSpec(
        prefill_workers=setting.prefill_workers, decode_workers=setting.decode_workers,
        colocated_workers=setting.colocated_workers, engine="sim", cost_model=setting.cost_model,
        num_blocks=kv_blocks(setting), policy=setting.policy,
        policy_opts=[f"{k}={v}" for k, v in setting.knobs.items()], log_level="WARNING"))
    FAILURES.clear()
    with Cluster(spec, log_dir=log_dir) as cluster:
        cluster.wait_ready()
        target = LoadTarget(spec.sdk_addr, {})
        calibration = asyncio.run(run_load(calibration_specs(specs), target, seed=seed, progress=False))
        timelines = asyncio.run(run_load(specs, target, seed=seed, progress=progress))
    if FAILURES:
        raise RuntimeError(f"{sum(FAILURES.values())} requests failed on the services (logs in {log_dir}): "
                           f"{FAILURES.most_common(3)}")
    control_path = [t.prefill_start - t.arrival for t in calibration if t.prefill_start is not None]
    if not control_path:
        raise RuntimeError(f"no calibration request reached a worker (logs in {log_dir})")
    return RunResult.from_timelines(timelines), float(np.median(control_path))


def compare(services: dict, simulator: dict, tolerance: float) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key in ("ttft_p50", "tbt_p99", "ttft_p99", "tbt_p50"):
        row[key] = (services[key], simulator[key], services[key] / simulator[key])
    row["agrees"] = all(abs(row[key][2] - 1) <= tolerance for key in ("ttft_p50", "tbt_p99"))
    return row


def gap_split(result) -> dict[str, float]:
    """Where the TBT tail comes from: the first gap of each request (its first token to its second: in a
    disaggregated cluster the KV handoff and the wait for a decode iteration) against every later gap, in seconds."""
    first = [t[1] - t[0] for t in result.token_times if len(t) >= 2]
    later = [np.diff(t[1:]) for t in result.token_times if len(t) >= 3]
    later_all = np.concatenate(later) if later else np.array([np.nan])
    return {"first_p50": float(np.median(first)) if first else float("nan"),
            "first_p99": float(np.percentile(first, 99)) if first else float("nan"),
            "later_p99": float(np.percentile(later_all, 99))}


def run(args: argparse.Namespace, out_dir: Path) -> list[Path]:
    from diptych.metrics.summary import summarize
    from diptych.sim.simulator import simulate
    from diptych.workloads.max_tokens import parse_max_tokens

    max_tokens = str(parse_max_tokens(args.max_tokens))
    names = parse_names(args.settings, SETTINGS, "setting")
    if args.scale_requests <= 0 or not 0 < args.tolerance < 1:
        raise ValueError("--scale-requests must be positive and --tolerance in (0, 1)")
    loads_override = parse_numbers(args.loads, "--loads") if args.loads else None
    log_root = args.keep_logs or tempfile.mkdtemp(prefix="diptych-sim-agreement-")
    rows, cdfs = [], []
    for name in names:
        setting = SETTINGS[name]
        runs = (zip(setting.loads, setting.requests) if loads_override is None
                else [(qps, setting.requests[0]) for qps in loads_override])
        for qps, requests in runs:
            requests = max(20, int(requests * args.scale_requests * (0.25 if args.quick else 1)))
            specs = workload(setting, qps, requests, args.seed, max_tokens)
            if not args.no_progress:
                print(f"{name} at {qps:g} req/s, {requests} requests: services, then the simulator")
            log_dir = str(Path(log_root) / f"{name.replace('/', '-')}-{qps:g}")
            services, control_path_s = run_services(setting, specs, args.seed, log_dir, not args.no_progress)
            simulated = simulate(simulator_config(setting, control_path_s), specs)
            s_sum, m_sum = (summarize(r, fairness_metrics=False) for r in (services, simulated))
            row = compare(s_sum, m_sum, args.tolerance)
            row["control_path_s"] = control_path_s
            row["gaps"] = (gap_split(services), gap_split(simulated))
            rows.append((name, qps, requests, row))
            cdfs.append((f"{name} @ {qps:g}", _ttfts(services), _ttfts(simulated)))
    files = []
    plt = pyplot()
    if plt is not None:
        files.append(_plot(plt, out_dir, cdfs))
    files.append(write_markdown(out_dir, NAME, _report(args, rows, log_root)))
    return files


def _ttfts(result) -> np.ndarray:
    ttft = result.times["first_token"] - result.times["arrival"]
    return np.sort(ttft[~np.isnan(ttft)])


def _plot(plt, out_dir: Path, cdfs: list) -> Path:
    cols = min(len(cdfs), 3)
    rows = -(-len(cdfs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, services, simulated) in zip(axes.flat, cdfs):
        for values, label, style in ((services, "services (--engine sim)", "-"), (simulated, "simulator", "--")):
            ax.plot(values, np.linspace(0, 1, len(values)), style, label=label)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("CDF")
    for ax in list(axes.flat)[len(cdfs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return save_figure(fig, out_dir, NAME)


def _report(args: argparse.Namespace, rows: list, log_root: str) -> str:
    def triple(values: tuple[float, float, float], unit_scale: float = 1.0, unit: str = "s") -> list:
        return [f"{values[0] * unit_scale:.3g} {unit}", f"{values[1] * unit_scale:.3g} {unit}", f"{values[2]:.2f}x"]

    table = md_table(
        ["setting", "load (req/s)", "requests", "TTFT p50 services", "simulator", "ratio", "TBT p99 services",
         "simulator", "ratio", f"within {args.tolerance:.0%}"],
        [[name, qps, n, *triple(r["ttft_p50"]), *triple(r["tbt_p99"], 1e3, "ms"), "yes" if r["agrees"] else "no"]
         for name, qps, n, r in rows])
    context = md_table(
        ["setting", "load (req/s)", "control path (measured, ms)", "TTFT p99 services", "simulator", "ratio",
         "TBT p50 services", "simulator", "ratio"],
        [[name, qps, f"{r['control_path_s'] * 1e3:.2f}", *triple(r["ttft_p99"]), *triple(r["tbt_p50"], 1e3, "ms")]
         for name, qps, _, r in rows])
    gaps = md_table(
        ["setting", "load (req/s)", "first gap p50 services", "simulator", "first gap p99 services", "simulator",
         "later gaps p99 services", "simulator", "ratio"],
        [[name, qps, *(f"{g[key] * 1e3:.3g} ms" for key in ("first_p50", "first_p99") for g in r["gaps"]),
          *(f"{g['later_p99'] * 1e3:.3g} ms" for g in r["gaps"]),
          f"{r['gaps'][0]['later_p99'] / r['gaps'][1]['later_p99']:.2f}x"] for name, qps, _, r in rows])
    agreed = sum(1 for *_, r in rows if r["agrees"])
    command = (f"diptych experiment {NAME} --settings {args.settings} --scale-requests {args.scale_requests:g} "
               f"--seed {args.seed}" + (f" --loads {args.loads}" if args.loads else "")
               + (" --quick" if args.quick else ""))
    return "\n".join([
        f"# {NAME}", "",
        f"Generated by `{command}`. Each run sends the same workload to a real cluster of `--engine sim` workers "
        "(separate processes over ZeroMQ; iterations take the cost model's time) and to `diptych simulate`; see "
        "`experiments/sim_agreement.py` for the settings. The simulator's control path (`dispatch_latency_s`) is "
        "measured on the idle cluster before each run (column below).", "",
        f"**{agreed} of {len(rows)} runs agree within {args.tolerance:.0%}** on both median TTFT and P99 TBT.", "",
        table, "", "Tails and medians beside them (not part of the criterion):", "", context, "",
        "Token gaps split: each request's first gap (first to second token: for a disaggregated request, the KV "
        "handoff and the wait for the decode worker's next iteration) and all later gaps (P99 exact here; the "
        "criterion's P99 comes from the pooled histogram):", "", gaps, "",
        f"![TTFT distributions]({NAME}.png)", "",
        f"Service logs of the runs were written under `{log_root}` (not kept in the repository).",
    ])
