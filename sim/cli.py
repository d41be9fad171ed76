"""Command-line options for a simulated cluster (``diptych simulate``, experiments).

The cluster's options also tell the workload options what context the ``--max-tokens`` policy fills
(``simulated_context``: the model's context, as a served engine's ``max_model_len``): a parser with both gets
``model_context_of`` as a default, which ``workloads.catalog.workload_from_args`` calls.
"""

from __future__ import annotations

import argparse

from diptych.cluster.placement import DEFAULT_EXPECTED_OUTPUT_TOKENS
from diptych.engine.kv_rules import DEFAULT_WATERMARK_FRACTION, max_positions
from diptych.policies.admission import ADMISSION_POLICIES
from diptych.policies.batch import BATCH_POLICIES
from diptych.policies.pool import POOL_POLICIES
from diptych.services.common.cli import parse_knobs
from diptych.sim import cost_model
from diptych.sim.config import ClusterConfig, PolicySpec


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    d = ClusterConfig()
    g = parser.add_argument_group("cluster")
    g.add_argument("--prefill-workers", type=int, default=d.prefill_workers, help="prefill workers [%(default)s]")
    g.add_argument("--decode-workers", type=int, default=d.decode_workers, help="decode workers [%(default)s]")
    g.add_argument("--colocated-workers", type=int, default=0,
                   help="colocated workers (prefill and decode in one engine); use with --prefill-workers 0 "
                        "--decode-workers 0 [%(default)s]")
    g.add_argument("--cost-model", default="h200-mistral-7b",
                   help=f"iteration cost model: a preset ({', '.join(cost_model.PRESETS)}) or a JSON file saved by "
                        "CostModel.save [%(default)s]")
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block [%(default)s]")
    g.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per worker [GPU memory x --memory-utilization minus weights]")
    g.add_argument("--kv-watermark", type=float, default=DEFAULT_WATERMARK_FRACTION,
                   help="fraction of each worker's KV pool that admission leaves free while sequences run, for "
                        "their decodes to grow into (engine.kv_rules) [%(default)s]")
    g.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                   help="the engines' context, prompt plus output tokens [the cost model's model context, e.g. "
                        "32768 for Mistral-7B; one worker's KV pool if the model names none]")
    g.add_argument("--expected-output-tokens", type=int, default=DEFAULT_EXPECTED_OUTPUT_TOKENS,
                   help="output growth placement expects of a request: it places by the KV of prompt + "
                        "min(max_tokens, this) tokens (coordinator's --expected-output-tokens) [%(default)s]")
    g.add_argument("--memory-utilization", type=float, default=d.memory_utilization,
                   help="GPU memory fraction for weights and KV [%(default)s]")
    g.add_argument("--admission", default="fcfs", choices=ADMISSION_POLICIES.names(),
                   help="coordinator admission policy [%(default)s]")
    g.add_argument("--admission-opt", action="append", metavar="KEY=VALUE", help="admission knob, repeatable")
    for role, default in (("prefill", d.prefill_policy), ("decode", d.decode_policy),
                          ("colocated", d.colocated_policy)):
        g.add_argument(f"--{role}-policy", default=default.name, choices=BATCH_POLICIES.names(),
                       help=f"batch policy of {role} workers [%(default)s]")
        g.add_argument(f"--{role}-opt", action="append", metavar="KEY=VALUE",
                       help=f"{role} batch policy knob, repeatable [{_knobs(default.knobs)}]")
    g.add_argument("--pool-policy", default="static", choices=POOL_POLICIES.names(),
                   help="prefill/decode split policy [%(default)s]")
    g.add_argument("--pool-opt", action="append", metavar="KEY=VALUE", help="pool policy knob, repeatable")
    g.add_argument("--pool-tick", type=float, default=d.pool_tick_s,
                   help="seconds between pool decisions [%(default)s]")
    g.add_argument("--handoff-latency", type=float, default=d.handoff_latency_s * 1e3,
                   help="KV handoff latency, ms [%(default)s]")
    g.add_argument("--handoff-bandwidth", type=float, default=d.handoff_bandwidth_Bps / 1e9,
                   help="KV handoff bandwidth, GB/s [%(default)s]")
    g.add_argument("--dispatch-latency", type=float, default=d.dispatch_latency_s * 1e3,
                   help="control path from admission to the worker's queue, ms [%(default)s]")
    g.add_argument("--max-decode-sequences", type=int, default=d.max_decode_sequences,
                   help="requests placed on one decode worker at a time (coordinator's --max-decode-sequences) "
                   "[%(default)s]")
    g.add_argument("--max-prefill-backlog", default=str(d.max_prefill_backlog_tokens),
                   help="prompt tokens queued per prefill/colocated worker, or 'none' for unbounded [%(default)s]")
    g.add_argument("--no-colocated-reserve", action="store_true",
                   help="colocated workers: leave KV admission to the batch policy instead of reserving at placement")
    g.add_argument("--exact", action="store_true",
                   help="call the batch policy before every iteration (no stretch fast-forward; slower)")
    parser.set_defaults(model_context_of=context_from_args)


