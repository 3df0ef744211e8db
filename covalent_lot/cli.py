"""``covalent-lot`` command line (grows into doctor/ls/cp/rm/gc in a later issue)."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="covalent-lot",
        description="Large object transfer between Covalent electrons.",
    )
    parser.add_argument("--version", action="version", version=f"covalent-lot {__version__}")
    sub = parser.add_subparsers(dest="command")
    cp = sub.add_parser("cp", help="copy a file or folder between local disk and a store now")
    cp.add_argument("source")
    cp.add_argument("destination")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from ._strategy import strategy_for

    try:
        if "://" in args.source and "://" not in args.destination:
            stats = strategy_for(args.source).get(args.source, args.destination)
        elif "://" in args.destination and "://" not in args.source:
            stats = strategy_for(args.destination).put(args.source, args.destination)
        elif "://" in args.source:
            stats = strategy_for(args.source).copy(args.source, args.destination)
        else:
            parser.error("one of SOURCE and DESTINATION must be a storage URI")
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as exc:
        print(f"covalent-lot: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(stats.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
