"""``diptych experiment``: every experiment has --help, runs on a tiny input writing its figures and report, and
refuses bad options clearly."""

from __future__ import annotations

import pytest

from diptych.cli import main
from diptych.experiments import experiments


def test_every_experiment_is_registered_with_help(capsys):
    assert set(experiments()) == {"vtc-fairness", "slai-vs-sarathi", "pd-split", "sim-agreement", "pd-split-gpu"}
    for name in experiments():
        with pytest.raises(SystemExit) as exit_info:
            main(["experiment", name, "--help"])
        assert exit_info.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "--out-dir" in out and "--max-tokens" in out
        if name != "pd-split-gpu":  # the others have recorded results, made before the --max-tokens policies
            assert "produced with oracle caps (--max-tokens oracle reproduces them)" in out


def test_vtc_fairness_tiny(tmp_path, capsys):
    code = main(["experiment", "vtc-fairness", "--out-dir", str(tmp_path), "--scenarios", "overload",
                 "--policies", "fcfs,vtc", "--duration", "90", "--jobs", "1", "--no-progress"])
    assert code == 0
    report = (tmp_path / "vtc-fairness.md").read_text()
    assert "| overload | VTC |" in report and "published (VTC paper)" in report
    assert (tmp_path / "vtc-fairness-overload.png").stat().st_size > 10_000


@pytest.mark.parametrize("max_tokens", ["2048", "oracle", "context"])
def test_slai_vs_sarathi_tiny(tmp_path, max_tokens):
    code = main(["experiment", "slai-vs-sarathi", "--out-dir", str(tmp_path), "--variants", "sarathi-fcfs,slai",
                 "--loads", "1.5", "--requests", "60", "--no-capacity", "--jobs", "1", "--no-progress",
                 "--max-tokens", max_tokens])
    assert code == 0
    report = (tmp_path / "slai-vs-sarathi.md").read_text()
    assert "| 1.5 | slai |" in report and (tmp_path / "slai-vs-sarathi.png").exists()


def test_slai_vs_sarathi_reports_the_range_over_seeds(tmp_path):
    code = main(["experiment", "slai-vs-sarathi", "--out-dir", str(tmp_path), "--variants", "sarathi-fcfs,slai",
                 "--loads", "1,2", "--requests", "60", "--seeds", "2", "--tolerance", "0.2", "--jobs", "1",
                 "--no-progress", "--max-tokens", "context"])
    assert code == 0
    report = (tmp_path / "slai-vs-sarathi.md").read_text()
    assert "--max-tokens context --seeds 2" in report and "seeds 0..1" in report
    lines = report.splitlines()
    load_row = next(line for line in lines if line.startswith("| 1 | slai | "))
    capacity_row = next(line for line in lines if line.startswith("| slai | ") and line.endswith("% |"))
    for row, column in ((load_row, 2), (capacity_row, 1)):  # "mean (min..max)"
        cell = row.split(" | ")[column]
        mean, (low, high) = float(cell.split(" ")[0]), cell.split("(")[1].rstrip(")").split("..")
        assert float(low) <= mean <= float(high)
    assert "- slai, seed 0: " in report and "- slai, seed 1: " in report


def test_pd_split_tiny(tmp_path):
    code = main(["experiment", "pd-split", "--quick", "--out-dir", str(tmp_path), "--workloads", "azure-code",
                 "--jobs", "2", "--no-progress"])
    assert code == 0
    report = (tmp_path / "pd-split.md").read_text()
    assert "| azure-code | 2 | 1:1 |" in report and (tmp_path / "pd-split.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["vtc-fairness", "--scenarios", "nope"], "unknown scenario"),
    (["vtc-fairness", "--policies", "wfq"], "unknown policy"),
    (["slai-vs-sarathi", "--loads", "a,b"], "comma-separated numbers"),
    (["slai-vs-sarathi", "--variants", "orca"], "unknown variant"),
    (["pd-split", "--gpus", "1"], "at least 2"),
    (["pd-split", "--workloads", "lmsys"], "unknown length distribution"),
    (["pd-split", "--jobs", "0"], "--jobs"),
    (["pd-split", "--max-tokens", "lots"], "--max-tokens must be"),
    (["vtc-fairness", "--max-tokens", "0"], "at least 1 token"),
    (["slai-vs-sarathi", "--max-tokens", "-5"], "at least 1 token"),
    (["sim-agreement", "--max-tokens", "all"], "--max-tokens must be"),
])
def test_bad_options(argv, message, tmp_path, capsys):
    assert main(["experiment", *argv, "--out-dir", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_sim_agreement_rejects_bad_input(tmp_path, capsys):
    assert main(["experiment", "sim-agreement", "--out-dir", str(tmp_path), "--settings", "nope"]) == 2
    assert "unknown setting 'nope'" in capsys.readouterr().err
    assert main(["experiment", "sim-agreement", "--out-dir", str(tmp_path), "--tolerance", "2"]) == 2
    assert main(["experiment", "sim-agreement", "--out-dir", str(tmp_path), "--loads", "1,x"]) == 2


@pytest.mark.integration
@pytest.mark.slow
def test_sim_agreement_tiny(tmp_path):
    """Real processes with --engine sim against the simulator on a few requests: the report is written with both
    sides' numbers (agreement itself is measured on an idle machine, docs/experiments/sim-agreement.md)."""
    code = main(["experiment", "sim-agreement", "--out-dir", str(tmp_path), "--settings", "pd-split/2p2d",
                 "--loads", "10", "--scale-requests", "0.05", "--no-progress"])
    assert code == 0
    report = (tmp_path / "sim-agreement.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| pd-split/2p2d")]
    assert len(rows) == 3  # in the criterion table, the context table and the token-gap split
    assert " ms |" in rows[2] and "nan" not in rows[2]
    assert "runs agree within 10%" in report
