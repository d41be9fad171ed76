"""Named workloads and their command-line options, shared by ``diptych simulate``, experiments and load generators.

``WorkloadConfig`` describes a workload; ``build_workload(config)`` turns it into request specs (deterministic for
a seed). The workload name picks the lengths (and, for traces, the arrivals):

- ``sharegpt4``, ``azure-conv``, ``azure-code``: generated lengths matching the public traces (``workloads.lengths``);
- ``fixed:P:O``: every request P prompt and O output tokens; ``uniform:P1-P2:O1-O2``: uniform ranges;
- ``shift:A,B[,C...]``: the named length distributions in equal consecutive time phases (e.g.
  ``shift:azure-conv,azure-code`` shifts from conversation to code at mid-run);
- ``vtc:SCENARIO``: a VTC multi-client scenario (``workloads.vtc``; its own clients and arrivals, ``--duration``);
- ``trace:PATH``: a user trace file (CSV with lengths, or Mooncake ``.jsonl``): its lengths in order and, with
  ``--arrivals trace``, its timestamps (sped up to ``--qps`` if given);
- ``specs:PATH``: a request-spec JSONL file (``workloads.spec``) replayed as is.

``max_context`` (tokens) clips every request to fit a server's context: output to at most half of it, then the
prompt to the rest (``clip_to_context``), so a long-prompt workload runs against a small model.

``max_tokens`` is the policy for what each request asks as ``max_tokens`` (``workloads.max_tokens``: ``oracle``, a
fixed cap such as the default ``2048``, or ``context``), applied last to every workload kind, within
``max_context`` if given, else within ``model_context`` (the served context, e.g. the simulated model's context) if
given.

Arrivals (``workloads.arrivals``) at ``qps`` requests/s for ``num_requests`` requests (or ``duration_s`` seconds);
SLO tiers from ``tiers`` (``workloads.tiers``); ``clients`` > 1 spreads requests uniformly over ``client0..``.
Independent random streams are used for lengths, arrivals, tiers and clients, so changing the rate keeps the lengths.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np

from diptych.workloads import lengths as L
from diptych.workloads.arrivals import ARRIVAL_KINDS, arrival_times, scale_trace, unit_gaps
from diptych.workloads.max_tokens import DEFAULT_MAX_TOKENS, MAX_TOKENS_HELP, apply_max_tokens, parse_max_tokens
from diptych.workloads.spec import RequestSpec, load_specs
from diptych.workloads.tiers import assign_tiers, parse_tiers
from diptych.workloads.traces import read_trace
from diptych.workloads.vtc import SCENARIOS, vtc_scenario

STREAM_LENGTHS, STREAM_ARRIVALS, STREAM_TIERS, STREAM_CLIENTS = range(4)


@dataclass
class WorkloadConfig:
    name: str = "sharegpt4"
    qps: float | None = 1.0
    num_requests: int | None = 1000
    duration_s: float | None = None
    arrivals: str = "poisson"
    cv: float = 1.0
    cap_factor: float = 3.0
    tiers: str = "none"
    clients: int = 1
    seed: int = 0
    max_context: int | None = None
    max_tokens: str = DEFAULT_MAX_TOKENS
    """The max_tokens policy (``workloads.max_tokens.parse_max_tokens``), as text."""
    model_context: int | None = None
    """Tokens: the context the max_tokens policy fits requests into when ``max_context`` is None."""


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def length_distribution(name: str) -> L.LengthDistribution:
    if name in L.preset_names():
        return L.preset(name)
    kind, _, rest = name.partition(":")
    try:
        if kind == "fixed":
            p, o = rest.split(":")
            return L.FixedLengths(int(p), int(o))
        if kind == "uniform":
            p, o = rest.split(":")
            (p1, p2), (o1, o2) = (tuple(int(x) for x in part.split("-")) for part in (p, o))
            return L.UniformLengths((p1, p2), (o1, o2))
    except ValueError as exc:
        raise ValueError(f"bad length distribution {name!r} ({exc}); expected fixed:P:O or uniform:P1-P2:O1-O2") \
            from None
    raise ValueError(f"unknown length distribution {name!r}; choose one of: {', '.join(L.preset_names())}, "
                     "fixed:P:O, uniform:P1-P2:O1-O2")


def build_workload(config: WorkloadConfig) -> list[RequestSpec]:
    """The workload's request specs, clipped to ``max_context`` (if given), with the ``max_tokens`` policy applied."""
    policy = parse_max_tokens(config.max_tokens)
    specs = _requests(config)
    if config.max_context is not None:
        specs = clip_to_context(specs, config.max_context)
    context = config.max_context if config.max_context is not None else config.model_context
    return apply_max_tokens(specs, policy, context)


