"""Diptych's services, one process each: frontend, coordinator, prefill_worker, decode_worker."""
