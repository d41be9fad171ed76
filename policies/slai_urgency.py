"""SLAI urgency: the mean iteration time ``b_bar``, the offset ``Theta`` and each decode's last schedulable time.

Rules (Bari, Hegde, de Veciana, arXiv 2508.01002; times in seconds):

- ``b_bar``: running mean of measured iteration wall time, scheduler time included. ``"cumulative"`` (the
  reference code): the mean of all iterations since start. ``"ewma"`` [Diptych knob]: ``b = a*d + (1-a)*b``, the
  first sample taken as is. Before the first measurement ``b_bar = 0``.
- ``Theta = theta_lo`` (5) while KV utilisation ``u < kv_threshold`` (0.96), else ``theta_hi`` (10); the
  fixed-offset variant uses ``theta_hi`` always.
- ``LST_j = t_end_j + TBT_j - Theta * b_bar``, with ``t_end_j`` = the end of the iteration that produced j's last
  token (``SequenceState.last_token_time``) and ``TBT_j`` its target (``tbt_slo_s``, else ``default_tbt_s``).
  A decode with no token yet (``last_token_time is None``) has ``LST = -inf``: always critical.
- Decode j is critical iff ``now >= LST_j``.
- ``LSTBook``: LST is computed when j gets a token (a new ``last_token_time``) and then kept: a deferred decode
  keeps its LST even as ``b_bar`` and ``u`` move, so its urgency grows with time only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diptych.policies.batch import SequenceState

B_BAR_MODES = ("cumulative", "ewma")


class IterationTimer:
    """Running mean of iteration wall time (seconds)."""

    def __init__(self, mode: str = "cumulative", ewma_alpha: float = 0.1) -> None:
        if mode not in B_BAR_MODES:
            raise ValueError(f"b_bar_mode must be one of {B_BAR_MODES}, got {mode!r}")
        if not 0 < ewma_alpha <= 1:
            raise ValueError("ewma_alpha must be in (0, 1]")
        self.mode = mode
        self.ewma_alpha = ewma_alpha
        self.mean_s = 0.0
        self.count = 0

    def observe(self, duration_s: float) -> None:
        if duration_s < 0:
            raise ValueError("iteration duration must be >= 0")
        self.count += 1
        if self.mode == "cumulative":
            self.mean_s += (duration_s - self.mean_s) / self.count
        elif self.count == 1:
            self.mean_s = duration_s
        else:
            self.mean_s += self.ewma_alpha * (duration_s - self.mean_s)


class Urgency:
    """Theta and LST. Knobs as in ``SLAIBatching``."""

    def __init__(self, theta_lo: float = 5.0, theta_hi: float = 10.0, kv_threshold: float = 0.96,
                 fixed_offset: bool = False, default_tbt_s: float = 0.2, timer: IterationTimer | None = None) -> None:
        if theta_lo < 0 or theta_hi < 0 or default_tbt_s <= 0:
            raise ValueError("theta_lo and theta_hi must be >= 0 and default_tbt_s > 0")
        self.theta_lo = theta_lo
        self.theta_hi = theta_hi
        self.kv_threshold = kv_threshold
        self.fixed_offset = fixed_offset
        self.default_tbt_s = default_tbt_s
        self.timer = timer or IterationTimer()

    def theta(self, utilization: float) -> float:
        if self.fixed_offset or utilization >= self.kv_threshold:
            return self.theta_hi
        return self.theta_lo

    def tbt(self, seq: SequenceState) -> float:
        return seq.tbt_slo_s if seq.tbt_slo_s is not None else self.default_tbt_s

    def last_schedulable_time(self, seq: SequenceState, utilization: float) -> float:
        """LST computed now (no memory); ``-inf`` for a decode without a token yet."""
        if seq.last_token_time is None:
            return float("-inf")
        return seq.last_token_time + self.tbt(seq) - self.theta(utilization) * self.timer.mean_s


class LSTBook:
    """Each decode's LST, fixed when it got its latest token (see the module docstring)."""

    def __init__(self, urgency: Urgency) -> None:
        self.urgency = urgency
        self._entries: dict[str, tuple[float | None, float]] = {}  # request id -> (t_end it was computed for, LST)

    def refresh(self, decodes: list[SequenceState], utilization: float) -> dict[str, float]:
        """LSTs of ``decodes``: recomputed for those whose ``last_token_time`` changed; others forgotten."""
        entries: dict[str, tuple[float | None, float]] = {}
        for seq in decodes:
            known = self._entries.get(seq.request_id)
            if known is None or known[0] != seq.last_token_time:
                known = (seq.last_token_time, self.urgency.last_schedulable_time(seq, utilization))
            entries[seq.request_id] = known
        self._entries = entries
        return {request_id: lst for request_id, (_, lst) in entries.items()}
