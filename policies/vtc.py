"""VTC, the Virtual Token Counter (Sheng et al., OSDI 2024), weighted, and LCF, its no-lift baseline.

State: one counter ``c[k]`` per client (weighted service tokens, starts at 0) and one waiting queue per client.
A client is *in Q* while it has at least one waiting request (running requests do not count).

- Arrival of r from client u, when u has no waiting request: lift its counter,
  ``c[u] = max(c[u], min(c[k] for k in Q))`` if some client is in Q, else ``c[u] = max(c[u], c[l])`` with l the
  last client whose request left Q (dispatched or cancelled). The second branch is missing from the paper's
  artifact; Diptych implements it. The lift never lowers a counter: a client keeps its debt but cannot bank credit
  while idle. Then r joins u's queue.
- ``peek()``: among clients in Q, the one with the smallest counter (ties: earliest waiting request, by arrival time
  then arrival order); its queue's head. The coordinator stops when that head cannot be placed: the policy never
  skips ahead, and ``peek()`` keeps returning the same head until some call changes the state.
- ``pop(now)``: dispatches the head and charges ``w_p * prompt_tokens / weight`` to its client.
- ``on_output_tokens(client, n)``: charges ``w_q * n / weight``.

Weights: a client's weight is the ``weight`` of its most recently added request (must be > 0); every charge is
divided by it, so backlogged clients receive service in proportion to their weights.

Per-client queue order (``client_queue_order``): ``"fifo"`` (default, the paper) or ``"spf"`` (shortest prompt first
within the client, with the optional ``aging_s`` bound, see ``policies.request_queue``) [Diptych].

Service received (``snapshot()["service"]``) is unweighted cost, ``w_p * input + w_q * output`` tokens as charged.
Guarantee (two continuously backlogged clients, weight 1): the service difference over any interval is at most
``2 * max(w_p * L_input, w_q * M)`` (max input length, tokens of KV memory).

LCF (least counter first) is the same policy without the lift: a client returning after idling, or a new one, keeps
its low counter and monopolises the server until it catches up. A baseline that shows why the lift matters.
"""

from __future__ import annotations

from typing import Any

from diptych.policies.admission import ADMISSION_POLICIES, AdmissionPolicy, PendingRequest, Rejection
from diptych.policies.knobs import Knob
from diptych.policies.request_queue import QUEUE_ORDERS, RequestQueue


