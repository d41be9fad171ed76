"""Entry point of decode workers (``--role decode``), colocated and flex workers; the roles live in
``services.worker.roles``."""
