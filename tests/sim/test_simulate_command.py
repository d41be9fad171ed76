"""``diptych simulate``: help, a small run with its outputs, a capacity search, and clear errors."""

from __future__ import annotations

import json

import pytest

from diptych.cli import main
from diptych.metrics.timeline import load_timelines


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--capacity" in out and "--cost-model" in out and "--workload" in out


def test_small_run_writes_timelines_and_summary(tmp_path, capsys):
    timelines, summary = tmp_path / "t.json", tmp_path / "s.json"
    code = main(["simulate", "--num-requests", "40", "--qps", "5", "--tiers", "slai", "--no-progress",
                 "--timelines", str(timelines), "--record-tokens", "--summary-json", str(summary)])
    assert code == 0
    out = capsys.readouterr().out
    assert "TTFT median / P99" in out and "simulated" in out
    requests, meta = load_timelines(timelines)
    assert len(requests) == 40 and meta["source"] == "diptych simulate"
    assert all(len(r.token_times) == r.output_len for r in requests)
    assert json.loads(summary.read_text())["summary"]["finished"] == 40


def test_colocated_capacity_search(capsys):
    code = main(["simulate", "--num-requests", "60", "--prefill-workers", "0", "--decode-workers", "0",
                 "--colocated-workers", "1", "--cost-model", "rtx6000ada-mistral-7b", "--tiers", "slai",
                 "--capacity", "slai", "--qps-lo", "0.5", "--qps-hi", "1", "--max-runs", "4"])
    assert code == 0
    assert "capacity:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--qps", "0"], "--qps"),
    (["--tiers", "a:0.3:0.1"], "sum to 1"),
    (["--colocated-workers", "2"], "either disaggregated"),
    (["--cost-model", "tpu-v9"], "unknown cost model"),
    (["--decode-opt", "token_budget"], "key=value"),
    (["--decode-opt", "bogus=1"], "bad option"),
    (["--max-prefill-backlog", "lots"], "integer or 'none'"),
    (["--workload", "trace:/no/such.csv"], "does not exist"),
])
def test_bad_inputs_fail_clearly(argv, message, capsys):
    assert main(["simulate", "--num-requests", "5", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