def _requests(config: WorkloadConfig) -> list[RequestSpec]:
    name = config.name
    if config.clients < 1:
        raise ValueError("clients must be >= 1")
    if name.startswith("vtc:"):
        return vtc_scenario(name[4:], config.duration_s, config.seed)
    if name.startswith("specs:"):
        return load_specs(name[6:])
    trace = read_trace(name[6:]) if name.startswith("trace:") else None
    if config.arrivals == "trace":
        if trace is None or trace.arrival_times is None:
            raise ValueError("--arrivals trace needs a trace:PATH workload whose file has timestamps")
        times = scale_trace(trace.arrival_times, rate=config.qps)
        if config.num_requests is not None:
            times = times[: config.num_requests]
        if config.duration_s is not None:
            times = times[times < config.duration_s]
    else:
        times = _arrivals(config)
    n = len(times)
    if n == 0:
        raise ValueError("the workload has no requests (check --num-requests / --duration)")
    if trace is not None:
        index = np.arange(n) % len(trace)
        prompts, outputs = trace.prompt_lens[index], trace.output_lens[index]
    elif name.startswith("shift:"):
        prompts, outputs = _shifted_lengths(name[6:], times, config.seed)
    else:
        prompts, outputs = length_distribution(name).sample(n, _rng(config.seed, STREAM_LENGTHS))
    tiers = assign_tiers(parse_tiers(config.tiers), n, _rng(config.seed, STREAM_TIERS))
    if config.clients > 1:
        clients = _rng(config.seed, STREAM_CLIENTS).integers(0, config.clients, n)
        client_ids = [f"client{c}" for c in clients]
    else:
        client_ids = ["client0"] * n
    return [RequestSpec(f"r{i}", float(times[i]), int(prompts[i]), int(outputs[i]), client_id=client_ids[i],
                        tier=tiers[i].name, tbt_slo_s=tiers[i].tbt_slo_s, ttft_slo_s=tiers[i].ttft_slo_s)
            for i in range(n)]


