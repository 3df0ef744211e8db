#!/usr/bin/env python
"""`make soak`: many concurrent seed dispatches per backend, memory watched.

Each round runs, for every selected backend, ``--concurrency`` dispatches at once
of the seed lattice through a private ``covalent start`` server: the producer
writes ``--size-mib`` MiB of random bytes to a handoff path (uploaded to
``<bucket>/soak/{dispatch_id}/blob.bin``), the consumer really downloads it
(``reuse_local=False``) and returns the sha256 of what it got. Rounds go round-
robin over the backends until ``--minutes`` have passed (at least one round).

Checked per round: every dispatch COMPLETED; every consumer's sha256 equals its
producer's and the producers' are all distinct; the store then holds exactly one
object per dispatch, ``soak/<dispatch_id>/blob.bin`` (so: ``concurrency``
distinct prefixes, each one a dispatch id, no partial or stray object). The
round's bucket, staging files and result downloads are then deleted, so disk
stays bounded.

After each round the resident memory (RSS) of three things is sampled: the
Covalent server's process tree (uvicorn, dask scheduler, nannies, workers), the
backend's storage server process group, and the client process (this script, or
the pytest process in integration/test_soak.py).

Flatness criterion (loose, since Python/dask memory is noisy): for the Covalent
tree (whose workers run the transfers) and the client, over all samples,
``last <= first + max(200 MiB, 50% of first)``. Series with one sample pass.
The storage servers' curves are reported, not judged: they are emulators that
hold objects in memory and give it back lazily (fake-gcs-server, in Go, went
190 -> 540 -> 190 and once 214 -> 789 MiB over a few 8 x 64 MiB rounds), which
says nothing about covalent-lot.

    python -m integration.soak [--minutes 10] [--backends s3,gcs,azure,sftp]
        [--size-mib 64] [--concurrency 8] [--out DIR]

Writes ``soak.md`` (the table), ``soak.json`` and, when matplotlib imports,
``soak.png`` into ``--out`` (default: a new temp dir, printed at the end). Exit
status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import cloudpickle

from integration import _kits, _servers

MiB = 1024 * 1024
KEY = "soak/{dispatch_id}/blob.bin"
ROUND_TIMEOUT = 300.0  # s for a round's dispatches, all together (measured 10-65 s, loaded)
FLAT_SLACK_MIB = 200.0
FLAT_SLACK_RATIO = 0.5
_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "POSTPROCESSING_FAILED"}

# Dask workers cannot import this module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ----------------------------------------------------------------------- workflow


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def write_random(path: str, size: int) -> str:
    """Write ``size`` random bytes in 4 MiB blocks (flat memory); return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def seed_lattice(uri: str, size_mib: int):
    """The seed lattice: producer -> store -> consumer; returns both sha256s."""
    import covalent as ct
    import covalent_lot

    # The consumer runs on the producer's machine and path: without
    # reuse_local=False it would find the verified file there and skip the download.
    h = covalent_lot.handoff(uri, reuse_local=False)

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        os.makedirs(os.path.dirname(h.path), exist_ok=True)
        return write_random(h.path, size_mib * MiB)

    @ct.electron(files=[h.download()])
    def consume(produced: str, files=[]):
        return {"produced": produced, "consumed": file_sha256(h.path), "local": h.path}

    @ct.lattice
    def soak_seed():
        return consume(produce())

    return soak_seed


def wait_result(dispatch_id: str, deadline: float):
    """The finished result, polling the status until ``deadline`` (monotonic);
    on timeout the dispatch is cancelled and TimeoutError raised."""
    import covalent as ct

    while True:
        status = str(ct.get_result(dispatch_id, status_only=True)["status"])
        if status in _TERMINAL:
            return ct.get_result(dispatch_id, wait=True, intermediate_outputs=False)
        if time.monotonic() > deadline:
            ct.cancel(dispatch_id)
            raise TimeoutError(f"dispatch {dispatch_id} still {status} at the round's deadline")
        time.sleep(0.5)


@dataclasses.dataclass
class Round:
    backend: str
    dispatch_ids: list[str]
    seconds: float
    problems: list[str]  # empty when every check passed


def run_round(kit, concurrency: int, size_mib: int, timeout: float = ROUND_TIMEOUT) -> Round:
    """``concurrency`` seed dispatches at once into a fresh bucket, checked, cleaned up."""
    import covalent as ct

    bucket = kit.new_bucket()
    ids: list[str] = []
    problems: list[str] = []
    started = time.monotonic()
    try:
        lattice = seed_lattice(kit.uri(bucket, KEY), size_mib)
        for _ in range(concurrency):  # appended one by one: all get cleaned up should one fail
            ids.append(ct.dispatch(lattice)())
        outputs = {}
        for dispatch_id in ids:
            try:
                result = wait_result(dispatch_id, started + timeout)
            except TimeoutError as exc:
                problems.append(str(exc))
                continue
            if str(result.status) != "COMPLETED":
                problems.append(f"{dispatch_id}: {result.status}: {_failure(result)}")
                continue
            outputs[dispatch_id] = result.result
        seconds = time.monotonic() - started
        problems += _check_outputs(outputs)
        problems += _check_keys(kit, bucket, ids)
    finally:
        _clean_up(kit, bucket, ids)
    return Round(kit.name, ids, seconds, problems)


