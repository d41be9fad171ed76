"""The cluster core: the pure state and rules of a Diptych cluster, with no I/O and no clock of its own.

The coordinator drives it with real messages and the wall clock; the simulator drives it in virtual time. Nothing
here imports torch, ZeroMQ or asyncio. Modules: ``blocks`` (KV block rounding), ``workers`` (registry, roles,
pools, liveness, per-worker accounting), ``placement`` (where a request goes, accounted by its expected KV
footprint), ``requests`` (the request table and phases), ``accounting`` (reservation and backlog, released exactly
once), ``pools`` (pool statistics, moves and drains), ``ledger`` (per-client service), ``overload`` (bounds of the
admission queue and shedding), ``core`` (``ClusterCore``: the admission loop over all of them).

Where the two drivers differ, the difference is a parameter: ``movable_roles`` (the services move ``flex`` workers,
the simulator every worker), ``colocated_reserve``, ``limits`` (the services bound the admission queue, the
simulator does not), ``ArrivalRate.divide_by_elapsed``, and the statistics only the driver knows (prefill
throughput, running decodes, decode rate and capacity: None when unknown).
"""
