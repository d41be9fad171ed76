"""The same faults under ``diptych serve``'s supervision (``Cluster.wait`` on a thread): a killed decode worker,
prefill worker or coordinator is restarted by the launcher, every stream completes with the reference tokens, the
cluster stays up and idles with every pool at its starting free count. A child that keeps dying at start makes the
supervision give up."""

from __future__ import annotations

import asyncio
import threading

import pytest

from diptych.launcher import Cluster
from diptych.supervision import RestartPolicy
from tests.chaos.streams import kill, run_streams
from tests.integration.conftest import wait_until_idle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def supervised(chaos_cluster: Cluster) -> Cluster:
    """The session's cluster under supervision from here on (``Cluster.stop`` at the end of the session ends it)."""
    threading.Thread(target=chaos_cluster.wait, args=(RestartPolicy(initial_backoff_s=0.2),), daemon=True).start()
    return chaos_cluster


@pytest.mark.parametrize("name", ["decode-0", "prefill-0", "coordinator"])
def test_killed_process_is_restarted_and_every_stream_completes_exactly(supervised: Cluster, reference, name):
    restarts = len(supervised.restarts)
    got = asyncio.run(run_streams(supervised, kill(supervised, name), after_tokens=1 if name == "prefill-0" else 96))
    assert got == reference
    assert [r[1] for r in supervised.restarts[restarts:]] == [name]
    supervised.wait_ready(timeout_s=120)
    status = wait_until_idle(supervised, timeout_s=60)
    assert len(status["workers"]) == 3


def test_a_child_that_keeps_dying_at_start_stops_the_supervision():
    policy = RestartPolicy(initial_backoff_s=1.0, max_backoff_s=4.0, stable_after_s=10.0, max_quick_exits=3)
    assert [policy.on_exit("w", 0.0, 1.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert policy.on_exit("w", 0.0, 1.0) is None
    assert policy.on_exit("w", 0.0, 60.0) == 1.0  # it had been running: the count starts over
