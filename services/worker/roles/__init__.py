"""The roles a worker composes (``services.worker.role.Role``): prefill, decode, colocated."""
