"""Small clusters and workloads for simulator tests."""

from __future__ import annotations

from dataclasses import replace

from diptych.sim.config import ClusterConfig, PolicySpec
from diptych.sim.cost_model import DEFAULT
from diptych.workloads.catalog import WorkloadConfig, build_workload
from diptych.workloads.spec import RequestSpec


def specs(n: int = 60, qps: float = 20.0, name: str = "sharegpt4", tiers: str = "slai", seed: int = 0,
          clients: int = 1) -> list[RequestSpec]:
    return build_workload(WorkloadConfig(name=name, qps=qps, num_requests=n, tiers=tiers, seed=seed, clients=clients))


def disaggregated(prefill: int = 1, decode: int = 2, **kw) -> ClusterConfig:
    return ClusterConfig(prefill_workers=prefill, decode_workers=decode, **kw)


def colocated(workers: int = 1, policy: str = "sarathi", **kw) -> ClusterConfig:
    knobs = kw.pop("knobs", {})
    return ClusterConfig(prefill_workers=0, decode_workers=0, colocated_workers=workers,
                         colocated_policy=PolicySpec(policy, knobs), **kw)


def request(rid: str, t: float, prompt: int, output: int, **kw) -> RequestSpec:
    return RequestSpec(rid, t, prompt, output, **kw)


__all__ = ["specs", "disaggregated", "colocated", "request", "replace", "DEFAULT", "PolicySpec"]
