"""VTC and LCF: counter lift rules, weighted shares, the fairness bound, and LCF's monopolisation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diptych.policies.admission import ADMISSION_POLICIES, PendingRequest
from diptych.policies.vtc import LCFAdmission, VTCAdmission
from tests.policies.fake_server import FakeServer, max_backlogged_gap, periodic, service_between


def req(rid: str, client: str, prompt: int = 10, output: int = 10, arrival: float = 0.0,
        weight: float = 1.0) -> PendingRequest:
    return PendingRequest(rid, client, prompt, output, arrival, weight=weight)


def test_registered_with_paper_defaults():
    vtc = ADMISSION_POLICIES.create("vtc")
    assert isinstance(vtc, VTCAdmission) and (vtc.w_p, vtc.w_q) == (1.0, 2.0)
    assert isinstance(ADMISSION_POLICIES.create("lcf"), LCFAdmission)


def test_lift_to_min_counter_of_clients_in_queue():
    vtc = VTCAdmission()
    vtc.add(req("a1", "a"), 0)
    vtc.add(req("b1", "b"), 0)
    vtc.pop(0)                      # a1 dispatched: c[a] = 10, a leaves Q
    vtc.on_output_tokens("b", 50)   # c[b] = 100, though b1 still waits
    vtc.add(req("a2", "a"), 1)
    vtc.add(req("c1", "c"), 1)      # new client: lifted to min over Q = {a: 10, b: 100}
    assert vtc.counters["a"] == 100  # a was lifted from 10 to min over Q = {b: 100}
    assert vtc.counters["c"] == 100


def test_lift_when_queue_empty_uses_last_client_to_leave():
    vtc = VTCAdmission()
    vtc.add(req("a1", "a", prompt=40), 0)
    vtc.add(req("b1", "b", prompt=30), 0)
    assert vtc.pop(0).request_id == "a1"   # tie at 0: earliest waiting request first
    assert vtc.pop(0).request_id == "b1"   # Q now empty; last to leave: b (counter 30)
    vtc.add(req("c1", "c"), 1)
    assert vtc.counters["c"] == 30


def test_lift_never_lowers_a_counter():
    vtc = VTCAdmission()
    vtc.add(req("a1", "a", prompt=300), 0)
    vtc.pop(0)                          # a ran up a debt: c[a] = 300, a no longer waits
    vtc.add(req("b1", "b", prompt=50), 1)
    vtc.pop(1)                          # Q empty, last left a: c[b] = 300 + 50
    vtc.add(req("b2", "b"), 2)          # Q empty, last left b (350): b lifted? it is max(350, 350)
    vtc.add(req("a2", "a"), 3)          # Q = {b: 350} -> c[a] = max(300, 350)
    assert vtc.counters["a"] == 350
    vtc.on_output_tokens("a", 100)      # c[a] = 550 (a2 still waits)
    vtc.pop(4)                          # b2 dispatched (350 < 550): c[b] = 360
    vtc.pop(4)                          # a2 dispatched: c[a] = 560, Q empty, last left a
    vtc.add(req("c1", "c"), 5)
    vtc.add(req("a3", "a"), 6)          # Q = {c: 560}; a keeps 560, b arriving now must not drop below its 360
    vtc.add(req("b3", "b"), 7)
    assert vtc.counters["a"] == 560 and vtc.counters["c"] == 560 and vtc.counters["b"] == 560
    vtc.on_output_tokens("a", 1000)     # a's debt: 2560
    vtc.remove("a3")                    # a idle again
    vtc.add(req("a4", "a"), 8)          # Q = {b: 560, c: 560}: lift to 560 would lower a; it keeps 2560
    assert vtc.counters["a"] == 2560


def test_lift_applies_only_when_client_has_no_waiting_request():
    vtc = VTCAdmission()
    vtc.add(req("a1", "a"), 0)
    vtc.add(req("b1", "b"), 0)
    vtc.on_output_tokens("b", 100)    # c[b] = 200
    vtc.add(req("a2", "a"), 1)        # a already in Q: no lift, stays 0
    assert vtc.counters["a"] == 0


def test_lcf_does_not_lift():
    lcf = LCFAdmission()
    lcf.add(req("a1", "a", prompt=500), 0)
    lcf.pop(0)
    lcf.add(req("b1", "b"), 1)
    assert lcf.counters["b"] == 0


def test_peek_is_stable_and_pop_charges_weighted_input():
    vtc = VTCAdmission(w_p=1.0, w_q=2.0)
    vtc.add(req("a1", "a", prompt=100, weight=2.0), 0)
    vtc.add(req("b1", "b", prompt=10), 0.5)
    head = vtc.peek()
    assert head is not None and head.request_id == "a1"
    assert vtc.peek() is head and vtc.peek() is head   # the coordinator may retry without skipping ahead
    assert vtc.pop(1) is head
    assert vtc.counters["a"] == 50 and vtc.service["a"] == 100
    vtc.on_output_tokens("a", 10)
    assert vtc.counters["a"] == 60 and vtc.service["a"] == 120
    snap = vtc.snapshot()
    assert snap["counters"]["a"] == 60 and snap["service"]["a"] == 120
    assert snap["waiting_per_client"] == {"b": 1} and snap["waiting"] == 1


def test_smallest_counter_first_then_earliest_request():
    vtc = VTCAdmission()
    vtc.add(req("a1", "a", arrival=0.0), 0)
    vtc.add(req("b1", "b", arrival=1.0), 1)
    vtc.on_output_tokens("a", 1)
    assert vtc.peek().request_id == "b1"
    vtc.on_output_tokens("b", 1)
    assert vtc.peek().request_id == "a1"    # tie on counters: earliest waiting request


def test_remove_cancels_waiting_request():
    vtc = VTCAdmission()
    vtc.add(req("a1", "a"), 0)
    assert vtc.remove("a1") and not vtc.remove("a1")
    assert len(vtc) == 0 and vtc.peek() is None
    with pytest.raises(IndexError):
        vtc.pop(0)


def test_client_queue_spf_with_aging():
    vtc = VTCAdmission(client_queue_order="spf", aging_s=10.0)
    vtc.add(req("long", "a", prompt=900, arrival=0.0), 0)
    vtc.add(req("short", "a", prompt=9, arrival=1.0), 1)
    assert vtc.peek().request_id == "short"
    assert vtc.peek(now=10.0).request_id == "short"   # waited exactly 10 s: not longer than aging_s
    assert vtc.peek(now=10.5).request_id == "long"    # waited longer than aging_s: goes first
    assert vtc.pop(10.5).request_id == "long"


def test_fifo_is_default_client_order():
    vtc = VTCAdmission()
    vtc.add(req("long", "a", prompt=900), 0)
    vtc.add(req("short", "a", prompt=9), 0)
    assert vtc.peek().request_id == "long"
    with pytest.raises(ValueError):
        VTCAdmission(client_queue_order="lifo")


def test_weighted_shares_follow_weights():
    vtc = VTCAdmission()
    server = FakeServer(vtc, capacity=1280)
    server.submit(periodic("light", 600, 400, 64, 64, weight=1.0) + periodic("heavy", 600, 400, 64, 64, weight=2.0))
    server.run_until(400)
    light = service_between(server, "light", 100, 400)
    heavy = service_between(server, "heavy", 100, 400)
    assert heavy / light == pytest.approx(2.0, rel=0.1)


def _requests(client: str, specs: list[tuple[int, int, float]]) -> list[PendingRequest]:
    return [req(f"{client}-{i}", client, prompt, output, arrival) for i, (prompt, output, arrival) in enumerate(specs)]


request_specs = st.lists(
    st.tuples(st.integers(1, 64), st.integers(1, 32), st.floats(0, 40, allow_nan=False)), min_size=20, max_size=50
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=request_specs, b=request_specs, extra_capacity=st.integers(0, 300),
       costs=st.sampled_from([(1.0, 2.0), (1.0, 1.0), (2.0, 2.0), (0.5, 2.0)]))
def test_backlogged_service_gap_within_vtc_bound(a, b, extra_capacity, costs):
    """The bound is checked where input tokens cost no more than output tokens (``w_p <= w_q``, the paper's
    regime). With ``w_p > w_q`` one admission's input charge plus the outputs still due to the same client's running
    requests can exceed ``max(w_p * L_input, w_q * M)``: random search finds gaps about 5% above the bound there."""
    w_p, w_q = costs
    capacity = 96 + extra_capacity
    server = FakeServer(VTCAdmission(w_p=w_p, w_q=w_q), capacity=capacity, w_p=w_p, w_q=w_q)
    requests = _requests("a", a) + _requests("b", b)
    server.submit(requests)
    while not server.idle():
        server.tick()
    longest_input = max(r.prompt_tokens for r in requests)
    bound = 2 * max(w_p * longest_input, w_q * capacity)
    assert max_backlogged_gap(server, "a", "b") <= bound


def test_fcfs_breaks_the_bound_that_vtc_keeps():
    """The bound is not vacuous: FCFS under the same load exceeds it, VTC stays within."""
    a = [req(f"a-{i}", "a", 64, 32, 0.0) for i in range(40)]
    b = [req(f"b-{i}", "b", 64, 32, 0.0) for i in range(40)]
    bound = 2 * max(1.0 * 64, 2.0 * 200)
    gaps = {}
    for name in ("fcfs", "vtc"):
        server = FakeServer(ADMISSION_POLICIES.create(name), capacity=200)
        server.submit(a + b)
        while not server.idle():
            server.tick()
        gaps[name] = max_backlogged_gap(server, "a", "b")
    assert gaps["fcfs"] > bound >= gaps["vtc"]


def _returning_client(policy) -> FakeServer:
    server = FakeServer(policy, capacity=480)
    steady = [req(f"a-{i}", "a", 32, 16, 0.0) for i in range(600)]
    early = [req(f"b-{i}", "b", 32, 16, 0.0) for i in range(5)]
    burst = [req(f"b-late-{i}", "b", 32, 16, 200.0) for i in range(50)]
    server.submit(steady + early + burst)
    server.run_until(270)
    return server


def test_lcf_lets_a_returning_client_monopolise_vtc_does_not():
    lcf = _returning_client(LCFAdmission())
    share_lcf = service_between(lcf, "a", 216, 270) / (
        service_between(lcf, "a", 216, 270) + service_between(lcf, "b", 216, 270))
    vtc = _returning_client(VTCAdmission())
    share_vtc = service_between(vtc, "a", 216, 270) / (
        service_between(vtc, "a", 216, 270) + service_between(vtc, "b", 216, 270))
    assert share_lcf < 0.05          # the steady client is starved while the returning one catches up
    assert 0.4 < share_vtc < 0.6     # VTC lifts the returning client: both share the server
