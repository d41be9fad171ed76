"""Trace readers (CSV variants, Mooncake JSONL, errors with line numbers), request specs, tiers, VTC scenarios and
named workloads."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from diptych.workloads.catalog import WorkloadConfig, add_workload_arguments, build_workload, workload_from_args
from diptych.workloads.spec import RequestSpec, load_specs, save_specs
from diptych.workloads.tiers import assign_tiers, format_tiers, parse_tiers
from diptych.workloads.traces import read_trace
from diptych.workloads.vtc import SCENARIOS, vtc_scenario


def test_csv_variants(tmp_path):
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:04.0319600,3180,8\n"
                     "2023-11-16 18:17:03.9799600,4808,10\n")
    t = read_trace(azure)
    assert list(t.prompt_lens) == [4808, 3180] and t.arrival_times[1] == pytest.approx(0.052)
    sharegpt = tmp_path / "sg.csv"
    sharegpt.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n74,918,992,0.08\n")
    t = read_trace(sharegpt)
    assert t.arrival_times is None and list(t.output_lens) == [918]
    generic = tmp_path / "g.csv"
    generic.write_text("timestamp_ms,prompt_len,output_len\n1000,5,6\n1500,7,8\n")
    assert list(read_trace(generic).arrival_times) == [0.0, 0.5]


def test_mooncake_and_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]}\n'
                    '{"timestamp": 30535, "input_length": 6472, "output_length": 26, "hash_ids": [46]}\n')
    t = read_trace(path)
    assert list(t.prompt_lens) == [6955, 6472] and t.arrival_times[1] == pytest.approx(3.053)
    assert t.hash_ids == [[46, 47], [46]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1, "input_length": 5, "output_length": 5}\n{"timestamp": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_trace(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt_len,output_len\n5,6\nx,7\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3"):
        read_trace(bad_csv)
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="prompt length column"):
        read_trace(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "missing.csv")


def test_request_specs_round_trip_and_validate(tmp_path):
    specs = [RequestSpec("a", 0.5, 10, 5, client_id="c", tier="strict", tbt_slo_s=0.1, weight=2.0),
             RequestSpec("b", 0.1, 3, 4, max_tokens=9)]
    save_specs(specs, tmp_path / "s.jsonl")
    loaded = load_specs(tmp_path / "s.jsonl")
    assert [s.request_id for s in loaded] == ["b", "a"] and loaded[1] == specs[0] and loaded[0].max_tokens == 9
    with pytest.raises(ValueError, match="output_len"):
        RequestSpec("x", 0, 1, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        RequestSpec("x", 0, 1, 5, max_tokens=4)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"request_id": "x", "arrival_time": 0, "prompt_len": 1,
                                                    "output_len": 1, "color": "red"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*color"):
        load_specs(tmp_path / "bad.jsonl")


def test_tiers():
    tiers = parse_tiers("slai")
    assert [(t.name, t.fraction, t.tbt_slo_s) for t in tiers] == [("strict", 0.05, 0.1), ("relaxed", 0.95, 0.5)]
    assert parse_tiers(format_tiers(tiers)) == tiers
    assert parse_tiers("gold:0.3:0.1:1.0,free:0.7:none")[0].ttft_slo_s == 1.0
    for bad, message in [("a:0.5:0.1", "sum to 1"), ("a:2:0.1", "fraction"), ("a:1", "expected"),
                         ("a:1:-1", "> 0"), ("a:0.5:0.1,a:0.5:0.1", "repeat")]:
        with pytest.raises(ValueError, match=message):
            parse_tiers(bad)
    drawn = assign_tiers(tiers, 20_000, np.random.default_rng(0))
    assert sum(t.name == "strict" for t in drawn) / 20_000 == pytest.approx(0.05, abs=0.005)


def test_vtc_scenarios():
    counts = {name: len(vtc_scenario(name, 120)) for name in SCENARIOS}
    assert counts["overload"] == 180 + 360
    weighted = vtc_scenario("weighted", 60)
    assert sorted({s.weight for s in weighted}) == [1.0, 2.0, 3.0, 4.0]
    short = vtc_scenario("poisson_short_long_2", 120, seed=1)
    assert {(s.prompt_len, s.output_len) for s in short if s.client_id == "client1"} == {(512, 32)}
    onoff = vtc_scenario("on_off_less", 600)
    c1 = np.array([s.arrival_time for s in onoff if s.client_id == "client1"])
    assert not ((c1 % 120) >= 60).any()
    with pytest.raises(ValueError, match="unknown VTC"):
        vtc_scenario("nope")


def test_build_workload_is_deterministic_and_keeps_lengths_across_rates():
    a = build_workload(WorkloadConfig("sharegpt4", qps=1.0, num_requests=200, tiers="slai", seed=3))
    b = build_workload(WorkloadConfig("sharegpt4", qps=4.0, num_requests=200, tiers="slai", seed=3))
    assert [(s.prompt_len, s.output_len, s.tier) for s in a] == [(s.prompt_len, s.output_len, s.tier) for s in b]
    assert a[-1].arrival_time == pytest.approx(4 * b[-1].arrival_time)
    c = build_workload(WorkloadConfig("sharegpt4", qps=1.0, num_requests=200, seed=4))
    assert [s.prompt_len for s in a] != [s.prompt_len for s in c]


def test_shift_duration_clients_and_trace_workloads(tmp_path):
    shift = build_workload(WorkloadConfig("shift:azure-conv,azure-code", qps=10, num_requests=4000))
    first, second = shift[:1800], shift[2200:]
    assert np.median([s.output_len for s in first]) > 100 > 20 > np.median([s.output_len for s in second])
    timed = build_workload(WorkloadConfig("fixed:10:5", qps=2.0, num_requests=None, duration_s=50, clients=3))
    assert 70 < len(timed) < 130 and timed[-1].arrival_time < 50 and len({s.client_id for s in timed}) == 3
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_time,prompt_len,output_len\n0,5,6\n2,7,8\n4,9,10\n")
    replay = build_workload(WorkloadConfig(f"trace:{trace}", qps=1.0, num_requests=None, arrivals="trace"))
    assert [s.arrival_time for s in replay] == [0.0, 1.0, 2.0] and replay[2].prompt_len == 9
    with pytest.raises(ValueError, match="trace"):
        build_workload(WorkloadConfig("sharegpt4", arrivals="trace"))
    with pytest.raises(ValueError, match="fixed:P:O"):
        build_workload(WorkloadConfig("fixed:1"))


def test_command_line_options():
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    config = workload_from_args(parser.parse_args(["--workload", "azure-conv", "--qps", "3", "--tiers", "slai"]))
    assert config.num_requests == 1000 and config.qps == 3.0
    config = workload_from_args(parser.parse_args(["--duration", "60"]))
    assert config.num_requests is None and config.duration_s == 60
    with pytest.raises(ValueError, match="tier"):
        workload_from_args(parser.parse_args(["--tiers", "x:0.5:1"]))
    with pytest.raises(ValueError, match="--qps"):
        workload_from_args(parser.parse_args(["--qps", "-1"]))
