"""Workloads: request specs (``workloads.spec``), length distributions matching public traces
(``workloads.lengths``), arrival processes (``workloads.arrivals``), SLO tier mixes (``workloads.tiers``), the VTC
multi-client scenarios (``workloads.vtc``), trace readers (``workloads.traces``) and named workloads with their
command-line options (``workloads.catalog``). Shared by the simulator and load generators."""
