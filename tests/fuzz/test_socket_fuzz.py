"""Fuzz every socket of a real running cluster with every message type, then check it still serves.

The fuzzer is an authenticated but malicious peer: it holds the cluster's CURVE keys (the frontend's key towards the
coordinator, a prefill worker's towards the token stream and the KV ingress) and sends, raw, each registered message
type with random field values, type-correct (to reach the range checks of ``proto.validation`` and the receivers'
handlers) or of any type, plus random frames. Afterwards every process must be alive and a normal request must be
served.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import types
import typing
from typing import Any

import httpx
import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from diptych import proto
from diptych.launcher import Cluster, ClusterSpec, free_port_block
from diptych.proto.codec import _REGISTRY, _hints
from diptych.services.common.security import generate_key_set

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = int(os.environ.get("DIPTYCH_FUZZ_EXAMPLES", "100"))
"""Hypothesis examples per socket."""

_ANY = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats()
                    | st.text(max_size=20) | st.binary(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
"""A msgpack-encodable value of any type."""

_INTS = st.one_of(*[st.integers(0, 40)] * 4, st.integers(-3, -1), st.integers(-(2 ** 63), 2 ** 64 - 1),
                  st.sampled_from([2 ** 20, 2 ** 31, 2 ** 40]))
_IDS = st.sampled_from(["", "r1", "decode-0", "prefill-0", "frontend", "x" * 300]) | st.text(max_size=12)


def _typed(hint: Any) -> st.SearchStrategy:
    """Values of ``hint``'s type (out of range as often as not), or now and then of any type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_typed(arg) for arg in args])
    if hint is type(None):
        return st.none()
    if origin is list:
        return st.lists(_typed(args[0] if args else Any), max_size=6)
    if origin is dict:
        key, value = args if args else (Any, Any)
        return st.dictionaries(_typed(key), _typed(value), max_size=4)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _body(hint)
    if hint is int:
        return _INTS
    if hint is float:
        return st.floats() | st.sampled_from([0.0, 1.0, -1.0, 0.5])
    if hint is str:
        return _IDS
    if hint is bool:
        return st.booleans()
    return _ANY


@functools.cache
def _body(cls: type) -> st.SearchStrategy:
    """A body map of ``cls``: each field mostly of its type (sometimes of any), a required field rarely missing."""
    hints = _hints(cls)
    required: dict[str, st.SearchStrategy] = {}
    optional: dict[str, st.SearchStrategy] = {}
    for f in dataclasses.fields(cls):
        value = st.integers(0, 3) if f.metadata.get("payload") else st.one_of(*[_typed(hints[f.name])] * 7, _ANY)
        needed = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        (required if needed else optional)[f.name] = value
    complete = st.fixed_dictionaries(required, optional=optional)
    return st.one_of(*[complete] * 9, st.fixed_dictionaries({}, optional={**required, **optional}))


@st.composite
def frames(draw: st.DrawFn, tags: list[str]) -> list[bytes]:
    """One message's frames: a header for one of ``tags`` (or any tag) with a random body and payload frames, or
    random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    if draw(st.integers(0, 2)) == 0 and any(tag in _TEMPLATES for tag in tags):
        tag = draw(st.sampled_from([tag for tag in tags if tag in _TEMPLATES]))
        body = _mutated(draw, _TEMPLATES[tag]())
    else:
        tag = draw(st.sampled_from(tags) | st.sampled_from(sorted(_REGISTRY)))
        body = draw(_body(_REGISTRY[tag]))
    header = msgpack.packb({"v": draw(st.sampled_from([proto.PROTOCOL_VERSION] * 19 + [0])),
                            "t": tag, "b": body}, use_bin_type=True)
    payload = sum(v for k, v in body.items() if isinstance(v, int) and k in _PAYLOAD_FIELDS.get(tag, ()))
    if not 0 <= payload <= 4 or draw(st.integers(0, 9)) == 0:
        payload = draw(st.integers(0, 3))
    return [header, *draw(st.lists(st.binary(max_size=256), min_size=payload, max_size=payload))]


_PAYLOAD_FIELDS = {tag: {f.name for f in dataclasses.fields(cls) if f.metadata.get("payload")}
                   for tag, cls in _REGISTRY.items()}


def _template_request() -> proto.Request:
    return proto.Request(request_id=f"fuzz-{time.monotonic_ns()}", client_id="fuzz", prompt_token_ids=[1, 5, 9],
                         sampling=proto.SamplingParams(max_tokens=4), arrival_time=time.time(),
                         stream_addr="tcp://127.0.0.1:1")


def _map(msg: Any) -> dict:
    return msgpack.unpackb(proto.encode(msg)[0])["b"]


_TEMPLATES = {
    "submit": lambda: _map(proto.SubmitRequest(request=_template_request())),
    "client_generate": lambda: _map(proto.ClientGenerate(request_id=f"c{time.monotonic_ns()}", prompt="hi",
                                                         prompt_token_ids=None,
                                                         sampling=proto.SamplingParams(max_tokens=4))),
    "tokens": lambda: _map(proto.TokenBatch(outputs=[proto.TokenOutput(request_id="r1", index=0, token_ids=[5])])),
    "kv_handoff": lambda: {**_map(proto.KVHandoff(request=_template_request(), first_token_id=5,
                                                  first_token_time=time.time(), num_tokens=3,
                                                  layout=proto.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8,
                                                                        block_size=16, dtype="float32"))),
                           "path": proto.HANDOFF_CUDA_IPC},
}
"""Valid bodies (fresh ids each time) that ``_mutated`` spoils one field of: these reach the receivers' handlers."""


