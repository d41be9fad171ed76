"""The hooks a worker runs on each of its roles. A role keeps the state of the requests it owns and talks to its
process only through ``WorkerLinks``; roles that cooperate are wired to each other explicitly (the colocated role
hands a request to the decode role with ``DecodeRole.adopt``).

Order: the worker calls every hook on its roles in one fixed order, ``ROLE_ORDER`` (prefill, colocated, decode).
Each iteration the colocated role hands a request over at its first token before the decode role streams that
token; a control message goes to the first role that takes it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from diptych.engine.outputs import StepOutput
from diptych.proto.messages import WorkerLoad
from diptych.proto.roles import Pool

ROLE_ORDER: tuple[Pool, ...] = (Pool.PREFILL, Pool.COLOCATED, Pool.DECODE)
"""The order in which a worker runs its roles' hooks (``Role.kind``)."""


class Role(Protocol):
    kind: Pool
    """Which work this role serves (its place in ``ROLE_ORDER``)."""

    def kv_ingress(self) -> tuple[str, dict[str, Any]] | None:
        """``(KV ingress address, GPU pool share)`` published at registration by a role that receives KV; None
        otherwise."""

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Loops this role runs beside the engine loop while the worker runs (e.g. receiving KV)."""

    async def handle(self, msg: Any) -> bool:
        """Take a coordinator message (other than registration and cancellation): True if it was this role's."""

    def output_needs_engine(self, output: StepOutput) -> bool:
        """Whether this role's ``after_step`` for ``output`` calls the engine (then it runs between iterations)."""

    async def after_step(self, output: StepOutput) -> None:
        """Ship what one iteration produced for the requests this role owns."""

    async def prepare_abort(self, request_id: str) -> bool:
        """First step of an abort: True if this role ended the request itself (the engine is then not asked)."""

    async def aborted(self, request_id: str, held: bool) -> None:
        """Last step of an abort (``held``: the request was held here and is gone now): drop its state."""

    def report(self, load: WorkerLoad) -> None:
        """Add this role's figures to the heartbeat's load."""
