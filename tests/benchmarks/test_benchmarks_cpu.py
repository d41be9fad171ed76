"""The benchmark and profiling commands end to end on the CPU with the tiny model (small sizes: the code paths,
not the numbers)."""

from __future__ import annotations

import json

import pytest

from diptych.benchmarks.profile import tile_steps
from diptych.cli import main

pytestmark = pytest.mark.slow


def test_bench_engine_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "engine.json"
    assert main(["bench", "engine", "--model", "tiny", "--device", "cpu", "--batches", "1,2", "--context", "20",
                 "--steps", "2", "--hf-steps", "1", "--prefill-tokens", "16,32", "--chunk", "8", "--kv-gb", "0.02",
                 "--check-tokens", "4", "--hf-generate-batch", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [p["batch"] for p in data["decode"]] == [1, 2]
    assert all(p["step_s"] > 0 and p["hf_step_s"] >= 0 and p["floor_s"] > 0 for p in data["decode"])
    assert [(p["tokens"], p["chunk"]) for p in data["prefill"]] == [(16, 16), (32, 32), (32, 8)]
    assert data["agreement"][0]["first_divergence"] is None  # float32 on CPU: exact
    assert "ours/floor" in capsys.readouterr().out


def test_bench_transfer_tiny_cpu_frames_path(tmp_path, capsys):
    pytest.importorskip("zmq")
    out = tmp_path / "transfer.json"
    assert main(["bench", "transfer", "--model", "tiny", "--prefill-device", "cpu", "--decode-device", "cpu",
                 "--prompts", "24", "--chunk", "8", "--repeats", "1", "--zmq-endpoint",
                 f"ipc://{tmp_path}/kv", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["path"] == "zmq_frames"
    assert data["rows"][0]["zmq_GBps"] > 0
    assert "ZeroMQ GB/s" in capsys.readouterr().out


def test_profile_tiny_cpu_writes_samples_and_fit(tmp_path):
    assert main(["profile", "--model", "tiny", "--device", "cpu", "--prefill", "0,16,48", "--decodes", "0,2,4",
                 "--context", "8,24", "--held-out", "4", "--sweep-step", "16", "--sweep-max", "48", "--kv-gb", "0.02",
                 "--out-dir", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("iteration_times_*.json")).read_text())
    assert len(data["samples"]) == 2 + 2 * 3 * 2 and len(data["held_out_samples"]) == 4
    model = json.loads(next(tmp_path.glob("cost_model_*.json")).read_text())
    assert model["params"]["tile_quantum"] >= 1


def test_tile_steps_finds_the_quantum():
    tokens = list(range(16, 513, 16))
    seconds = [1.0 + 0.5 * ((t - 1) // 64) + 0.001 * t for t in tokens]
    steps, quantum = tile_steps(tokens, seconds)
    assert steps == [80, 144, 208, 272, 336, 400, 464] and quantum == 64
