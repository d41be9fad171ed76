"""Fixtures that start real Diptych clusters (separate processes over real ZeroMQ sockets) on free ports."""

from __future__ import annotations

import time

import httpx
import pytest

from diptych.launcher import Cluster, ClusterSpec, free_port_block


def cluster_spec(model_path: str, **overrides) -> ClusterSpec:
    base = free_port_block(16)
    spec = dict(model=model_path, http_port=base, coordinator_port=base + 1, sdk_port=base + 2,
                stream_port=base + 3, kv_base_port=base + 4, log_level="INFO")
    spec.update(overrides)
    return ClusterSpec(**spec)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from diptych.engine.tiny_model import build_tiny_model

    path = str(tmp_path_factory.mktemp("models") / "tiny-llama")
    build_tiny_model(path, family="llama")
    return path


def start_cluster(spec: ClusterSpec, log_dir) -> Cluster:
    cluster = Cluster(spec, log_dir=str(log_dir))
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=120)
    except Exception:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def pd_cluster(tiny_llama, tmp_path_factory):
    """2 prefill + 2 decode workers, a small prefill chunk so long prompts span several iterations."""
    spec = cluster_spec(tiny_llama, prefill_workers=2, decode_workers=2, policy_opts=["token_budget=32"],
                        num_blocks=256)
    cluster = start_cluster(spec, tmp_path_factory.mktemp("logs"))
    yield cluster
    cluster.stop()


ADMIN_KEY = "ak-test-operator"
"""An operator key for clusters started with an API keys file: list it under ``"admins"`` in that file."""


def cluster_status(cluster: Cluster, admin_key: str | None = None) -> dict:
    """``/admin/status``; ``admin_key`` is needed when the cluster has API keys (open without any)."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    return httpx.get(cluster.spec.http_url + "/admin/status", headers=headers, timeout=5).json()


def wait_until_idle(cluster: Cluster, timeout_s: float = 30.0) -> dict:
    """Wait until no request is queued or in flight and every worker reports all its blocks free."""
    deadline = time.time() + timeout_s
    status = {}
    while time.time() < deadline:
        status = cluster_status(cluster)
        workers = status["workers"].values()
        if (status["waiting"] == 0 and status["in_flight"] == 0
                and all(w["free_blocks"] == w["total_blocks"] and w["reserved_blocks"] == 0 for w in workers)):
            return status
        time.sleep(0.3)
    raise AssertionError(f"cluster did not return to idle: {status}")
