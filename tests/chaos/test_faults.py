"""Chaos on real processes (tiny model): under concurrent greedy streams, ``kill -9`` of a decode worker, of the
prefill worker and of the coordinator, and SIGSTOP of a decode worker, each separately. Every stream completes with
exactly the tokens of an undisturbed run (its requests are migrated: ``docs/reliability.md``), or, when a role has
no worker left, ends with an explicit error within its deadline; afterwards every pool is back at its starting free
count and the cluster serves new requests. Killed processes are started again by the test, as ``diptych serve``'s
supervision does (``test_supervised`` runs the same kills under ``Cluster.wait``)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from diptych.client import DiptychError
from tests.chaos.streams import (
    HEARTBEAT_TIMEOUT_S,
    QUEUE_TIMEOUT_S,
    kill,
    kill_and_restart,
    restored,
    run_streams,
    still_serves,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_kill_decode_worker(chaos_cluster, reference):
    got = asyncio.run(run_streams(chaos_cluster, kill(chaos_cluster, "decode-0")))
    assert got == reference
    restored(chaos_cluster, "decode-0")
    still_serves(chaos_cluster, reference)


def test_sigstop_decode_worker_past_its_heartbeat_deadline(chaos_cluster, reference):
    def pause() -> None:
        pid = chaos_cluster.procs["decode-1"].pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(HEARTBEAT_TIMEOUT_S * 3)
        os.kill(pid, signal.SIGCONT)

    got = asyncio.run(run_streams(chaos_cluster, pause))
    assert got == reference
    restored(chaos_cluster, "decode-1")  # it re-registers by itself once it runs again
    still_serves(chaos_cluster, reference)


def test_kill_prefill_worker_restarted(chaos_cluster, reference):
    got = asyncio.run(run_streams(chaos_cluster, kill_and_restart(chaos_cluster, "prefill-0", 0.5), after_tokens=1))
    assert got == reference
    restored(chaos_cluster, "prefill-0")
    still_serves(chaos_cluster, reference)


def test_kill_the_only_prefill_worker_ends_waiting_requests_with_an_error_within_the_deadline(chaos_cluster, reference):
    started = time.time()
    got = asyncio.run(run_streams(chaos_cluster, kill(chaos_cluster, "prefill-0"), after_tokens=1))
    elapsed = time.time() - started
    for want, result in zip(reference, got):
        assert result == want or (isinstance(result, DiptychError) and result.status == 503), result
    assert elapsed < QUEUE_TIMEOUT_S + HEARTBEAT_TIMEOUT_S + 30
    restored(chaos_cluster, "prefill-0")
    still_serves(chaos_cluster, reference)


def test_kill_coordinator_restarted(chaos_cluster, reference):
    got = asyncio.run(run_streams(chaos_cluster, kill_and_restart(chaos_cluster, "coordinator", 1.0)))
    assert got == reference
    restored(chaos_cluster, "coordinator")
    still_serves(chaos_cluster, reference)
