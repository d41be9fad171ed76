"""``diptych serve``: start coordinator, workers and frontend as separate processes and serve until stopped."""

from __future__ import annotations

import argparse
import os
import signal
import sys

TINY_MODEL_NOTE = ("Note: the built-in tiny model has random weights, so its replies are random tokens; "
                   "use --model <hub id or directory> for real text.\n")


def register(sub: argparse._SubParsersAction) -> None:
    from diptych.policies.admission import ADMISSION_POLICIES
    from diptych.policies.batch import BATCH_POLICIES
    from diptych.policies.pool import POOL_POLICIES

    p = sub.add_parser(
        "serve", help="start coordinator, workers and frontend as separate processes",
        description="Start a Diptych cluster on this machine and serve until Ctrl-C/SIGTERM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"admission policies (--admission, coordinator):\n{ADMISSION_POLICIES.describe()}\n\n"
               f"batch policies (--policy, every worker):\n{BATCH_POLICIES.describe()}\n\n"
               f"pool policies (--pool-policy, flex workers):\n{POOL_POLICIES.describe()}\n\n"
               "Policy knobs: --admission-opt/--policy-opt/--pool-opt KEY=VALUE; 'diptych policies NAME' lists them.",
    )
    p.set_defaults(run=run)
    p.add_argument("--model", default=None, help="HF model id or local directory [built-in tiny Llama]")
    p.add_argument("--prefill-workers", type=int, default=1, help="number of prefill workers [%(default)s]")
    p.add_argument("--decode-workers", type=int, default=1, help="number of decode workers [%(default)s]")
    p.add_argument("--colocated-workers", type=int, default=0,
                   help="workers that prefill and decode their own requests in the same batches [%(default)s]")
    p.add_argument("--flex-workers", type=int, default=0,
                   help="workers the pool policy moves between prefill and decode [%(default)s]")
    p.add_argument("--host", default="127.0.0.1", help="interface for every endpoint [%(default)s]")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API port [%(default)s]")
    p.add_argument("--sdk-port", type=int, default=5601, help="ZeroMQ SDK endpoint port [%(default)s]")
    p.add_argument("--coordinator-port", type=int, default=5600, help="coordinator control port [%(default)s]")
    p.add_argument("--stream-port", type=int, default=5602, help="frontend token-stream port [%(default)s]")
    p.add_argument("--kv-base-port", type=int, default=5610, help="first decode worker KV port [%(default)s]")
    p.add_argument("--admission", default="fcfs", choices=ADMISSION_POLICIES.names(),
                   help="admission policy across clients [%(default)s]")
    p.add_argument("--admission-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="admission policy knob, repeatable")
    p.add_argument("--pool-policy", default="static", choices=POOL_POLICIES.names(),
                   help="prefill/decode split of flex workers: static or rad (dynamic) [%(default)s]")
    p.add_argument("--pool-opt", action="append", default=[], metavar="KEY=VALUE", help="pool policy knob")
    p.add_argument("--policy", default="sarathi", choices=BATCH_POLICIES.names(),
                   help="worker batch policy [%(default)s]")
    p.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE", help="batch policy knob")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N for every worker, or a comma-separated list given to the workers in "
                   "turn (prefill workers first): cuda:0,cuda:1 [%(default)s]")
    p.add_argument("--engine", default="hf", choices=("hf", "sim"),
                   help="hf runs the model; sim waits a GPU cost model's time per iteration (placeholder tokens) "
                   "to run cluster-scale experiments on a CPU [%(default)s]")
    p.add_argument("--cost-model", default=None, help="with --engine sim: preset or JSON file [h200-mistral-7b]")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker [from the memory flags]")
    p.add_argument("--kv-memory-gb", type=float, default=None,
                   help="KV pool GiB per worker [on CUDA: what --gpu-memory-utilization leaves; on CPU 0.25]")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                   help="fraction of each GPU that the workers on it fill with weights, activations and KV pools, "
                        "divided evenly between them [0.9]")
    p.add_argument("--kv-watermark", type=float, default=None, metavar="FRACTION",
                   help="fraction of each worker's KV pool that admissions leave free for running requests to grow "
                        "into (KV is allocated as tokens are produced; a full pool preempts by recompute) [0.01]")
    p.add_argument("--expected-output-tokens", type=int, default=None, metavar="TOKENS",
                   help="output the coordinator expects a request to add to its KV when it places it (the placement "
                        "footprint is prompt + min(max_tokens, this)); smaller packs more requests per worker and "
                        "preempts more [512]")
    p.add_argument("--api-keys-file", default=None,
                   help="JSON file mapping API keys to clients (id, fairness weight, SLO tier) [anonymous]")
    p.add_argument("--admin-keys", default=None, metavar="FILE",
                   help="operator API keys, one per line, for /admin/status (or \"admins\" in the API keys file); "
                        "with any key configured, client keys get 403 there [open only without any keys]")
    p.add_argument("--ssl-certfile", default=None, metavar="PEM", help="serve the HTTP API over HTTPS [plain HTTP]")
    p.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="key of --ssl-certfile, if not in that file")
    p.add_argument("--slo-tiers", default=None, help="JSON file of SLO tiers {name: {tbt_s, ttft_s}} "
                   "[default 0.2 s, strict 0.1 s, relaxed 0.5 s TBT]")
    p.add_argument("--keys-dir", default=os.environ.get("DIPTYCH_KEYS_DIR") or None, metavar="DIR",
                   help="CURVE key set for the internal sockets ('diptych keys generate DIR --workers N'; it must "
                        "name every worker) [an ephemeral set, removed at exit]")
    p.add_argument("--insecure-no-curve", action="store_true",
                   help="plaintext, unauthenticated internal sockets (anyone who reaches a port can use it)")
    p.add_argument("--log-dir", default=None, help="write each process's log to DIR/<name>.log [stderr]")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING [%(default)s]")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="every process's log lines: text, or one JSON object per line [%(default)s]")


