"""``RunResult``: a run's requests in columns (numpy arrays, NaN where a phase did not happen), plus pooled TBT
histograms per SLO tier. Built by the simulator directly, or from timelines (``RunResult.from_timelines``) for a
live run, and summarised by ``metrics.summary.summarize``.

Per-request TBT bookkeeping: ``num_gaps`` (gaps between consecutive tokens), ``max_tbt`` and ``tbt_violations``
(gaps longer than the request's ``tbt_slo``). A request *meets its SLOs* when it finished, its TTFT is within
``ttft_slo`` (if set) and at most 1% of its gaps exceed ``tbt_slo`` (if set): its own P99 TBT is within target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diptych.metrics.histogram import LogHistogram
from diptych.metrics.timeline import RequestTimeline

PHASES = ("arrival", "admitted", "prefill_start", "prefill_end", "handoff_start", "handoff_end", "first_token",
          "finish")
STATUS_CODES = {"finished": 0, "rejected": 1, "failed": 2, "unfinished": 3}
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}
TBT_VIOLATION_ALLOWANCE = 0.01


@dataclass
class RunResult:
    request_ids: list[str]
    client_ids: list[str]
    tiers: list[str]
    prompt_len: np.ndarray
    output_len: np.ndarray
    weight: np.ndarray
    tbt_slo: np.ndarray  # NaN: none
    ttft_slo: np.ndarray  # NaN: none
    times: dict[str, np.ndarray]  # PHASES -> arrays
    status: np.ndarray  # STATUS_CODES
    num_tokens: np.ndarray
    num_gaps: np.ndarray
    max_tbt: np.ndarray
    tbt_violations: np.ndarray
    tbt_hist: dict[str, LogHistogram]
    end_time: float  # when the run stopped (last event or the time limit)
    token_times: list[np.ndarray] | None = None
    prefill_worker: list[str | None] | None = None
    decode_worker: list[str | None] | None = None
    kv_bytes_per_token: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def finished(self) -> np.ndarray:
        return self.status == STATUS_CODES["finished"]

    def meets_slo(self) -> np.ndarray:
        """Per request: finished, TTFT within target, at most 1% of its gaps over the TBT target."""
        ttft = self.times["first_token"] - self.times["arrival"]
        ok = self.finished.copy()
        has_ttft = ~np.isnan(self.ttft_slo)
        ok[has_ttft] &= ttft[has_ttft] <= self.ttft_slo[has_ttft]
        has_tbt = ~np.isnan(self.tbt_slo)
        ok[has_tbt] &= self.tbt_violations[has_tbt] <= np.floor(TBT_VIOLATION_ALLOWANCE * self.num_gaps[has_tbt])
        return ok

    @classmethod
    def from_timelines(cls, timelines: list[RequestTimeline], end_time: float | None = None,
                       meta: dict[str, Any] | None = None) -> RunResult:
        """Columns and histograms from full timelines (token times are kept)."""
        n = len(timelines)
        nan = float("nan")

        def col(values: list) -> np.ndarray:
            return np.array([nan if v is None else v for v in values], dtype=float)

        times = {phase: col([getattr(t, phase) for t in timelines]) for phase in PHASES}
        tiers = [t.tier for t in timelines]
        hist: dict[str, LogHistogram] = {tier: LogHistogram() for tier in sorted(set(tiers))}
        num_gaps, max_tbt, violations = np.zeros(n, np.int64), np.zeros(n), np.zeros(n, np.int64)
        token_times = []
        for i, t in enumerate(timelines):
            tokens = np.asarray(t.token_times, dtype=float)
            token_times.append(tokens)
            gaps = np.diff(tokens)
            if len(gaps):
                hist[t.tier].add_array(gaps)
                num_gaps[i], max_tbt[i] = len(gaps), gaps.max()
                if t.tbt_slo_s is not None:
                    violations[i] = int((gaps > t.tbt_slo_s).sum())
        ends = [v for v in times["finish"] if not np.isnan(v)]
        return cls(
            request_ids=[t.request_id for t in timelines], client_ids=[t.client_id for t in timelines], tiers=tiers,
            prompt_len=np.array([t.prompt_len for t in timelines], np.int64),
            output_len=np.array([t.output_len for t in timelines], np.int64),
            weight=np.array([t.weight for t in timelines], float),
            tbt_slo=col([t.tbt_slo_s for t in timelines]), ttft_slo=col([t.ttft_slo_s for t in timelines]),
            times=times, status=np.array([STATUS_CODES[t.status] for t in timelines], np.int8),
            num_tokens=np.array([t.num_tokens for t in timelines], np.int64), num_gaps=num_gaps, max_tbt=max_tbt,
            tbt_violations=violations, tbt_hist=hist,
            end_time=end_time if end_time is not None else (max(ends) if ends else 0.0), token_times=token_times,
            prefill_worker=[t.prefill_worker for t in timelines], decode_worker=[t.decode_worker for t in timelines],
            meta=dict(meta or {}),
        )

    def to_timelines(self) -> list[RequestTimeline]:
        """Timelines; ``token_times`` only when the run recorded them (else empty, with ``num_tokens`` set)."""
        def t(phase: str, i: int) -> float | None:
            v = self.times[phase][i]
            return None if np.isnan(v) else float(v)

        out = []
        for i in range(len(self)):
            out.append(RequestTimeline(
                request_id=self.request_ids[i], client_id=self.client_ids[i], arrival=float(self.times["arrival"][i]),
                prompt_len=int(self.prompt_len[i]), output_len=int(self.output_len[i]), tier=self.tiers[i],
                tbt_slo_s=None if np.isnan(self.tbt_slo[i]) else float(self.tbt_slo[i]),
                ttft_slo_s=None if np.isnan(self.ttft_slo[i]) else float(self.ttft_slo[i]),
                weight=float(self.weight[i]), admitted=t("admitted", i), prefill_start=t("prefill_start", i),
                prefill_end=t("prefill_end", i), handoff_start=t("handoff_start", i), handoff_end=t("handoff_end", i),
                first_token=t("first_token", i),
                token_times=[float(x) for x in self.token_times[i]] if self.token_times is not None else [],
                finish=t("finish", i), status=STATUS_NAMES[int(self.status[i])], num_tokens=int(self.num_tokens[i]),
                prefill_worker=self.prefill_worker[i] if self.prefill_worker else None,
                decode_worker=self.decode_worker[i] if self.decode_worker else None,
            ))
        return out
