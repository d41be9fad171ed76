"""Pool allocation: how many workers serve prefill and how many decode, decided tick by tick by the coordinator.

The coordinator calls ``policy.decide(stats, now)`` periodically with the cluster's ``PoolStats``; the answer is a
``PoolDecision`` (move one worker from one pool to the other, with a reason for the logs) or None. The coordinator
carries a decision out safely (the worker finishes or hands off its in-flight work first); the policy only decides.

``static``: never moves a worker (the fixed split given at start).

``rad`` [Diptych], the dynamic-allocation half of RAD as Diptych reads it. Two pressures, each 1.0 at its target:

- prefill pressure ``P = max(backlog_s / backlog_target_s, prompt_arrival_tps / prefill_throughput_tps /
  prefill_util_target)``, with ``backlog_s = queued_prompt_tokens / prefill_throughput_tps`` (seconds to drain the
  prompt backlog at the pool's rate; infinite when tokens wait and the rate is 0; 0 when nothing waits). The
  second term, the pool's utilisation, is left out when the arrival rate is unknown; it keeps a pool that is busy
  but has no queue yet from being judged idle;
- decode pressure ``D = max(kv_utilization / kv_target, running_decodes / (decode_workers * decode_batch_target),
  (1 - tbt_slack) / (1 - min_tbt_slack))``: KV memory, batch fill against the tile-efficient batch size, and TBT
  headroom (``tbt_slack`` = the fraction of the TBT target left unused, 1 - recent P99 TBT / target; the term is
  left out when unknown).

Rule, each tick:

1. No move within ``min_dwell_s`` seconds of the previous move (dwell).
2. The bottleneck is the pool with the larger pressure; it must be at least ``up_threshold``.
3. The other pool donates one worker only if it has at least two (a pool is never emptied) and its pressure
   projected onto one worker fewer, ``pressure * n / (n - 1)`` (the same load over fewer workers), is at most
   ``down_threshold``.
4. Then move one worker from the donor to the bottleneck; the reason string gives both pressures and their parts.

Hysteresis: ``down_threshold < up_threshold``, so right after a move the donor's projected pressure is below the level
that would pull the worker back; with the dwell time this keeps the split from oscillating.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from policies.registry import Registry

PREFILL = "prefill"
DECODE = "decode"


@dataclass
class PoolStats:
    """The cluster at one tick. Workers counted per pool (a draining worker still counts in its old pool)."""

    prefill_workers: int
    decode_workers: int
    queued_prompt_tokens: int  # prompt tokens not yet prefilled (coordinator queue plus prefill worker queues)
    prefill_throughput_tps: float  # prefill tokens/s the whole prefill pool sustains when busy (estimate)
    decode_kv_utilization: float  # used / total KV blocks across the decode pool, 0..1
    running_decodes: int  # sequences decoding across the decode pool
    tbt_slack: float | None = None  # smallest fraction of the TBT target left unused over decode workers
    prompt_arrival_tps: float | None = None  # prompt tokens/s arriving (recent average), None if unknown


@dataclass
class PoolDecision:
    """Move one worker from ``from_pool`` to ``to_pool`` (``"prefill"`` or ``"decode"``); ``reason`` for the logs."""

    from_pool: str
    to_pool: str
    reason: str


class PoolPolicy(ABC):
    name: str = ""

    @abstractmethod
    def decide(self, stats: PoolStats, now: float) -> PoolDecision | None:
        """A worker move, or None to keep the split. ``now`` in seconds."""


POOL_POLICIES: Registry[PoolPolicy] = Registry("pool")


@POOL_POLICIES.register("static")
class StaticPools(PoolPolicy):
    """The split given at start, never changed."""

    summary = "keep the split given at start"

    def decide(self, stats: PoolStats, now: float) -> PoolDecision | None:
        return None


@POOL_POLICIES.register("rad")
class RADPools(PoolPolicy):
    """Knobs: ``backlog_target_s`` (1.0), ``prefill_util_target`` (0.9), ``kv_target`` (0.9),
    ``decode_batch_target`` (decodes per worker at full tile efficiency, 128), ``min_tbt_slack`` (0.2),
    ``up_threshold`` (1.0), ``down_threshold`` (0.7), ``min_dwell_s`` (30.0). All [Diptych] choices: the paper's
    switching rule was not available."""

    summary = "move flex workers toward the bottleneck pool (prefill backlog vs decode pressure), with hysteresis"

    def __init__(self, backlog_target_s: float = 1.0, prefill_util_target: float = 0.9, kv_target: float = 0.9,
                 decode_batch_target: int = 128, min_tbt_slack: float = 0.2, up_threshold: float = 1.0, down_threshold: float = 0.7,
                 min_dwell_s: float = 30.0) -> None:
        if backlog_target_s <= 0 or decode_batch_target <= 0:
            raise ValueError("backlog_target_s and decode_batch_target must be positive")
        if not 0 < kv_target <= 1 or not 0 < prefill_util_target <= 1:
            raise ValueError("kv_target and prefill_util_target must be in (0, 1]")
        if not 0 <= min_tbt_slack < 1:
            raise ValueError("min_tbt_slack must be in [0, 1)")
        if not 0 < down_threshold < up_threshold:
            raise ValueError("thresholds must satisfy 0 < down_threshold < up_threshold (hysteresis)")
        if min_dwell_s < 0:
            raise ValueError("min_dwell_s must be >= 0")
        self.backlog_target_s = backlog_target_s
        self.prefill_util_target = prefill_util_target
        self.kv_target = kv_target
        self.decode_batch_target = decode_batch_target
        self.min_tbt_slack = min_tbt_slack
        self.up_threshold = up_threshold
        self.down_threshold = down_threshold
        self.min_dwell_s = min_dwell_s
        self.last_move_time: float | None = None

    def prefill_pressure(self, stats: PoolStats) -> tuple[float, str]:
        backlog_s = _ratio(stats.queued_prompt_tokens, stats.prefill_throughput_tps)
        pressure = backlog_s / self.backlog_target_s
        detail = (f"backlog {stats.queued_prompt_tokens} tokens at {stats.prefill_throughput_tps:.0f} tok/s "
                  f"= {backlog_s:.2f} s")
        if stats.prompt_arrival_tps is not None:
            utilization = _ratio(stats.prompt_arrival_tps, stats.prefill_throughput_tps)
            pressure = max(pressure, utilization / self.prefill_util_target)
            detail += f", arrivals {stats.prompt_arrival_tps:.0f} tok/s = {utilization:.0%} busy"
        return pressure, detail

    def decode_pressure(self, stats: PoolStats) -> tuple[float, str]:
        parts = {
            "kv": stats.decode_kv_utilization / self.kv_target,
            "batch": stats.running_decodes / (max(stats.decode_workers, 1) * self.decode_batch_target),
        }
        if stats.tbt_slack is not None:
            parts["tbt"] = (1 - stats.tbt_slack) / (1 - self.min_tbt_slack)
        detail = (f"KV {stats.decode_kv_utilization:.0%}, {stats.running_decodes} decodes, "
                  + ", ".join(f"{name} {value:.2f}" for name, value in parts.items()))
        return max(parts.values()), detail

    def decide(self, stats: PoolStats, now: float) -> PoolDecision | None:
        if self.last_move_time is not None and now - self.last_move_time < self.min_dwell_s:
            return None
        prefill, prefill_detail = self.prefill_pressure(stats)
        decode, decode_detail = self.decode_pressure(stats)
        if prefill >= decode:
            to_pool, from_pool, pressure, donor_pressure = PREFILL, DECODE, prefill, decode
            donors = stats.decode_workers
        else:
            to_pool, from_pool, pressure, donor_pressure = DECODE, PREFILL, decode, prefill
            donors = stats.prefill_workers
        if pressure < self.up_threshold or donors < 2:
            return None
        projected = donor_pressure * donors / (donors - 1)
        if projected > self.down_threshold:
            return None
        self.last_move_time = now
        reason = (f"{to_pool} is the bottleneck: prefill pressure {prefill:.2f} ({prefill_detail}); "
                  f"decode pressure {decode:.2f} ({decode_detail}); {from_pool} pool of {donors} "
                  f"projected at {projected:.2f} <= {self.down_threshold} with one worker fewer")
        return PoolDecision(from_pool, to_pool, reason)


def _ratio(amount: float, rate: float) -> float:
    """``amount / rate``; 0 when there is nothing, infinite when something meets a zero rate."""
    if amount <= 0:
        return 0.0
    return amount / rate if rate > 0 else math.inf
