"""Cost model: the documented default, tile quantisation, the pure-decode recurrence, fitting and persistence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diptych.sim.cost_model import DEFAULT, MISTRAL_7B, PRESETS, CostModel, resolve


def test_default_matches_its_derivation():
    assert MISTRAL_7B.kv_bytes_per_token == 131072
    assert DEFAULT.weights_floor_s == pytest.approx(3.4e-3)
    assert DEFAULT.kv_token_s == pytest.approx(131072 / 3.2e12)
    assert DEFAULT.per_token_s == pytest.approx(2 * 7.24e9 / 550e12)
    # batch-32 decode at 4k context and a 2048-token prompt, as in the docstring
    assert DEFAULT.iteration_time(0, 32, 32 * 4096) == pytest.approx(9.07e-3, rel=0.01)
    assert DEFAULT.iteration_time(2048) == pytest.approx(56.2e-3, rel=0.01)
    assert DEFAULT.iteration_time() == 0.0


def test_tile_quantisation_and_floor():
    assert DEFAULT.iteration_time(257) / DEFAULT.iteration_time(256) == pytest.approx(1.24, abs=0.02)
    assert DEFAULT.iteration_time(0, 1, 100) < DEFAULT.iteration_time(0, 64, 6400)
    assert DEFAULT.iteration_time(0, 64, 0) == DEFAULT.iteration_time(0, 1, 0)  # below the ridge: the weights floor


def test_decode_step_coefficients_follow_growing_context():
    a, b = DEFAULT.decode_step_coeffs(20, 40_000)
    for i in range(5):
        assert a + b * i == pytest.approx(DEFAULT.iteration_time(0, 20, 40_000 + 20 * i))


def test_fit_recovers_a_known_model_from_noisy_samples():
    truth = CostModel(overhead_s=4e-4, weights_floor_s=5e-3, per_token_s=3e-5, attn_pair_s=1e-9, kv_token_s=5e-8,
                      tile_quantum=64)
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(300):
        if rng.random() < 0.5:
            chunks = [[int(rng.integers(1, 2049)), int(rng.integers(0, 4000))]]
            decodes = int(rng.integers(0, 16))
        else:
            chunks, decodes = [], int(rng.integers(1, 256))
        context = decodes * int(rng.integers(100, 4000))
        prefill = sum(c for c, _ in chunks)
        pairs = sum(CostModel.chunk_pairs(c, s) for c, s in chunks)
        seconds = truth.iteration_time(prefill, decodes, context, pairs, 0) * (1 + 0.01 * rng.standard_normal())
        samples.append({"prefill_chunks": chunks, "num_decodes": decodes, "decode_context_tokens": context,
                        "seconds": seconds, "num_seqs": 0})
    fitted = CostModel.fit(samples, tile_quantum=64, device="test-gpu")
    assert fitted.fit_error["mean_ape"] < 0.02 and fitted.fit_error["held_out"] == 60
    for name in ("weights_floor_s", "per_token_s", "kv_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.1), name
    assert fitted.source == "fit" and fitted.device == "test-gpu"


def test_fit_rejects_bad_samples():
    with pytest.raises(ValueError, match="at least 6"):
        CostModel.fit([{"prefill_tokens": 10, "seconds": 0.01}] * 3)
    with pytest.raises(ValueError, match="missing 'seconds'"):
        CostModel.fit([{"prefill_tokens": 10}] * 8)
    with pytest.raises(ValueError, match="seconds > 0"):
        CostModel.fit([{"prefill_tokens": 0, "num_decodes": 0, "seconds": 1.0}] * 8)


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "model.json"
    PRESETS["a10g-llama-2-7b"].save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "diptych-cost-model/1" and data["device"] == "NVIDIA A10G"
    assert data["model"]["num_kv_heads"] == 32 and "held_out_error" in data and data["date"]
    assert CostModel.load(path) == PRESETS["a10g-llama-2-7b"]
    assert resolve(str(path)) == PRESETS["a10g-llama-2-7b"]
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a cost model"):
        CostModel.load(path)
    with pytest.raises(ValueError, match="unknown cost model"):
        resolve("no-such-preset")


def test_invalid_parameters_and_capacity():
    with pytest.raises(ValueError, match="overhead_s"):
        CostModel(overhead_s=-1, weights_floor_s=0, per_token_s=0, attn_pair_s=0, kv_token_s=0)
    with pytest.raises(ValueError, match="tile_quantum"):
        CostModel(0, 0, 0, 0, 0, tile_quantum=0)
    # H200: 0.9 * 141 GB - 14.5 GB of weights over 131072 B/token
    assert DEFAULT.kv_capacity_tokens() == math.floor((0.9 * 141e9 - 7.24e9 * 2) / 131072)
    with pytest.raises(ValueError, match="do not fit"):
        PRESETS["a10g-llama-2-7b"].kv_capacity_tokens(0.3)
