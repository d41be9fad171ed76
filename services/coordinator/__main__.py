"""``python -m diptych.services.coordinator``: run the coordinator (admission, placement, worker liveness)."""

from __future__ import annotations

import argparse
import sys

from diptych.services.common.cli import check_curve_arguments
from diptych.services.common.lifecycle import add_logging_arguments, run_service, setup_logging
from diptych.services.common.security import load_keys
from diptych.services.coordinator import config as coordinator_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diptych coordinator",
        description="Diptych coordinator: queues requests, orders them across clients with the admission policy, "
        "places each by its expected KV footprint (--expected-output-tokens), has the decode worker reserve the "
        "prompt's KV (retrying while it has no room) and dispatches the prefill, and evicts workers that stop "
        "heartbeating.",
    )
    coordinator_config.add_arguments(parser)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING [INFO]")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    check_curve_arguments(parser, args)
    setup_logging("coordinator", args.log_level, args.log_format)
    try:
        config = coordinator_config.from_args(args)
        keys = load_keys(config.keys_dir, config.key_name)
    except (ValueError, KeyError) as exc:
        parser.error(str(exc))
    from diptych.services.coordinator.server import Coordinator

    async def serve(stop):
        await Coordinator(config, keys=keys).run(stop)

    run_service(serve)
    sys.exit(0)


if __name__ == "__main__":
    main()
