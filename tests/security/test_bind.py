"""Sockets bind the interface they are given: with default flags nothing of a cluster listens beyond loopback."""

from __future__ import annotations

import socket

import pytest
import zmq

from diptych.launcher import Cluster, ClusterSpec, with_free_ports
from diptych.services.common.sockets import bind_address
from tests.security.listening import is_loopback, listening_addresses


@pytest.mark.parametrize("given, bound", [
    ("tcp://127.0.0.1:5600", "tcp://127.0.0.1:5600"),
    ("tcp://frontend:5602", "tcp://frontend:5602"),
    ("tcp://[::1]:5600", "tcp://[::1]:5600"),
    ("tcp://0.0.0.0:5600", "tcp://*:5600"),
    ("tcp://*:5600", "tcp://*:5600"),
    ("ipc:///tmp/diptych.sock", "ipc:///tmp/diptych.sock"),
])
def test_bind_address_keeps_the_interface(given, bound):
    assert bind_address(given) == bound


def test_bind_address_rejects_an_address_without_port():
    with pytest.raises(ValueError):
        bind_address("tcp://127.0.0.1")


def test_a_loopback_bind_is_not_reachable_from_another_interface():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    try:
        sock.bind(bind_address("tcp://127.0.0.1:0"))
        assert sock.getsockopt_string(zmq.LAST_ENDPOINT).startswith("tcp://127.0.0.1:")
    finally:
        sock.close(linger=0)
        ctx.term()


def test_listening_addresses_sees_a_plain_socket():
    import os

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        port = probe.getsockname()[1]
        assert ("127.0.0.1", port) in listening_addresses([os.getpid()])


@pytest.mark.integration
def test_default_cluster_listens_on_loopback_only(tmp_path):
    spec = with_free_ports(ClusterSpec(engine="sim", prefill_workers=1, decode_workers=1, colocated_workers=1))
    cluster = Cluster(spec, log_dir=str(tmp_path))
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=120)
        listening = listening_addresses([p.pid for p in cluster.procs.values()])
    finally:
        cluster.stop()
    ports = {int(addr.rsplit(":", 1)[1].split("/")[0]) for _, addr in spec.bound_addresses()}
    assert ports <= {port for _, port in listening}, (ports, listening)
    assert listening and all(is_loopback(ip) for ip, _ in listening), listening
