"""``diptych bench replay``: the ``slai-vs-sarathi`` setting on the real model. A workload is replayed in real time
into one engine in this process (the model on the GPU, the batch policy choosing every iteration, requests added
at their arrival times), and the simulator runs the same workload with the same policy, KV pool size and a
measured cost model; the table puts both side by side, and SLAI's change against Sarathi-Serve in each.

This is the colocated worker of the services without the processes around it: no coordinator, so every arrived
request reaches the batch policy at once (the experiment's setting; the simulator is configured alike). Times are
wall-clock seconds; token times are taken when each iteration's tokens are sampled.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from typing import Any

from tqdm import tqdm

from diptych.experiments.common import add_max_tokens_argument

VARIANTS = ("sarathi-fcfs", "slai")
CONTEXT_LEN = 32768
"""The replayed engine's ``max_model_len`` (tokens): the context ``--max-tokens`` fills."""


def add_replay_parser(kinds: argparse._SubParsersAction) -> None:
    r = kinds.add_parser("replay", help="slai-vs-sarathi on the real engine vs the simulator, same workload",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.set_defaults(run=run_replay)
    r.add_argument("--model", default="mistral-7b-shape", help="as for 'bench engine' [%(default)s]")
    r.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu [%(default)s]")
    r.add_argument("--loads", default="2,4", help="comma-separated loads, requests/s [%(default)s]")
    r.add_argument("--requests", type=int, default=200, help="requests per run [%(default)s]")
    r.add_argument("--variants", default=",".join(VARIANTS), help=f"slai-vs-sarathi variants [{','.join(VARIANTS)}]")
    r.add_argument("--kv-gb", type=float, default=64.0, help="KV pool in GiB, the simulator's too [%(default)s]")
    r.add_argument("--cost-model", default="benchmarks/data/cost_model_nvidia-h200.json",
                   help="the simulator's cost model (preset or file) [%(default)s]")
    r.add_argument("--seed", type=int, default=1, help="workload seed [%(default)s]")
    r.add_argument("--json", default=None, help="also write the raw summaries to this JSON file")
    add_max_tokens_argument(r, "slai-vs-sarathi", context=f"the engine's max_model_len, {CONTEXT_LEN}")


def run_replay(args: argparse.Namespace) -> int:
    import sys

    from diptych.experiments.common import parse_numbers
    from diptych.experiments.slai_vs_sarathi import VARIANTS as ALL_VARIANTS
    from diptych.sim.cost_model import resolve
    from diptych.workloads.max_tokens import parse_max_tokens

    try:
        loads = parse_numbers(args.loads, "--loads")
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in ALL_VARIANTS]
        if unknown or not variants:
            raise ValueError(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
        coordinated = [v for v in variants if ALL_VARIANTS[v][2] != "fcfs"]
        if coordinated:
            raise ValueError(f"{', '.join(coordinated)} order admission in the coordinator; replay runs one engine")
        if args.requests < 10 or args.kv_gb <= 0:
            raise ValueError("--requests must be >= 10 and --kv-gb > 0")
        cost = resolve(args.cost_model)
        args.max_tokens = str(parse_max_tokens(args.max_tokens))
    except ValueError as exc:
        print(f"diptych bench replay: {exc}", file=sys.stderr)
        return 2
    rows = _measure(args, loads, variants, cost)
    print(_table(rows, variants, loads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "run"}, "rows": rows}, f, indent=1)
    return 0


def _measure(args: argparse.Namespace, loads: list[float], variants: list[str], cost) -> list[dict[str, Any]]:
    import torch

    from diptych.benchmarks.common import build_model
    from diptych.engine import Engine, EngineConfig
    from diptych.experiments.slai_vs_sarathi import COMMON, VARIANTS as ALL_VARIANTS, config_for, workload
    from diptych.metrics.results import RunResult
    from diptych.metrics.summary import summarize
    from diptych.policies.batch import BATCH_POLICIES
    from diptych.sim.config import replace
    from diptych.sim.simulator import simulate

    under_test = build_model(args.model, args.device, torch.bfloat16)
    rows = []
    for qps in loads:  # variants interleaved per load, so no variant gains from running later
        specs = workload(qps, args.requests, args.seed, args.max_tokens, CONTEXT_LEN)
        for variant in variants:
            policy_name, knobs, _ = ALL_VARIANTS[variant]
            engine = Engine(EngineConfig(device=args.device, dtype="bfloat16", kv_memory_gb=args.kv_gb,
                                         max_model_len=CONTEXT_LEN),
                            BATCH_POLICIES.create(policy_name, **{**COMMON, **knobs}), model=under_test.model)
            replay(engine, warmup_specs(specs), args.seed, f"warm-up {variant}")  # kernels built, not timed
            real = RunResult.from_timelines(replay(engine, specs, args.seed, f"{variant} @ {qps:g} req/s"))
            blocks = engine.num_blocks
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            config = replace(config_for(variant, args.cost_model), cost_model=cost, kv_blocks=blocks)
            simulated = simulate(config, specs)
            rows.append({"variant": variant, "qps": qps, "requests": len(specs), "kv_blocks": blocks,
                         "engine": summarize(real, fairness_metrics=False),
                         "simulator": summarize(simulated, fairness_metrics=False)})
    return rows


