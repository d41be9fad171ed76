"""Scheduling policies: pure Python objects (no torch, no ZeroMQ) chosen by name from registries.

- ``policies.admission``: coordinator admission order across clients (``ADMISSION_POLICIES``): ``fcfs``, ``spf``
  (``policies.spf``), ``vtc`` and ``lcf`` (``policies.vtc``), ``rpm`` (``policies.rpm``).
- ``policies.batch``: per-worker iteration composition (``BATCH_POLICIES``): ``sarathi``, ``prefill-first``
  (``policies.prefill_first``), ``slai`` (``policies.slai``), ``rad`` (``policies.rad_batching``).
- ``policies.pool``: the prefill/decode split of workers (``POOL_POLICIES``): ``static``, ``rad``.

Importing the package registers every policy. The services and the simulator run the same objects; tests drive them
directly with a fake clock.
"""

from diptych.policies import prefill_first, rad_batching, rpm, slai, spf, vtc  # noqa: F401  (register policies)
from diptych.policies.admission import ADMISSION_POLICIES, AdmissionPolicy, PendingRequest, Rejection
from diptych.policies.batch import BATCH_POLICIES, BatchPlan, BatchPolicy, KVState, SequenceState
from diptych.policies.pool import POOL_POLICIES, PoolDecision, PoolPolicy, PoolStats

__all__ = [
    "ADMISSION_POLICIES", "AdmissionPolicy", "PendingRequest", "Rejection",
    "BATCH_POLICIES", "BatchPlan", "BatchPolicy", "KVState", "SequenceState",
    "POOL_POLICIES", "PoolDecision", "PoolPolicy", "PoolStats",
]
