"""Coordinator settings and command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from diptych.cluster.overload import QueueLimits
from diptych.cluster.placement import DEFAULT_EXPECTED_OUTPUT_TOKENS
from diptych.policies.admission import ADMISSION_POLICIES
from diptych.policies.pool import POOL_POLICIES
from diptych.services.common.cli import add_curve_arguments, env_default, parse_knobs

DEFAULT_ADDRESS = "tcp://127.0.0.1:5600"


@dataclass
class CoordinatorConfig:
    """Times in seconds, sizes in prompt tokens."""

    address: str = DEFAULT_ADDRESS
    admission_policy: str = "fcfs"
    admission_knobs: dict[str, Any] = field(default_factory=dict)
    heartbeat_timeout_s: float = 10.0
    handoff_timeout_s: float = 30.0
    watchdog_interval_s: float = 0.5
    max_prefill_backlog_tokens: int = 4096
    max_decode_sequences: int = 1024
    """Requests placed on one decode worker at a time: its batch policy's decodes per iteration (``max_decodes``), so
    that none waits for a slot in the batch. 1024 is what ``diptych experiment pd-split`` gives its decode workers."""
    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS
    """Output tokens placement expects a request to add while it lives: a decode worker is accounted
    ``prompt + min(max_tokens, expected_output_tokens)`` tokens of KV per request (``cluster.placement``)."""
    pool_policy: str = "static"
    pool_knobs: dict[str, Any] = field(default_factory=dict)
    pool_interval_s: float = 1.0
    max_queued_requests: int = 256
    """Requests waiting for admission at most; beyond, new ones are shed (``cluster.overload``)."""
    max_queued_tokens: int = 262144
    """Prompt tokens waiting for admission at most; beyond, new requests are shed."""
    queue_timeout_s: float | None = 60.0
    """A request not sent to a prefill worker this long after it arrived fails with 503 (no worker took it: its
    pool is empty, the cluster is saturated, or its decode worker kept refusing its reservation). None: no limit."""
    reserve_timeout_s: float = 120.0
    """Without a queue timeout: how long after its first refusal a request retries a reservation its decode worker
    refuses (no free blocks at the time) before it fails with 503."""
    retry_after_s: float = 1.0
    """What shed and timed-out requests are told to wait before retrying."""
    keys_dir: str | None = None
    """CURVE key set (``services.common.security``); None: plaintext, no identity checks (``--insecure-no-curve``)."""
    key_name: str = "coordinator"

    def __post_init__(self) -> None:
        # unknown names (KeyError) and bad knobs (ValueError) fail here, in one line naming the valid ones
        ADMISSION_POLICIES.create(self.admission_policy, **self.admission_knobs)
        POOL_POLICIES.create(self.pool_policy, **self.pool_knobs)
        for name in ("heartbeat_timeout_s", "handoff_timeout_s", "watchdog_interval_s", "pool_interval_s",
                     "reserve_timeout_s", "retry_after_s", "max_queued_requests", "max_queued_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise ValueError("queue_timeout_s must be positive (or None for no limit)")
        if self.expected_output_tokens < 0:
            raise ValueError("expected_output_tokens must be >= 0")
        if self.max_prefill_backlog_tokens <= 0:
            raise ValueError("max_prefill_backlog_tokens must be positive")
        if self.max_decode_sequences <= 0:
            raise ValueError("max_decode_sequences must be positive")

    @property
    def reserve_limit_s(self) -> float:
        """How long a refused reservation may keep being retried: the queue timeout (counted from arrival) if set,
        else the reserve timeout (counted from the first refusal)."""
        return self.queue_timeout_s if self.queue_timeout_s is not None else self.reserve_timeout_s

    def queue_limits(self) -> QueueLimits:
        """The admission queue's bounds; shedding is per client under the fair (vtc) policy."""
        return QueueLimits(self.max_queued_requests, self.max_queued_tokens, self.retry_after_s,
                           per_client=self.admission_policy == "vtc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CoordinatorConfig()
    parser.add_argument("--address", default=env_default("coordinator_addr", d.address),
                        help="ZeroMQ address of the control socket (binds on all interfaces for tcp) [%(default)s]")
    parser.add_argument("--admission", default=env_default("admission", d.admission_policy),
                        choices=ADMISSION_POLICIES.names(), help="admission policy across clients [%(default)s]")
    parser.add_argument("--admission-opt", action="append", metavar="KEY=VALUE",
                        help="admission policy knob, repeatable (e.g. w_q=2 for vtc)")
    parser.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout_s,
                        help="seconds without a heartbeat before a worker is evicted [%(default)s]")
    parser.add_argument("--handoff-timeout", type=float, default=d.handoff_timeout_s,
                        help="seconds a KV handoff may take before the request fails [%(default)s]")
    parser.add_argument("--pool-policy", default=env_default("pool_policy", d.pool_policy),
                        choices=POOL_POLICIES.names(),
                        help="prefill/decode split: static keeps each worker's role; rad moves flex workers between "
                        "the pools as load shifts [%(default)s]")
    parser.add_argument("--pool-opt", action="append", metavar="KEY=VALUE",
                        help="pool policy knob, repeatable (e.g. min_dwell_s=10)")
    parser.add_argument("--max-prefill-backlog", type=int, default=d.max_prefill_backlog_tokens,
                        help="prompt tokens queued per prefill worker; the rest wait in admission [%(default)s]")
    parser.add_argument("--max-decode-sequences", type=int, default=d.max_decode_sequences,
                        help="requests placed on one decode worker at a time; set it to the decode workers' "
                        "max_decodes (decodes per iteration) so that no placed request waits for a batch slot; the "
                        "rest wait in admission [%(default)s]")
    parser.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                        help="requests waiting for admission at most; new ones beyond get 503 (429 for a client "
                        "over its share under vtc) with Retry-After [%(default)s]")
    parser.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens,
                        help="prompt tokens waiting for admission at most, shed likewise [%(default)s]")
    parser.add_argument("--expected-output-tokens", type=int, default=d.expected_output_tokens,
                        help="output tokens placement expects a request to add while it lives: a decode worker is "
                        "accounted prompt + min(max_tokens, this) tokens of KV per request (its engine allocates on "
                        "demand and preempts if requests outgrow it); requests beyond the pools wait in admission "
                        "[%(default)s]")
    parser.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s,
                        help="seconds a request may wait for a worker (queued or reserving KV, including retries of "
                        "a reservation its decode worker refused for lack of free blocks) before it fails with 503; "
                        "0: no limit [%(default)s]")
    parser.add_argument("--reserve-timeout", type=float, default=d.reserve_timeout_s,
                        help="with --queue-timeout 0: seconds a request retries a KV reservation its decode worker "
                        "refuses (no free blocks at the moment) before it fails with 503 [%(default)s]")
    add_curve_arguments(parser, "coordinator")


def from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        address=args.address, admission_policy=args.admission, admission_knobs=parse_knobs(args.admission_opt),
        heartbeat_timeout_s=args.heartbeat_timeout, handoff_timeout_s=args.handoff_timeout,
        max_prefill_backlog_tokens=args.max_prefill_backlog, max_decode_sequences=args.max_decode_sequences,
        expected_output_tokens=args.expected_output_tokens, pool_policy=args.pool_policy,
        pool_knobs=parse_knobs(args.pool_opt), keys_dir=None if args.insecure_no_curve else args.keys_dir,
        key_name=args.key_name, max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens, queue_timeout_s=args.queue_timeout or None,
        reserve_timeout_s=args.reserve_timeout,
    )
