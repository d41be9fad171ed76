"""``python -m services.frontend --help``: run the Diptych frontend."""

from __future__ import annotations

import sys

from services.common.lifecycle import run_service, setup_logging
from services.frontend.config import parse_config


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    setup_logging("frontend", config.log_level)
    from services.frontend.server import serve  # after argument parsing, so --help does not load transformers

    status = 0

    async def run(stop) -> None:
        nonlocal status
        status = await serve(config, stop)

    run_service(run)
    sys.exit(status)


if __name__ == "__main__":
    main()
