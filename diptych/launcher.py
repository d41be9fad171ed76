"""Start a whole Diptych cluster on one machine: coordinator, prefill workers, decode workers and the frontend, each
its own process (the same ``python -m diptych.services.<role>`` commands docker-compose runs).

``Cluster`` is used by ``diptych serve`` and by the integration tests. Invariants: ``stop()`` leaves no child
process behind (SIGTERM, then SIGKILL after ``grace_s``); ``wait()`` supervises: a child that exits while the
cluster runs is restarted with the same command after a backoff (``diptych.supervision.RestartPolicy``, logged to
stderr), and ``wait()`` returns (the caller stops the rest) only when a child keeps dying at start.
CURVE is on unless ``insecure_no_curve``: every process gets ``--keys-dir``, the
spec's ``keys_dir`` or else an ephemeral key set (one name per process) written to a temporary directory when the
commands are first built and removed by ``stop()``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from diptych.supervision import RestartPolicy

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""Fraction of each GPU the workers on it fill together (weights, activations, KV pools), divided between them."""


@dataclass
class ClusterSpec:
    """Ports are TCP ports on ``host``; the decode, colocated and flex workers take ``kv_base_port``,
    ``kv_base_port + 1``, ... in that order."""

    model: str | None = None
    prefill_workers: int = 1
    decode_workers: int = 1
    colocated_workers: int = 0
    flex_workers: int = 0
    host: str = "127.0.0.1"
    http_port: int = 8000
    coordinator_port: int = 5600
    sdk_port: int = 5601
    stream_port: int = 5602
    kv_base_port: int = 5610
    admission: str = "fcfs"
    admission_opts: list[str] = field(default_factory=list)
    policy: str = "sarathi"
    policy_opts: list[str] = field(default_factory=list)
    pool_policy: str = "static"
    pool_opts: list[str] = field(default_factory=list)
    device: str = "cpu"
    """One device for every worker, or a comma-separated list given to the workers in turn, in launch order
    (prefill, decode, colocated, flex): ``cuda:0,cuda:1`` puts one prefill and one decode worker on two GPUs."""
    engine: str = "hf"
    cost_model: str | None = None
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_gb: float | None = None
    """KV pool GiB per worker; None: ``gpu_memory_utilization`` of the GPU on CUDA, 0.25 GiB on CPU."""
    gpu_memory_utilization: float | None = None
    """Fraction of each GPU that the workers on it fill together (weights, activations, KV pools), divided evenly
    between them; None: ``DEFAULT_GPU_MEMORY_UTILIZATION``."""
    api_keys_file: str | None = None
    admin_keys_file: str | None = None
    slo_tiers_file: str | None = None
    ssl_certfile: str | None = None
    """With it the HTTP API is HTTPS (``ssl_keyfile``: its key, if not in the same file)."""
    ssl_keyfile: str | None = None
    log_level: str = "INFO"
    keys_dir: str | None = None
    """A CURVE key set holding every process's name (``worker_names``); None: an ephemeral one per run."""
    insecure_no_curve: bool = False
    """Plaintext internal sockets, no identity checks (every process gets ``--insecure-no-curve``)."""
    log_format: str = "text"
    """"text" or "json" (one JSON object per line) for every process."""
    extra_worker_args: list[str] = field(default_factory=list)
    extra_frontend_args: list[str] = field(default_factory=list)
    extra_coordinator_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        counts = (self.prefill_workers, self.decode_workers, self.colocated_workers, self.flex_workers)
        if min(counts) < 0:
            raise ValueError("worker counts cannot be negative")
        disaggregated = self.prefill_workers + self.flex_workers >= 1 and self.decode_workers + self.flex_workers >= 1
        if self.colocated_workers == 0 and not (disaggregated and sum(counts) >= 2):
            raise ValueError("a cluster needs a colocated worker, or workers for both prefill and decode "
                             "(prefill + flex >= 1, decode + flex >= 1, at least two in all)")

    @property
    def num_workers(self) -> int:
        return self.prefill_workers + self.decode_workers + self.colocated_workers + self.flex_workers

    def addr(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.ssl_certfile else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def sdk_addr(self) -> str:
        return self.addr(self.sdk_port)

    def worker_names(self) -> list[str]:
        """Every worker's id (and CURVE key name), in launch order."""
        return [*(f"prefill-{i}" for i in range(self.prefill_workers)), *self.kv_addrs()]

    def kv_addrs(self) -> dict[str, str]:
        """Worker name -> the KV address it binds, for the decode, colocated and flex workers in launch order."""
        names = [f"{role}-{i}" for role, count in (("decode", self.decode_workers),
                                                    ("colocated", self.colocated_workers),
                                                    ("flex", self.flex_workers)) for i in range(count)]
        return {name: self.addr(self.kv_base_port + i) for i, name in enumerate(names)}

    def bound_addresses(self) -> list[tuple[str, str]]:
        """Every address a process of this cluster listens on, as (what, address): each binds exactly its host."""
        return [("OpenAI API", f"{self.http_url}/v1"), ("SDK", self.sdk_addr),
                ("coordinator", self.addr(self.coordinator_port)), ("token stream", self.addr(self.stream_port)),
                *((f"KV {name}", addr) for name, addr in self.kv_addrs().items())]


class Cluster:
    def __init__(self, spec: ClusterSpec, *, log_dir: str | None = None) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        """When each child was last started (``time.time()``)."""
        self.restarts: list[tuple[float, str, int]] = []
        """(time, name, exit status) of every restart ``wait()`` made."""
        self._logs: list = []
        self._launch_args: dict[str, tuple[list[str], dict[str, str], Any]] = {}
        self._stopping = False
        self._ephemeral_keys: str | None = None
        """The temporary directory of the key set made for this run, removed by ``stop``."""

    # ------------------------------------------------------------------ commands

    def commands(self) -> dict[str, list[str]]:
        s = self.spec
        py = [sys.executable, "-m"]
        coordinator = s.addr(s.coordinator_port)
        model = ["--model", s.model] if s.model else []
        curve = self.curve_args()
        worker_common = [*curve,
            "--coordinator-addr", coordinator, *model, "--block-size", str(s.block_size),
            "--policy", s.policy, "--log-level", s.log_level, *_opts("--policy-opt", s.policy_opts),
            *(["--num-blocks", str(s.num_blocks)] if s.num_blocks else []), "--engine", s.engine,
            *(["--kv-memory-gb", str(s.kv_memory_gb)] if s.kv_memory_gb else []),
            *(["--cost-model", s.cost_model] if s.cost_model else []), *s.extra_worker_args,
        ]
        cmds = {"coordinator": [*py, "diptych.services.coordinator", *curve, "--address", coordinator,
                                "--admission", s.admission, *_opts("--admission-opt", s.admission_opts),
                                "--pool-policy", s.pool_policy,
                                *_opts("--pool-opt", s.pool_opts), "--log-level", s.log_level,
                                *s.extra_coordinator_args]}
        devices = [d.strip() for d in s.device.split(",")]
        assigned = [devices[i % len(devices)] for i in range(s.num_workers)]
        sharing = Counter(_gpu(d) for d in assigned)
        utilization = s.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION

        def device() -> list[str]:
            """The next worker's device flags: on a GPU, its share of the memory of the GPU it shares."""
            chosen = assigned[sum(1 for name in cmds if name != "coordinator")]
            gpu = _gpu(chosen)
            if gpu is None:
                return ["--device", chosen]
            return ["--device", chosen, "--gpu-memory-utilization", f"{utilization / sharing[gpu]:.4f}"]

        for i in range(s.prefill_workers):
            cmds[f"prefill-{i}"] = [*py, "diptych.services.prefill_worker", "--worker-id", f"prefill-{i}", *device(),
                                    *worker_common]
        for name, kv_addr in s.kv_addrs().items():
            cmds[name] = [*py, "diptych.services.decode_worker", "--worker-id", name, "--role", name.split("-")[0],
                          "--kv-addr", kv_addr, *device(), *worker_common]
        cmds["frontend"] = [
            *py, "diptych.services.frontend", *curve, *model, "--host", s.host, "--http-port", str(s.http_port),
            "--sdk-addr", s.sdk_addr, "--stream-addr", s.addr(s.stream_port), "--coordinator-addr", coordinator,
            "--log-level", s.log_level, *(["--api-keys-file", s.api_keys_file] if s.api_keys_file else []),
            *(["--admin-keys", s.admin_keys_file] if s.admin_keys_file else []),
            *(["--ssl-certfile", s.ssl_certfile] if s.ssl_certfile else []),
            *(["--ssl-keyfile", s.ssl_keyfile] if s.ssl_keyfile else []),
            *(["--slo-tiers", s.slo_tiers_file] if s.slo_tiers_file else []),
            *(["--max-model-len", str(_sim_context_len())] if s.engine == "sim" else []),
            *s.extra_frontend_args,
        ]
        return cmds

    def curve_args(self) -> list[str]:
        """The CURVE flags every process gets (the ephemeral key set is written on the first call)."""
        if self.spec.insecure_no_curve:
            return ["--insecure-no-curve"]
        if self.spec.keys_dir:
            return ["--keys-dir", self.spec.keys_dir]
        if self._ephemeral_keys is None:
            from diptych.services.common.security import generate_key_set

            self._ephemeral_keys = tempfile.mkdtemp(prefix="diptych-keys-")
            generate_key_set(self._ephemeral_keys, ["coordinator", "frontend", *self.spec.worker_names()])
        return ["--keys-dir", self._ephemeral_keys]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start every process. ``PortInUseError`` (nothing started, no model loaded) if a port is taken."""
        check_ports_free(self.spec)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIPTYCH_LOG_FORMAT": self.spec.log_format}
        if self.spec.model is None:  # build the tiny default model once, before four processes race for it
            from diptych.engine.tiny_model import default_model_path

            default_model_path()
        for name, cmd in self.commands().items():
            out = None
            if self.log_dir:
                os.makedirs(self.log_dir, exist_ok=True)
                out = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115 (open while it runs)
                self._logs.append(out)
            self._launch_args[name] = (cmd, env, out)
            self._launch(name)

    def _launch(self, name: str) -> None:
        cmd, env, out = self._launch_args[name]
        self.started_at[name] = time.time()
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Block until the frontend's /health reports every worker registered; raise if a process dies first."""
        deadline = time.time() + timeout_s
        last = None
        probe = _own_frontend_tls() if self.spec.ssl_certfile else None
        while time.time() < deadline:
            dead = self.dead()
            if dead:
                raise RuntimeError(f"cluster processes exited during startup: {dead}")
            try:
                with urllib.request.urlopen(self.spec.http_url + "/health", timeout=2, context=probe) as resp:
                    last = json.loads(resp.read())
                registered = sum(last.get(k) or 0 for k in ("prefill_workers", "decode_workers", "colocated_workers"))
                if registered == self.spec.num_workers:
                    return last
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"cluster not ready after {timeout_s:.0f} s (last health: {last})")

    def dead(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def wait(self, policy: RestartPolicy | None = None) -> dict[str, int]:
        """Supervise until a child keeps dying at start (``policy``; default ``RestartPolicy()``): restart each
        child that exits, after its backoff. Returns the children given up on, with their exit statuses ({} once
        ``stop`` was called)."""
        policy = policy if policy is not None else RestartPolicy()
        due: dict[str, float] = {}
        while not self._stopping:
            now = time.time()
            for name, status in self.dead().items():
                if name in due:
                    continue
                delay = policy.on_exit(name, self.started_at[name], now)
                if delay is None:
                    print(f"diptych: {name} exited with status {status} and keeps dying at start; giving up",
                          file=sys.stderr, flush=True)
                    return {name: status}
                print(f"diptych: {name} exited with status {status}; restarting it in {delay:g} s",
                      file=sys.stderr, flush=True)
                self.restarts.append((now, name, status))
                due[name] = now + delay
            for name, at in list(due.items()):
                if now >= at:
                    del due[name]
                    self._launch(name)
            time.sleep(0.2)
        return {}

    def stop(self, grace_s: float = 10.0) -> None:
        self._stopping = True  # a supervising ``wait()`` (on another thread) returns and restarts nothing more
        # frontend first (stops taking requests), then workers, coordinator last
        order = ["frontend", *[n for n in self.procs if "-" in n], "coordinator"]
        for name in order:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._ephemeral_keys is not None:
            shutil.rmtree(self._ephemeral_keys, ignore_errors=True)
            self._ephemeral_keys = None

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PortInUseError(RuntimeError):
    """A port the cluster would listen on is taken; the message names it."""


def check_ports_free(spec: ClusterSpec) -> None:
    """Raise ``PortInUseError`` naming the first of the cluster's ports that cannot be bound on ``spec.host`` (bound
    as the services bind them, with ``SO_REUSEADDR``, so only a listener counts as taken, not a closing
    connection)."""
    for what, addr in spec.bound_addresses():
        port = int(addr.rsplit(":", 1)[1].split("/", 1)[0])
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((spec.host, port))
                probe.listen(1)
            except OSError as exc:
                raise PortInUseError(f"port {port} on {spec.host} ({what}) is not available: {exc.strerror}; "
                                     "stop what uses it or choose another port") from None


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that ``base .. base+count-1`` on ``host`` were all free a moment ago."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count >= 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no block of free ports")


def with_free_ports(spec: ClusterSpec) -> ClusterSpec:
    """``spec`` with its HTTP, coordinator, SDK, stream and KV ports moved to a block of free ports."""
    base = free_port_block(5 + spec.num_workers, spec.host)
    return replace(spec, http_port=base, coordinator_port=base + 1, sdk_port=base + 2, stream_port=base + 3,
                   kv_base_port=base + 4)


def _own_frontend_tls() -> ssl.SSLContext:
    """TLS for the readiness probe of the frontend this launcher started: it sends no credentials and reads only
    worker counts, and the certificate may name a public host rather than ``host``, so it is not verified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _gpu(device: str) -> str | None:
    """The GPU a --device value names (``cuda`` is ``cuda:0``), None for the CPU."""
    if not device.startswith("cuda"):
        return None
    return device if ":" in device else "cuda:0"


def _opts(flag: str, values: list[str]) -> list[str]:
    return [part for value in values for part in (flag, value)]


def _sim_context_len() -> int:
    """The simulated engine's context length, which the frontend must allow too."""
    from diptych.engine.sim_engine import SIM_CONTEXT_LEN

    return SIM_CONTEXT_LEN
