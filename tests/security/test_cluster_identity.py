"""A real cluster with CURVE on (the default), attacked over raw ZeroMQ: a client without the cluster's keys, a key
outside the set, and a member key (``decode-9``, in the set but not a worker of this cluster) trying to read the
status, submit as another tenant, register a fake worker, cancel, and speak for another worker. None gets an answer
that reveals anything; the coordinator's log names each refusal; the cluster keeps serving. The same raw client is
answered by a cluster started with ``--insecure-no-curve`` (what CURVE stops)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import zmq

from diptych import proto
from diptych.launcher import Cluster, ClusterSpec, with_free_ports
from diptych.services.common.security import CurveClient, KeyPair, SocketSecurity, generate_key_set

pytestmark = pytest.mark.integration

NO_ANSWER_S = 1.5
MEMBER = "decode-9"
"""A key in the cluster's set that no running worker holds: what a stolen or misused member key can do."""


def ask(address: str, msg, security: SocketSecurity | None, identity: bytes = b"intruder"):
    """Send ``msg`` from a fresh DEALER; the decoded answer, or None when nothing comes within NO_ANSWER_S."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    if security is not None:
        security.apply(sock)
    try:
        sock.connect(address)
        sock.send_multipart(proto.encode(msg))
        if sock.poll(int(NO_ANSWER_S * 1000)):
            return proto.decode(sock.recv_multipart())
        return None
    finally:
        sock.close()
        ctx.term()


def completion(cluster: Cluster) -> int:
    body = {"model": httpx.get(cluster.spec.http_url + "/v1/models").json()["data"][0]["id"], "prompt": "Hello",
            "max_tokens": 4}
    resp = httpx.post(cluster.spec.http_url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]["completion_tokens"]


def wait_for_log(path: Path, text: str, timeout_s: float = 5.0) -> str:
    deadline = time.time() + timeout_s
    log = ""
    while time.time() < deadline:
        log = path.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path.name}:\n{log[-3000:]}")


def submit_as_alice() -> proto.SubmitRequest:
    return proto.SubmitRequest(request=proto.Request(
        request_id="forged-1", client_id="alice", prompt_token_ids=[1, 2, 3],
        sampling=proto.SamplingParams(max_tokens=4), arrival_time=time.time(),
        stream_addr="tcp://127.0.0.1:1", weight=1e6))


def fake_registration(worker_id: str) -> proto.RegisterWorker:
    return proto.RegisterWorker(
        worker_id=worker_id, role="prefill", model="probe",
        layout=proto.KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, block_size=16, dtype="float32"),
        kv_addr="", load=proto.WorkerLoad(free_blocks=64, total_blocks=64, num_waiting=0, num_running=0,
                                          waiting_prompt_tokens=0), max_model_len=64)


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    keys = generate_key_set(tmp / "keys", ["coordinator", "frontend", "prefill-0", "decode-0", MEMBER])
    spec = with_free_ports(ClusterSpec(engine="sim", keys_dir=str(keys.directory)))
    cluster = Cluster(spec, log_dir=str(tmp / "logs"))
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=120)
        yield cluster, keys, tmp / "logs"
    finally:
        cluster.stop()


def test_no_keys_and_unknown_keys_get_nothing(secure_cluster):
    cluster, keys, logs = secure_cluster
    coordinator = cluster.spec.addr(cluster.spec.coordinator_port)
    for msg in (proto.StatusQuery(), submit_as_alice(), fake_registration("prefill-5"),
                proto.CancelRequest(request_id="forged-1", reason="abort")):
        assert ask(coordinator, msg, None) is None
    public, secret = zmq.curve_keypair()
    stranger = CurveClient(KeyPair("stranger", public, secret), keys.public_key("coordinator"))
    assert ask(coordinator, proto.StatusQuery(), stranger) is None
    wait_for_log(logs / "coordinator.log", f"key {public.decode()} is not in the cluster's key set")
    stream = cluster.spec.addr(cluster.spec.stream_port)
    stranger_to_frontend = CurveClient(KeyPair("stranger", public, secret), keys.public_key("frontend"))
    ask(stream, proto.StatusQuery(), stranger_to_frontend)  # a PUSH-side handshake: refused by the frontend's ZAP
    wait_for_log(logs / "frontend.log", f"key {public.decode()} is not in the cluster's key set")
    assert completion(cluster) >= 1


def test_a_member_key_can_only_be_itself(secure_cluster):
    cluster, keys, logs = secure_cluster
    coordinator = cluster.spec.addr(cluster.spec.coordinator_port)
    member = keys.client(MEMBER, "coordinator")
    assert ask(coordinator, proto.StatusQuery(), member) is None
    assert ask(coordinator, submit_as_alice(), member) is None
    assert ask(coordinator, proto.CancelRequest(request_id="forged-1", reason="abort"), member) is None
    assert ask(coordinator, proto.Heartbeat(worker_id="decode-0", load=fake_registration("x").load,
                                            time=time.time()), member) is None
    assert ask(coordinator, proto.RequestDone(request_id="forged-1", worker_id="decode-0", finish_reason="stop"),
               member) is None
    log = wait_for_log(logs / "coordinator.log", "refused RequestDone")
    for kind in ("StatusQuery", "SubmitRequest", "CancelRequest", "Heartbeat"):
        assert f"refused {kind} from b'intruder' (key {MEMBER})" in log, kind
    assert "forged-1 queued" not in log

    other = ask(coordinator, fake_registration("prefill-5"), member)  # someone else's id
    own = ask(coordinator, fake_registration(MEMBER), member, identity=MEMBER.encode())  # its own, wrong model
    for ack in (other, own):
        assert isinstance(ack, proto.RegisterAck) and not ack.ok and ack.error == "refused"
    log = wait_for_log(logs / "coordinator.log", f"refused worker {MEMBER}: model")
    assert "refused RegisterWorker" in log
    status = httpx.get(cluster.spec.http_url + "/admin/status", timeout=5).json()
    assert sorted(status["workers"]) == ["decode-0", "prefill-0"]
    assert completion(cluster) >= 1


def test_insecure_cluster_answers_anyone(tmp_path):
    """``--insecure-no-curve``: the suite's one cluster without CURVE; it serves, and so does a raw client."""
    spec = with_free_ports(ClusterSpec(engine="sim", insecure_no_curve=True))
    cluster = Cluster(spec, log_dir=str(tmp_path))
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=120)
        assert completion(cluster) >= 1
        status = ask(spec.addr(spec.coordinator_port), proto.StatusQuery(), None)
        assert isinstance(status, proto.ClusterStatus) and status.prefill_workers == 1
        assert "CURVE is off" in (tmp_path / "coordinator.log").read_text()
    finally:
        cluster.stop()