def simulated_context(config: ClusterConfig) -> int:
    """Tokens a simulated request may span, prompt plus output: ``kv_rules.max_positions`` of the context (the
    cluster's ``max_model_len``, else the cost model's model context, e.g. 32768 for Mistral-7B, else one worker's
    KV pool) and one worker's pool. What ``--max-tokens context`` fills (a chat request without max_tokens gets
    this minus its prompt) and a fixed cap is clipped to when ``--max-context`` is not given."""
    blocks = config.blocks_per_worker()
    context = config.max_model_len if config.max_model_len is not None else config.cost_model.model.max_model_len
    return max_positions(context if context is not None else blocks * config.block_size, blocks, config.block_size)


def context_from_args(args: argparse.Namespace) -> int:
    """``simulated_context`` of the cluster the parsed options describe (``ValueError`` if they are invalid)."""
    return simulated_context(cluster_from_args(args))


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "none"


def _spec(name: str, items: list[str] | None, defaults: PolicySpec) -> PolicySpec:
    try:
        knobs = parse_knobs(items)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    if name == defaults.name and items is None:
        knobs = dict(defaults.knobs)
    return PolicySpec(name, knobs)


def cluster_from_args(args: argparse.Namespace) -> ClusterConfig:
    """A validated ``ClusterConfig``; ``ValueError`` with a readable message otherwise."""
    d = ClusterConfig()
    backlog_text = str(args.max_prefill_backlog).strip().lower()
    if backlog_text in ("none", "unbounded", "inf"):
        backlog = None
    else:
        try:
            backlog = int(backlog_text)
        except ValueError:
            raise ValueError(f"--max-prefill-backlog must be an integer or 'none', got {args.max_prefill_backlog!r}") \
                from None
    if args.handoff_bandwidth <= 0:
        raise ValueError("--handoff-bandwidth must be > 0")
    if args.handoff_latency < 0:
        raise ValueError("--handoff-latency must be >= 0")
    if not 0 < args.memory_utilization <= 1:
        raise ValueError("--memory-utilization must be in (0, 1]")
    costs = cost_model.resolve(args.cost_model)
    model = costs.model
    config = ClusterConfig(
        prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
        colocated_workers=args.colocated_workers, cost_model=costs,
        block_size=args.block_size, kv_blocks=args.kv_blocks, memory_utilization=args.memory_utilization,
        kv_watermark=args.kv_watermark,
        max_model_len=args.max_model_len if args.max_model_len is not None else model.max_model_len,
        expected_output_tokens=args.expected_output_tokens,
        admission=_spec(args.admission, args.admission_opt, d.admission),
        prefill_policy=_spec(args.prefill_policy, args.prefill_opt, d.prefill_policy),
        decode_policy=_spec(args.decode_policy, args.decode_opt, d.decode_policy),
        colocated_policy=_spec(args.colocated_policy, args.colocated_opt, d.colocated_policy),
        pool_policy=_spec(args.pool_policy, args.pool_opt, d.pool_policy), pool_tick_s=args.pool_tick,
        handoff_latency_s=args.handoff_latency / 1e3, handoff_bandwidth_Bps=args.handoff_bandwidth * 1e9,
        dispatch_latency_s=args.dispatch_latency / 1e3, max_decode_sequences=args.max_decode_sequences,
        max_prefill_backlog_tokens=backlog, colocated_reserve=not args.no_colocated_reserve, exact=args.exact,
    )
    config.validate()
    return config
