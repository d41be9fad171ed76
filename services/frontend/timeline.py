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
- ``finish`` and ``finish_reason``: when and why the frontend ended the request ("stop", "length", "abort").

A phase is taken from the first output that carries it; a phase time <= 0 (a worker's "not measured") and event
names other than the five phases are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diptych.proto import TokenOutput

PHASES = ("admitted", "prefill_start", "prefill_end", "handoff_start", "handoff_end")


@dataclass
class Timeline:
    arrival: float
    phases: dict[str, float] = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    finish_reason: str | None = None

    def record(self, output: TokenOutput, num_tokens: int, now: float) -> None:
        """Merge the in-order ``output``'s phase events and the times of its first ``num_tokens`` tokens (the ones
        the client gets: a stop string may cut an output short). ``now`` stands in for missing timestamps."""
        for name, at in output.events.items():
            if name in PHASES and at > 0:
                self.phases.setdefault(name, at)
        times = list(output.timestamps[:num_tokens])
        self.token_times.extend(times + [now] * (num_tokens - len(times)))

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
        if self.finish is not None:
            out.update(finish=self.finish, finish_reason=self.finish_reason)
        return out

    def summary(self) -> str:
        """``ttft=<s> tbt_mean=<s> queueing=<s>`` for the log, "-" where unknown. TTFT is first_token - arrival,
        mean TBT the mean gap between consecutive token times, queueing admitted - arrival."""
        n = len(self.token_times)
        ttft = _secs(self.first_token - self.arrival) if self.first_token is not None else "-"
        tbt = _secs((self.token_times[-1] - self.token_times[0]) / (n - 1)) if n >= 2 else "-"
        admitted = self.phases.get("admitted")
        queueing = _secs(admitted - self.arrival) if admitted is not None else "-"
        return f"ttft={ttft} tbt_mean={tbt} queueing={queueing}"


def _secs(value: float) -> str:
    return f"{value:.3f}s"
