"""``metrics.summary``: the KV-on-demand figures a run records are copied into the summary and printed."""

from __future__ import annotations

from diptych.metrics.summary import KV_FIGURES, format_summary, kv_figures_text, summarize
from diptych.sim.simulator import simulate
from tests.sim.helpers import colocated, request


def _run(meta_keys: bool):
    # 40 blocks (640 tokens) hold both prompts but not both sequences to the end: one is preempted and recomputed
    result = simulate(colocated(1, kv_blocks=40, colocated_reserve=False, max_prefill_backlog_tokens=None),
                      [request("a", 0.0, 200, 300), request("b", 0.0, 200, 300)])
    if not meta_keys:
        for key in KV_FIGURES:
            del result.meta[key]
    return result


def test_summary_copies_the_kv_figures_of_the_run():
    result = _run(meta_keys=True)
    s = summarize(result)
    assert s["finished"] == 2
    assert (s["preemptions"], s["recomputed_tokens"], s["peak_running"]) == (
        result.meta["preemptions"], result.meta["recomputed_tokens"], result.meta["peak_running"])
    assert s["preemptions"] >= 1 and s["recomputed_tokens"] > 0 and s["peak_running"] == 2
    row = f"| preemptions / recomputed tokens / peak running | {s['preemptions']} / {s['recomputed_tokens']} / 2 |"
    assert row in format_summary(s).splitlines()
    assert kv_figures_text(s) == (f"preemptions {s['preemptions']}, recomputed {s['recomputed_tokens']} tokens, "
                                  "peak running 2")


def test_a_run_without_kv_figures_has_no_row():
    s = summarize(_run(meta_keys=False))
    assert not any(key in s for key in KV_FIGURES)
    assert "preemptions" not in format_summary(s) and kv_figures_text(s) == ""
