#!/usr/bin/env python
"""covalent-lot benchmark suite: `make bench` (full) or `make bench QUICK=1`.

Checks the targets of issue 16 in one run (report "## Targets"). Per backend
(s3, gcs, azure, sftp), on real servers started here on 127.0.0.1 through the
integration kits (SeaweedFS, fake-gcs-server, Azurite, OpenSSH sshd):

1. one file of each size (full: 512 MiB and 1 GiB), up and down: covalent-lot vs
   the plain SDK with the same settings (for SFTP: OpenSSH sftp with covalent-lot's
   cipher, aes128-gcm) vs Covalent's own strategy (for SFTP: Rsync, same cipher);
   MiB/s (median of --rounds after a warm-up), ratios to both, the child's peak
   RSS above its baseline after imports, sha256 of what arrived;
2. a folder of small files (full: 1000 x 64 KiB): covalent-lot folder put/get vs
   the SDK's per-file loop;
3. end to end through a private Covalent server (bench/e2e.py): by value,
   handoff and ``@lot.offload`` per backend, the local-path floor, and where the
   handoff's extra time over the floor goes (per-hook timings, COVALENT_LOT_TIMINGS).

Not part of `make bench` (their last results are kept in the report from
OUT/latest.json): the compression trade-off of ``@lot.offload``
(bench/compression.py; `make bench-compression`, i.e. ``--compression-only``, or
``--with-compression``) and the seed scenario across hosts (bench/remote.py;
`make bench-remote`, its own remote.md).

Every transfer runs in a fresh child process, one at a time (2-core machine).
Writes bench/results/latest.md, latest.json, throughput.png, e2e.png (and
compression.md/json/png when that part runs) and prints the markdown.

    python -m bench.suite [--quick] [--backends s3,gcs,azure,sftp] [--sizes 512,1024]
                          [--rounds N] [--small-files N] [--e2e-sizes 64,512] [--skip-e2e]
                          [--extra-tools sftp-default,scp,paramiko] [--with-compression]
                          [--compression-mib N] [--compression-rounds N]
                          [--e2e-only | --compression-only]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (python bench/suite.py) rather than with -m: the repository
    # root makes the packages bench and integration importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report, throughput  # noqa: E402
from integration import _kits, _servers  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

BACKENDS = tuple(_kits.KIT_CLASSES)
# Full mode: the sizes issue 16's targets name (512 MiB, 1 GiB), 3 rounds; about 40 min
# on the 2-core machine (s3 ~7, gcs ~12, azure ~9, sftp ~6 with their small files and
# probes, end to end ~6; the gcs uploads at 1 GiB, ~25 MiB/s into fake-gcs-server, dominate).
FULL = {"sizes": [512, 1024], "rounds": 3, "small_files": 1000, "e2e_sizes": [64, 512],
        "compression_mib": 256, "compression_rounds": 3}
QUICK = {"sizes": [16, 64], "rounds": 1, "small_files": 200, "e2e_sizes": [16, 64],
         "compression_mib": 64, "compression_rounds": 1}
SMALL_FILE_KIB = 64
SEAWEED_WARM_MIB = 512  # SeaweedFS's first ~512 MiB into a new bucket are slow


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def isolate_environment(work: Path) -> None:
    """Before anything imports covalent: a private HOME, no inherited covalent config."""
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(home)
    for var in [v for v in os.environ if v.startswith("COVALENT_") and not v.startswith("COVALENT_LOT_")]:
        del os.environ[var]
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_DIR"):
        os.environ.pop(var, None)


def make_kit(name: str):
    return _kits.kit_class(name)()


def write_ssh_config(kit, work: Path) -> Path:
    """Covalent's Rsync has no port or cipher option and ssh reads ~/.ssh/config from
    the passwd home, not $HOME: its children get an ``ssh`` first on PATH that adds
    ``-F`` with this run's port, known_hosts and covalent-lot's cipher (aes128-gcm,
    as the OpenSSH sftp row gets with -c). Returns that directory."""
    ssh_dir = work / "ssh"
    (ssh_dir / "bin").mkdir(parents=True, exist_ok=True)
    config = ssh_dir / "config"
    config.write_text(
        f"Host 127.0.0.1\n  Port {kit.server.port}\n  UserKnownHostsFile {kit.known_hosts}\n"
        "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        f"  IdentitiesOnly yes\n  Ciphers {throughput.SSH_CIPHER}\n"
    )
    config.chmod(0o600)
    wrapper = ssh_dir / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F "{config}" "$@"\n')
    wrapper.chmod(0o755)
    return ssh_dir / "bin"


def run_backend(name: str, args, work: Path, sources: dict, warm_file: Path | None) -> tuple[list, list, dict]:
    kit = make_kit(name)
    kit_dir = work / f"srv-{name}"
    scratch = work / f"scratch-{name}"
    scratch.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    started = time.monotonic()
    saved = {}
    try:
        kit.start(kit_dir)
        saved = _servers.apply_env(kit.env)
        settings = throughput.strategy_settings(kit.uri("settings-probe", "x"))
        info["settings"] = settings
        b = throughput.Backend(name, kit, settings, scratch)
        if name == "sftp":
            b.ssh_bin = write_ssh_config(kit, scratch)
        log(f"[{name}] server up in {time.monotonic() - started:.1f}s; {len(args.sizes)} sizes x "
            f"{args.rounds} round(s)")
        rows = throughput.measure_backend(b, args.sizes, sources, args.rounds, log, warm_file=warm_file,
                                          extra_tools=args.extra_tools)
        small = []
        if args.small_files > 0:
            small = throughput.measure_small_files(b, args.small_files, SMALL_FILE_KIB, args.rounds, log)
        info["probes"] = throughput.probe_correctness(b, log, extra_tools=args.extra_tools)
        info["seconds"] = time.monotonic() - started
        return rows, small, info
    finally:
        _servers.apply_env(saved)
        try:
            if getattr(kit, "server", None) is not None:  # a failed start stops its own server
                kit.stop()
        finally:
            shutil.rmtree(kit_dir, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)


def e2e_code() -> dict:
    """bench/e2e.py's count of the seed scenario's user code per workflow ({} if absent)."""
    try:
        from bench import e2e

        return e2e.user_code()
    except Exception:  # noqa: BLE001
        return {}


def run_e2e(sizes: list[int], backends: list[str], work: Path, quick: bool) -> tuple[list, str | None]:
    try:
        from bench import e2e

        return list(e2e.run(sizes, backends, work / "e2e", quick)), None
    except BaseException as exc:  # noqa: BLE001 - record and carry on (KeyboardInterrupt re-raised)
        if isinstance(exc, KeyboardInterrupt):
            raise
        log(traceback.format_exc())
        return [], f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(work / "e2e", ignore_errors=True)


def run_compression(args, backends: list[str], work: Path) -> tuple[dict, str | None]:
    """bench/compression.py on the backends it knows (s3, sftp) among ``backends``;
    writes compression.md/json/png into args.out. (result, error)."""
    try:
        from bench import compression

        chosen = [b for b in compression.BACKENDS if b in backends]
        if not chosen:
            return {}, f"none of its backends ({', '.join(compression.BACKENDS)}) selected"
        log(f"[compression] {args.compression_mib} MiB x {args.compression_rounds} round(s), backends {chosen}")
        result = compression.measure(args.compression_mib, args.compression_rounds, chosen, args.quick,
                                     work / "compression")
        compression.write(result, args.out)
        log(f"[compression] done in {result['run_seconds']:.0f}s")
        return result, None
    except BaseException as exc:  # noqa: BLE001 - record and carry on (KeyboardInterrupt re-raised)
        if isinstance(exc, KeyboardInterrupt):
            raise
        log(traceback.format_exc())
        return {}, f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(work / "compression", ignore_errors=True)


def _previous_part(out: Path, part: str) -> dict | None:
    """``part``'s results, the settings and the date of OUT/latest.json, or None."""
    import json

    try:
        previous = json.loads((out / "latest.json").read_text())
    except (OSError, ValueError):
        return None
    if not previous.get(part):
        return None
    return {part: previous[part], "settings": previous.get("settings", {}), "date": previous.get("date", "?")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 16,64; 200 small files; 1 round")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--sizes", type=_ints, help="MiB, comma-separated")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--small-files", type=int, help="files in the small-files folder (0: skip)")
    parser.add_argument("--e2e-sizes", type=_ints)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-only", action="store_true",
                        help="run only the end-to-end part; keep the other tables of OUT/latest.json")
    parser.add_argument("--extra-tools", default="",
                        help="tools no target needs, comma-separated: "
                             + ", ".join(t for ts in throughput.EXTRA_TOOLS.values() for t in ts))
    parser.add_argument("--with-compression", action="store_true",
                        help="also run the offload compression part (make bench-compression runs it alone)")
    parser.add_argument("--skip-compression", action="store_true",
                        help="the default now (kept so that older command lines still run)")
    parser.add_argument("--compression-only", action="store_true",
                        help="run only the offload compression part; keep the other tables of OUT/latest.json")
    parser.add_argument("--compression-mib", type=int, help="payload size (full 256, quick 64)")
    parser.add_argument("--compression-rounds", type=int, help="rounds (full 3, quick 1)")
    parser.add_argument("--warm-mib", type=int, help=f"S3 warm-up write (default max(largest size, "
                                                     f"{SEAWEED_WARM_MIB}))")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    args.sizes = args.sizes or mode["sizes"]
    args.rounds = args.rounds if args.rounds is not None else mode["rounds"]
    args.small_files = args.small_files if args.small_files is not None else mode["small_files"]
    args.e2e_sizes = args.e2e_sizes or mode["e2e_sizes"]
    args.compression_mib = args.compression_mib or mode["compression_mib"]
    args.compression_rounds = args.compression_rounds or mode["compression_rounds"]
    args.extra_tools = tuple(t.strip() for t in args.extra_tools.split(",") if t.strip())
    known_extra = {t for ts in throughput.EXTRA_TOOLS.values() for t in ts}
    if set(args.extra_tools) - known_extra:
        parser.error(f"unknown --extra-tools {sorted(set(args.extra_tools) - known_extra)}; known: "
                     f"{', '.join(sorted(known_extra))}")
    run_compression_here = args.with_compression and not args.skip_compression
    if args.e2e_only and args.compression_only:
        parser.error("--e2e-only and --compression-only exclude each other")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lot-bench-"))
    isolate_environment(work)
    results: dict = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine_facts(),
        "settings": {
            "mode": "quick" if args.quick else "full", "backends": backends, "sizes_mib": args.sizes,
            "rounds": args.rounds, "small_files": args.small_files, "small_file_kib": SMALL_FILE_KIB,
            "e2e_sizes_mib": [] if args.skip_e2e else args.e2e_sizes,
            "compression_mib": args.compression_mib if run_compression_here else None,
            "extra_tools": list(args.extra_tools),
        },
        "lot_settings": {}, "builtin_notes": throughput.BUILTIN_NOTES,
        "throughput": [], "small_files": [], "probes": [], "e2e": [], "e2e_code": {}, "compression": {},
        "errors": {},
    }
    # Other work on the machine skews every figure: the load averages go into the report
    # (for --e2e-only / --compression-only into settings["<part>_loadavg"]).
    load_start = [round(x, 2) for x in os.getloadavg()]
    only = "e2e" if args.e2e_only else ("compression" if args.compression_only else None)
    if only:
        import json

        previous = json.loads((args.out / "latest.json").read_text())
        keep = {"e2e": ("compression",), "compression": ("e2e", "e2e_code")}[only]
        for part in ("throughput", "small_files", "probes", "lot_settings", "builtin_notes") + keep:
            results[part] = previous.get(part, results[part])
        results["errors"] = {k: v for k, v in previous.get("errors", {}).items() if k != only}
        results["settings"] = dict(previous.get("settings", {}))
        if only == "e2e":
            results["settings"]["e2e_sizes_mib"] = args.e2e_sizes
        else:
            results["settings"]["compression_mib"] = args.compression_mib
        results["settings"][f"{only}_date"] = results["date"]
        results["date"] = previous.get("date", results["date"])
        for key in ("loadavg_start", "loadavg_end"):  # of the run whose tables are kept
            if key in previous.get("machine", {}):
                results["machine"][key] = previous["machine"][key]
    elif not run_compression_here:
        # The compression part has its own make target: keep its last tables (and when
        # and how they were measured) from OUT/latest.json.
        kept = _previous_part(args.out, "compression")
        if kept:
            results["compression"] = kept["compression"]
            for key in ("compression_mib", "compression_date", "compression_run_seconds", "compression_loadavg"):
                if key in kept["settings"]:
                    results["settings"][key] = kept["settings"][key]
            results["settings"].setdefault("compression_date", kept["date"])
    try:
        if only == "e2e":
            log(f"[e2e] sizes {args.e2e_sizes} MiB, backends {backends}")
            rows, error = run_e2e(args.e2e_sizes, backends, work, args.quick)
            results["e2e"], results["e2e_code"] = rows, e2e_code()
            if error:
                results["errors"]["e2e"] = error
            return 0  # the finally below writes the report
        if only == "compression":
            results["compression"], error = run_compression(args, backends, work)
            if error:
                results["errors"]["compression"] = error
            return 0
        log(f"sources: {args.sizes} MiB in {work}")
        sources = {}
        for size in args.sizes:
            path = work / f"source-{size}.bin"
            sources[size] = (path, throughput.write_random(path, size))
        warm_file = None
        if "s3" in backends:
            warm_mib = args.warm_mib if args.warm_mib is not None else max(max(args.sizes), SEAWEED_WARM_MIB)
            largest = max(args.sizes)
            if warm_mib == largest:
                warm_file = sources[largest][0]
            else:
                warm_file = work / "warm.bin"
                throughput.write_random(warm_file, warm_mib)
            results["settings"]["s3_warm_mib"] = warm_mib
        for name in backends:
            try:
                rows, small, info = run_backend(name, args, work, sources, warm_file)
                results["throughput"] += rows
                results["small_files"] += small
                results["lot_settings"][name] = info.get("settings", {})
                results["probes"] += info.get("probes", [])
                log(f"[{name}] done in {info.get('seconds', 0):.0f}s")
            except Exception as exc:  # a backend whose server cannot start: record, go on
                if isinstance(exc, KeyboardInterrupt):
                    raise
                log(traceback.format_exc())
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
        for path, _digest in sources.values():
            path.unlink(missing_ok=True)
        if warm_file is not None:
            warm_file.unlink(missing_ok=True)
        if not args.skip_e2e:
            log(f"[e2e] sizes {args.e2e_sizes} MiB, backends {backends}")
            rows, error = run_e2e(args.e2e_sizes, backends, work, args.quick)
            results["e2e"], results["e2e_code"] = rows, e2e_code()
            if error:
                results["errors"]["e2e"] = error
        if run_compression_here:
            results["settings"]["compression_date"] = results["date"]
            results["compression"], error = run_compression(args, backends, work)
            if error:
                results["errors"]["compression"] = error
    finally:
        elapsed = time.monotonic() - started
        if only:  # the run time of the run whose other parts are kept, and this one's
            results["run_seconds"] = previous.get("run_seconds")
            results["settings"][f"{only}_run_seconds"] = round(elapsed)
        else:
            results["run_seconds"] = elapsed
        load = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
        if only:
            results["settings"][f"{only}_loadavg"] = load
        else:
            results["machine"]["loadavg_start"], results["machine"]["loadavg_end"] = load["start"], load["end"]
        try:
            markdown = report.write(results, args.out)  # matplotlib caches under HOME = work/home
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(markdown)
        log(f"wrote {args.out}/latest.md, latest.json, throughput.png, e2e.png"
            + (", compression.md/json/png" if (run_compression_here or only == "compression") else "")
            + f" in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
