"""Fixtures for the frontend tests: the frontend as a real process on free ports, with the test owning its peers.

``FakeCluster`` plays the coordinator (a real ZeroMQ ROUTER socket the frontend's DEALER connects to: it records
``SubmitRequest``/``CancelRequest``, answers ``StatusQuery``, can send ``RequestFailed``) and the workers (PUSH
sockets connected to each request's ``stream_addr``, sending ``TokenBatch`` messages). It runs in a thread that owns
its sockets, so sync and async tests drive it the same way. A ``responder`` makes it answer every submit with
tokens by itself (for the ``openai`` client tests).

Three frontend processes start together once per session (startup is dominated by importing transformers):
``anon`` (no API keys, built-in SLO tiers), ``keyed`` (API keys and tiers, a 2 s request timeout) and
``disposable`` (for the shutdown test).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from diptych import proto
from diptych.services.common.security import ZAP_DOMAIN, KeySet, generate_key_set

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

API_KEYS = {
    "sk-alice": {"client_id": "alice", "weight": 2.0, "tier": "strict"},
    "sk-bob": {"client_id": "bob"},
}
KEYED_TIERS = {"strict": {"tbt_s": 0.1, "ttft_s": 1.0}, "relaxed": {"tbt_s": 0.5}}
"""The ``keyed`` frontend's tiers (from its keys file); ``default`` (TBT 0.2 s) is implied."""


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    """The frontend's coordinator and workers. Thread-safe: all socket work happens on its own thread."""

    def __init__(self, address: str, keys: KeySet | None = None) -> None:
        """With ``keys`` (a CURVE key set) it plays the coordinator and worker ``prefill-0`` over CURVE, admitting the
        set's keys (pyzmq's own authenticator, reading the set's ``public/`` certificates)."""
        self.address = address
        self.responder: Callable[[proto.Request], list[proto.TokenBatch]] | None = None
        self.answer_status = True
        self.status_clients: dict[str, Any] = {}
        """``ClusterStatus.clients`` in the status answers (per-client service)."""
        self._keys = keys
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys.directory / "public"))
            keys.server("coordinator").apply(self._router)
        self._router.bind(address)
        self._pushers: dict[str, zmq.Socket] = {}
        self._frontend: bytes | None = None
        self._received: list[Any] = []
        self._outbox: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fake-cluster", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ test API

    def reset(self) -> None:
        with self._cond:
            self._received.clear()
            self.responder = None
            self.answer_status = True
            self.status_clients = {}

    def wait_message(self, kind: type, match: Callable[[Any], bool] = lambda m: True, timeout: float = 10.0) -> Any:
        """Take the first received message of ``kind`` matching ``match``; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, msg in enumerate(self._received):
                    if isinstance(msg, kind) and match(msg):
                        return self._received.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind.__name__} within {timeout} s; received {self._received}")
                self._cond.wait(left)

    def wait_submit(self, timeout: float = 10.0) -> proto.Request:
        return self.wait_message(proto.SubmitRequest, timeout=timeout).request

    def wait_cancel(self, request_id: str, timeout: float = 10.0) -> proto.CancelRequest:
        return self.wait_message(proto.CancelRequest, lambda m: m.request_id == request_id, timeout)

    def received(self, kind: type) -> list[Any]:
        with self._cond:
            return [m for m in self._received if isinstance(m, kind)]

    def push(self, request: proto.Request, *outputs: proto.TokenOutput) -> None:
        """Send one TokenBatch to the request's stream address, as a worker would."""
        self._send(request.stream_addr, proto.TokenBatch(outputs=list(outputs)))

    def fail(self, request_id: str, code: int, message: str = "refused", retry_after_s: float | None = None):
        self._send("", proto.RequestFailed(request_id=request_id, code=code, message=message,
                                           retry_after_s=retry_after_s))

    def close(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5)
        for sock in [self._router, *self._pushers.values()]:
            sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # ------------------------------------------------------------ thread

    def _send(self, to: str, msg: Any) -> None:
        with self._cond:
            self._outbox.append((to, msg))

    def _run(self) -> None:
        while not self._stopping:
            if self._router.poll(10):
                frames = self._router.recv_multipart()
                self._frontend = frames[0]
                self._on_message(proto.decode(frames[1:]))
            with self._cond:
                outbox, self._outbox = self._outbox, []
            for to, msg in outbox:
                if to:
                    self._pusher(to).send_multipart(proto.encode(msg))
                else:
                    self._router.send_multipart([self._frontend, *proto.encode(msg)])

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, proto.StatusQuery):
            if self.answer_status:
                self._router.send_multipart([self._frontend, *proto.encode(proto.ClusterStatus(
                    prefill_workers=1, decode_workers=1, waiting=0, in_flight=0, clients=self.status_clients))])
            return
        if isinstance(msg, proto.SubmitRequest) and self._keys is not None:  # its outputs come from prefill-0
            self._router.send_multipart([self._frontend, *proto.encode(proto.RequestPlaced(
                request_id=msg.request.request_id, workers=["prefill-0"]))])
        with self._cond:
            self._received.append(msg)
            self._cond.notify_all()
            responder = self.responder
        if isinstance(msg, proto.SubmitRequest) and responder is not None:
            for batch in responder(msg.request):
                self._pusher(msg.request.stream_addr).send_multipart(proto.encode(batch))

    def _pusher(self, addr: str) -> zmq.Socket:
        if addr not in self._pushers:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            if self._keys is not None:
                self._keys.client("prefill-0", "frontend").apply(sock)
            sock.connect(addr)
            self._pushers[addr] = sock
        return self._pushers[addr]


