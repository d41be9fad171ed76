"""Run metrics: per-request timelines (``metrics.timeline``), columnar results (``metrics.results``), the summary
table (``metrics.summary``), fairness metrics (``metrics.fairness``) and the TBT histogram (``metrics.histogram``).
Used alike for simulated and live runs."""
