"""A worker with both roles: ``colocated`` (prefill and decode of the same requests share its batches, no KV
handoff) or ``flex`` (the coordinator's pool policy puts it in the prefill or the decode pool and may move it).

Method order (``FlexWorker.__mro__``): the decode role, then the prefill role, then the base. So for each
iteration the prefill role runs first (``DecodeWorker.after_step`` calls ``super()`` before its own work) and adopts
colocated requests at their first token; the decode role then streams and reports them with its own requests.
"""

from __future__ import annotations

from diptych.services.decode_worker.worker import DecodeWorker
from diptych.services.prefill_worker.worker import PrefillWorker

ROLES = ("decode", "colocated", "flex")


class FlexWorker(DecodeWorker, PrefillWorker):
    role = "flex"
