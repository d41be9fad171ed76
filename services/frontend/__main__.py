"""``python -m diptych.services.frontend --help``: run the Diptych frontend."""

from __future__ import annotations

import logging
import sys

from diptych.services.common.lifecycle import run_service, setup_logging
from diptych.services.frontend.config import parse_config
from diptych.services.frontend.identity import load_access


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    setup_logging("frontend", config.log_level, config.log_format)
    try:  # before importing the server, so a bad keys or tiers file fails in well under a second
        directory, slo_policy = load_access(config.api_keys_file, config.slo_tiers_file, config.admin_keys_file)
    except ValueError as exc:
        logging.getLogger(__name__).error("cannot start: %s", exc)
        sys.exit(1)
    from diptych.services.frontend.server import serve  # after argument parsing, so --help does not load transformers

    status = 0

    async def run(stop) -> None:
        nonlocal status
        status = await serve(config, directory, slo_policy, stop)

    run_service(run)
    sys.exit(status)


if __name__ == "__main__":
    main()