def _mutated(draw: st.DrawFn, body: dict) -> dict:
    """``body`` with one field, at any depth, replaced by a random value (of its type or not)."""
    target = body
    while True:
        key = draw(st.sampled_from(sorted(target)))
        if isinstance(target[key], dict) and target[key] and draw(st.booleans()):
            target = target[key]
            continue
        current = target[key]
        kind = type(current) if current is not None else type(None)
        target[key] = draw(st.one_of(_typed(kind), _INTS, _ANY) if kind is not list else
                           st.lists(_INTS, max_size=8) | _ANY)
        return body


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    from diptych.engine.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-llama"), family="llama")


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    base = free_port_block(16)
    keys_dir = str(tmp_path_factory.mktemp("keys"))
    spec = ClusterSpec(model=tiny_llama, prefill_workers=1, decode_workers=1, http_port=base,
                       coordinator_port=base + 1, sdk_port=base + 2, stream_port=base + 3, kv_base_port=base + 4,
                       num_blocks=64, keys_dir=keys_dir)
    keys = generate_key_set(keys_dir, ["coordinator", "frontend", *spec.worker_names()])
    running = Cluster(spec, log_dir=str(tmp_path_factory.mktemp("logs")))
    running.start()
    try:
        running.wait_ready(timeout_s=120)
        yield running, keys
    finally:
        running.stop()


@pytest.fixture(scope="module")
def sockets(cluster):
    """One connected socket per target: name -> (socket, message tags its owner expects)."""
    running, keys = cluster
    spec = running.spec
    ctx = zmq.Context()
    made: dict[str, tuple[zmq.Socket, list[str]]] = {}

    def connect(name: str, kind: int, addr: str, client: tuple[str, str] | None, tags: list[str]) -> None:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 2000)
        if client is not None:
            keys.client(*client).apply(sock)
        sock.connect(addr)
        made[name] = (sock, tags)

    connect("coordinator", zmq.DEALER, spec.addr(spec.coordinator_port), ("frontend", "coordinator"),
            ["submit", "cancel", "status_query", "register", "heartbeat", "kv_reserved", "prefill_done",
             "kv_received", "token_report", "request_done"])
    connect("sdk", zmq.DEALER, spec.sdk_addr, None, ["client_generate", "client_cancel"])
    connect("token_stream", zmq.PUSH, spec.addr(spec.stream_port), ("prefill-0", "frontend"), ["tokens"])
    connect("kv_ingress", zmq.PUSH, spec.kv_addrs()["decode-0"], ("prefill-0", "decode-0"),
            ["kv_handoff", "kv_push_aborted"])
    time.sleep(0.5)  # CURVE handshakes
    yield made
    for sock, _ in made.values():
        sock.close()
    ctx.term()


def _drain(sock: zmq.Socket) -> None:
    while sock.getsockopt(zmq.TYPE) == zmq.DEALER and sock.poll(0):
        sock.recv_multipart()


@pytest.mark.parametrize("target", ["coordinator", "sdk", "token_stream", "kv_ingress"])
def test_fuzzed_socket_leaves_the_cluster_serving(cluster, sockets, target):
    running, _ = cluster
    sock, tags = sockets[target]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(frames(tags))
    def send(message: list[bytes]) -> None:
        sock.send_multipart(message)
        _drain(sock)

    send()
    time.sleep(1.0)
    _drain(sock)
    assert running.dead() == {}, f"processes died after fuzzing the {target} socket: {running.dead()}"
    _assert_serves(running)


def _assert_serves(running: Cluster, timeout_s: float = 60.0) -> None:
    """A normal request completes (retried while a fuzzed registration or refusal is being cleared up)."""
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | Exception | None = None
    while time.monotonic() < deadline:
        try:
            last = httpx.post(running.spec.http_url + "/v1/completions", timeout=30,
                              json={"prompt": "hello", "max_tokens": 4, "temperature": 0})
            if last.status_code == 200:
                assert last.json()["usage"]["completion_tokens"] == 4
                return
        except httpx.TransportError as exc:
            last = exc
        time.sleep(1.0)
    raise AssertionError(f"the cluster no longer serves: {last!r} {getattr(last, 'text', '')}")
