"""Subcommands of ``diptych``: every module here defines ``register(subparsers)``, which adds its parser and sets
``run`` (a function of the parsed arguments returning the exit code) with ``parser.set_defaults(run=...)``."""