@dataclass
class Frontend:
    proc: subprocess.Popen
    http_url: str
    sdk_addr: str
    stream_addr: str
    cluster: FakeCluster
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def _launch(model: str, log_dir: str, name: str, *extra: str, keys: KeySet | None = None,
            scheme: str = "http", insecure: bool = False) -> Frontend:
    """Start a frontend with its fake cluster; CURVE on (``keys``, else a fresh key set in ``log_dir``) unless
    ``insecure``."""
    http, sdk, stream = free_port(), free_port(), free_port()
    if keys is None and not insecure:
        keys = generate_key_set(os.path.join(log_dir, f"{name}-curve"), ["coordinator", "frontend", "prefill-0"])
    curve = ["--insecure-no-curve"] if keys is None else ["--keys-dir", str(keys.directory)]
    cluster = FakeCluster(f"tcp://127.0.0.1:{free_port()}", keys)
    log_path = os.path.join(log_dir, f"{name}.log")
    cmd = [sys.executable, "-m", "diptych.services.frontend", "--model", model, "--served-model-name", "tiny",
           "--http-port", str(http), "--sdk-addr", f"tcp://127.0.0.1:{sdk}",
           "--stream-addr", f"tcp://127.0.0.1:{stream}", "--coordinator-addr", cluster.address,
           "--log-level", "DEBUG", *curve, *extra]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return Frontend(proc, f"{scheme}://127.0.0.1:{http}", f"tcp://127.0.0.1:{sdk}", f"tcp://127.0.0.1:{stream}",
                    cluster, log_path)


def _wait_ready(fe: Frontend, timeout_s: float = 60.0, verify: str | bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fe.proc.poll() is not None:
            raise RuntimeError(f"frontend exited with {fe.proc.returncode}:\n{fe.log()}")
        try:
            if httpx.get(fe.http_url + "/health", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"frontend not ready:\n{fe.log()}")


def _stop(fe: Frontend) -> int:
    if fe.proc.poll() is None:
        fe.proc.terminate()
        try:
            fe.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            fe.proc.kill()
            fe.proc.wait()
    fe.cluster.close()
    return fe.proc.returncode


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from diptych.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", family="llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def frontends(tiny_model, tmp_path_factory) -> dict[str, Frontend]:
    tmp = tmp_path_factory.mktemp("frontend")
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps({"tiers": KEYED_TIERS, "clients": API_KEYS}))
    started = {
        "anon": _launch(tiny_model, str(tmp), "anon", "--request-timeout", "30"),
        "keyed": _launch(tiny_model, str(tmp), "keyed", "--api-keys-file", str(keys_file),
                         "--request-timeout", "2"),
        "disposable": _launch(tiny_model, str(tmp), "disposable"),
    }
    try:
        for fe in started.values():
            _wait_ready(fe)
        yield started
    finally:
        codes = {name: _stop(fe) for name, fe in started.items()}
    assert all(code == 0 for code in codes.values()), f"unclean frontend exits: {codes}"


def _fresh(fe: Frontend) -> Frontend:
    fe.cluster.reset()
    return fe


@pytest.fixture
def anon(frontends) -> Frontend:
    """The anonymous frontend, with its fake cluster's state cleared for this test."""
    return _fresh(frontends["anon"])


@pytest.fixture
def keyed(frontends) -> Frontend:
    return _fresh(frontends["keyed"])


@pytest.fixture
def disposable(frontends) -> Frontend:
    return _fresh(frontends["disposable"])


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS (the tiny tokenizer: one token per UTF-8 byte)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def replying(tokenizer, text: str, finish_reason: str = "length", per_batch: int = 3):
    """A responder that answers every request with ``text``: the first token alone (as the prefill worker would),
    then batches of ``per_batch`` tokens, the last one carrying ``finish_reason``."""

    def respond(request: proto.Request) -> list[proto.TokenBatch]:
        ids = text_ids(tokenizer, text)
        outputs, index = [proto.TokenOutput(request_id=request.request_id, index=0, token_ids=ids[:1])], 1
        while index < len(ids):
            outputs.append(proto.TokenOutput(request_id=request.request_id, index=index,
                                             token_ids=ids[index:index + per_batch]))
            index += per_batch
        outputs[-1].finish_reason = finish_reason
        return [proto.TokenBatch(outputs=[o]) for o in outputs]

    return respond
