"""A worker process: one engine, and the roles it serves composed around it.

- ``worker.Worker``: registration, the engine loop with its heartbeats, cancellation; runs its roles' hooks in
  their order (``role.Role``).
- ``links.WorkerLinks``: what roles may use of their process (engine calls, control socket, pushes, token streams).
- ``roles``: ``prefill`` (prompt -> first token -> KV handed to a decode worker), ``decode`` (KV reservations,
  handoffs in, decode), ``colocated`` (a request from prompt to last token here, no handoff).
- ``main``: flags, engine, and which roles each ``WorkerRole`` composes (entry points: ``services.prefill_worker``,
  ``services.decode_worker``).
"""
