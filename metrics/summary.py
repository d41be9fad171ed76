"""The summary of a run (``algorithms.md`` section 5): latency percentiles, TBT per tier, scheduling delay, goodput,
throughput, per-client service and service differences, KV transfer.

Definitions (times in seconds):

- TTFT = first token - arrival; scheduling delay = prefill start - arrival; TPOT = (finish - first token) /
  (tokens - 1); TBT = every gap between consecutive tokens of a request, pooled per tier (P50/P99).
- span = from the first arrival to the last finish (or the time limit when the run was cut short).
- throughput = (prompt + output tokens of finished requests) / span; ``output_tps`` the output tokens alone.
- goodput = requests that met their SLOs (``RunResult.meets_slo``) / span; ``slo_attainment`` their fraction of all
  requests.
- per client: service = (w_p * prompt + w_q * output of finished requests) / span, mean TTFT.
- ``service_diff_max`` / ``service_diff_avg``: max and time-average of the service difference of clients over the
  stretches in which they wait together (per unit of client weight; ``metrics.fairness.service_difference``), only
  with two or more clients.
- KV transfer: bytes/s handed off and the mean share of TTFT spent in the handoff.
- KV on demand (``KV_FIGURES``, copied from ``RunResult.meta`` when the run recorded them, as the simulator does):
  ``preemptions`` (sequences preempted by recompute, all workers), ``recomputed_tokens`` (computed positions those
  preemptions dropped) and ``peak_running`` (the most sequences running at once on one worker).

Latency statistics cover finished requests (TTFT: every request that got a first token).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diptych.metrics import fairness
from diptych.metrics.results import STATUS_CODES, RunResult

KV_FIGURES = ("preemptions", "recomputed_tokens", "peak_running")
"""Counters of ``RunResult.meta`` that ``summarize`` copies when present (module docstring)."""


def _pct(values: np.ndarray, q: float) -> float:
    values = values[~np.isnan(values)]
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(result: RunResult, w_p: float = 1.0, w_q: float = 2.0, fairness_metrics: bool = True) -> dict[str, Any]:
    t = result.times
    finished = result.finished
    n = len(result)
    arrival = t["arrival"]
    start = float(np.nanmin(arrival)) if n else 0.0
    last_finish = float(np.nanmax(t["finish"][finished])) if finished.any() else start
    unfinished = result.status == STATUS_CODES["unfinished"]
    end = result.end_time if unfinished.any() else last_finish
    span = max(end - start, 1e-9)
    ttft = t["first_token"] - arrival
    delay = t["prefill_start"] - arrival
    tokens = result.num_tokens.astype(float)
    tpot = np.where(finished & (tokens > 1), (t["finish"] - t["first_token"]) / np.maximum(tokens - 1, 1), np.nan)
    done_tokens = float((result.prompt_len[finished] + result.output_len[finished]).sum())
    meets = result.meets_slo()
    s: dict[str, Any] = {
        "requests": n,
        "finished": int(finished.sum()),
        "rejected": int((result.status == STATUS_CODES["rejected"]).sum()),
        "failed": int((result.status == STATUS_CODES["failed"]).sum()),
        "unfinished": int(unfinished.sum()),
        "span_s": span,
        "offered_qps": (n - 1) / (float(np.nanmax(arrival)) - start) if n > 1 and np.nanmax(arrival) > start else 0.0,
        "ttft_mean": float(np.nanmean(ttft)) if np.any(~np.isnan(ttft)) else float("nan"),
        "ttft_p50": _pct(ttft, 50), "ttft_p90": _pct(ttft, 90), "ttft_p99": _pct(ttft, 99),
        "sched_delay_p50": _pct(delay, 50), "sched_delay_p99": _pct(delay, 99),
        "tpot_mean": float(np.nanmean(tpot)) if np.any(~np.isnan(tpot)) else float("nan"),
        "e2e_p50": _pct(np.where(finished, t["finish"] - arrival, np.nan), 50),
        "e2e_p99": _pct(np.where(finished, t["finish"] - arrival, np.nan), 99),
        "throughput_tps": done_tokens / span,
        "output_tps": float(result.output_len[finished].sum()) / span,
        "request_throughput": float(finished.sum()) / span,
        "goodput": float(meets.sum()) / span,
        "slo_attainment": float(meets.mean()) if n else float("nan"),
    }
    tiers: dict[str, dict[str, float]] = {}
    tier_names = np.array(result.tiers)
    for tier in sorted(set(result.tiers)):
        mask = tier_names == tier
        hist = result.tbt_hist.get(tier)
        slo = result.tbt_slo[mask]
        slo_value = float(slo[~np.isnan(slo)][0]) if np.any(~np.isnan(slo)) else float("nan")
        tiers[tier] = {
            "requests": int(mask.sum()),
            "tbt_p50": hist.quantile(0.50) if hist else float("nan"),
            "tbt_p99": hist.quantile(0.99) if hist else float("nan"),
            "tbt_max": hist.max if hist and hist.total else float("nan"),
            "tbt_slo": slo_value,
            "ttft_p50": _pct(ttft[mask], 50), "ttft_p99": _pct(ttft[mask], 99),
            "slo_attainment": float(meets[mask].mean()),
        }
    s["tiers"] = tiers
    s.update({key: int(result.meta[key]) for key in KV_FIGURES if key in result.meta})
    all_tbt = None
    for hist in result.tbt_hist.values():
        if all_tbt is None:
            all_tbt = type(hist)(hist.lo, hist.hi, hist.bins_per_decade)
        all_tbt.merge(hist)
    s["tbt_p50"] = all_tbt.quantile(0.5) if all_tbt else float("nan")
    s["tbt_p99"] = all_tbt.quantile(0.99) if all_tbt else float("nan")
    handoff = t["handoff_end"] - t["handoff_start"]
    has_handoff = ~np.isnan(handoff) & ~np.isnan(ttft) & (ttft > 0)
    s["kv_transfer_bytes_per_s"] = (float(result.prompt_len[has_handoff].sum()) * result.kv_bytes_per_token / span)
    s["handoff_share_of_ttft"] = (float(np.mean(handoff[has_handoff] / (t["handoff_end"] - arrival)[has_handoff]))
                                  if has_handoff.any() else float("nan"))
    clients: dict[str, dict[str, float]] = {}
    owner = np.array(result.client_ids)
    cost = fairness.request_costs(result, w_p, w_q)
    for client in sorted(set(result.client_ids)):
        mask = owner == client
        clients[client] = {
            "requests": int(mask.sum()),
            "service_tps": float(cost[mask & finished].sum()) / span,
            "ttft_mean": float(np.nanmean(ttft[mask])) if np.any(~np.isnan(ttft[mask])) else float("nan"),
            "rejected": int((result.status[mask] == STATUS_CODES["rejected"]).sum()),
        }
    s["clients"] = clients
    if fairness_metrics and len(clients) >= 2 and n:
        _, diff = fairness.service_difference(result, 1.0, w_p, w_q)
        valid = diff[~np.isnan(diff)]
        s["service_diff_max"] = float(valid.max()) if len(valid) else float("nan")
        s["service_diff_avg"] = float(valid.mean()) if len(valid) else float("nan")
    return s


def kv_figures_text(s: dict[str, Any]) -> str:
    """``"preemptions P, recomputed R tokens, peak running N"`` of a summary with the ``KV_FIGURES``, else ``""``."""
    if not all(key in s for key in KV_FIGURES):
        return ""
    return (f"preemptions {s['preemptions']}, recomputed {s['recomputed_tokens']} tokens, "
            f"peak running {s['peak_running']}")


def format_summary(s: dict[str, Any]) -> str:
    """A markdown summary table (plus per-tier and per-client tables)."""
    def f(value: float, unit: str = "", digits: int = 3) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        return f"{value:.{digits}g}{unit}" if abs(value) < 1e4 else f"{value:,.0f}{unit}"

    rows = [
        ("requests (finished / rejected / failed / unfinished)",
         f"{s['requests']} ({s['finished']} / {s['rejected']} / {s['failed']} / {s['unfinished']})"),
        ("offered load", f(s["offered_qps"], " req/s")),
        ("TTFT median / P99", f"{f(s['ttft_p50'], ' s')} / {f(s['ttft_p99'], ' s')}"),
        ("TBT median / P99 (all tiers)", f"{f(s['tbt_p50'], ' s')} / {f(s['tbt_p99'], ' s')}"),
        ("scheduling delay median / P99", f"{f(s['sched_delay_p50'], ' s')} / {f(s['sched_delay_p99'], ' s')}"),
        ("TPOT mean", f(s["tpot_mean"], " s")),
        ("throughput (prompt+output)", f(s["throughput_tps"], " tok/s")),
        ("output throughput", f(s["output_tps"], " tok/s")),
        ("goodput (requests meeting SLOs)", f"{f(s['goodput'], ' req/s')} ({f(100 * s['slo_attainment'], '%')})"),
        ("KV transfer", f"{f(s['kv_transfer_bytes_per_s'] / 1e9, ' GB/s')}, "
                        f"{f(100 * s['handoff_share_of_ttft'], '%')} of TTFT"),
    ]
    if kv_figures_text(s):
        rows.append(("preemptions / recomputed tokens / peak running",
                     f"{s['preemptions']} / {s['recomputed_tokens']} / {s['peak_running']}"))
    if "service_diff_max" in s:
        rows.append(("service difference max / avg", f"{f(s['service_diff_max'])} / {f(s['service_diff_avg'])}"))
    out = ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    out += ["", "| tier | requests | TBT SLO | TBT P50 | TBT P99 | TTFT P50 | TTFT P99 | SLO met |",
            "|---|---|---|---|---|---|---|---|"]
    for tier, v in s["tiers"].items():
        out.append(f"| {tier} | {v['requests']} | {f(v['tbt_slo'], ' s')} | {f(v['tbt_p50'], ' s')} | "
                   f"{f(v['tbt_p99'], ' s')} | {f(v['ttft_p50'], ' s')} | {f(v['ttft_p99'], ' s')} | "
                   f"{f(100 * v['slo_attainment'], '%')} |")
    if len(s["clients"]) > 1:
        out += ["", "| client | requests | service (tok/s) | mean TTFT | rejected |", "|---|---|---|---|---|"]
        for client, v in s["clients"].items():
            out.append(f"| {client} | {v['requests']} | {f(v['service_tps'])} | {f(v['ttft_mean'], ' s')} | "
                       f"{v['rejected']} |")
    return "\n".join(out)
