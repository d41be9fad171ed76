"""Entry point of prefill workers; the prefill role lives in ``services.worker.roles.prefill``."""
