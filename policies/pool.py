"""Pool allocation: how many workers serve prefill and how many decode, decided tick by tick by the coordinator.

The coordinator calls ``policy.decide(stats, now)`` periodically with the cluster's ``PoolStats``; the answer is a
``PoolDecision`` (move ``workers`` workers from one pool to the other, with a reason for the logs) or None. The
coordinator carries a decision out safely (each worker finishes or hands off its in-flight work first); the policy
only decides.

``static``: never moves a worker (the fixed split given at start).

``rad`` [Diptych], the dynamic-allocation half of RAD as Diptych reads it. Two pressures, each 1.0 at its target and
each the largest of its terms (a term whose input is unknown, None, is left out):

- prefill pressure ``P``:
  ``backlog = queued_prompt_tokens / prefill_throughput_tps / backlog_target_s`` (seconds to drain the prompts that
  wait for prefill at the pool's rate; infinite when tokens wait and the rate is 0, 0 when nothing waits) and
  ``utilisation = prompt_arrival_tps / prefill_throughput_tps / prefill_util_target`` (keeps a pool that is busy but
  has no queue yet from being judged idle);
- decode pressure ``D``:
  ``kv = (decode_kv_utilization + kv_waiting) / kv_target`` (KV reserved, plus the KV of requests waiting in the
  coordinator because no decode worker can reserve theirs: a decode bottleneck, not a prefill backlog),
  ``batch = running_decodes / (decode_workers * decode_batch_target)`` (batch fill against the tile-efficient size),
  ``utilisation = decode_tokens_per_s / decode_capacity_tps / decode_util_target`` (decode compute: a decode pool
  near its token rate limit has step times, and so batches and KV use, that grow without bound, long before its KV
  looks full; the simulator fills both, the services' coordinator leaves them unknown for now, as decode workers do
  not report a capacity) and ``tbt = (1 - tbt_slack) / (1 - min_tbt_slack)`` (TBT headroom).

Every term is a load spread over the pool's workers, so a pool of ``n'`` workers instead of ``n`` is projected at
``pressure * n / n'`` (for the TBT term this is an approximation). Rule, each tick:

1. No decision within ``min_dwell_s`` seconds of the previous move, nor while a moved worker still drains
   (``draining_workers > 0``: the pressures do not show the move yet).
2. No move while the larger pressure ``max(P, D)`` is below ``min_pressure`` (the cluster is comfortable).
3. Every split reachable by moving 1 .. ``max_workers_per_move`` workers (None: any number) from one pool to the
   other, leaving each pool at least one worker, is projected; the one with the lowest ``max(P', D')`` is chosen
   (the fewest workers moved on a tie).
4. The move is made only if it lowers the larger pressure by the relative margin ``min_gain``:
   ``max(P', D') <= (1 - min_gain) * max(P, D)``.

Workers always go to the pool with the larger pressure (taking workers from it cannot lower the larger pressure); the
decision's reason names it the bottleneck and gives both pressures, their parts and the projection.

Hysteresis: the chosen split minimises the larger projected pressure, so moving back would raise it; only a change
in load (beyond the ``min_gain`` margin) moves a worker back. An overshoot is undone the same way: when the pool that
gave workers becomes the bottleneck, returning them lowers the larger pressure.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from diptych.policies.knobs import Knob
from diptych.policies.registry import Registry

PREFILL = "prefill"
DECODE = "decode"


@dataclass
class PoolStats:
    """The cluster at one tick. Workers counted per pool (a draining worker still counts in its old pool). Tokens
    are tokens, rates tokens per second, KV quantities fractions of the decode pool's KV blocks."""

    prefill_workers: int
    decode_workers: int
    queued_prompt_tokens: int
    """Prompt tokens waiting for prefill: prefill worker queues, plus the coordinator's queue unless its head waits
    for decode KV (then it counts in ``kv_waiting`` instead)."""
    prefill_throughput_tps: float  # prefill tokens/s the whole prefill pool sustains when busy (estimate)
    decode_kv_utilization: float  # reserved / total KV blocks across the decode pool, 0..1
    running_decodes: int  # sequences decoding across the decode pool
    tbt_slack: float | None = None  # smallest fraction of the TBT target left unused over decode workers
    prompt_arrival_tps: float | None = None  # prompt tokens/s arriving (recent average), None if unknown
    kv_waiting: float = 0.0
    """KV blocks of the prompts waiting in the coordinator's queue while its head waits for decode KV, as a fraction
    of the decode pool's blocks (a lower bound: their outputs will need more); 0 when the queue waits for prefill."""
    decode_tokens_per_s: float | None = None  # output tokens/s the decode pool produced (recent average)
    decode_capacity_tps: float | None = None  # decode tokens/s the pool sustains at a full batch (estimate)
    draining_workers: int = 0  # workers moving between pools that have not finished draining


