"""``diptych keys``: write and inspect the cluster's CURVE key set (``services.common.security`` has the layout)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from diptych.services.common.security import DEFAULT_NAMES

    p = sub.add_parser(
        "keys", help="generate or list the cluster's CURVE keys (one named key pair per process)",
        description="CURVE keys authenticate and encrypt the cluster's internal ZeroMQ sockets. A key set is a "
                    "directory: public/<name>.key for every process, private/<name>.key_secret (mode 0600) for "
                    "each; each process needs public/ and its own secret. See docs/security.md.")
    p.set_defaults(run=lambda args: p.print_help() or 2)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    gen = verbs.add_parser("generate", help="write key pairs (existing ones are kept, so this also adds names)")
    gen.add_argument("directory", metavar="DIR")
    gen.add_argument("names", nargs="*", metavar="NAME",
                     help=f"process names: coordinator, frontend and each worker id [{' '.join(DEFAULT_NAMES)}]")
    gen.add_argument("--workers", type=int, default=None, metavar="N",
                     help="also add prefill-0..N-1 and decode-0..N-1")
    gen.set_defaults(run=_generate)
    show = verbs.add_parser("list", help="print the names and public keys of a key set")
    show.add_argument("directory", metavar="DIR")
    show.set_defaults(run=_list)


def _generate(args: argparse.Namespace) -> int:
    from diptych.services.common.security import DEFAULT_NAMES, generate_key_set

    names = list(args.names or DEFAULT_NAMES)
    if args.workers:
        names += [f"{role}-{i}" for role in ("prefill", "decode") for i in range(args.workers)]
    try:
        keys = generate_key_set(args.directory, names)
    except (ValueError, OSError) as exc:
        print(f"diptych keys: {exc}", file=sys.stderr)
        return 1
    print(f"key set {args.directory}: {', '.join(keys.names())}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from diptych.services.common.security import KeySet

    try:
        keys = KeySet.load(args.directory)
    except (ValueError, OSError) as exc:
        print(f"diptych keys: {exc}", file=sys.stderr)
        return 1
    for name in keys.names():
        print(f"{name:<20} {keys.public_key(name).decode()}")
    return 0
