"""``covalent-lot`` command line: doctor, ls, cp, rm, gc.

Every command goes through the same strategies and engine as workflows do, so
checksums, atomic local files, retries and the error table hold here too. The
helpers that decide things (age parsing, gc selection, listing format) are
plain functions over :class:`RemoteObject` lists so they can be tested without
a store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterator, Sequence

from . import __version__
from ._cli_shared import human_size, open_strategy

__all__ = ["main", "parse_age", "select_garbage", "GcPlan", "format_listing", "human_size"]

MiB = 1024 * 1024
BAR_THRESHOLD = 8 * MiB  # smaller transfers finish before a bar would help
PROG = "covalent-lot"


class UsageError(Exception):
    """A command line that is valid syntax but refused (exit 2, like argparse)."""


# --- pure helpers --------------------------------------------------------------------------

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``'7d'``, ``'12h'``, ``'30m'``, ``'90s'``, ``'2w'`` -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"not an age: {text!r} (use a number and a unit: 90s, 30m, 12h, 7d, 2w)"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]


def parse_option(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of ``-o``; the strategy parses and checks the value."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def format_time(modified: float | None, long: bool = False) -> str:
    if modified is None:
        return "-"
    stamp = datetime.fromtimestamp(modified).astimezone()
    return stamp.isoformat(timespec="seconds") if long else stamp.strftime("%Y-%m-%d %H:%M")


def format_listing(objects: Sequence[Any], base: str = "", long: bool = False) -> list[str]:
    """Rows of size, modified, stored checksum (``crc32c:<8 hex>``, a sha256 cut
    short, or '-' when none is stored) and key.

    Keys are shown below ``base`` (the listed folder's key); ``long`` shows exact
    sizes, seconds and time zone, the whole checksum and the full URI.
    """
    rows = [("SIZE", "MODIFIED", "CHECKSUM", "URI" if long else "KEY")]
    for obj in objects:
        key = obj.location.key
        rows.append((
            str(obj.size) if long else human_size(obj.size),
            format_time(obj.modified, long),
            (str(obj.checksum) if long else str(obj.checksum)[:19]) if obj.checksum else "-",
            str(obj.location) if long else (key[len(base):] if key.startswith(base) and key != base else key),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
    total = sum(obj.size for obj in objects)
    lines.append(f"{len(objects)} object(s), {human_size(total)}")
    return lines


def object_record(obj: Any) -> dict[str, Any]:
    """One object for ``--json``."""
    return {"uri": str(obj.location), "key": obj.location.key, "size": obj.size,
            "modified": obj.modified, "checksum": str(obj.checksum) if obj.checksum else None,
            "sha256": obj.sha256, "version": obj.version}


@dataclass
class GcPlan:
    """What ``gc`` would remove from one listing."""

    selected: list
    listed: int
    unknown_age: int = 0  # objects kept because the service gave no modification time

    @property
    def bytes(self) -> int:
        return sum(obj.size for obj in self.selected)


def select_garbage(objects: Sequence[Any], *, dispatch_id: str | None = None,
                   older_than: float | None = None, now: float | None = None) -> GcPlan:
    """The objects that have ``dispatch_id`` as a key segment AND are older than ``older_than`` s.

    Either condition may be left out, not both (that would select everything).
    An object with no known modification time is never old enough.
    """
    if dispatch_id is None and older_than is None:
        raise ValueError("select_garbage needs dispatch_id or older_than (or both)")
    now = time.time() if now is None else now
    selected, unknown = [], 0
    for obj in objects:
        if dispatch_id is not None and dispatch_id not in obj.location.key.split("/"):
            continue
        if older_than is not None:
            if obj.modified is None:
                unknown += 1
                continue
            if now - obj.modified < older_than:
                continue
        selected.append(obj)
    return GcPlan(selected, len(objects), unknown)


def stats_record(stats: Any) -> dict[str, Any]:
    """TransferStats for ``--json``."""
    record = dataclasses.asdict(stats)
    return {**record, "seconds": round(stats.seconds, 3), "mib_per_s": round(stats.mib_per_s, 3)}


def describe(stats: Any) -> str:
    """One line for a finished command."""
    if stats.action == "delete":
        return (f"removed {stats.files} object(s), {human_size(stats.bytes)} from "
                f"{stats.source} in {stats.seconds:.2f} s")
    return stats.summary()


def is_uri(text: str) -> bool:
    return "://" in text


# --- shared plumbing -----------------------------------------------------------------------


def each_with_engine(strategy, items: Sequence[Any], fn: Callable[[Any, Any], Any]) -> list:
    """``fn(engine, item)`` for each item through one engine (one client), as many at once
    as the backend allows in a folder transfer (``file_concurrency``: 1 for paramiko's SFTP)."""
    from ._pool import run_bounded
    from ._strategy import build_engine

    if not items:
        return []
    engine = build_engine(strategy.backend_path, strategy.settings.as_dict())
    try:
        return run_bounded(items, lambda item: fn(engine, item), engine.backend.file_concurrency(),
                           name="covalent-lot-cli")
    finally:
        engine.backend.close()


def with_checksum(engine, obj: Any) -> Any:
    """The object as its own metadata describes it: listings of some services omit the checksum."""
    if obj.checksum is not None or obj.location.is_folder:
        return obj
    try:
        return engine.ls(obj.location)[0]
    except FileNotFoundError:
        return obj


def emit(args: argparse.Namespace, record: Any, text: Callable[[], Any]) -> None:
    """``record`` as JSON with ``--json``; else the lines of ``text()`` unless ``--quiet``."""
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    elif not args.quiet:
        lines = text()
        print("\n".join(lines) if isinstance(lines, list) else lines)


def wants_bar(args: argparse.Namespace) -> bool:
    return not (args.quiet or args.json) and sys.stdout.isatty()


@contextlib.contextmanager
def progress_bar(total: int | None, description: str) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar for transfers over BAR_THRESHOLD; yields its ``progress`` callback."""
    if total is None or total <= BAR_THRESHOLD:
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda nbytes: bar.advance(task, nbytes)  # Progress locks: any thread


def local_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def download_target(source: str, destination: str) -> str:
    """Like cp: an object copied into an existing folder (or a path ending in /) keeps its name."""
    into_folder = destination.endswith(("/", os.sep)) or os.path.isdir(destination)
    if into_folder and not source.endswith("/"):
        return os.path.join(os.path.abspath(destination), source.rstrip("/").rsplit("/", 1)[-1])
    return os.path.abspath(destination)


# --- commands ------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    strategy = open_strategy(args, args.uri)
    objects = strategy.ls(args.uri)
    if args.long:
        objects = each_with_engine(strategy, objects, with_checksum)
    base = strategy.parse(args.uri).key if args.uri.endswith("/") else ""
    emit(args, [object_record(o) for o in objects], lambda: format_listing(objects, base, args.long))
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    source, destination = args.source, args.destination
    if not (is_uri(source) or is_uri(destination)):
        raise UsageError("one of SOURCE and DESTINATION must be a storage URI (e.g. s3://bucket/key)")
    if is_uri(source) and is_uri(destination) and \
            source.split("://")[0].lower() != destination.split("://")[0].lower():
        raise UsageError(
            "a copy between two services is not server-side: download it first "
            f"(cp {source} LOCAL), then upload (cp LOCAL {destination})"
        )
    strategy = open_strategy(args, source if is_uri(source) else destination)
    if is_uri(source) and is_uri(destination):
        action, transfer = "copy", lambda progress: strategy.copy(source, destination, progress=progress)
    elif is_uri(source):
        target = download_target(source, destination)
        action, transfer = "download", lambda progress: strategy.get(source, target, progress=progress)
    else:
        action, transfer = "upload", lambda progress: strategy.put(os.path.abspath(source), destination,
                                                             progress=progress)
    total = None
    if wants_bar(args):  # one listing more, only for a person watching
        total = sum(o.size for o in strategy.ls(source)) if is_uri(source) else local_size(source)
    with progress_bar(total, f"{action} {os.path.basename(source.rstrip('/'))}") as progress:
        stats = transfer(progress)
    emit(args, stats_record(stats), lambda: describe(stats))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    if args.uri.endswith("/") and not args.recursive:
        raise UsageError(
            f"{args.uri} is a folder: removing it removes every object below it; "
            "add --recursive (-r) if that is what you want"
        )
    stats = open_strategy(args, args.uri).rm(args.uri)
    emit(args, stats_record(stats), lambda: describe(stats))
    return 0


def cmd_gc_local(args: argparse.Namespace) -> int:
    from ._cache import trim
    from ._strategy import staging_dirs_here

    if args.prefix is not None or args.dispatch is not None or args.older_than is not None:
        raise UsageError("gc --local empties this machine's staging folder; it takes no PREFIX, "
                         "--dispatch or --older-than (run gc on a store separately)")
    records, lines = [], []
    for root in staging_dirs_here():
        if args.dry_run:
            from ._cache import TrimReport

            report = TrimReport(os.path.abspath(root), 0)
        else:
            report = trim(root, 0, everything=True) if os.path.isdir(root) else None
        if report is None:
            lines.append(f"gc --local {root}: nothing there")
            continue
        records.append({"staging_dir": report.root, "files": report.evicted,
                        "bytes": report.evicted_bytes, "partials": report.stale_partials,
                        "held": report.held_skipped, "left_bytes": report.size_after,
                        "dry_run": args.dry_run})
        if args.dry_run:
            lines.append(f"gc --local {root}: dry run, nothing removed")
        else:
            lines.append(f"gc --local {report.root}: removed {report.evicted} verified copies "
                         f"({human_size(report.evicted_bytes)}) and {report.stale_partials} abandoned "
                         f"partial(s); kept {human_size(report.size_after)} (files in use, or not "
                         f"copies of stored objects)")
    emit(args, {"local": records}, lambda: lines)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    if args.local:
        return cmd_gc_local(args)
    if args.prefix is None:
        raise UsageError("gc needs a PREFIX (a folder URI such as s3://bucket/runs/), or --local")
    if args.dispatch is None and args.older_than is None:
        raise UsageError(
            "gc needs --dispatch ID and/or --older-than AGE: without either it would remove "
            "everything below the prefix (use rm --recursive for that)"
        )
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    strategy = open_strategy(args, prefix)
    plan = select_garbage(strategy.ls(prefix), dispatch_id=args.dispatch, older_than=args.older_than)
    started = time.perf_counter()
    if not args.dry_run and plan.selected:
        from ._strategy import build_engine

        engine = build_engine(strategy.backend_path, strategy.settings.as_dict())
        try:
            engine.remove(plan.selected, prefix)
        finally:
            engine.backend.close()
    seconds = time.perf_counter() - started
    record = {"prefix": prefix, "dry_run": args.dry_run, "listed": plan.listed,
              "unknown_age": plan.unknown_age, "files": len(plan.selected), "bytes": plan.bytes,
              "seconds": round(seconds, 3), "objects": [object_record(o) for o in plan.selected]}
    base = strategy.parse(prefix).key
    emit(args, record, lambda: gc_report(plan, base, prefix, args.dry_run, seconds))
    return 0


def gc_report(plan: GcPlan, base: str, prefix: str, dry_run: bool, seconds: float) -> list[str]:
    lines = format_listing(plan.selected, base)[:-1] if dry_run and plan.selected else []
    verb = "would remove" if dry_run else "removed"
    line = (f"gc {prefix}: {verb} {len(plan.selected)} of {plan.listed} object(s), "
            f"{human_size(plan.bytes)}")
    lines.append(line + (" (dry run: nothing removed)" if dry_run else f" in {seconds:.2f} s"))
    if plan.unknown_age:
        lines.append(f"kept {plan.unknown_age} object(s) whose modification time the service did not give")
    return lines


def cmd_doctor(args: argparse.Namespace) -> int:
    from ._cli_doctor import doctor

    return doctor(args)


# --- parser --------------------------------------------------------------------------------

EXAMPLES = {
    "doctor": """\
examples:
  covalent-lot doctor                         settings, SDKs and credentials of every backend
  covalent-lot doctor s3://my-bucket/runs/    ... and a write/read/delete round trip there
  covalent-lot doctor --store minio s3://scratch/tmp/
  covalent-lot doctor --json > doctor.json

Exit status 0 when all is well; otherwise 1, with one line per problem on stderr:
  PROBLEM s3: ...""",
    "ls": """\
examples:
  covalent-lot ls s3://my-bucket/runs/        everything below the folder, recursively
  covalent-lot ls -l gs://my-bucket/x.npy     exact size, time zone, full checksum and URI
  covalent-lot ls --json az://container/runs/ | jq '.[].size'

SHA256 is the checksum covalent-lot stored with the object ('-': none stored, or
the listing does not return it; ls -l asks for each object).""",
    "cp": """\
examples:
  covalent-lot cp ./data.npy s3://my-bucket/runs/data.npy      upload a file
  covalent-lot cp ./features/ s3://my-bucket/runs/features/    upload a folder
  covalent-lot cp s3://my-bucket/runs/data.npy ./              download into a folder
  covalent-lot cp sftp://hpc/scratch/out/ ./out/               download a folder
  covalent-lot cp s3://bkt/a/ s3://bkt/b/                      server-side copy

Folders are URIs ending in '/'. Downloads are checked against the stored
checksum (crc32c or sha256) and appear atomically; a progress bar shows on a terminal above 8 MiB.""",
    "rm": """\
examples:
  covalent-lot rm s3://my-bucket/runs/data.npy
  covalent-lot rm --recursive s3://my-bucket/runs/old/    everything below the folder""",
    "gc": """\
examples:
  covalent-lot gc s3://my-bucket/runs/ --dispatch 3f2a9c1e-... --dry-run
  covalent-lot gc s3://my-bucket/runs/ --dispatch 3f2a9c1e-...
  covalent-lot gc s3://my-bucket/runs/ --older-than 7d        also 12h, 30m, 90s, 2w
  covalent-lot gc s3://my-bucket/runs/ --dispatch ID --older-than 1d   (both must hold)
  covalent-lot gc --local        empty this machine's staging folder (the local cache)

covalent-lot URIs use {dispatch_id} as a key segment (runs/{dispatch_id}/x.npy),
so --dispatch removes one dispatch's intermediates. --older-than goes by the
modification time the service reports.""",
}


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--store", metavar="NAME",
                       help="named store: the options of [lot.<backend>.stores.NAME] in covalent.conf")
    group.add_argument("-o", "--option", metavar="NAME=VALUE", type=parse_option, action="append",
                       help="a strategy option, e.g. -o endpoint_url=http://127.0.0.1:9000 (repeatable)")
    group.add_argument("-q", "--quiet", action="store_true", help="no output but errors")
    group.add_argument("--json", action="store_true", help="machine-readable output (wins over -q)")
    group.add_argument("--debug", action="store_true", help="tracebacks and DEBUG logs")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Large object transfer between Covalent electrons: check the setup, "
                    "and list, copy, remove and clean up stored objects.",
        epilog="Run 'covalent-lot COMMAND --help' for the examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                           epilog=EXAMPLES[name], parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func, command_parser=p)
        return p

    p = command("doctor", cmd_doctor, "check settings, SDKs, credentials and (given STOREs) reachability")
    p.add_argument("stores", nargs="*", metavar="STORE", help="folder URI to test with a round trip")
    p.add_argument("-a", "--all", action="store_true", help="show options at their defaults too")
    p = command("ls", cmd_ls, "list the objects below a folder URI (recursively), or one object")
    p.add_argument("uri", metavar="URI", help="a folder URI (ending in '/') or an object URI")
    p.add_argument("-l", "--long", action="store_true", help="exact sizes and times, full checksum and URI")
    p = command("cp", cmd_cp, "copy between local disk and a store, or within a store (server side)")
    p.add_argument("source", metavar="SOURCE", help="local path or URI (a folder: ending in '/')")
    p.add_argument("destination", metavar="DESTINATION", help="local path or URI")
    p = command("rm", cmd_rm, "remove an object, or with --recursive everything below a folder URI")
    p.add_argument("uri", metavar="URI", help="an object URI, or with --recursive a folder URI")
    p.add_argument("-r", "--recursive", action="store_true", help="remove a folder URI's objects")
    p = command("gc", cmd_gc, "remove the intermediates dispatches left below a prefix")
    p.add_argument("prefix", metavar="PREFIX", nargs="?",
                   help="folder URI to clean up below, e.g. s3://bucket/runs/")
    p.add_argument("--local", action="store_true",
                   help="instead: empty this machine's staging folder (verified copies no one holds)")
    p.add_argument("--dispatch", metavar="ID", help="objects whose key has ID as a path segment")
    p.add_argument("--older-than", metavar="AGE", type=parse_age,
                   help="objects last modified longer ago than AGE (90s, 30m, 12h, 7d, 2w)")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would go, remove nothing")
    return parser


@contextlib.contextmanager
def cli_logging(args: argparse.Namespace) -> Iterator[None]:
    """covalent_lot's warnings (retries) on stderr; DEBUG with --debug; only errors with --quiet.

    doctor reports what failed in its own words, so its retries are not shown either.
    """
    logger = logging.getLogger("covalent_lot")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    saved = logger.level
    quiet = args.quiet or args.command == "doctor"
    logger.setLevel(logging.DEBUG if args.debug else logging.ERROR if quiet else logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Usage errors raise SystemExit(2) as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    with cli_logging(args):
        try:
            return args.func(args)
        except UsageError as exc:
            args.command_parser.error(str(exc))  # usage, the message, exit status 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            if args.debug:
                traceback.print_exc()
            message = " ".join(str(exc).split()) or "(no message)"
            print(f"{PROG}: {type(exc).__name__}: {message}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
