"""``diptych bench replay`` on the CPU: the real-time replay drives a real engine to completion and returns
timelines the metrics accept; bad input is refused with a clear message."""

from __future__ import annotations

from diptych.benchmarks.replay import replay
from diptych.cli import main
from diptych.engine import Engine, EngineConfig
from diptych.metrics.results import RunResult
from diptych.metrics.summary import summarize
from diptych.policies.batch import BATCH_POLICIES
from diptych.workloads.spec import RequestSpec


def test_replay_runs_every_request_at_its_arrival_time():
    engine = Engine(EngineConfig(kv_memory_gb=0.01), BATCH_POLICIES.create("slai", token_budget=64))
    specs = [RequestSpec(f"r{i}", arrival_time=0.05 * i, prompt_len=20 + 7 * i, output_len=4 + i, max_tokens=64,
                         tier="strict" if i % 2 else "relaxed", tbt_slo_s=0.5) for i in range(6)]
    timelines = replay(engine, specs, seed=0, label="test")
    assert [t.request_id for t in timelines] == [s.request_id for s in specs]
    start = timelines[0].arrival
    for spec, timeline in zip(specs, timelines):
        assert timeline.status == "finished"
        assert len(timeline.token_times) == spec.output_len  # stop_after_tokens, within the max_tokens cap
        assert abs(timeline.arrival - start - spec.arrival_time) < 1e-6
        assert timeline.arrival <= timeline.admitted <= timeline.first_token <= timeline.finish
    summary = summarize(RunResult.from_timelines(timelines), fairness_metrics=False)
    assert summary["finished"] == 6 and summary["ttft_p50"] > 0
    assert not engine.request_ids()  # every block returned


def test_replay_rejects_bad_input(capsys):
    assert main(["bench", "replay", "--variants", "nope"]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err
    assert main(["bench", "replay", "--loads", "0"]) == 2
    assert main(["bench", "replay", "--cost-model", "no-such-model"]) == 2
    assert main(["bench", "replay", "--max-tokens", "some"]) == 2
    assert "--max-tokens must be" in capsys.readouterr().err


def test_warmup_requests_span_the_workload_and_arrive_together():
    from diptych.benchmarks.replay import warmup_specs

    specs = [RequestSpec(f"r{i}", arrival_time=i, prompt_len=10 * (i + 1), output_len=100) for i in range(40)]
    warmup = warmup_specs(specs, count=5)
    assert len(warmup) == 5 and all(s.arrival_time == 0 and s.max_tokens == 16 for s in warmup)
    assert warmup[0].prompt_len == 10 and warmup[-1].prompt_len >= 300
    assert all(s.request_id.startswith("warmup-") for s in warmup)
