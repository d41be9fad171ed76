"""The max_tokens policy (``workloads.max_tokens``): oracle, a fixed cap, the context; clipping, bad values, and the
``--max-tokens`` option of the workload commands."""

from __future__ import annotations

import argparse
import json

import pytest

from diptych.cli import main
from diptych.workloads.catalog import WorkloadConfig, add_workload_arguments, build_workload, workload_from_args
from diptych.workloads.max_tokens import MaxTokensPolicy, apply_max_tokens, parse_max_tokens
from diptych.workloads.spec import RequestSpec

SPECS = [RequestSpec("short", 0.0, 100, 30), RequestSpec("long", 0.5, 900, 3000), RequestSpec("big", 1.0, 4000, 10)]


def test_parse_accepts_the_three_policies_and_refuses_the_rest():
    assert parse_max_tokens("oracle") == MaxTokensPolicy("oracle")
    assert parse_max_tokens(" Context ") == MaxTokensPolicy("context")
    assert parse_max_tokens("2048") == MaxTokensPolicy("cap", 2048) and str(parse_max_tokens(512)) == "512"
    for bad, message in (("0", "at least 1"), ("-3", "at least 1"), ("lots", "'oracle', 'context' or"),
                         ("2.5", "positive integer"), ("", "positive integer")):
        with pytest.raises(ValueError, match=message):
            parse_max_tokens(bad)


def test_oracle_asks_for_the_true_output_length():
    out = apply_max_tokens([RequestSpec("a", 0.0, 10, 7, max_tokens=99)], "oracle", context=4096)
    assert (out[0].output_len, out[0].max_tokens) == (7, 7)


def test_fixed_cap_truncates_the_output_and_fits_the_context():
    without = apply_max_tokens(SPECS, "2048")
    assert [(s.max_tokens, s.output_len) for s in without] == [(2048, 30), (2048, 2048), (2048, 10)]
    within = apply_max_tokens(SPECS, "2048", context=4096)
    assert [(s.max_tokens, s.output_len) for s in within] == [(2048, 30), (2048, 2048), (96, 10)]
    assert all(s.prompt_len + s.max_tokens <= 4096 for s in within)
    assert SPECS[1].output_len == 3000 and SPECS[1].max_tokens == 3000  # the input is left as it was


def test_context_fills_the_rest_of_the_context():
    out = apply_max_tokens(SPECS, "context", context=5000)
    assert [(s.max_tokens, s.output_len) for s in out] == [(4900, 30), (4100, 3000), (1000, 10)]
    with pytest.raises(ValueError, match="--max-context"):
        apply_max_tokens(SPECS, "context")
    with pytest.raises(ValueError, match="request big: a prompt of 4000 tokens leaves no output token"):
        apply_max_tokens(SPECS, "context", context=4000)


def test_build_workload_applies_the_policy_last_and_the_default_is_a_2048_cap():
    assert WorkloadConfig().max_tokens == "2048"
    oracle = build_workload(WorkloadConfig("uniform:10-20:1000-3000", num_requests=200, max_tokens="oracle"))
    capped = build_workload(WorkloadConfig("uniform:10-20:1000-3000", num_requests=200))
    assert all(s.max_tokens == s.output_len for s in oracle)
    assert [s.prompt_len for s in capped] == [s.prompt_len for s in oracle]  # same draws
    assert [s.output_len for s in capped] == [min(s.output_len, 2048) for s in oracle]
    assert all(s.max_tokens == 2048 for s in capped)
    fitted = build_workload(WorkloadConfig("sharegpt4", num_requests=100, max_context=512, max_tokens="context"))
    assert all(s.prompt_len + s.max_tokens == 512 and s.output_len <= s.max_tokens for s in fitted)
    served = build_workload(WorkloadConfig("fixed:100:50", num_requests=3, max_tokens="context", model_context=8000))
    assert {s.max_tokens for s in served} == {7900}
    vtc = build_workload(WorkloadConfig("vtc:overload", num_requests=None, duration_s=10, max_tokens="64"))
    assert vtc and all(s.max_tokens == 64 and s.output_len <= 64 for s in vtc)


def test_the_option_is_parsed_and_checked_with_the_workload():
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    assert workload_from_args(parser.parse_args([])).max_tokens == "2048"
    assert workload_from_args(parser.parse_args(["--max-tokens", "oracle"])).max_tokens == "oracle"
    with pytest.raises(ValueError, match="--max-tokens"):
        workload_from_args(parser.parse_args(["--max-tokens", "none"]))
    assert "oracle" in parser.format_help() and "context" in parser.format_help()


@pytest.mark.parametrize("policy", ["context", "oracle", "256"])
def test_simulate_runs_with_each_policy(policy, tmp_path, capsys):
    out = tmp_path / "summary.json"
    assert main(["simulate", "--num-requests", "30", "--qps", "4", "--kv-blocks", "2000", "--no-progress",
                 "--max-tokens", policy, "--summary-json", str(out)]) == 0
    assert "TTFT" in capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["workload"]["max_tokens"] == policy
    assert summary["workload"]["model_context"] == 2000 * 16  # the pool (32,000 positions) is below Mistral's 32,768
    assert summary["summary"]["finished"] == 30


def test_simulate_refuses_a_bad_policy(capsys):
    assert main(["simulate", "--num-requests", "5", "--no-progress", "--max-tokens", "unbounded"]) == 2
    assert "--max-tokens must be 'oracle', 'context' or a positive integer" in capsys.readouterr().err