def warmup_specs(specs: list, count: int = 12) -> list:
    """A few of the workload's requests, arriving together and cut to 16 output tokens, whose iterations build
    and cache the kernels the timed run needs (prefill chunks, mixed batches, decode batch sizes)."""
    from dataclasses import replace

    picked = sorted(specs, key=lambda s: s.prompt_len)[:: max(1, len(specs) // count)][:count]
    return [replace(s, request_id=f"warmup-{s.request_id}", arrival_time=0.0, output_len=16, max_tokens=16)
            for s in picked]


def replay(engine: Any, specs: list, seed: int, label: str) -> list:
    """Add each request at its arrival time (seconds from now), with the spec's ``max_tokens`` and
    ``stop_after_tokens = output_len`` (the output follows the workload; the scheduler sees only the cap), and step
    the engine until every request ends; returns one ``RequestTimeline`` per spec, on the wall clock."""
    from diptych.engine.outputs import StepOutput
    from diptych.metrics.timeline import from_service_timeline
    from diptych.proto.messages import SLO, SamplingParams

    vocab = engine.runner.vocab_size
    order = sorted(specs, key=lambda s: s.arrival_time)
    timelines: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(order), desc=label, unit="req")
    start = time.time()
    next_index = 0
    while next_index < len(order) or engine.has_work():
        now = time.time()
        while next_index < len(order) and start + order[next_index].arrival_time <= now:
            spec = order[next_index]
            rng = random.Random(f"{seed}:{spec.request_id}")
            arrival = start + spec.arrival_time
            engine.add_request(spec.request_id, [rng.randrange(3, vocab) for _ in range(spec.prompt_len)],
                               SamplingParams(max_tokens=spec.max_tokens, stop_after_tokens=spec.output_len,
                                              temperature=0.0, ignore_eos=True),
                               arrival_time=arrival,
                               slo=SLO(tier=spec.tier, ttft_s=spec.ttft_slo_s, tbt_s=spec.tbt_slo_s))
            timelines[spec.request_id] = {"arrival": arrival, "token_times": []}
            next_index += 1
        if not engine.has_work():
            time.sleep(max(0.0, start + order[next_index].arrival_time - time.time()))
            continue
        output: StepOutput = engine.step()
        for rid in output.admitted:
            timelines[rid].update(admitted=output.start_time, prefill_start=output.start_time)
        for token in output.tokens:
            timeline = timelines[token.request_id]
            timeline["token_times"].append(token.time)
            if token.finish_reason:
                timeline.update(finish=token.time, finish_reason=token.finish_reason)
                bar.update()
    bar.close()
    return [from_service_timeline(spec, timelines[spec.request_id]) for spec in specs]


def _table(rows: list[dict[str, Any]], variants: list[str], loads: list[float]) -> str:
    lines = ["| variant | load (req/s) | requests | TTFT p50 engine | simulator | ratio | TTFT p99 engine | simulator "
             "| TBT p99 strict engine | simulator | TBT p99 relaxed engine | simulator |", "|" + "---|" * 12]

    def tier(summary: dict, name: str) -> float:
        return summary["tiers"].get(name, {}).get("tbt_p99", float("nan"))

    for row in rows:
        e, s = row["engine"], row["simulator"]
        lines.append(
            f"| {row['variant']} | {row['qps']:g} | {row['requests']} | {e['ttft_p50']:.3f} s | {s['ttft_p50']:.3f} s "
            f"| {e['ttft_p50'] / s['ttft_p50']:.2f}x | {e['ttft_p99']:.3f} s | {s['ttft_p99']:.3f} s "
            f"| {tier(e, 'strict') * 1e3:.1f} ms | {tier(s, 'strict') * 1e3:.1f} ms "
            f"| {tier(e, 'relaxed') * 1e3:.1f} ms | {tier(s, 'relaxed') * 1e3:.1f} ms |")
    by_key = {(row["variant"], row["qps"]): row for row in rows}
    if "sarathi-fcfs" in variants and len(variants) > 1:
        lines += ["", "| variant | load (req/s) | median TTFT vs Sarathi-Serve, engine | simulator |",
                  "|---|---|---|---|"]
        for variant in variants:
            if variant == "sarathi-fcfs":
                continue
            for qps in loads:
                base, other = by_key.get(("sarathi-fcfs", qps)), by_key.get((variant, qps))
                if base and other:
                    change = [other[side]["ttft_p50"] / base[side]["ttft_p50"] - 1 for side in ("engine", "simulator")]
                    lines.append(f"| {variant} | {qps:g} | {change[0]:+.0%} | {change[1]:+.0%} |")
    return "\n".join(lines)
