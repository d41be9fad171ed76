"""``diptych experiment NAME``: run a named experiment on the simulator and write its figures and report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from diptych.experiments import experiments
    from diptych.experiments.common import default_jobs

    p = sub.add_parser("experiment", help="run a named experiment (figures and tables into docs/experiments)",
                       description="Run a named experiment on the simulator; each writes PNG figures and a "
                                   "markdown report into --out-dir.")
    names = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for name, module in experiments().items():
        e = names.add_parser(name, help=module.HELP, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        e.set_defaults(run=run, module=module)
        e.add_argument("--out-dir", default="docs/experiments", help="where figures and the report go [%(default)s]")
        e.add_argument("--quick", action="store_true", help="a small, fast version (for checks, not for the docs)")
        e.add_argument("--jobs", type=int, default=default_jobs(), help="parallel simulations [%(default)s]")
        e.add_argument("--no-progress", action="store_true", help="no progress bars")
        module.add_arguments(e)


def run(args: argparse.Namespace) -> int:
    module = args.module
    if args.jobs < 1:
        print("diptych experiment: --jobs must be >= 1", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"diptych experiment: cannot create {out_dir}: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        files = module.run(args, out_dir)
    except ValueError as exc:
        print(f"diptych experiment {module.NAME}: {exc}", file=sys.stderr)
        return 2
    print(f"{module.NAME}: done in {time.perf_counter() - started:.0f} s; wrote")
    for path in files:
        print(f"  {path}")
    return 0
