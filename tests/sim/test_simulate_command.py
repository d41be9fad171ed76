"""``diptych simulate``: help, a small run with its outputs, a capacity search, the KV-on-demand options and
figures, the context ``--max-tokens context`` fills, and clear errors."""

from __future__ import annotations

import json

import pytest

from diptych.cli import main
from diptych.metrics.timeline import load_timelines
from diptych.sim.cli import simulated_context
from diptych.sim.cost_model import LLAMA2_7B, MISTRAL_7B, PRESETS, replace
from diptych.sim.simulator import Simulator
from tests.sim.helpers import colocated, request


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
    out = capsys.readouterr().out
    assert "capacity:" in out and "max_tokens 2048 (context 32768)" in out
    assert out.count("peak running") == 4  # one per run of the search


def _cluster_line(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("cluster: "))[len("cluster: "):])


def test_kv_options_reach_the_cluster_and_the_figures_are_printed(tmp_path, capsys):
    summary = tmp_path / "s.json"
    code = main(["simulate", "--workload", "uniform:200-1000:100-800", "--num-requests", "30", "--qps", "20",
                 "--prefill-workers", "0", "--decode-workers",
                 "0", "--colocated-workers", "1", "--kv-blocks", "300", "--kv-watermark", "0.05",
                 "--expected-output-tokens", "64", "--max-model-len", "3000", "--max-tokens", "context",
                 "--no-progress", "--summary-json", str(summary)])
    assert code == 0
    out = capsys.readouterr().out
    cluster = _cluster_line(out)
    assert (cluster["kv_watermark"], cluster["expected_output_tokens"], cluster["max_model_len"]) == (0.05, 64, 3000)
    assert "max_tokens context (context 3000), 30 requests" in out
    s = json.loads(summary.read_text())
    assert s["workload"]["model_context"] == 3000
    assert "| preemptions / recomputed tokens / peak running |" in out
    assert s["summary"]["peak_running"] >= 1 and s["summary"]["preemptions"] >= 0


def test_placement_expects_the_configured_output_growth():
    sim = Simulator(colocated(1, expected_output_tokens=64), [request("a", 0.0, 10, 5)])
    assert sim.core.placer.expected_output_tokens == 64
    assert Simulator(colocated(1), [request("a", 0.0, 10, 5)]).core.placer.expected_output_tokens == 512
    with pytest.raises(ValueError, match="expected_output_tokens"):
        colocated(1, expected_output_tokens=-1).validate()


def test_the_context_is_the_models_then_the_pool():
    assert (MISTRAL_7B.max_model_len, LLAMA2_7B.max_model_len) == (32768, 4096)
    assert simulated_context(colocated(1)) == 32768  # Mistral-7B on an H200: the model, not the 850k-token pool
    assert simulated_context(colocated(1, cost_model=PRESETS["a10g-llama-2-7b"])) == 4096
    assert simulated_context(colocated(1, kv_blocks=100)) == 1600  # a pool smaller than the model's context
    assert simulated_context(colocated(1, max_model_len=5000)) == 5000
    no_context = replace(PRESETS["h200-mistral-7b"], model=replace(MISTRAL_7B, max_model_len=None))
    assert simulated_context(colocated(1, cost_model=no_context, kv_blocks=3000)) == 48000


def test_a_cost_model_file_without_a_model_context_still_loads(tmp_path, capsys):
    path = tmp_path / "old.json"
    PRESETS["h200-mistral-7b"].save(path)
    data = json.loads(path.read_text())
    del data["model"]["max_model_len"]  # as saved before the field existed
    path.write_text(json.dumps(data))
    assert main(["simulate", "--num-requests", "5", "--cost-model", str(path), "--kv-blocks", "3000",
                 "--max-tokens", "context", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "max_tokens context (context 48000)" in out and _cluster_line(out)["max_model_len"] is None


@pytest.mark.parametrize("argv,message", [
    (["--qps", "0"], "--qps"),
    (["--tiers", "a:0.3:0.1"], "sum to 1"),
    (["--colocated-workers", "2"], "either disaggregated"),
    (["--cost-model", "tpu-v9"], "unknown cost model"),
    (["--decode-opt", "token_budget"], "key=value"),
    (["--decode-opt", "bogus=1"], "bad option"),
    (["--max-prefill-backlog", "lots"], "integer or 'none'"),
    (["--kv-watermark", "1"], "fraction in [0, 1)"),
    (["--max-model-len", "1"], "max_model_len"),
    (["--expected-output-tokens", "-5"], "expected_output_tokens"),
    (["--workload", "trace:/no/such.csv"], "does not exist"),
])
def test_bad_inputs_fail_clearly(argv, message, capsys):
    assert main(["simulate", "--num-requests", "5", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
