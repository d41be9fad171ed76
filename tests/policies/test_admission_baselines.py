"""Baselines next to VTC: RPM rate limiting, FCFS unfairness on the `overload` workload, SPF ordering."""

from __future__ import annotations

import pytest

from diptych.policies.admission import ADMISSION_POLICIES, FCFSAdmission, PendingRequest
from diptych.policies.rpm import RPMAdmission
from diptych.policies.spf import SPFAdmission
from tests.policies.fake_server import FakeServer, periodic, service_between


def req(rid: str, client: str = "a", prompt: int = 10, arrival: float = 0.0) -> PendingRequest:
    return PendingRequest(rid, client, prompt, 10, arrival)


def test_rpm_rejects_beyond_limit_with_retry_after():
    rpm = RPMAdmission(limit=3)
    assert rpm.add(req("a0", arrival=0), 0) is None
    assert rpm.add(req("a1", arrival=10), 10) is None
    assert rpm.add(req("a2", arrival=20), 20) is None
    rejection = rpm.add(req("a3", arrival=30), 30)
    assert rejection is not None and "rate limit" in rejection.reason
    assert rejection.retry_after_s == pytest.approx(30.0)   # a0 (t=0) leaves the 60 s window at t=60
    assert rpm.add(req("b0", client="b", arrival=30), 30) is None   # limits are per client
    assert rpm.add(req("a4", arrival=59.5), 59.5).retry_after_s == pytest.approx(0.5)
    assert rpm.add(req("a5", arrival=60), 60) is None        # a0 has left the window
    assert [rpm.pop(60).request_id for _ in range(len(rpm))] == ["a0", "a1", "a2", "b0", "a5"]   # FCFS
    snap = rpm.snapshot()
    assert snap["rejected"] == {"a": 2} and snap["accepted_in_window"]["a"] == 3


def test_rpm_limits_throughput_even_when_capacity_idles():
    server = FakeServer(RPMAdmission(limit=5), capacity=100_000)
    server.submit(periodic("a", 60, 120, 64, 64))
    server.run_until(200)
    assert server.admitted["a"] == 10 and server.rejected["a"] == 110


def _overload(policy_name: str) -> tuple[float, float]:
    """The VTC paper's `overload` workload: 2 clients at 90 and 180 req/min, 256 in / 256 out, on a server that
    completes about 2 requests/s (10 at a time, 256 decode ticks of 20 ms)."""
    server = FakeServer(ADMISSION_POLICIES.create(policy_name), capacity=10 * 512, dt=0.02)
    server.submit(periodic("c1", 90, 120, 256, 256) + periodic("c2", 180, 120, 256, 256))
    server.run_until(120)
    return service_between(server, "c1", 30, 120), service_between(server, "c2", 30, 120)


def test_overload_fcfs_serves_in_proportion_to_arrivals_vtc_equally():
    fcfs_c1, fcfs_c2 = _overload("fcfs")
    vtc_c1, vtc_c2 = _overload("vtc")
    assert fcfs_c2 / fcfs_c1 == pytest.approx(2.0, rel=0.1)
    assert vtc_c2 / vtc_c1 == pytest.approx(1.0, rel=0.05)
    assert vtc_c1 + vtc_c2 == pytest.approx(fcfs_c1 + fcfs_c2, rel=0.05)   # both work-conserving


def test_spf_serves_shortest_prompt_first_with_optional_aging():
    spf = ADMISSION_POLICIES.create("spf")
    assert isinstance(spf, SPFAdmission) and spf.aging_s is None
    spf.add(req("long", prompt=500, arrival=0), 0)
    spf.add(req("mid", prompt=50, arrival=1), 1)
    spf.add(req("short", prompt=5, arrival=2), 2)
    spf.add(req("short-too", prompt=5, arrival=3), 3)
    assert [spf.pop(1000).request_id for _ in range(4)] == ["short", "short-too", "mid", "long"]

    aged = SPFAdmission(aging_s=30)
    aged.add(req("long", prompt=500, arrival=0), 0)
    aged.add(req("short", prompt=5, arrival=20), 20)
    assert aged.peek().request_id == "short"
    assert aged.peek(now=31).request_id == "long"      # waited longer than 30 s: first
    assert aged.pop(31).request_id == "long"
    assert aged.remove("short") and len(aged) == 0 and aged.peek() is None


def test_pop_returns_what_peek_returned_even_if_pop_time_ages_a_request():
    spf = SPFAdmission(aging_s=10)
    spf.add(req("long", prompt=500, arrival=0), 0)
    spf.add(req("short", prompt=5, arrival=5), 5)
    head = spf.peek()
    assert spf.pop(now=100) is head                    # judged at the clock peek() used, then the clock moves
    assert spf.peek().request_id == "long"


def test_fcfs_peek_accepts_now_and_ignores_it():
    fcfs = FCFSAdmission()
    fcfs.add(req("x"), 0)
    assert fcfs.peek(now=5.0).request_id == "x" and fcfs.pop(5.0).request_id == "x"


def test_spf_requeued_id_is_ordered_by_its_new_prompt():
    spf = SPFAdmission()
    spf.add(req("x", prompt=5), 0)
    spf.remove("x")
    spf.add(req("x", prompt=500), 1)
    spf.add(req("y", prompt=50), 2)
    assert spf.peek().request_id == "y"


def test_spf_stays_ordered_through_many_removals():
    spf = SPFAdmission()
    for i in range(300):
        spf.add(req(f"r{i}", prompt=1000 - i), 0)
    for i in range(0, 300, 3):
        spf.remove(f"r{i}")
    order = [spf.pop(1).prompt_tokens for _ in range(len(spf))]
    assert order == sorted(order) and len(order) == 200
