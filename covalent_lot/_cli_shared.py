"""What the ``covalent-lot`` commands share: the strategy a command line names,
and sizes for people. The doctor (``_cli_doctor``) and the other commands
(``cli``) both build on it, so neither imports the other back."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["human_size", "open_strategy"]


def human_size(size: int) -> str:
    """Bytes as B/KiB/MiB/GiB/TiB with one decimal."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def open_strategy(args: argparse.Namespace, uri: str, **overrides: Any):
    """The strategy for ``uri``'s scheme with ``-o`` options, ``--store`` and ``overrides``."""
    from ._strategy import strategy_for

    options: dict[str, Any] = {**dict(args.option or ()), "store": args.store, **overrides}
    if options["store"] is None:
        del options["store"]
    return strategy_for(uri, **options)