def run(args: argparse.Namespace) -> int:
    from diptych.launcher import Cluster, ClusterSpec

    try:
        _check_knobs(args)  # a bad knob fails here, before any process starts
        spec = ClusterSpec(
            model=args.model, prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
            colocated_workers=args.colocated_workers, flex_workers=args.flex_workers,
            pool_policy=args.pool_policy, pool_opts=args.pool_opt,
            host=args.host, http_port=args.http_port, coordinator_port=args.coordinator_port,
            sdk_port=args.sdk_port, stream_port=args.stream_port, kv_base_port=args.kv_base_port,
            admission=args.admission, admission_opts=args.admission_opt, policy=args.policy,
            policy_opts=args.policy_opt, device=args.device, engine=args.engine, cost_model=args.cost_model,
            num_blocks=args.num_blocks, kv_memory_gb=args.kv_memory_gb,
            gpu_memory_utilization=args.gpu_memory_utilization, log_format=args.log_format,
            api_keys_file=args.api_keys_file, slo_tiers_file=args.slo_tiers, log_level=args.log_level,
            admin_keys_file=args.admin_keys, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
            keys_dir=args.keys_dir, insecure_no_curve=args.insecure_no_curve,
            extra_worker_args=[] if args.kv_watermark is None else ["--kv-watermark", str(args.kv_watermark)],
            extra_coordinator_args=([] if args.expected_output_tokens is None
                                    else ["--expected-output-tokens", str(args.expected_output_tokens)]),
        )
    except ValueError as exc:
        print(f"diptych serve: {exc}", file=sys.stderr)
        return 2
    device_error = _device_error(args.device)
    if device_error:
        print(f"diptych serve: {device_error}", file=sys.stderr)
        return 2
    cluster = Cluster(spec, log_dir=args.log_dir)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the cluster like Ctrl-C
    try:
        cluster.start()
        health = cluster.wait_ready()
        workers = ", ".join(f"{health.get(f'{pool}_workers') or 0} {pool}"
                            for pool in ("prefill", "decode", "colocated"))
        listening = "".join(f"  {what:<14} {addr}\n" for what, addr in spec.bound_addresses())
        curve = ("OFF (--insecure-no-curve)" if spec.insecure_no_curve
                 else f"on, keys {spec.keys_dir}" if spec.keys_dir else "on, an ephemeral key set")
        print(f"Diptych is up: workers {workers}; model {health.get('model')}\n"
              f"Listening on (nothing else; CURVE {curve}):\n{listening}"
              f"Try: curl {spec.http_url}/v1/models\n"
              f"{TINY_MODEL_NOTE if spec.model is None else ''}"
              f"Press Ctrl-C to stop.", flush=True)
        dead = cluster.wait()
        print(f"diptych serve: processes exited: {dead}; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping Diptych...", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"diptych serve: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


def _device_error(devices: str) -> str | None:
    """Why ``--device`` cannot work here (checked once, before any worker starts), or None."""
    wanted = [d.strip() for d in devices.split(",") if d.strip().startswith("cuda")]
    if not wanted:
        return None
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"--device {devices}: torch {torch.__version__} ({build}) sees no CUDA GPU. Install a CUDA build "
                "(make TORCH_SPEC=torch==<version> serve reinstalls it) or use --device cpu")
    count = torch.cuda.device_count()
    missing = [d for d in wanted if ":" in d and int(d.split(":")[1]) >= count]
    if missing:
        return f"--device {devices}: {', '.join(missing)} not present ({count} CUDA device(s))"
    return None


def _check_knobs(args: argparse.Namespace) -> None:
    """``ValueError`` (one line naming the valid knobs) for an unknown or mistyped policy knob."""
    from diptych.policies import ADMISSION_POLICIES, BATCH_POLICIES, POOL_POLICIES
    from diptych.services.common.cli import parse_knobs

    for registry, name, items in ((ADMISSION_POLICIES, args.admission, args.admission_opt),
                                  (BATCH_POLICIES, args.policy, args.policy_opt),
                                  (POOL_POLICIES, args.pool_policy, args.pool_opt)):
        try:
            registry.check(name, parse_knobs(items))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
