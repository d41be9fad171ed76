"""The frontend locked down, on a real process: operator endpoints need an admin key, a client sees only its own
usage, HTTPS with a self-signed certificate (the official ``openai`` client verifying it), and CURVE on the
coordinator link and token stream (``--keys-dir``)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import openai
import pytest
import zmq

from diptych import proto
from diptych.services.common.security import CurveClient, KeyPair, generate_key_set
from diptych.services.frontend.identity import AdminAccess, ClientDirectory, ClientIdentity, load_access
from tests.frontend.conftest import _launch, _stop, _wait_ready, replying, text_ids
from tests.security.certs import self_signed_certificate

CLIENTS = {"sk-alice": {"client_id": "alice"}, "sk-bob": {"client_id": "bob"}}
ADMIN_IN_FILE, ADMIN_IN_LIST = "ak-root", "ak-ops"
OTHER_WORKER = "decode-9"
"""A worker key of the cluster that the requests of these tests are not placed on (they run on ``prefill-0``)."""


@pytest.fixture(scope="module")
def secure(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps({"clients": CLIENTS, "admins": [ADMIN_IN_FILE]}))
    admin_file = tmp / "admins.txt"
    admin_file.write_text(f"# operators\n{ADMIN_IN_LIST}\n")
    cert, key = self_signed_certificate(tmp)
    keys = generate_key_set(tmp / "curve", ["coordinator", "frontend", "prefill-0", OTHER_WORKER])
    fe = _launch(tiny_model, str(tmp), "secure", "--api-keys-file", str(keys_file), "--admin-keys", str(admin_file),
                 "--ssl-certfile", cert, "--ssl-keyfile", key, "--keys-dir", str(tmp / "curve"),
                 keys=keys, scheme="https")
    try:
        _wait_ready(fe, verify=cert)
        yield fe, cert
    finally:
        code = _stop(fe)
    assert code == 0, fe.log()


def get(fe, cert, path, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(fe.http_url + path, headers=headers, verify=cert, timeout=10)


def test_admin_status_needs_an_operator_key(secure):
    fe, cert = secure
    fe.cluster.reset()
    for admin in (ADMIN_IN_FILE, ADMIN_IN_LIST):
        assert get(fe, cert, "/admin/status", admin).status_code == 200
    tenant = get(fe, cert, "/admin/status", "sk-alice")
    assert tenant.status_code == 403
    assert tenant.json()["error"]["message"] == "This endpoint needs an operator key"
    for key in (None, "sk-nobody"):
        refused = get(fe, cert, "/admin/status", key)
        assert refused.status_code == 401 and "workers" not in refused.text


def test_usage_shows_only_the_callers_own(secure):
    fe, cert = secure
    fe.cluster.reset()
    fe.cluster.status_clients = {"alice": {"requests": 2, "input_tokens": 10, "output_tokens": 7, "service": 24.0},
                                 "bob": {"requests": 9, "input_tokens": 99, "output_tokens": 99, "service": 297.0}}
    body = get(fe, cert, "/v1/usage", "sk-alice").json()
    assert body == {"object": "usage", "client_id": "alice", "requests": 2, "input_tokens": 10, "output_tokens": 7,
                    "service": 24.0}
    assert "bob" not in json.dumps(body)
    assert get(fe, cert, "/v1/usage", ADMIN_IN_FILE).status_code == 401  # an operator key is not a client
    assert get(fe, cert, "/v1/usage").status_code == 401


def test_openai_client_over_https_and_curve(secure, tokenizer):
    fe, cert = secure
    fe.cluster.reset()
    fe.cluster.responder = replying(tokenizer, "secure hello", finish_reason="stop")
    with httpx.Client(verify=cert) as http:
        client = openai.OpenAI(base_url=fe.http_url + "/v1", api_key="sk-alice", http_client=http, max_retries=0)
        done = client.completions.create(model="tiny", prompt="hi", max_tokens=16)
    assert done.choices[0].text == "secure hello"
    submitted = fe.cluster.wait_submit()
    assert submitted.client_id == "alice"


def test_https_refuses_an_unverified_client(secure):
    fe, _ = secure
    with pytest.raises(httpx.ConnectError):
        httpx.get(fe.http_url + "/health", timeout=5)  # system CAs do not trust the self-signed certificate


def test_token_stream_refuses_a_key_outside_the_set(secure):
    fe, _ = secure
    public, secret = zmq.curve_keypair()
    server = fe.cluster._keys.public_key("frontend")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    CurveClient(KeyPair("stranger", public, secret), server).apply(sock)
    sock.connect(fe.stream_addr)
    with contextlib.suppress(zmq.Again):  # no connection completes: the handshake is refused
        sock.send_multipart(proto.encode(proto.TokenBatch(outputs=[])), flags=zmq.NOBLOCK)
    deadline = time.monotonic() + 10
    while public.decode() not in fe.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    sock.close()
    ctx.term()
    assert f"key {public.decode()} is not in the cluster's key set" in fe.log()


def test_tokens_come_only_from_the_worker_the_request_is_on(secure, tokenizer):
    """The coordinator placed the request on ``prefill-0`` (``RequestPlaced``): another worker's key is refused."""
    fe, cert = secure
    fe.cluster.reset()
    answer: dict[str, httpx.Response] = {}

    def call() -> None:
        answer["response"] = httpx.post(fe.http_url + "/v1/completions", verify=cert, timeout=30,
                                        headers={"Authorization": "Bearer sk-alice"},
                                        json={"model": "tiny", "prompt": "hi", "max_tokens": 8})

    caller = threading.Thread(target=call)
    caller.start()
    request = fe.cluster.wait_submit()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    fe.cluster._keys.client(OTHER_WORKER, "frontend").apply(sock)
    sock.connect(fe.stream_addr)
    sock.send_multipart(proto.encode(proto.TokenBatch(outputs=[proto.TokenOutput(
        request_id=request.request_id, index=0, token_ids=text_ids(tokenizer, "forged"), finish_reason="stop")])))
    deadline = time.monotonic() + 10
    refusal = f"refused output 0 from key {OTHER_WORKER}"
    while refusal not in fe.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    sock.close()
    ctx.term()
    assert refusal in fe.log()
    fe.cluster.push(request, proto.TokenOutput(request_id=request.request_id, index=0,
                                               token_ids=text_ids(tokenizer, "real"), finish_reason="stop"))
    caller.join(30)
    assert answer["response"].status_code == 200
    assert answer["response"].json()["choices"][0]["text"] == "real"


def test_admin_access_rules():
    alice = ClientIdentity("alice")
    assert ClientDirectory().admin_access(None) is AdminAccess.GRANTED  # nothing configured: development cluster
    anonymous_with_ops = ClientDirectory(admins=frozenset({"ak"}))
    assert anonymous_with_ops.admin_access(None) is AdminAccess.UNAUTHENTICATED
    assert anonymous_with_ops.admin_access("ak") is AdminAccess.GRANTED
    keyed = ClientDirectory({"sk": alice})
    assert keyed.admin_access("sk") is AdminAccess.FORBIDDEN  # no admin keys: operator endpoints closed
    with pytest.raises(ValueError):
        ClientDirectory({"sk": alice}, frozenset({"sk"}))


def test_bad_admin_configuration_is_refused(tmp_path):
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"clients": {"k": {"client_id": "a"}}, "admins": ["k"]}))
    with pytest.raises(ValueError, match="both a client key and an admin key"):
        load_access(both)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"clients": {}, "admins": "k"}))
    with pytest.raises(ValueError, match="admins must be a list"):
        load_access(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_access(None, None, empty)
