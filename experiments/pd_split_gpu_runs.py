"""The runs of ``pd-split-gpu``: cluster layouts, one served load against ``diptych serve`` (with ``/admin/status``
polled during it), and the simulator's prediction of the same requests on the same layout.

Units: times in seconds, rates in requests/s, bytes in bytes. A served run's times are relative to the start of its
load (the first request is sent at 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np

from diptych.experiments import pd_split

SERVED_POLICY = {"token_budget": 512, "max_decodes": 256, "max_running": 256}
"""Sarathi knobs of every served worker (``diptych serve`` gives one batch policy to all), and of every simulated
worker of the prediction, so that both run the same batches."""
RAD_KNOBS = {"decode_batch_target": 512}
"""RAD knobs besides ``min_dwell_s`` (``--rad-dwell``), as in the ``pd-split`` experiment."""
SETTLE_S = 2.0
"""Seconds between a load's last answer and its final ``/admin/status`` poll: several worker heartbeats (0.5 s
apart by default), so that the handoff counters include the load's last requests."""
PROMPT_BUCKETS = ((0, 512, "<512"), (512, 2048, "512-2k"), (2048, 8192, "2k-8k"), (8192, None, ">8k"))
"""Prompt-length buckets (tokens, lower bound inclusive) of the handoff share of TTFT."""


@dataclass(frozen=True)
class Layout:
    """A cluster layout: workers per role; ``flex`` workers are moved between pools by RAD."""

    name: str
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    flex: int = 0

    @property
    def gpus(self) -> int:
        return self.prefill + self.decode + self.colocated + self.flex

    @property
    def sim_name(self) -> str:
        """The ``pd-split`` experiment's name of this layout (``pd_split.cluster``)."""
        if self.colocated:
            return "colocated"
        if self.flex:
            return "rad"
        return f"{self.prefill}:{self.decode}"


def layouts(gpus: int) -> list[Layout]:
    """2 GPUs: 1 prefill + 1 decode, 2 colocated, 2 flex under RAD. 4 GPUs: the static splits 1:3, 2:2, 3:1,
    4 colocated, 4 flex under RAD."""
    if gpus == 2:
        return [Layout("1p1d", prefill=1, decode=1), Layout("2 colocated", colocated=2),
                Layout("2 flex RAD", flex=2)]
    if gpus == 4:
        return [*(Layout(f"{p}:{4 - p}", prefill=p, decode=4 - p) for p in (1, 2, 3)),
                Layout("4 colocated", colocated=4), Layout("4 flex RAD", flex=4)]
    raise ValueError(f"--gpus must be 2 or 4, got {gpus}")


def devices(device: str, gpus: int) -> list[str]:
    """One device per worker: ``cuda:0 .. cuda:gpus-1`` for ``cuda`` (``ValueError`` when fewer GPUs are visible),
    ``cpu`` for every worker on ``cpu``."""
    if device == "cpu":
        return ["cpu"]
    if device != "cuda":
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < gpus:
        raise ValueError(f"--gpus {gpus} with --device cuda needs {gpus} visible GPUs, found {visible}")
    return [f"cuda:{i}" for i in range(gpus)]


def device_names(device_list: list[str]) -> list[str]:
    if device_list == ["cpu"]:
        import platform

        return [f"CPU ({platform.processor() or platform.machine()})"]
    import torch

    return [torch.cuda.get_device_name(int(d.split(":")[1])) for d in device_list]


def serve_args(layout: Layout, device_list: list[str], model: str | None, rad_dwell: float) -> list[str]:
    """``diptych serve`` flags of ``layout``; workers take the devices in launch order (prefill, decode, colocated,
    flex), one GPU each."""
    args = ["--prefill-workers", str(layout.prefill), "--decode-workers", str(layout.decode),
            "--colocated-workers", str(layout.colocated), "--flex-workers", str(layout.flex),
            "--device", ",".join(device_list), "--policy", "sarathi",
            *(x for k, v in SERVED_POLICY.items() for x in ("--policy-opt", f"{k}={v}"))]
    if layout.flex:
        knobs = {**RAD_KNOBS, "min_dwell_s": rad_dwell}
        args += ["--pool-policy", "rad", *(x for k, v in knobs.items() for x in ("--pool-opt", f"{k}={v}"))]
    return args + (["--model", model] if model else [])


def sim_cluster(layout: Layout, cost_model: str, rad_dwell: float, context: int | None = None):
    """The simulator's model of ``layout``: ``pd_split.cluster`` with the served batch policy on every worker and
    the served model's context (None: the cost model's)."""
    from diptych.sim.config import PolicySpec

    policy = PolicySpec("sarathi", dict(SERVED_POLICY))
    config = pd_split.cluster(layout.sim_name, layout.gpus, cost_model, rad_dwell)
    if layout.flex:
        config = replace(config, pool_policy=PolicySpec("rad", {**RAD_KNOBS, "min_dwell_s": rad_dwell}))
    return replace(config, prefill_policy=policy, decode_policy=policy, colocated_policy=policy,
                   max_model_len=context)


def workload_specs(name: str, qps: float, requests: int, slo: tuple[float, float], max_tokens: str, context: int,
                   seed: int) -> list:
    """``pd_split.workload`` (``shift`` is its conversation-then-code workload) fitted to ``context`` tokens
    (``catalog.clip_to_context``), then given the ``max_tokens`` policy within that context; ``slo`` is (TTFT, TBT)
    in seconds."""
    from diptych.workloads.catalog import clip_to_context
    from diptych.workloads.max_tokens import apply_max_tokens

    raw = pd_split.workload(name, qps, requests, slo[0], slo[1], "oracle", None, seed)
    return apply_max_tokens(clip_to_context(raw, context), max_tokens, context)