@dataclass
class PoolDecision:
    """Move ``workers`` workers from ``from_pool`` to ``to_pool`` (``"prefill"`` or ``"decode"``); ``reason`` for
    the logs."""

    from_pool: str
    to_pool: str
    reason: str
    workers: int = 1


class PoolPolicy(ABC):
    name: str = ""
    knobs: ClassVar[tuple[Knob, ...]] = ()
    """The constructor's keyword arguments (``policies.knobs``)."""

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
    """Knobs: ``backlog_target_s`` (seconds, 1.0), ``prefill_util_target`` (0.9), ``kv_target`` (0.9),
    ``decode_batch_target`` (decodes per worker at full tile efficiency, 128), ``decode_util_target`` (0.8),
    ``min_tbt_slack`` (0.2), ``min_pressure`` (0.5), ``min_gain`` (0.1), ``max_workers_per_move`` (None: any),
    ``min_dwell_s`` (seconds, 30.0). All [Diptych] choices: the paper's switching rule was not available."""

    summary = "move flex workers so as to lower the larger of the prefill and decode pressures, with a margin"
    knobs = (
        Knob("backlog_target_s", float, 1.0, "seconds to drain the prefill backlog at pressure 1"),
        Knob("prefill_util_target", float, 0.9, "prompt arrival rate / prefill throughput at pressure 1, (0, 1]"),
        Knob("kv_target", float, 0.9, "decode KV fraction (reserved plus waiting) at pressure 1, (0, 1]"),
        Knob("decode_batch_target", int, 128, "decodes per worker at full tile efficiency"),
        Knob("decode_util_target", float, 0.8, "decode tokens/s / decode capacity at pressure 1, (0, 1]"),
        Knob("min_tbt_slack", float, 0.2, "TBT slack fraction at pressure 1, [0, 1)"),
        Knob("min_pressure", float, 0.5, "no move while the larger pressure is below this"),
        Knob("min_gain", float, 0.1, "relative margin a move must lower the larger pressure by, (0, 1)"),
        Knob("max_workers_per_move", int, None, "most workers moved in one decision (None: any)", optional=True),
        Knob("min_dwell_s", float, 30.0, "seconds after a move before the next decision"),
    )

    def __init__(self, backlog_target_s: float = 1.0, prefill_util_target: float = 0.9, kv_target: float = 0.9,
                 decode_batch_target: int = 128, decode_util_target: float = 0.8, min_tbt_slack: float = 0.2,
                 min_pressure: float = 0.5, min_gain: float = 0.1, max_workers_per_move: int | None = None,
                 min_dwell_s: float = 30.0) -> None:
        if backlog_target_s <= 0 or decode_batch_target <= 0:
            raise ValueError("backlog_target_s and decode_batch_target must be positive")
        for name, value in (("kv_target", kv_target), ("prefill_util_target", prefill_util_target),
                            ("decode_util_target", decode_util_target)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0 <= min_tbt_slack < 1:
            raise ValueError("min_tbt_slack must be in [0, 1)")
        if min_pressure < 0 or not 0 < min_gain < 1:
            raise ValueError("min_pressure must be >= 0 and min_gain in (0, 1)")
        if max_workers_per_move is not None and max_workers_per_move < 1:
            raise ValueError("max_workers_per_move must be >= 1 or None")
        if min_dwell_s < 0:
            raise ValueError("min_dwell_s must be >= 0")
        self.backlog_target_s = backlog_target_s
        self.prefill_util_target = prefill_util_target
        self.kv_target = kv_target
        self.decode_batch_target = decode_batch_target
        self.decode_util_target = decode_util_target
        self.min_tbt_slack = min_tbt_slack
        self.min_pressure = min_pressure
        self.min_gain = min_gain
        self.max_workers_per_move = max_workers_per_move
        self.min_dwell_s = min_dwell_s
        self.last_move_time: float | None = None

    def prefill_pressure(self, stats: PoolStats) -> tuple[float, str]:
        backlog_s = _ratio(stats.queued_prompt_tokens, stats.prefill_throughput_tps)
        parts = {"backlog": backlog_s / self.backlog_target_s}
        detail = (f"backlog {stats.queued_prompt_tokens} tokens at {stats.prefill_throughput_tps:.0f} tok/s "
                  f"= {backlog_s:.2f} s")
        if stats.prompt_arrival_tps is not None:
            utilization = _ratio(stats.prompt_arrival_tps, stats.prefill_throughput_tps)
            parts["util"] = utilization / self.prefill_util_target
            detail += f", arrivals {stats.prompt_arrival_tps:.0f} tok/s = {utilization:.0%} busy"
        return max(parts.values()), detail

    def decode_pressure(self, stats: PoolStats) -> tuple[float, str]:
        parts = {
            "kv": (stats.decode_kv_utilization + stats.kv_waiting) / self.kv_target,
            "batch": stats.running_decodes / (max(stats.decode_workers, 1) * self.decode_batch_target),
        }
        detail = f"KV {stats.decode_kv_utilization:.0%}"
        if stats.kv_waiting:
            detail += f" + {stats.kv_waiting:.0%} waiting"
        detail += f", {stats.running_decodes} decodes"
        if stats.decode_tokens_per_s is not None and stats.decode_capacity_tps is not None:
            utilization = _ratio(stats.decode_tokens_per_s, stats.decode_capacity_tps)
            parts["util"] = utilization / self.decode_util_target
            detail += f", {stats.decode_tokens_per_s:.0f} tok/s = {utilization:.0%} busy"
        if stats.tbt_slack is not None:
            parts["tbt"] = (1 - stats.tbt_slack) / (1 - self.min_tbt_slack)
        return max(parts.values()), detail + ", " + ", ".join(f"{name} {value:.2f}" for name, value in parts.items())

    def decide(self, stats: PoolStats, now: float) -> PoolDecision | None:
        if self.last_move_time is not None and now - self.last_move_time < self.min_dwell_s:
            return None
        if stats.draining_workers > 0:
            return None
        prefill, prefill_detail = self.prefill_pressure(stats)
        decode, decode_detail = self.decode_pressure(stats)
        current = max(prefill, decode)
        if current < self.min_pressure:
            return None
        n_p, n_d = stats.prefill_workers, stats.decode_workers
        limit = self.max_workers_per_move or n_p + n_d
        best_shift, best = 0, current
        for shift in sorted(range(-min(n_p - 1, limit), min(n_d - 1, limit) + 1), key=abs):
            if shift:  # shift > 0 moves decode workers to prefill
                projected = max(_scaled(prefill, n_p, n_p + shift), _scaled(decode, n_d, n_d - shift))
                if projected < best:
                    best_shift, best = shift, projected
        if best_shift == 0 or best > (1 - self.min_gain) * current:
            return None
        self.last_move_time = now
        to_pool, from_pool = (PREFILL, DECODE) if best_shift > 0 else (DECODE, PREFILL)
        workers = abs(best_shift)
        reason = (f"{to_pool} is the bottleneck: prefill pressure {prefill:.2f} ({prefill_detail}); decode pressure "
                  f"{decode:.2f} ({decode_detail}); {n_p}:{n_d} -> {n_p + best_shift}:{n_d - best_shift} projects "
                  f"the larger pressure from {current:.2f} to {best:.2f}")
        return PoolDecision(from_pool, to_pool, reason, workers)


def _scaled(pressure: float, workers: int, new_workers: int) -> float:
    """``pressure`` of a load on ``workers`` workers, spread over ``new_workers`` instead."""
    return pressure * workers / new_workers


def _ratio(amount: float, rate: float) -> float:
    """``amount / rate``; 0 when there is nothing, infinite when something meets a zero rate."""
    if amount <= 0:
        return 0.0
    return amount / rate if rate > 0 else math.inf
