"""``python -m diptych.services.decode_worker``: run one decode worker (or, with ``--role``, a colocated or flex
worker)."""

import argparse

from diptych.proto.roles import WorkerRole
from diptych.services.common.cli import env_default
from diptych.services.worker.main import worker_main

ROLES = (WorkerRole.DECODE.value, WorkerRole.COLOCATED.value, WorkerRole.FLEX.value)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-addr", default=env_default("kv_addr", "tcp://127.0.0.1:5610"),
                        help="address of this worker's KV ingress socket, as prefill workers reach it [%(default)s]")
    parser.add_argument("--role", default=env_default("role", WorkerRole.DECODE.value), choices=ROLES,
                        help="decode: decode only; colocated: prefill and decode its own requests in the same "
                        "batches (no handoff); flex: serve the prefill or the decode pool as the coordinator's "
                        "pool policy assigns [%(default)s]")


def main(argv: list[str] | None = None) -> None:
    worker_main("decode", "Diptych decode worker: reserves KV blocks for incoming handoffs, decodes with continuous "
                "batching and streams tokens to the frontend. With --role colocated or flex it also prefills.",
                WorkerRole.DECODE, _arguments, argv=argv)


if __name__ == "__main__":
    main()