def _failure(result) -> str:
    """The dispatch's error and its electrons' stderr tails (transfer errors land there)."""
    parts = [str(result.error or "")]
    for node_id in (0, 1):  # produce, consume
        try:
            parts.append(f"node {node_id}: {result.get_node_result(node_id).get('stderr') or ''}")
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            parts.append(f"node {node_id}: <no stderr: {exc!r}>")
    return " | ".join(part[-800:] for part in parts)


def _check_outputs(outputs: dict[str, dict]) -> list[str]:
    problems = []
    for dispatch_id, out in outputs.items():
        if out["consumed"] != out["produced"]:
            problems.append(f"{dispatch_id}: consumer got sha256 {out['consumed']}, "
                            f"producer wrote {out['produced']}")
        if dispatch_id not in out["local"]:
            problems.append(f"{dispatch_id}: local path {out['local']} does not name the dispatch")
    produced = [out["produced"] for out in outputs.values()]
    if len(set(produced)) != len(produced):
        problems.append(f"producers' sha256s collide: {sorted(produced)}")
    return problems


def _check_keys(kit, bucket: str, dispatch_ids: list[str]) -> list[str]:
    """Exactly one object per dispatch, under its own prefix (SFTP sidecars aside)."""
    objects = sorted(k for k in kit.list_keys(bucket) if not _kits.is_sidecar(k))  # SFTP's checksum files aside
    expected = sorted(KEY.format(dispatch_id=i) for i in dispatch_ids)
    if objects != expected:
        return [f"store listing {objects} != one object per dispatch {expected}"]
    return []


def _clean_up(kit, bucket: str, dispatch_ids: list[str]) -> None:
    """Drop the round's bucket, handoff files and client-side result downloads."""
    from covalent._shared_files.config import get_config

    kit.delete_bucket(bucket)
    staging = os.environ["COVALENT_LOT_STAGING_DIR"]
    results = get_config("sdk.results_dir")  # get_result's client-side downloads
    for dispatch_id in dispatch_ids:
        shutil.rmtree(os.path.join(staging, dispatch_id), ignore_errors=True)
        shutil.rmtree(os.path.join(results, dispatch_id), ignore_errors=True)


# ------------------------------------------------------------------------- memory


def _group_rss(pgid: Optional[int]) -> dict[str, float]:
    """RSS MiB by "<pid> <name>" of the live members of process group ``pgid``."""
    rss = {}
    for proc in _servers._group_members(pgid) if pgid else []:
        try:
            rss[f"{proc.pid} {proc.name()}"] = round(proc.memory_info().rss / MiB, 1)
        except Exception:  # noqa: BLE001 - the process ended between listing and reading
            continue
    return rss


def sample(round_no: int, done: Round, kit, covalent_server, disk_root: Path) -> dict:
    """One row of the curve: RSS after ``done`` (servers run in their own groups)."""
    import psutil

    covalent = _group_rss(covalent_server.pgid)
    storage = _group_rss(kit.server.pid)
    return {
        "round": round_no,
        "backend": done.backend,
        "seconds": round(done.seconds, 1),
        "dispatches": len(done.dispatch_ids),
        "problems": len(done.problems),
        "covalent_tree_mib": round(sum(covalent.values()), 1),
        "covalent_procs": len(covalent),
        "storage_mib": round(sum(storage.values()), 1),
        "storage_procs": len(storage),
        "client_mib": round(psutil.Process().memory_info().rss / MiB, 1),
        "disk_mib": round(_servers.dir_bytes(disk_root) / MiB, 1),
        "covalent_by_process_mib": covalent,  # JSON only: which process grows
    }


def flatness_violations(rows: list[dict]) -> list[str]:
    """Series breaking the criterion of the module docstring."""
    series = {"covalent server tree": [r["covalent_tree_mib"] for r in rows],
              "client": [r["client_mib"] for r in rows]}
    violations = []
    for name, values in series.items():
        if len(values) < 2:
            continue
        first, last = values[0], values[-1]
        limit = first + max(FLAT_SLACK_MIB, FLAT_SLACK_RATIO * first)
        if last > limit:
            violations.append(f"{name}: RSS {first:.0f} -> {last:.0f} MiB exceeds {limit:.0f} MiB")
    return violations


