"""A shared decode pool frees an aborted reservation only once no GPU-to-GPU push can still write into it."""

from diptych.services.worker.roles.held_blocks import HeldBlocks


def test_abort_then_stop_frees_at_the_stop():
    held = HeldBlocks(timeout_s=30)
    assert held.hold("r", [3, 4], now=0.0) == [] and "r" in held and len(held) == 1
    assert held.push_stopped("r", now=1.0) == [3, 4]
    assert "r" not in held and held.expired(now=100.0) == []


def test_stop_then_abort_frees_at_the_abort():
    held = HeldBlocks(timeout_s=30)
    assert held.push_stopped("r", now=0.0) == []
    assert held.hold("r", [7], now=1.0) == [7]
    assert len(held) == 0


def test_silent_pusher_frees_after_the_timeout_only():
    held = HeldBlocks(timeout_s=30)
    held.hold("a", [1], now=0.0)
    held.hold("b", [2, 5], now=10.0)
    assert held.expired(now=29.0) == []
    assert held.expired(now=30.0) == [1]
    assert held.expired(now=45.0) == [2, 5] and len(held) == 0
    assert held.push_stopped("a", now=46.0) == []  # late word from the pusher frees nothing twice


def test_stale_stop_notices_are_forgotten():
    held = HeldBlocks(timeout_s=30)
    held.push_stopped("r", now=0.0)
    held.expired(now=31.0)
    assert held.hold("r", [9], now=32.0) == []  # the old notice no longer counts
