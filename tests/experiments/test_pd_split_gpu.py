"""``diptych experiment pd-split-gpu``: the whole pipeline on a CPU (--quick), its layouts' serve flags, the
handoff buckets, the computed ranking comparison, and clear errors for bad arguments."""

from __future__ import annotations

import json

import pytest

from diptych.cli import main
from diptych.experiments import pd_split_gpu_report as report, pd_split_gpu_runs as runs
from diptych.experiments.pd_split_gpu import QUICK_REQUESTS
from diptych.metrics.results import RunResult
from diptych.metrics.timeline import RequestTimeline


def test_help_explains_layouts_and_run_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "pd-split-gpu", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--gpus", "--build-model", "--device", "--quick", "--requests", "--seed", "--max-tokens",
                 "--out-dir", "Expected run time", "2 GPUs", "4 GPUs", "1p1d"):
        assert text in out, text


def test_three_gpus_are_refused(tmp_path, capsys):
    code = main(["experiment", "pd-split-gpu", "--gpus", "3", "--device", "cpu", "--quick",
                 "--out-dir", str(tmp_path)])
    assert code == 2
    assert "--gpus must be 2 or 4, got 3" in capsys.readouterr().err


def test_missing_gpus_are_refused(tmp_path, capsys):
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= 4:
        pytest.skip("four GPUs are visible")
    code = main(["experiment", "pd-split-gpu", "--gpus", "4", "--device", "cuda", "--quick",
                 "--out-dir", str(tmp_path)])
    assert code == 2
    assert f"--gpus 4 with --device cuda needs 4 visible GPUs, found {visible}" in capsys.readouterr().err


def test_layouts_map_one_worker_per_gpu_in_launch_order():
    two = {layout.name: layout for layout in runs.layouts(2)}
    assert list(two) == ["1p1d", "2 colocated", "2 flex RAD"]
    args = runs.serve_args(two["1p1d"], ["cuda:0", "cuda:1"], "/models/m", 5.0)
    assert args[args.index("--prefill-workers") + 1] == "1" and args[args.index("--decode-workers") + 1] == "1"
    assert args[args.index("--device") + 1] == "cuda:0,cuda:1" and args[-2:] == ["--model", "/models/m"]
    assert "--pool-policy" not in args
    rad = runs.serve_args(two["2 flex RAD"], ["cuda:0", "cuda:1"], None, 5.0)
    assert rad[rad.index("--flex-workers") + 1] == "2" and rad[rad.index("--pool-policy") + 1] == "rad"
    assert "min_dwell_s=5.0" in rad and "--model" not in rad
    four = runs.layouts(4)
    assert [layout.name for layout in four] == ["1:3", "2:2", "3:1", "4 colocated", "4 flex RAD"]
    assert all(layout.gpus == 4 for layout in four)
    assert [layout.sim_name for layout in four] == ["1:3", "2:2", "3:1", "colocated", "rad"]


def test_simulated_layout_runs_the_served_batch_policy():
    config = runs.sim_cluster(runs.layouts(2)[0], "h200-mistral-7b", 5.0, context=4096)
    assert (config.prefill_workers, config.decode_workers, config.max_model_len) == (1, 1, 4096)
    for spec in (config.prefill_policy, config.decode_policy, config.colocated_policy):
        assert spec.name == "sarathi" and spec.knobs == runs.SERVED_POLICY
    rad = runs.sim_cluster(runs.layouts(2)[2], "h200-mistral-7b", 7.0)
    assert rad.pool_policy.name == "rad" and rad.pool_policy.knobs["min_dwell_s"] == 7.0


def _timeline(prompt: int, handoff: float | None) -> RequestTimeline:
    t = RequestTimeline(f"r{prompt}", "c", arrival=0.0, prompt_len=prompt, output_len=4, first_token=1.0,
                        finish=2.0, status="finished")
    if handoff is not None:
        t.handoff_start, t.handoff_end = 0.5, 0.5 + handoff
    return t


def test_handoff_shares_per_prompt_bucket():
    shares = runs.handoff_shares(RunResult.from_timelines([_timeline(100, 0.2), _timeline(511, 0.4),
                                                           _timeline(512, 0.1), _timeline(9000, None),
                                                           _timeline(8192, 0.5)]))
    assert shares["<512"] == pytest.approx(0.3)
    assert shares["512-2k"] == pytest.approx(0.1)
    assert shares[">8k"] == pytest.approx(0.5)
    assert shares["2k-8k"] != shares["2k-8k"]  # no request: NaN


def _run(layout: str, served: float, sim: float) -> dict:
    return {"layout": layout, "workload": "w", "served": {"goodput": served}, "sim": {"goodput": sim}}


def test_agreement_is_computed_with_ties():
    agree = report.agreement([_run("a", 10.0, 20.0), _run("b", 5.0, 8.0), _run("c", 9.8, 19.5)], ["w"])
    assert "served a ~ c > b" in agree and "simulator a ~ c > b" in agree and "The rankings agree." in agree
    flip = report.agreement([_run("a", 10.0, 5.0), _run("b", 5.0, 8.0)], ["w"])
    assert "The rankings disagree: served a above b, simulator a below b." in flip
    best = report.best_goodput([_run("a", 1.0, 1.0), _run("a", 3.0, 2.0)], "w", "served")
    assert best == {"a": 3.0}


@pytest.mark.slow
@pytest.mark.integration
def test_quick_cpu_pipeline_writes_a_row_per_layout(tmp_path):
    code = main(["experiment", "pd-split-gpu", "--gpus", "2", "--device", "cpu", "--quick", "--out-dir",
                 str(tmp_path), "--no-progress", "--server-logs", str(tmp_path / "logs")])
    assert code == 0
    text = (tmp_path / "pd-split-gpu.md").read_text()
    for layout in ("1p1d", "2 colocated", "2 flex RAD"):
        assert f"| sharegpt4 | {layout} | quick |" in text
    assert "## Layout rankings (computed)" in text and "`sharegpt4`" in text
    assert "`diptych experiment pd-split-gpu --gpus 2 --device cpu --quick --requests" in text
    data = json.loads((tmp_path / "pd-split-gpu.json").read_text())
    assert len(data["runs"]) == 3
    for run in data["runs"]:
        assert run["served"]["finished"] == run["requests"] == QUICK_REQUESTS
        assert run["sim"]["finished"] == run["requests"]
        assert set(run["sim"]["handoff_share_by_prompt"]) == {"<512", "512-2k", "2k-8k", ">8k"}
    handed_off = {run["layout"]: run["served"]["kv_handoffs"] for run in data["runs"]}
    assert handed_off["2 colocated"] == {}
    assert sum(c["requests"] for c in handed_off["1p1d"].values()) >= 1
    assert (tmp_path / "pd-split-gpu.png").stat().st_size > 10_000