def clip_to_context(specs: list[RequestSpec], max_context: int) -> list[RequestSpec]:
    """``specs`` with each ``prompt_len + max_tokens <= max_context`` tokens: the output (``max_tokens`` and
    ``output_len``) clipped to at most ``max_context // 2``, then the prompt to what is left. Fitting specs are
    unchanged."""
    if max_context < 2:
        raise ValueError(f"max_context must be at least 2 tokens, got {max_context}")
    clipped = []
    for spec in specs:
        requested = spec.max_tokens or spec.output_len
        if spec.prompt_len + requested <= max_context:
            clipped.append(spec)
            continue
        output = min(requested, max_context // 2)
        clipped.append(replace(spec, prompt_len=min(spec.prompt_len, max_context - output),
                               output_len=min(spec.output_len, output), max_tokens=output))
    return clipped


def _arrivals(config: WorkloadConfig) -> np.ndarray:
    if config.arrivals not in ARRIVAL_KINDS:
        raise ValueError(f"unknown arrival process {config.arrivals!r}; choose one of: "
                         f"{', '.join((*ARRIVAL_KINDS, 'trace'))}")
    if config.qps is None or not config.qps > 0:
        raise ValueError("--qps must be > 0 for generated arrivals")
    rng = _rng(config.seed, STREAM_ARRIVALS)
    if config.num_requests is not None:
        if config.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        times = arrival_times(config.arrivals, config.qps, config.num_requests, rng, config.cv, config.cap_factor)
        if config.duration_s is not None:
            times = times[times < config.duration_s]
        return times
    if config.duration_s is None or not config.duration_s > 0:
        raise ValueError("give --num-requests or a positive --duration")
    chunk = int(config.duration_s * config.qps * 1.2) + 16
    gaps = unit_gaps(config.arrivals, chunk, rng, config.cv, config.cap_factor)
    while gaps.sum() / config.qps < config.duration_s:
        gaps = np.concatenate([gaps, unit_gaps(config.arrivals, chunk, rng, config.cv, config.cap_factor)])
    times = np.cumsum(gaps) / config.qps
    if config.arrivals == "constant":
        times -= 1.0 / config.qps
    return times[times < config.duration_s]


def _shifted_lengths(spec: str, times: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) < 2:
        raise ValueError("shift: needs at least two length distributions, e.g. shift:azure-conv,azure-code")
    span = times[-1] if len(times) and times[-1] > 0 else 1.0
    phase = np.minimum((times / span * len(names)).astype(int), len(names) - 1)
    prompts, outputs = np.zeros(len(times), np.int64), np.zeros(len(times), np.int64)
    for k, name in enumerate(names):
        p, o = length_distribution(name).sample(len(times), _rng(seed, 16 + k))
        prompts[phase == k], outputs[phase == k] = p[phase == k], o[phase == k]
    return prompts, outputs


WORKLOAD_HELP = ("sharegpt4 | azure-conv | azure-code | fixed:P:O | uniform:P1-P2:O1-O2 | shift:A,B | "
                 f"vtc:{{{','.join(SCENARIOS)}}} | trace:PATH (CSV or Mooncake .jsonl) | specs:PATH")


def add_workload_arguments(parser: argparse.ArgumentParser, qps: float | None = 1.0,
                           num_requests: int | None = 1000) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--workload", default="sharegpt4", help=f"{WORKLOAD_HELP} [%(default)s]")
    g.add_argument("--qps", type=float, default=qps, help="mean arrival rate, requests/s [%(default)s]")
    g.add_argument("--num-requests", type=int, default=None,
                   help=f"requests to send [{num_requests} unless --duration is given]")
    parser.set_defaults(default_num_requests=num_requests)
    g.add_argument("--duration", type=float, default=None,
                   help="seconds of arrivals (instead of, or capping, --num-requests; VTC scenarios' length)")
    g.add_argument("--arrivals", default="poisson", choices=(*ARRIVAL_KINDS, "trace"),
                   help="arrival process [%(default)s]")
    g.add_argument("--cv", type=float, default=1.0, help="gap coefficient of variation for gamma arrivals [1]")
    g.add_argument("--cap-factor", type=float, default=3.0,
                   help="poisson-capped: cap each gap at this many mean gaps [%(default)s]")
    g.add_argument("--tiers", default="none",
                   help="SLO tier mix: preset (none, slai, uniform-0.2, sarathi-strict, sarathi-relaxed, "
                        "distserve-chat) or NAME:FRACTION:TBT_S[:TTFT_S],... [%(default)s]")
    g.add_argument("--clients", type=int, default=1, help="spread requests over this many clients [1]")
    g.add_argument("--seed", type=int, default=0, help="random seed [0]")
    g.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="clip each request to prompt + output <= TOKENS (output to at most half) [no clipping]")
    g.add_argument("--max-tokens", default=DEFAULT_MAX_TOKENS, metavar="oracle|N|context",
                   help=f"{MAX_TOKENS_HELP}; context is --max-context if given, else the served context (bench "
                        "serve over HTTP: the server's max_model_len; simulate: the cost model's model context, or "
                        "one worker's KV pool where smaller; --max-model-len overrides) "
                        "[%(default)s]")


def workload_from_args(args: argparse.Namespace) -> WorkloadConfig:
    """The validated ``WorkloadConfig`` of the options ``add_workload_arguments`` added (``ValueError`` with a
    readable message otherwise). A parser whose other options describe where the workload runs may set the default
    ``model_context_of``: a function of the parsed options giving ``model_context`` (``sim.cli`` does)."""
    num = args.num_requests
    if num is None and args.duration is None:
        num = getattr(args, "default_num_requests", 1000)
    config = WorkloadConfig(name=args.workload, qps=args.qps, num_requests=num, duration_s=args.duration,
                            arrivals=args.arrivals, cv=args.cv, cap_factor=args.cap_factor, tiers=args.tiers,
                            clients=args.clients, seed=args.seed, max_context=getattr(args, "max_context", None),
                            max_tokens=args.max_tokens)
    parse_max_tokens(config.max_tokens)
    context_of = getattr(args, "model_context_of", None)
    if context_of is not None:
        config.model_context = context_of(args)
    if config.num_requests is not None and config.num_requests < 1:
        raise ValueError("--num-requests must be >= 1")
    if config.duration_s is not None and not config.duration_s > 0:
        raise ValueError("--duration must be > 0")
    if config.qps is not None and not config.qps > 0:
        raise ValueError("--qps must be > 0")
    parse_tiers(config.tiers)
    return config