@ADMISSION_POLICIES.register("vtc")
class VTCAdmission(AdmissionPolicy):
    """Weighted VTC. Knobs: ``w_p`` (cost per input token, 1.0), ``w_q`` (cost per output token, 2.0),
    ``client_queue_order`` (``"fifo"`` or ``"spf"``), ``aging_s`` (SPF starvation bound in seconds, None = off)."""

    summary = "Virtual Token Counter: the backlogged client with the least weighted service goes next"
    knobs = (
        Knob("w_p", float, 1.0, "cost per input token"),
        Knob("w_q", float, 2.0, "cost per output token"),
        Knob("client_queue_order", str, "fifo", "order within a client's queue", choices=QUEUE_ORDERS),
        Knob("aging_s", float, None, "SPF starvation bound, seconds (spf order only; None: off)", optional=True),
    )

    lifts_counters = True

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0, client_queue_order: str = "fifo",
                 aging_s: float | None = None) -> None:
        if w_p < 0 or w_q < 0:
            raise ValueError("w_p and w_q must be >= 0")
        RequestQueue(client_queue_order, aging_s)  # validates the order knobs before any request arrives
        self.w_p = w_p
        self.w_q = w_q
        self.client_queue_order = client_queue_order
        self.aging_s = aging_s
        self.counters: dict[str, float] = {}
        self.service: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self._queues: dict[str, RequestQueue] = {}  # only clients in Q (non-empty queues)
        self._client_of: dict[str, str] = {}  # waiting request id -> client id
        self._arrival_order: dict[str, int] = {}  # waiting request id -> arrival number (tie-breaks)
        self._arrivals = 0
        self._last_left: str | None = None
        self._clock = float("-inf")

    # ------------------------------------------------------------------ queue events

    def add(self, request: PendingRequest, now: float) -> Rejection | None:
        if request.weight <= 0:
            raise ValueError(f"client {request.client_id!r} weight must be > 0, got {request.weight}")
        if request.request_id in self._client_of:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        self._advance(now)
        client = request.client_id
        self.weights[client] = request.weight
        self.counters.setdefault(client, 0.0)
        self.service.setdefault(client, 0.0)
        if client not in self._queues:
            if self.lifts_counters:
                self._lift(client)
            self._queues[client] = RequestQueue(self.client_queue_order, self.aging_s)
        self._queues[client].push(request)
        self._client_of[request.request_id] = client
        self._arrival_order[request.request_id] = self._arrivals
        self._arrivals += 1
        return None

    def _lift(self, client: str) -> None:
        """Raise ``client``'s counter to the level of the clients being served; never lowers it."""
        if self._queues:
            floor = min(self.counters[k] for k in self._queues)
        elif self._last_left is not None:
            floor = self.counters[self._last_left]
        else:
            return
        self.counters[client] = max(self.counters[client], floor)

    def peek(self, now: float | None = None) -> PendingRequest | None:
        if now is not None:
            self._advance(now)
        if not self._queues:
            return None
        client = min(self._queues, key=self._priority)
        return self._queues[client].head(self._clock)

    def _priority(self, client: str) -> tuple[float, float, int]:
        oldest = self._queues[client].oldest()
        assert oldest is not None  # queues in Q are never empty
        return self.counters[client], oldest.arrival_time, self._arrival_order[oldest.request_id]

    def pop(self, now: float) -> PendingRequest:
        head = self.peek()
        if head is None:
            raise IndexError("pop from an empty admission queue")
        self._leave_queue(head.request_id)
        self._charge(head.client_id, self.w_p * head.prompt_tokens)
        self._advance(now)
        return head

    def remove(self, request_id: str) -> bool:
        if request_id not in self._client_of:
            return False
        self._leave_queue(request_id)
        return True

    def _leave_queue(self, request_id: str) -> None:
        client = self._client_of.pop(request_id)
        del self._arrival_order[request_id]
        queue = self._queues[client]
        queue.remove(request_id)
        if not queue:
            del self._queues[client]
        self._last_left = client

    # ------------------------------------------------------------------ charges

    def on_output_tokens(self, client_id: str, count: int) -> None:
        if count < 0:
            raise ValueError("output token count must be >= 0")
        self.counters.setdefault(client_id, 0.0)
        self.service.setdefault(client_id, 0.0)
        self._charge(client_id, self.w_q * count)

    def _charge(self, client: str, cost: float) -> None:
        self.service[client] += cost
        self.counters[client] += cost / self.weights.get(client, 1.0)

    def _advance(self, now: float) -> None:
        self._clock = max(self._clock, now)

    # ------------------------------------------------------------------ observation

    def __len__(self) -> int:
        return len(self._client_of)

    def waiting_per_client(self) -> dict[str, int]:
        return {client: len(queue) for client, queue in self._queues.items()}

    def snapshot(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "waiting": len(self),
            "w_p": self.w_p,
            "w_q": self.w_q,
            "counters": dict(self.counters),
            "service": dict(self.service),
            "weights": dict(self.weights),
            "waiting_per_client": self.waiting_per_client(),
        }


@ADMISSION_POLICIES.register("lcf")
class LCFAdmission(VTCAdmission):
    """Least counter first: VTC's counters and charges without the arrival lift. Same knobs as ``vtc``."""

    summary = "least counter first: VTC without the lift (a returning client can monopolise)"

    lifts_counters = False