# ------------------------------------------------------------------------- report

_COLUMNS = [("round", "round"), ("backend", "backend"), ("seconds", "s"), ("dispatches", "dispatches"),
            ("problems", "problems"), ("covalent_tree_mib", "Covalent tree MiB"),
            ("covalent_procs", "procs"), ("storage_mib", "storage server MiB"),
            ("storage_procs", "procs"), ("client_mib", "client MiB"), ("disk_mib", "session disk MiB")]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in _COLUMNS) + " |",
             "|" + "---|" * 2 + "---:|" * (len(_COLUMNS) - 2)]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in _COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_report(rows: list[dict], out_dir: Path, settings: dict[str, Any], problems: list[str],
                 violations: list[str], plot: bool = True) -> list[Path]:
    """soak.md, soak.json and (``plot`` and matplotlib importable) soak.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "soak.json", out_dir / "soak.md"]
    paths[0].write_text(json.dumps({"settings": settings, "rows": rows, "problems": problems,
                                    "flatness_violations": violations}, indent=2) + "\n")
    paths[1].write_text(f"{table(rows)}\n\nproblems: {problems or 'none'}\n"
                        f"flatness violations: {violations or 'none'}\n")
    png = _plot(rows, out_dir / "soak.png") if plot else None
    return paths + ([png] if png else [])


def _plot(rows: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = range(1, len(rows) + 1)
    ax.plot(x, [r["covalent_tree_mib"] for r in rows], marker="o", label="Covalent server tree")
    ax.plot(x, [r["client_mib"] for r in rows], marker="o", label="client")
    for backend in dict.fromkeys(r["backend"] for r in rows):
        points = [(i, r["storage_mib"]) for i, r in zip(x, rows) if r["backend"] == backend]
        ax.plot(*zip(*points), marker=".", label=f"storage server ({backend})")
    ax.set_xlabel("sample (one per backend round)")
    ax.set_ylabel("RSS MiB")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="start no new cycle over the backends after this (default 10)")
    parser.add_argument("--backends", default="",
                        help="comma-separated subset of s3,gcs,azure,sftp (default all)")
    parser.add_argument("--size-mib", type=int, default=64, help="object size per dispatch (default 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="dispatches at once (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="report dir (default: a new temp dir)")
    args = parser.parse_args(argv)

    if args.backends:
        os.environ["LOT_BACKENDS"] = args.backends
    # The integration conftest, imported before covalent, points this process at a
    # private covalent config below its session dir.
    from integration import conftest

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="lot-soak-"))
    kits: dict = {}
    server = None
    try:
        for name in conftest.BACKENDS:
            kits[name] = _kits.kit_class(name)()
            kits[name].start(conftest.SESSION_DIR / name)
        # The whole run is the soak: its environment is this process's for good.
        env = conftest.harness_env(kits)
        _servers.apply_env(env)
        server = _servers.CovalentServer(conftest.COVALENT_DIR, env_extra=env,
                                         port=conftest.COVALENT_PORT).start()
        conftest._sync_client_config(server)
        print(f"soak: {', '.join(kits)}; {args.concurrency} x {args.size_mib} MiB dispatches per round, "
              f"{args.minutes:g} min; Covalent at {server.url}", flush=True)
        rows, problems = soak(kits, server, args, conftest.SESSION_DIR)
    finally:
        if server is not None:
            server.stop()
        for kit in kits.values():
            kit.stop()
        shutil.rmtree(conftest.SESSION_DIR, ignore_errors=True)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["backends"] = list(kits)
    violations = flatness_violations(rows)
    paths = write_report(rows, out_dir, settings, problems, violations)
    print(f"\n{table(rows)}\n\nproblems: {problems or 'none'}\nflatness violations: {violations or 'none'}")
    print(f"report: {', '.join(map(str, paths))}")
    return 1 if problems or violations else 0


def soak(kits: dict, server, args, disk_root: Path) -> tuple[list[dict], list[str]]:
    """Round-robin rounds over ``kits`` until ``args.minutes`` have passed."""
    rows, problems = [], []
    stop_at = time.monotonic() + args.minutes * 60
    round_no = 0
    while round_no == 0 or time.monotonic() < stop_at:
        round_no += 1
        for kit in kits.values():
            done = run_round(kit, args.concurrency, args.size_mib)
            problems += [f"round {round_no} {kit.name}: {p}" for p in done.problems]
            rows.append(sample(round_no, done, kit, server, disk_root))
            print(" ".join(f"{key}={rows[-1][key]}" for key, _ in _COLUMNS), flush=True)
    return rows, problems


if __name__ == "__main__":
    sys.exit(main())
