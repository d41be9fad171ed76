"""When ``diptych serve`` restarts a child process that exited: a pure policy, with the times passed in.

A child that exits is restarted after a backoff that doubles with each quick exit (``initial_backoff_s`` up to
``max_backoff_s``). An exit more than ``stable_after_s`` after its start counts as a crash of a process that had been
running: the backoff starts over. A child that exits within ``stable_after_s`` of its start ``max_quick_exits`` times
in a row keeps dying at start (a bad flag, a port taken, a model missing): the policy gives up and the cluster stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    stable_after_s: float = 15.0
    max_quick_exits: int = 5
    _quick_exits: dict[str, int] = field(default_factory=dict)

    def on_exit(self, name: str, started_at: float, now: float) -> float | None:
        """Seconds to wait before restarting ``name`` (started at ``started_at``, exited by ``now``), or None to
        give up on it."""
        quick = self._quick_exits.get(name, 0) + 1 if now - started_at < self.stable_after_s else 1
        self._quick_exits[name] = quick
        if quick > self.max_quick_exits:
            return None
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** (quick - 1))
