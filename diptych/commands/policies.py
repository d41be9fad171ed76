"""``diptych policies [NAME]``: the registered policies, or one policy's knobs (name, type, default, help)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "policies", help="list the admission, batch and pool policies, or one policy's knobs",
        description="Without NAME: every policy by family. With NAME: its knobs, set with --admission-opt, "
                    "--policy-opt (--prefill-opt/--decode-opt/--colocated-opt in 'diptych simulate') or --pool-opt "
                    "KEY=VALUE. A name in several families (rad: batch and pool) lists each.")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="a policy name [list all]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from diptych.policies import ADMISSION_POLICIES, BATCH_POLICIES, POOL_POLICIES
    from diptych.policies.registry import Registry

    families: list[tuple[str, Registry[Any]]] = [
        ("admission policies (--admission, --admission-opt)", ADMISSION_POLICIES),
        ("batch policies (--policy, --policy-opt)", BATCH_POLICIES),
        ("pool policies (--pool-policy, --pool-opt)", POOL_POLICIES),
    ]
    if args.name is None:
        print("\n\n".join(f"{title}:\n{registry.describe()}" for title, registry in families))
        print("\n'diptych policies NAME' lists a policy's knobs.")
        return 0
    found = [registry.describe_knobs(args.name) for _, registry in families if args.name in registry.names()]
    if not found:
        names = sorted({name for _, registry in families for name in registry.names()})
        print(f"diptych policies: unknown policy {args.name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    print("\n\n".join(found))
    return 0
