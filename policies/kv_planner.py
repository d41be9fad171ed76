"""Block bookkeeping while a batch policy composes one iteration: who runs, who is preempted, what stays free.

``KVPlanner`` starts from the worker's ``KVState`` and records every decision into a ``BatchPlan``:

- ``admit(seq)`` takes ``seq.blocks_to_admit`` blocks for a waiting sequence, if that leaves the watermark free.
- ``step(seq)`` takes ``seq.blocks_to_step`` blocks for a running decode, if free.
- ``step_or_preempt(seq, victims)`` steps ``seq``, preempting ``victims`` in the given order until its blocks fit.
  A victim already scheduled or preempted in this plan, holding no blocks (``blocks_held == 0``) or not
  ``preemptible``, is passed over;
  each preempted victim returns its ``blocks_held`` to the free count. If ``seq`` itself comes up in ``victims``, it
  is preempted (vLLM's rule: the lowest-priority sequence gives way, even the one asking). Returns whether ``seq``
  decodes.

Invariant: the blocks taken never exceed the free blocks plus the blocks of the sequences preempted in this plan.
Memory in KV blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diptych.policies.batch import BatchPlan, KVState, SequenceState


class KVPlanner:
    def __init__(self, kv: KVState, plan: BatchPlan) -> None:
        self.free = kv.free_blocks
        self.watermark = kv.watermark_blocks
        self.plan = plan
        self._decided: set[str] = set()

    def is_decided(self, seq: SequenceState) -> bool:
        """True once ``seq`` was scheduled (decode or prefill chunk) or preempted in this plan."""
        return seq.request_id in self._decided

    def admit(self, seq: SequenceState) -> bool:
        if seq.blocks_to_admit + self.watermark > self.free:
            return False
        self.free -= seq.blocks_to_admit
        self._decided.add(seq.request_id)
        return True

    def mark_scheduled(self, seq: SequenceState) -> None:
        """``seq`` runs a chunk whose blocks it already holds (a running partial prefill)."""
        self._decided.add(seq.request_id)

    def step(self, seq: SequenceState) -> bool:
        if seq.blocks_to_step > self.free:
            return False
        self.free -= seq.blocks_to_step
        self._decided.add(seq.request_id)
        self.plan.decodes.append(seq.request_id)
        return True

    def step_or_preempt(self, seq: SequenceState, victims: Iterable[SequenceState]) -> bool:
        if self.step(seq):
            return True
        for victim in victims:
            if victim.request_id == seq.request_id:
                self.preempt(seq)
                return False
            if self.is_decided(victim) or victim.blocks_held == 0 or not victim.preemptible:
                continue
            self.preempt(victim)
            if self.step(seq):
                return True
        return False

    def preempt(self, seq: SequenceState) -> None:
        self.free += seq.blocks_held
        self._decided.add(seq.request_id)
        self.plan.preempt.append(seq.request_id)
