"""Scheduling policies: pure Python objects (no torch, no ZeroMQ) chosen by name from registries.

- ``policies.admission``: coordinator admission order across clients (``ADMISSION_POLICIES``).
- ``policies.batch``: per-worker iteration composition (``BATCH_POLICIES``).

The services and the simulator run the same objects; tests drive them directly with a fake clock.
"""

from policies.admission import ADMISSION_POLICIES, AdmissionPolicy, PendingRequest, Rejection
from policies.batch import BATCH_POLICIES, BatchPlan, BatchPolicy, KVState, SequenceState

__all__ = [
    "ADMISSION_POLICIES", "AdmissionPolicy", "PendingRequest", "Rejection",
    "BATCH_POLICIES", "BatchPlan", "BatchPolicy", "KVState", "SequenceState",
]
