"""One request's timeline, built by the tracker as its outputs are applied in order.

Every time is wall-clock seconds since the epoch (``time.time()``); the frontend's own (``arrival``, ``finish``) and
the workers' (phases, token times) are compared directly, so they are as consistent as the hosts' clocks. As a dict
(``as_dict``, what clients get), in this key order, a key absent when its moment did not happen:

- ``arrival``: the frontend received the request;
- ``admitted``, ``prefill_start``, ``prefill_end``: from the prefill worker's ``TokenOutput.events``;
- ``handoff_start``, ``handoff_end``: from the decode worker's (absent when the request finished at its first token);
- ``first_token``: emission time of output token 0;
- ``token_times``: emission time of every output token the client got, in order (``TokenOutput.timestamps``; the
  frontend's receipt time for a token whose worker sent none), so ``len(token_times)`` is the completion's token
  count;
- ``preempted``: ``{"count": n, "first": t}`` when the decoding worker preempted the request (its KV dropped under
  memory pressure and recomputed) ``n`` times, the first at ``t``;
- ``finish`` and ``finish_reason``: when and why the frontend ended the request ("stop", "length", "abort").

A phase is taken from the first output that carries it; a phase time <= 0 (a worker's "not measured") and event
names other than the five phases and the preemption events are ignored. Preemptions are reported by the output
that follows them (each preemption once): event ``preempted``, the time of the first preemption it reports, or a
list of the times of each, and optionally ``preemptions``, how many it reports (default: one per time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diptych.proto import TokenOutput

PHASES = ("admitted", "prefill_start", "prefill_end", "handoff_start", "handoff_end")
PREEMPTED, PREEMPTIONS = "preempted", "preemptions"


@dataclass
class Timeline:
    arrival: float
    phases: dict[str, float] = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    finish_reason: str | None = None
    preemptions: int = 0
    first_preempted: float | None = None

    def record(self, output: TokenOutput, num_tokens: int, now: float) -> None:
        """Merge the in-order ``output``'s phase events and the times of its first ``num_tokens`` tokens (the ones
        the client gets: a stop string may cut an output short). ``now`` stands in for missing timestamps."""
        events = output.events
        for name, at in events.items():
            if name in PHASES and at > 0:
                self.phases.setdefault(name, at)
        if PREEMPTED in events:
            self._preempted(events[PREEMPTED], events.get(PREEMPTIONS))
        times = list(output.timestamps[:num_tokens])
        self.token_times.extend(times + [now] * (num_tokens - len(times)))

    def _preempted(self, at: Any, count: Any) -> None:
        """One output's preemption report: ``at`` a time or a list of times, ``count`` how many (None: one per
        time). Malformed values (a worker's, not the client's doing) count nothing."""
        times = [t for t in (at if isinstance(at, list) else [at]) if isinstance(t, (int, float)) and t > 0]
        reported = len(times) if count is None else count
        if not times or not isinstance(reported, (int, float)) or reported < 1:
            return
        self.preemptions += int(reported)
        first = min(times)
        if self.first_preempted is None or first < self.first_preempted:
            self.first_preempted = first

    def close(self, finish_reason: str, now: float) -> None:
        self.finish, self.finish_reason = now, finish_reason

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arrival": self.arrival}
        out.update((name, self.phases[name]) for name in PHASES if name in self.phases)
        if self.first_token is not None:
            out["first_token"] = self.first_token
        out["token_times"] = list(self.token_times)
        if self.preemptions:
            out[PREEMPTED] = {"count": self.preemptions, "first": self.first_preempted}
        if self.finish is not None:
            out.update(finish=self.finish, finish_reason=self.finish_reason)
        return out

    def summary(self) -> str:
        """``ttft=<s> tbt_mean=<s> queueing=<s>`` for the log, "-" where unknown, then ``preempted=<n>`` if it
        was. TTFT is first_token - arrival, mean TBT the mean gap between consecutive token times, queueing
        admitted - arrival."""
        n = len(self.token_times)
        ttft = _secs(self.first_token - self.arrival) if self.first_token is not None else "-"
        tbt = _secs((self.token_times[-1] - self.token_times[0]) / (n - 1)) if n >= 2 else "-"
        admitted = self.phases.get("admitted")
        queueing = _secs(admitted - self.arrival) if admitted is not None else "-"
        preempted = f" preempted={self.preemptions}" if self.preemptions else ""
        return f"ttft={ttft} tbt_mean={tbt} queueing={queueing}{preempted}"


def _secs(value: float) -> str:
    return f"{value:.3f}s"
