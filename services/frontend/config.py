"""Frontend settings: command-line flags, each with a ``DIPTYCH_<NAME>`` environment fallback."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from diptych.services.common.cli import add_curve_arguments, env_default
from diptych.services.common.lifecycle import add_logging_arguments

BUILTIN_MODEL_NAME = "diptych-tiny"


@dataclass
class FrontendConfig:
    """Addresses are ZeroMQ endpoints; ``stream_addr`` is the token-stream address *as workers connect to it* (the
    frontend binds that interface; ``services.common.sockets.bind_address``). ``max_model_len`` (tokens) defaults to
    the model's ``max_position_embeddings``. ``request_timeout_s``: a request that receives no output for this long is
    cancelled and fails with 504. ``slo_tiers_file``: JSON tiers map (``services.frontend.identity`` describes both
    files). ``admin_keys_file``: operator API keys, one per line. ``ssl_certfile``/``ssl_keyfile``: PEM files; with
    them the HTTP API is HTTPS. ``keys_dir``: a CURVE key set (``services.common.security``); with it the coordinator
    link and the token stream use CURVE as ``key_name``; without it the frontend starts only with ``insecure_no_curve``
    (plaintext, no check of who sends tokens)."""

    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    sdk_addr: str = "tcp://127.0.0.1:5601"
    stream_addr: str = "tcp://127.0.0.1:5602"
    coordinator_addr: str = "tcp://127.0.0.1:5600"
    api_keys_file: str | None = None
    slo_tiers_file: str | None = None
    max_model_len: int | None = None
    request_timeout_s: float = 600.0
    log_level: str | None = None
    log_format: str = "text"
    admin_keys_file: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    keys_dir: str | None = None
    key_name: str = "frontend"
    insecure_no_curve: bool = False
    max_body_bytes: int = 16 << 20
    """Largest HTTP request body accepted; a larger one is a 413 before it is parsed."""

    def __post_init__(self) -> None:
        if self.served_model_name is None:
            self.served_model_name = BUILTIN_MODEL_NAME if self.model is None else self.model
        if not 0 <= self.http_port < 65536:
            raise ValueError("http_port must be in 0..65535")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError("max_model_len must be at least 2")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")

    @property
    def http_scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"


def build_parser() -> argparse.ArgumentParser:
    d = FrontendConfig()
    p = argparse.ArgumentParser(
        prog="python -m diptych.services.frontend",
        description="Diptych frontend: OpenAI-compatible HTTP API and SDK endpoint; tokenizes requests, submits them "
                    "to the coordinator and streams the workers' tokens back as text.",
    )
    p.add_argument("--model", default=env_default("model", "") or None,
                   help="model path or hub id (its tokenizer and config are loaded); default: the built-in tiny Llama")
    p.add_argument("--served-model-name", default=env_default("served_model_name", "") or None,
                   help=f"model name clients must send; default {BUILTIN_MODEL_NAME!r} for the built-in model, "
                        "else --model")
    p.add_argument("--host", default=env_default("host", d.host), help="HTTP bind host [%(default)s]")
    p.add_argument("--http-port", type=int, default=env_default("http_port", d.http_port),
                   help="HTTP port [%(default)s]")
    p.add_argument("--sdk-addr", default=env_default("sdk_addr", d.sdk_addr),
                   help="ZeroMQ address the SDK ROUTER socket binds [%(default)s]")
    p.add_argument("--stream-addr", default=env_default("stream_addr", d.stream_addr),
                   help="token-stream PULL address as workers connect to it; bound on that interface only "
                        "(tcp://0.0.0.0:PORT for all) [%(default)s]")
    p.add_argument("--coordinator-addr", default=env_default("coordinator_addr", d.coordinator_addr),
                   help="coordinator control socket [%(default)s]")
    p.add_argument("--api-keys-file", default=env_default("api_keys_file", "") or None,
                   help='JSON {"tiers": {...}, "clients": {"<key>": {"client_id": ..., "weight": ..., "tier": ...}}} '
                        '("tiers", "weight" and "tier" optional; a tier must be known). A client runs in its '
                        "key's tier; its requests may loosen the tier's targets, not tighten them. Without it every "
                        "request is client 'anonymous' and picks its own tier and targets")
    p.add_argument("--slo-tiers", default=env_default("slo_tiers", "") or None, metavar="FILE",
                   help='JSON {"<tier>": {"tbt_s": <s>, "ttft_s": <s>}, ...} (ttft_s optional): the SLO tiers, '
                        "replacing the built-in default (tbt 0.2 s), strict (0.1 s) and relaxed (0.5 s); 'default' "
                        "(0.2 s) is kept unless redefined. Alternatively put this map under \"tiers\" in the API "
                        "keys file (not both)"),
    p.add_argument("--max-model-len", type=int, default=env_default("max_model_len", 0) or None,
                   help="context length in tokens (prompt + output); default: the model's max_position_embeddings")
    p.add_argument("--max-body-bytes", type=int, default=env_default("max_body_bytes", d.max_body_bytes),
                   help="largest HTTP request body accepted, in bytes; larger ones get 413 [%(default)s]")
    p.add_argument("--request-timeout", type=float, default=env_default("request_timeout_s", d.request_timeout_s),
                   help="seconds without output before a request is cancelled with 504 [%(default)s]")
    p.add_argument("--admin-keys", default=env_default("admin_keys", "") or None, metavar="FILE",
                   help="operator API keys, one per line, for /admin/status (also \"admins\": [...] in the API keys "
                        "file). With any key configured, operator endpoints need one of these; client keys get 403")
    p.add_argument("--ssl-certfile", default=env_default("ssl_certfile", "") or None, metavar="PEM",
                   help="serve HTTPS with this certificate (chain) [plain HTTP]")
    p.add_argument("--ssl-keyfile", default=env_default("ssl_keyfile", "") or None, metavar="PEM",
                   help="private key of --ssl-certfile, if not in that file")
    add_curve_arguments(p, d.key_name)
    p.add_argument("--log-level", default=None, help="logging level [DIPTYCH_LOG_LEVEL or INFO]")
    add_logging_arguments(p)
    return p


def parse_config(argv: list[str] | None = None) -> FrontendConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return FrontendConfig(
            model=args.model, served_model_name=args.served_model_name, host=args.host, http_port=args.http_port,
            sdk_addr=args.sdk_addr, stream_addr=args.stream_addr, coordinator_addr=args.coordinator_addr,
            api_keys_file=args.api_keys_file, slo_tiers_file=args.slo_tiers, max_model_len=args.max_model_len,
            request_timeout_s=args.request_timeout, log_level=args.log_level, log_format=args.log_format,
            admin_keys_file=args.admin_keys,
            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
            keys_dir=None if args.insecure_no_curve else args.keys_dir, insecure_no_curve=args.insecure_no_curve,
            key_name=args.key_name, max_body_bytes=args.max_body_bytes,
        )
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2
