"""Flags every worker takes (engine shape, coordinator address, identity) and the engine built from them."""

from __future__ import annotations

import argparse
import uuid

from diptych.engine.protocol import WorkerEngine
from diptych.services.common.cli import add_curve_arguments, env_default
from diptych.services.common.lifecycle import add_logging_arguments


def add_worker_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Flags common to every worker; ``name`` prefixes the default worker id."""
    from diptych.policies.batch import BATCH_POLICIES

    parser.add_argument("--worker-id", default=env_default("worker_id", f"{name}-{uuid.uuid4().hex[:6]}"),
                        help="unique id of this worker in the cluster [random]")
    parser.add_argument("--coordinator-addr", default=env_default("coordinator_addr", "tcp://127.0.0.1:5600"),
                        help="coordinator control socket [%(default)s]")
    parser.add_argument("--model", default=env_default("model", None),
                        help="HF model id or local directory [built-in tiny Llama]")
    parser.add_argument("--device", default=env_default("device", "cpu"), help="cpu, cuda or cuda:N [%(default)s]")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto [%(default)s]")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block [%(default)s]")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks [from --kv-memory-gb]")
    parser.add_argument("--kv-memory-gb", type=float, default=None,
                        help="KV pool size in GiB [on CUDA: what --gpu-memory-utilization leaves; on CPU 0.25]")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                        help="fraction of the GPU this worker fills with weights, activations and the KV pool "
                             "[%(default)s]")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length [model's]")
    parser.add_argument("--kv-watermark", type=float, default=0.01, metavar="FRACTION",
                        help="fraction of the KV pool that admitting new requests (and handoff reservations) leaves "
                             "free while requests run, for them to grow into; KV is allocated as tokens are "
                             "produced and a sequence that finds no block preempts another by recompute "
                             "[%(default)s]")
    parser.add_argument("--policy", default="sarathi", choices=BATCH_POLICIES.names(),
                        help="batch composition policy [%(default)s]")
    parser.add_argument("--policy-opt", action="append", metavar="KEY=VALUE",
                        help="batch policy knob, repeatable (e.g. token_budget=256)")
    parser.add_argument("--engine", default=env_default("engine", "hf"), choices=("hf", "sim"),
                        help="hf: run the model; sim: wait the cost model's time per iteration and emit placeholder "
                        "tokens (cluster-scale runs on a CPU, comparable with 'diptych simulate') [%(default)s]")
    parser.add_argument("--cost-model", default=None,
                        help="with --engine sim: a cost-model preset or JSON file [h200-mistral-7b]")
    parser.add_argument("--sim-handoff-gbps", type=float, default=50.0,
                        help="with --engine sim: modelled KV transfer bandwidth, GB/s [%(default)s]")
    parser.add_argument("--sim-handoff-latency-ms", type=float, default=1.0,
                        help="with --engine sim: modelled KV transfer latency, ms [%(default)s]")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between heartbeats")
    add_curve_arguments(parser, None)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING [INFO]")
    add_logging_arguments(parser)


def build_engine(args: argparse.Namespace) -> WorkerEngine:
    """The engine a worker runs, from the common flags (torch is imported only here); a model engine is warmed up
    (``Engine.warm_up``) before it is returned, so the worker registers only once its first requests run at full
    speed."""
    from diptych.engine import Engine, EngineConfig
    from diptych.policies.batch import BATCH_POLICIES
    from diptych.services.common.cli import parse_knobs

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                          num_blocks=args.num_blocks, kv_memory_gb=args.kv_memory_gb, max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization, kv_watermark=args.kv_watermark)
    policy = BATCH_POLICIES.create(args.policy, **parse_knobs(args.policy_opt))
    if args.engine == "sim":
        from diptych.engine.sim_engine import SimEngine, SimHandoff
        from diptych.sim.cost_model import resolve

        if args.sim_handoff_gbps <= 0 or args.sim_handoff_latency_ms < 0:
            raise ValueError("--sim-handoff-gbps must be positive and --sim-handoff-latency-ms >= 0")
        handoff = SimHandoff(bandwidth_Bps=args.sim_handoff_gbps * 1e9, latency_s=args.sim_handoff_latency_ms / 1e3)
        return SimEngine(config, policy, cost=resolve(args.cost_model), handoff=handoff)
    engine = Engine(config, policy)
    engine.warm_up()
    return engine

