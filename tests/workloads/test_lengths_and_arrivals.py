"""Generated lengths match the published statistics (and the traces, where present); arrival processes have the
advertised rate and burstiness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diptych.workloads import lengths as L
from diptych.workloads.arrivals import arrival_times, arrivals_in, gap_cv, on_off_times, ramp_times, scale_trace
from diptych.workloads.make_tables import spearman
from diptych.workloads.traces import read_csv_trace

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
RNG = np.random.default_rng


def test_sharegpt4_matches_the_published_table():
    p, o = L.preset("sharegpt4").sample(60_000, RNG(0))
    assert p.mean() == pytest.approx(2340, rel=0.02) and o.mean() == pytest.approx(439, rel=0.02)
    for q, want in zip((10, 25, 50, 75, 90, 99), (74, 580, 1730, 3734, 5696, 7433)):
        assert np.percentile(p, q) == pytest.approx(want, rel=0.05), q
    for q, want in zip((10, 25, 50, 75, 90, 99), (84, 228, 415, 628, 834, 998)):
        assert np.percentile(o, q) == pytest.approx(want, rel=0.05), q
    assert p.max() <= 8141 and o.max() <= 1024 and p.min() >= 1 and o.min() >= 1
    assert p.sum() / o.sum() == pytest.approx(5.33, rel=0.03)
    assert spearman(p, o) == pytest.approx(0.05, abs=0.02)


def test_azure_generators_match_the_published_medians():
    p, o = L.preset("azure-conv").sample(40_000, RNG(1))
    assert np.median(p) == pytest.approx(1020, rel=0.03) and np.percentile(p, 90) == pytest.approx(2734, rel=0.05)
    assert np.median(o) == pytest.approx(129, rel=0.05) and np.percentile(o, 90) == pytest.approx(424, rel=0.05)
    p, o = L.preset("azure-code").sample(40_000, RNG(2))
    assert np.median(p) == pytest.approx(1469, rel=0.03) and np.median(o) == pytest.approx(13, abs=1)
    assert p.sum() / o.sum() == pytest.approx(73, rel=0.1)


@pytest.mark.parametrize("name,file", [("sharegpt4", "sharegpt4_lengths.csv"), ("azure-conv", "azure2023_conv.csv"),
                                       ("azure-code", "azure2023_code.csv")])
def test_generators_match_the_public_traces(name, file):
    path = DATA / file
    if not path.exists():
        pytest.skip(f"public trace {path} not present (the generators' tables were made from it)")
    trace = read_csv_trace(path)
    p, o = L.preset(name).sample(len(trace), RNG(3))
    for generated, real in ((p, trace.prompt_lens), (o, trace.output_lens)):
        grid = np.percentile(real, np.arange(1, 100))
        ks = np.max(np.abs(np.searchsorted(np.sort(generated), grid, "right") / len(generated)
                           - np.searchsorted(np.sort(real), grid, "right") / len(real)))
        assert ks < 0.03, f"{name}: KS distance {ks:.3f}"


def test_fixed_uniform_and_trace_lengths():
    p, o = L.FixedLengths(256, 128).sample(5, RNG(0))
    assert (p == 256).all() and (o == 128).all()
    p, o = L.UniformLengths((10, 20), (1, 2)).sample(1000, RNG(0))
    assert p.min() >= 10 and p.max() <= 20 and set(o) == {1, 2}
    p, o = L.TraceLengths("t", np.array([5, 6]), np.array([7, 8])).sample(100, RNG(0))
    assert set(zip(p, o)) == {(5, 7), (6, 8)}
    with pytest.raises(ValueError, match="unknown length"):
        L.preset("nope")
    with pytest.raises(ValueError):
        L.FixedLengths(0, 1)


@pytest.mark.parametrize("kind,cv,rate_factor", [("poisson", 1.0, 1.0), ("poisson-capped", 0.88, 1.053),
                                                 ("gamma", 3.0, 1.0), ("constant", 0.0, 1.0)])
def test_arrival_processes(kind, cv, rate_factor):
    times = arrival_times(kind, 2.0, 200_000, RNG(4), cv=3.0)
    assert (np.diff(times) >= 0).all()
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate == pytest.approx(2.0 * rate_factor, rel=0.02)
    assert gap_cv(times) == pytest.approx(cv, abs=0.03)


def test_common_random_numbers_across_rates():
    a = arrival_times("poisson", 1.0, 100, RNG(5))
    b = arrival_times("poisson", 4.0, 100, RNG(5))
    np.testing.assert_allclose(a, b * 4)


def test_windows_ramps_on_off_and_trace_scaling():
    t = arrivals_in("constant", 1.0, 10.0, 20.0, RNG(0))
    assert len(t) == 10 and t[0] == 10.0
    ramp = ramp_times(12 / 60, 120 / 60, 0, 600)
    assert len(ramp) == pytest.approx((12 + 120) / 2 * 10, abs=2)
    assert np.diff(ramp)[0] > np.diff(ramp)[-1]
    on_off = on_off_times("constant", 1.0, 60, 60, 0, 600, RNG(0))
    assert len(on_off) == 300 and not ((on_off % 120) >= 60).any()
    trace = np.array([0.0, 10.0, 20.0, 30.0])
    np.testing.assert_allclose(scale_trace(trace, rate=1.0), [0, 1, 2, 3])
    np.testing.assert_allclose(scale_trace(trace, time_scale=2.0), [0, 5, 10, 15])
    with pytest.raises(ValueError, match="unknown arrival"):
        arrival_times("weird", 1.0, 10, RNG(0))
    with pytest.raises(ValueError, match="rate"):
        arrival_times("poisson", 0.0, 10, RNG(0))
