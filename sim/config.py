"""Cluster configuration of a simulation: workers, policies by registry name and knobs, KV pools, handoff link.

Times in seconds, memory in KV blocks of ``block_size`` tokens, bandwidth in bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from diptych.cluster.placement import DEFAULT_EXPECTED_OUTPUT_TOKENS
from diptych.engine.kv_rules import DEFAULT_WATERMARK_FRACTION, watermark_blocks
from diptych.policies.admission import ADMISSION_POLICIES
from diptych.policies.batch import BATCH_POLICIES
from diptych.policies.pool import POOL_POLICIES
from diptych.sim.cost_model import DEFAULT, CostModel


@dataclass
class PolicySpec:
    """A policy by registry name with its knobs."""

    name: str
    knobs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.knobs:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in sorted(self.knobs.items()))})"


@dataclass
class ClusterConfig:
    """A disaggregated cluster (``prefill_workers`` + ``decode_workers``) or a colocated one (``colocated_workers``
    running prefill and decode in one engine); not both.

    - ``kv_blocks``: KV blocks per worker (None: the cost model's GPU memory at ``memory_utilization`` minus the
      weights, e.g. 53,100 blocks of 16 tokens for Mistral-7B on an H200).
    - ``kv_watermark``: fraction of each worker's pool that admission (and a decode worker's handoff reservation)
      leaves free while sequences run (``engine.kv_rules``); ``max_model_len``: the engines' context length in
      tokens (None: only the pool bounds a sequence, ``kv_rules.max_positions``); ``expected_output_tokens``: the
      output growth (tokens) placement expects of a request, ``prompt + min(max_tokens, expected_output_tokens)``
      (``cluster.placement``, the coordinator's ``--expected-output-tokens``); ``idle_poll_s``: how long a worker
      whose plan ran nothing while sequences hold KV (e.g. SLAI deferring every decode when no block is free) waits
      before planning again (the engine loop plans again at once).
    - Policies: ``admission`` (coordinator, ``ADMISSION_POLICIES``), ``prefill_policy`` / ``decode_policy`` /
      ``colocated_policy`` (per-worker ``BATCH_POLICIES``), ``pool_policy`` (``POOL_POLICIES``, ticked every
      ``pool_tick_s``; ``rad`` moves workers between the prefill and decode pools, draining them first).
    - ``max_prefill_backlog_tokens``: prompt tokens queued per prefill (or colocated) worker before requests wait in
      the coordinator (the services' default 4096; None: unbounded, so the worker's batch policy sees every request).
    - ``max_decode_sequences``: requests placed on one decode worker at a time (the coordinator's
      ``--max-decode-sequences``, default 1024); set it to the decode batch policy's decodes per iteration so that
      no placed sequence waits for a batch slot.
    - ``colocated_reserve``: the coordinator reserves a request's whole KV on a colocated worker at placement, as the
      services do (fairness policies then order admission); False [simulator only] leaves KV admission to the
      worker's batch policy (with no backlog limit, SLAI's shortest-prompt-first among all arrived requests).
    - Handoff: ``handoff_latency_s + bytes / handoff_bandwidth_Bps``, bytes = whole prompt blocks x KV bytes/token.
    - ``dispatch_latency_s``: the control path, from a request's admission to its arrival in its prefill (or
      colocated) worker's queue (the services' frontend -> coordinator -> reservation round trip -> worker
      messages; ``diptych experiment sim-agreement`` measures it on idle services). 0: instant.
    - ``exact``: call the batch policy before every iteration (else stationary decode-only stretches are
      fast-forwarded, see ``sim.simulator``); ``record_tokens`` keeps every token time (memory-hungry on long runs).
    """

    prefill_workers: int = 1
    decode_workers: int = 1
    colocated_workers: int = 0
    cost_model: CostModel = DEFAULT
    block_size: int = 16
    kv_blocks: int | None = None
    memory_utilization: float = 0.9
    kv_watermark: float = DEFAULT_WATERMARK_FRACTION
    max_model_len: int | None = None
    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS
    idle_poll_s: float = 0.001
    admission: PolicySpec = field(default_factory=lambda: PolicySpec("fcfs"))
    prefill_policy: PolicySpec = field(default_factory=lambda: PolicySpec("sarathi", {"token_budget": 2048}))
    decode_policy: PolicySpec = field(default_factory=lambda: PolicySpec("sarathi", {"token_budget": 512}))
    colocated_policy: PolicySpec = field(default_factory=lambda: PolicySpec("sarathi", {"token_budget": 512}))
    pool_policy: PolicySpec = field(default_factory=lambda: PolicySpec("static"))
    pool_tick_s: float = 1.0
    handoff_latency_s: float = 0.001
    handoff_bandwidth_Bps: float = 50e9
    dispatch_latency_s: float = 0.0
    max_prefill_backlog_tokens: int | None = 4096
    max_decode_sequences: int = 1024
    colocated_reserve: bool = True
    exact: bool = False
    record_tokens: bool = False

    def validate(self) -> None:
        if self.colocated_workers < 0 or self.prefill_workers < 0 or self.decode_workers < 0:
            raise ValueError("worker counts must be >= 0")
        if self.colocated_workers and (self.prefill_workers or self.decode_workers):
            raise ValueError("a cluster is either disaggregated (prefill + decode workers) or colocated, not both: "
                             "set --prefill-workers 0 --decode-workers 0 with --colocated-workers")
        if not self.colocated_workers and (self.prefill_workers < 1 or self.decode_workers < 1):
            raise ValueError("a disaggregated cluster needs at least one prefill and one decode worker")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError("kv_blocks must be >= 1")
        watermark_blocks(self.kv_watermark, 1)  # ValueError outside [0, 1)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2 or None")
        if self.expected_output_tokens < 0:
            raise ValueError("expected_output_tokens must be >= 0")
        if not self.idle_poll_s > 0:
            raise ValueError("idle_poll_s must be > 0")
        if self.dispatch_latency_s < 0:
            raise ValueError("dispatch_latency_s must be >= 0")
        if self.pool_tick_s <= 0 or self.handoff_latency_s < 0 or self.handoff_bandwidth_Bps <= 0:
            raise ValueError("pool_tick_s and handoff bandwidth must be > 0, handoff latency >= 0")
        if self.max_prefill_backlog_tokens is not None and self.max_prefill_backlog_tokens < 1:
            raise ValueError("max_prefill_backlog_tokens must be >= 1 or None")
        if self.max_decode_sequences < 1:
            raise ValueError("max_decode_sequences must be >= 1")
        for spec, registry in ((self.admission, ADMISSION_POLICIES), (self.prefill_policy, BATCH_POLICIES),
                               (self.decode_policy, BATCH_POLICIES), (self.colocated_policy, BATCH_POLICIES),
                               (self.pool_policy, POOL_POLICIES)):
            try:
                registry.create(spec.name, **spec.knobs)
            except KeyError as exc:
                raise ValueError(str(exc.args[0])) from None
        if self.pool_policy.name != "static" and self.colocated_workers:
            raise ValueError("pool policies move workers between prefill and decode pools; "
                             "a colocated cluster has none")
        self.blocks_per_worker()

    def blocks_per_worker(self) -> int:
        if self.kv_blocks is not None:
            return self.kv_blocks
        return self.cost_model.kv_capacity_tokens(self.memory_utilization) // self.block_size

    @property
    def num_workers(self) -> int:
        return self.prefill_workers + self.decode_workers + self.colocated_workers

    def describe(self) -> dict[str, Any]:
        return {
            "workers": ({"colocated": self.colocated_workers} if self.colocated_workers
                        else {"prefill": self.prefill_workers, "decode": self.decode_workers}),
            "cost_model": self.cost_model.device + " / " + self.cost_model.model.name,
            "kv_blocks_per_worker": self.blocks_per_worker(), "block_size": self.block_size,
            "kv_watermark": self.kv_watermark, "max_model_len": self.max_model_len,
            "expected_output_tokens": self.expected_output_tokens,
            "admission": str(self.admission),
            "batch": ({"colocated": str(self.colocated_policy)} if self.colocated_workers
                      else {"prefill": str(self.prefill_policy), "decode": str(self.decode_policy)}),
            "pool": str(self.pool_policy),
            "handoff": f"{self.handoff_latency_s * 1e3:g} ms + bytes / {self.handoff_bandwidth_Bps / 1e9:g} GB/s",
            "dispatch_latency_ms": self.dispatch_latency_s * 1e3,
            "max_prefill_backlog_tokens": self.max_prefill_backlog_tokens,
            "max_decode_sequences": self.max_decode_sequences,
            "colocated_reserve": self.colocated_reserve, "exact": self.exact,
        }


__all__ = ["ClusterConfig", "PolicySpec", "replace"]