def capacity(job: dict[str, Any]) -> dict[str, Any]:
    """goodput90 capacity (req/s) the simulator predicts for ``job['layout']`` on ``job['workload']``, scored after
    a warm-up as in ``pd-split`` (``pd_split.steady_summary``)."""
    from diptych.sim.capacity import capacity_search
    from diptych.sim.cli import simulated_context
    from diptych.sim.simulator import simulate

    layout: Layout = job["layout"]
    config = sim_cluster(layout, job["cost_model"], job["rad_dwell"])
    context = simulated_context(config)

    def one(qps: float) -> dict:
        specs = workload_specs(job["workload"], qps, max(300, int(qps * 120)), job["slo"], job["max_tokens"],
                               context, job["seed"])
        return pd_split.steady_summary(simulate(config, specs), 30.0)

    est = pd_split.estimate(job["workload"], layout.sim_name, layout.gpus, job["cost_model"], job["max_tokens"])
    result = capacity_search(one, "goodput90", 0.5 * est, est, rel_tol=0.05, max_runs=8)
    return {"layout": layout.name, "workload": job["workload"], "capacity": result.qps}


def predict(layout: Layout, specs: list, cost_model: str, rad_dwell: float, context: int) -> dict[str, Any]:
    """The simulator's summary of ``specs`` on ``layout``, plus its pool moves (count)."""
    from diptych.metrics.summary import summarize
    from diptych.sim.simulator import simulate

    result = simulate(sim_cluster(layout, cost_model, rad_dwell, context), specs)
    return {**summarize(result, fairness_metrics=False), "handoff_share_by_prompt": handoff_shares(result),
            "moves": len(result.meta.get("pool_moves", []))}


def handoff_shares(result) -> dict[str, float]:
    """Per prompt bucket, the mean of (handoff_end - handoff_start) / TTFT over the requests of ``result`` (a
    ``RunResult``, served or simulated) that had a handoff; NaN for a bucket without one."""
    t = result.times
    ttft = t["first_token"] - t["arrival"]
    share = (t["handoff_end"] - t["handoff_start"]) / np.where(ttft > 0, ttft, np.nan)
    valid = ~np.isnan(share)
    out = {}
    for lo, hi, label in PROMPT_BUCKETS:
        mask = valid & (result.prompt_len >= lo) & (result.prompt_len < (hi if hi is not None else np.inf))
        out[label] = float(share[mask].mean()) if mask.any() else float("nan")
    return out


def handoff_counters(workers: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``kv_handoffs`` summed over workers, per path: requests, bytes, seconds."""
    total: dict[str, dict[str, float]] = {}
    for w in workers.values():
        for path, counts in (w.get("kv_handoffs") or {}).items():
            into = total.setdefault(path, {"requests": 0.0, "bytes": 0.0, "seconds": 0.0})
            for key in into:
                into[key] += float(counts.get(key, 0))
    return total


def counter_delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    """``after - before`` per path and counter."""
    return {path: {k: v - before.get(path, {}).get(k, 0.0) for k, v in counts.items()}
            for path, counts in after.items()}


@dataclass
class StatusLog:
    """``/admin/status`` polled during a load: prefill-pool workers over time, the moves seen, the last workers."""

    start: float
    pool_history: list[tuple[float, int]]
    moves: dict[tuple[float, str], dict[str, Any]]
    workers: dict[str, Any]


async def _poll(http: httpx.AsyncClient, log: StatusLog, interval_s: float, done: asyncio.Event) -> None:
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            status = (await http.get("/admin/status")).json()
            log.workers = status["workers"]
            now = time.time() - log.start
            log.pool_history.append((now, sum(1 for w in log.workers.values() if w.get("pool") == "prefill")))
            for move in status.get("pools", {}).get("moves", []):
                log.moves[(move["time"], move["worker"])] = move
        if done.is_set():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), interval_s)


async def served_load(url: str, specs: list, seed: int, poll_s: float, progress: bool) -> tuple[list, StatusLog, dict]:
    """Send ``specs`` to the server at ``url`` (``serve_load.run_load`` over HTTP) while polling ``/admin/status``;
    the timelines, the status log and the handoff counters before the load."""
    from diptych.benchmarks.serve_load import LoadTarget, run_load

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        before = handoff_counters((await http.get("/admin/status")).json()["workers"])
        log = StatusLog(time.time(), [], {}, {})
        done = asyncio.Event()
        poller = asyncio.create_task(_poll(http, log, poll_s, done))
        try:
            timelines = await run_load(specs, LoadTarget(url, {}), seed=seed, progress=progress)
            await asyncio.sleep(SETTLE_S)  # the last heartbeats reach the coordinator before the final poll
        finally:
            done.set()
            await poller
    return timelines, log, before


def served_summary(timelines: list, log: StatusLog, before: dict) -> dict[str, Any]:
    """The run's summary, handoff shares per prompt bucket, handoff counters of the load, and the pool moves made
    during it (times relative to the load's start)."""
    from diptych.metrics.results import RunResult
    from diptych.metrics.summary import summarize

    result = RunResult.from_timelines(timelines)
    summary = summarize(result, fairness_metrics=False)
    moves = sorted(({**m, "time": m["time"] - log.start,
                     "completed": None if m["completed"] is None else m["completed"] - log.start}
                    for m in log.moves.values() if m["time"] >= log.start), key=lambda m: m["time"])
    return {**summary, "handoff_share_by_prompt": handoff_shares(result),
            "kv_handoffs": counter_delta(handoff_counters(log.workers), before), "move_log": moves,
            "moves": len(moves), "pool_history": log.pool_history}
