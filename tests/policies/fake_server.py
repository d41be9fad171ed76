"""A pure single-server fake that drives an admission policy over time, for tests only.

The server holds ``capacity`` tokens of KV memory. A request reserves ``prompt_tokens + max_tokens`` tokens when
admitted (so it never needs preemption) and frees them when its last token is out. Each tick at time ``now``:

1. requests that arrived by ``now`` are added to the policy (rejections are counted);
2. admission: while the policy's head fits in the free memory, pop it (the policy charges its input) and start it;
   stop at the first head that does not fit (never skip ahead);
3. every running request decodes one token (reported to the policy, per client, in one call per tick);
   finished requests free their memory.

The server keeps its own record of service per client (``w_p * input`` at admission, ``w_q`` per output token,
unweighted) and, after every tick, the clients with waiting requests, so tests can measure service differences over
the intervals in which clients are continuously backlogged. Times in seconds, lengths in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diptych.policies.admission import AdmissionPolicy, PendingRequest


@dataclass
class TickRecord:
    now: float
    service: dict[str, float]
    backlogged: frozenset[str]


@dataclass
class _Running:
    request: PendingRequest
    generated: int = 0


@dataclass
class FakeServer:
    policy: AdmissionPolicy
    capacity: int
    w_p: float = 1.0
    w_q: float = 2.0
    dt: float = 1.0
    now: float = 0.0
    service: dict[str, float] = field(default_factory=dict)
    admitted: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    history: list[TickRecord] = field(default_factory=list)
    _arrivals: list[PendingRequest] = field(default_factory=list)
    _running: list[_Running] = field(default_factory=list)
    _waiting: dict[str, int] = field(default_factory=dict)
    _used: int = 0

    def submit(self, requests: list[PendingRequest]) -> None:
        for request in requests:
            if request.prompt_tokens + request.max_tokens > self.capacity:
                raise ValueError(f"request {request.request_id} can never fit in {self.capacity} tokens")
        self._arrivals.extend(requests)
        self._arrivals.sort(key=lambda r: r.arrival_time, reverse=True)  # pop() yields the earliest

    def run_until(self, end: float) -> None:
        while self.now + self.dt <= end + 1e-9:
            self.tick()

    def idle(self) -> bool:
        return not (self._arrivals or self._running or len(self.policy))

    def tick(self) -> None:
        self.now += self.dt
        while self._arrivals and self._arrivals[-1].arrival_time <= self.now:
            self._arrive(self._arrivals.pop())
        self._admit()
        self._decode()
        backlogged = frozenset(client for client, count in self._waiting.items() if count)
        self.history.append(TickRecord(self.now, dict(self.service), backlogged))

    def _arrive(self, request: PendingRequest) -> None:
        rejection = self.policy.add(request, self.now)
        if rejection is not None:
            self.rejected[request.client_id] = self.rejected.get(request.client_id, 0) + 1
            return
        self._waiting[request.client_id] = self._waiting.get(request.client_id, 0) + 1

    def _admit(self) -> None:
        while (head := self.policy.peek()) is not None:
            if self._used + head.prompt_tokens + head.max_tokens > self.capacity:
                return
            popped = self.policy.pop(self.now)
            assert popped is head, "pop() must return what peek() returned"
            self._used += head.prompt_tokens + head.max_tokens
            self._waiting[head.client_id] -= 1
            self.admitted[head.client_id] = self.admitted.get(head.client_id, 0) + 1
            self._add_service(head.client_id, self.w_p * head.prompt_tokens)
            self._running.append(_Running(head))

    def _decode(self) -> None:
        tokens: dict[str, int] = {}
        still_running = []
        for job in self._running:
            job.generated += 1
            client = job.request.client_id
            tokens[client] = tokens.get(client, 0) + 1
            if job.generated < job.request.max_tokens:
                still_running.append(job)
            else:
                self._used -= job.request.prompt_tokens + job.request.max_tokens
        self._running = still_running
        for client, count in tokens.items():
            self.policy.on_output_tokens(client, count)
            self._add_service(client, self.w_q * count)

    def _add_service(self, client: str, cost: float) -> None:
        self.service[client] = self.service.get(client, 0.0) + cost


def service_between(server: FakeServer, client: str, start: float, end: float) -> float:
    """Service ``client`` received in the ticks ending in (start, end]."""

    def at(t: float) -> float:
        before = [record for record in server.history if record.now <= t + 1e-9]
        return before[-1].service.get(client, 0.0) if before else 0.0

    return at(end) - at(start)


def max_backlogged_gap(server: FakeServer, first: str, second: str) -> float:
    """The largest difference in service between ``first`` and ``second`` over any interval in which both were
    continuously backlogged (waiting requests at every tick end of the interval)."""
    worst = 0.0
    run: list[float] = []
    for record in [*server.history, TickRecord(float("inf"), {}, frozenset())]:
        if {first, second} <= record.backlogged:
            run.append(record.service.get(first, 0.0) - record.service.get(second, 0.0))
            continue
        if run:
            worst = max(worst, max(run) - min(run))
        run = []
    return worst


def periodic(client: str, rate_per_min: float, duration_s: float, prompt: int, output: int,
             weight: float = 1.0, start_s: float = 0.0) -> list[PendingRequest]:
    """Deterministic arrivals of ``client`` every ``60 / rate_per_min`` seconds from ``start_s``."""
    gap = 60.0 / rate_per_min
    count = int(duration_s / gap)
    return [PendingRequest(f"{client}-{i}", client, prompt, output, start_s + i * gap, weight=weight)
            for i in range(count)]
