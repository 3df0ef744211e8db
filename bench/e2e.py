#!/usr/bin/env python
"""End to end: the seed scenario through a real Covalent server, by value vs handoff vs offload vs floor.

For every size, a producer electron makes a random float64 numpy array of that
many MiB and a consumer electron reduces it to a small summary (element count,
sum, first and last element) that this script checks against the same values
computed here, chunk by chunk, outside the measurement. The pair runs as:

* ``by value``: the producer returns the array, Covalent passes it to the consumer;
* ``handoff`` (one row per backend: s3, gcs, azure, sftp): the producer
  ``np.save``s to ``h.path`` and covalent-lot uploads it after the electron to a
  per-dispatch key ``<scheme>://<bucket>/{dispatch_id}/x.npy``; the consumer's
  download runs before it and it ``np.load``s ``h.path``;
* ``offload`` (one row per backend): the by-value code with ``@lot.offload(to=
  "<scheme>://<bucket>/offload/")`` under the producer's ``@ct.electron`` and
  ``@lot.offload`` under the consumer's: the producer returns the array, which
  is encoded (``.npy``) into the local cache, uploaded (``compress="auto"``, the
  default: random floats are stored as they are) and replaced by a ``lot.Ref``;
  the consumer receives the array (on this one machine from the producer's
  verified cached copy, no download);
* ``local path (floor)``: the producer saves a local ``.npy`` and returns the
  path string, the consumer loads it (one machine only; the lower bound).

``SEED_CODE`` holds the seed scenario as a user writes it in each style
(producer returns/saves a numpy array, the consumer sums it) and
:func:`user_code` counts its lines: the workflows measured here are these plus
the summary that is checked and the local servers' URIs.

Everything runs on loopback servers started here, all state under ``workdir``:
a private ``covalent start`` (2 dask workers; HOME, TMPDIR, config, database,
results, logs and dask scratch below ``workdir/covalent``, never the user's
home) and one storage server per requested backend, started through the
integration kits (SeaweedFS, fake-gcs-server, Azurite, OpenSSH sshd). The
Covalent server's environment carries every kit's ``env`` (credentials by
reference plus ``COVALENT_LOT_<NAME>_*``), as in integration/test_workflows.py,
so electrons reach the stores. A backend whose kit cannot start (no sshd, no
Azurite...) gets an error row per size and the rest goes on. Every server is
stopped in ``finally`` (and by the harness's atexit hook should that fail).

Measurement, per row:

* ``wall_s``: ``ct.dispatch(...)(...)`` until the dispatch's status is terminal
  (polled every POLL_INTERVAL s; Covalent's own ``get_result(wait=True)`` polls
  once a second, which put 0-1 s of slack into every row) and
  ``ct.get_result(dispatch_id, intermediate_outputs=False)`` has returned,
  the same calls for every workflow (``--intermediate-outputs`` switches all
  rows to Covalent's default, which also downloads every node's output, i.e.
  the whole array for "by value"). ``server_s`` is the dispatch's start to end
  time as the server recorded it, ``producer_s``/``consumer_s`` the nodes' own
  start-to-end times (file transfers included), and for handoff rows
  ``upload_s`` / ``download_s`` come from covalent-lot's INFO lines in the
  nodes' stderr.
* where the handoff's time goes (``gap``, 512 MiB in the report): the Covalent
  server runs with ``COVALENT_LOT_TIMINGS`` (every covalent-lot transfer hook
  appends its phase timings, see covalent_lot._strategy.PhaseClock) and
  ``LOT_BENCH_MARKS`` (every measured electron appends ``time.time()`` as its
  body starts and as it returns); :func:`explain_gap` splits handoff wall -
  floor wall of the same size into imports, settings, client construction,
  Covalent's hook overhead, hashing, transfer, cache trimming and the rest,
  and what is left is ``unaccounted`` (the dispatch's start and the result's
  fetch, which no timestamp brackets).
* ``worker_rss_mib``: peak RSS of the largest single process of the Covalent
  server's process group (uvicorn dispatcher, dask scheduler, nannies, the
  workers that run the electrons), sampled every 50 ms; ``tree_rss_mib`` the
  peak of the group's total; ``worker_rss_start_mib`` the largest process's
  RSS when the dispatch starts (workers keep memory from earlier rows, so the
  peak of a light row can be a heavier row's leftover);
  ``client_rss_mib`` the peak of this process;
  ``store_rss_mib`` (handoff rows) the peak of the storage server's process
  and its descendants (sshd: listener plus per-connection children).
* ``added_mib``: bytes added under the Covalent server's data and results
  dirs during the dispatch (``dir_bytes`` before/after);
  ``cache_added_mib``: the same for the dask executor's cache dir and the
  client's dispatch cache (pickled inputs/outputs and stdout/stderr per task).

Repetitions: ``quick`` runs every configuration once per size; otherwise twice,
interleaved (all configurations, then all again in reverse order) so drift
hits all alike; the row then reports the best (lowest) ``wall_s`` with the
timings of that run, and the highest RSS / added bytes of the two runs;
``wall_s_all`` lists both. Before the measured rows every workflow runs once
untimed on a tiny array (worker imports, first writes to each store) and a
fresh SeaweedFS gets min(256, largest size) MiB written twice (it grows its
first volumes at half speed, a cloud store does not). Nothing is restarted
between rows; every dispatch runs alone (sequential; the machine has 2 cores).
The handoff's local files (``workdir/staging/<dispatch_id>/<uri tag>/x.npy``),
the offload's local cache (``workdir/staging/objects/``) and the floor's
(``workdir/floor/<dispatch_id>.npy``) are deleted after each row, outside the
measurement; the stored objects stay until the servers go.
This process keeps its HOME: only covalent's own paths (COVALENT_*,
XDG_CACHE_HOME) point below ``workdir``, set before covalent is imported (or
its config manager is rebuilt from them if it was imported already).

    python -m bench.e2e --sizes 16,64 --backends s3,gcs,azure,sftp [--quick] [--json out.json]

(``upload s`` of an offload row is the engine's upload alone, without the encoding.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    # Run as a file (python bench/x.py, or a child run of one) rather than with -m:
    # the repository root makes the packages bench and integration importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import start_kits  # noqa: E402
from bench.throughput import settle  # noqa: E402
from integration import _kits, _servers  # noqa: E402

MiB = 1024 * 1024

BACKENDS = tuple(_kits.KIT_CLASSES)
BY_VALUE, HANDOFF, OFFLOAD, FLOOR = "by value", "handoff", "offload", "local path (floor)"
STORED = (HANDOFF, OFFLOAD)  # the workflows that go through a store, one row per backend

# ct.get_result(..., intermediate_outputs=INTERMEDIATE_OUTPUTS) for every row.
INTERMEDIATE_OUTPUTS = False
SAMPLE_INTERVAL = 0.05  # seconds between RSS samples
WARM_N = 1024  # elements in the untimed warm-up dispatches
DISPATCH_TIMEOUT = 900.0  # seconds before a dispatch counts as hung
POLL_INTERVAL = 0.1  # seconds between status queries while a dispatch runs
# Files the Covalent server's environment names (its dask workers inherit it): every
# covalent-lot transfer hook appends its timings to the first, every measured electron
# its own start and return times to the second.
TIMINGS_ENV = "COVALENT_LOT_TIMINGS"
MARKS_ENV = "LOT_BENCH_MARKS"

# The seed scenario as a user writes it in each style: the producer makes a numpy
# array, the consumer sums it. Only the store URIs differ from the measured workflows
# (which also return a checked summary instead of the bare sum).
# The lattice is the same in every style: only the electrons change.
_SEED_LATTICE = """
@ct.lattice
def seed(n):
    return consume(produce(n))
"""
SEED_CODE = {
    BY_VALUE: """
import covalent as ct
import numpy as np

@ct.electron
def produce(n):
    return np.random.default_rng(0).random(n)

@ct.electron
def consume(x):
    return float(x.sum())
""" + _SEED_LATTICE,
    HANDOFF: """
import covalent as ct
import covalent_lot as lot
import numpy as np

h = lot.handoff("s3://my-bucket/runs/{dispatch_id}/x.npy")

@ct.electron(files=[h.upload()])
def produce(n, files=[]):
    np.save(h.path, np.random.default_rng(0).random(n))
    return n

@ct.electron(files=[h.download()])
def consume(n, files=[]):
    return float(np.load(h.path).sum())
""" + _SEED_LATTICE,
    OFFLOAD: """
import covalent as ct
import covalent_lot as lot
import numpy as np

@ct.electron
@lot.offload(to="s3://my-bucket/runs/")
def produce(n):
    return np.random.default_rng(0).random(n)

@ct.electron
@lot.offload
def consume(x):
    return float(x.sum())
""" + _SEED_LATTICE,
}


def _code_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def user_code() -> dict:
    """workflow -> {"lines": non-blank code lines, "added": lines not in the by-value code,
    "removed": by-value lines gone, "code": the text} for SEED_CODE (a line diff)."""
    import difflib

    base = _code_lines(SEED_CODE[BY_VALUE])
    out = {}
    for workflow, text in SEED_CODE.items():
        compile(text, f"SEED_CODE[{workflow!r}]", "exec")  # valid Python, at least
        lines = _code_lines(text)
        ops = difflib.SequenceMatcher(a=base, b=lines, autojunk=False).get_opcodes()
        out[workflow] = {
            "lines": len(lines),
            "added": sum(j2 - j1 for tag, _i1, _i2, j1, j2 in ops if tag in ("insert", "replace")),
            "removed": sum(i2 - i1 for tag, i1, i2, _j1, _j2 in ops if tag in ("delete", "replace")),
            "code": text.strip("\n"),
        }
    return out


if __name__ != "__main__" and __name__ in sys.modules:
    # Electrons defined in this module must reach the dask workers by value (the
    # workers cannot import bench/e2e.py); __main__ is pickled by value anyway.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _mark(role: str, event: str) -> None:
    """In an electron: append its dispatch, ``role`` (producer/consumer), ``event``
    (start/return) and ``time.time()`` to the file LOT_BENCH_MARKS names (no-op unset)."""
    t = time.time()
    path = os.environ.get(MARKS_ENV)
    if not path:
        return
    import covalent as ct

    line = json.dumps({"dispatch_id": ct.get_context().dispatch_id, "role": role, "event": event, "t": t})
    with open(path, "a") as f:
        f.write(line + "\n")


def _read_jsonl(path: Path, dispatch_id: str) -> list[dict]:
    """The lines of ``path`` that belong to ``dispatch_id`` (unreadable lines skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("dispatch_id") == dispatch_id:
                    out.append(record)
    except OSError:
        pass
    return out


def _log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _short(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------- RSS sampling


class PeakRSS:
    """Peak resident memory of process groups and of this process, sampled in a thread.

    Copied from integration/demo.py and extended: ``worker_peak`` is the largest
    single process of the Covalent server's group, ``tree_peak`` that group's
    total, ``client_peak`` this process, ``store_peak`` the total of the storage
    server's process and its descendants (if one is given).
    """

    def __init__(self, servers, server_pgid: int, store_pid: Optional[int] = None,
                 interval: float = SAMPLE_INTERVAL):
        import psutil

        self._psutil = psutil
        self._servers = servers
        self._pgid = server_pgid
        self._store_pid = store_pid
        self._interval = interval
        self._stop = threading.Event()
        self.worker_peak = 0
        self.tree_peak = 0
        self.client_peak = 0
        self.store_peak = 0
        self._me = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _group_rss(self, pgid: int) -> tuple[int, int]:
        total = biggest = 0
        for proc in self._servers._group_members(pgid):
            try:
                rss = proc.memory_info().rss
            except self._psutil.Error:
                continue
            total += rss
            biggest = max(biggest, rss)
        return total, biggest

    def _tree_rss(self, pid: int) -> int:
        # A process and its descendants: sshd's per-connection children leave
        # the listener's process group (setsid) but stay its descendants.
        try:
            root = self._psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except self._psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except self._psutil.Error:
                pass
        return total

    def sample(self) -> None:
        try:
            self.client_peak = max(self.client_peak, self._me.memory_info().rss)
        except self._psutil.Error:
            pass
        total, biggest = self._group_rss(self._pgid)
        self.worker_peak = max(self.worker_peak, biggest)
        self.tree_peak = max(self.tree_peak, total)
        if self._store_pid is not None:
            self.store_peak = max(self.store_peak, self._tree_rss(self._store_pid))

    def _run(self):
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a sampling hiccup must not end the run
                pass
            self._stop.wait(self._interval)

    def __enter__(self):
        self.sample()
        self.worker_start = self.worker_peak  # what the largest process held already
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


# ------------------------------------------------------------------ the workflows


def _expected(n: int, seed: int) -> dict:
    """What the consumer must report, computed in bounded memory (8 MiB chunks).

    ``Generator.random`` draws one 64-bit value per double, so chunks give the
    very same elements as one call; only the sum's rounding differs.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    total, first, last, left = 0.0, None, None, n
    while left:
        chunk = rng.random(min(left, MiB))
        if first is None:
            first = float(chunk[0])
        last = float(chunk[-1])
        total += float(chunk.sum())
        left -= chunk.size
    return {"n": n, "sum": total, "first": first, "last": last}


def _check(got: Any, want: dict) -> Optional[str]:
    """None when the consumer's summary matches, else a short reason."""
    if not isinstance(got, dict):
        return f"unexpected result {_short(repr(got), 80)}"
    for key in ("n", "first", "last"):
        if got.get(key) != want[key]:
            return f"wrong {key}: {got.get(key)!r} != {want[key]!r}"
    if not math.isclose(got.get("sum", math.nan), want["sum"], rel_tol=1e-9):
        return f"wrong sum: {got.get('sum')!r} != {want['sum']!r}"
    return None


def _lattices(ct, lot, workdir: Path, kits: dict, buckets: dict) -> dict:
    """(workflow, backend) -> (lattice, producer name, consumer name)."""
    floor_dir = str(workdir / "floor")
    staging = str(workdir / "staging")

    # --- by value -------------------------------------------------------------------
    # Every measured electron marks its body's start and return (_mark; a file append).
    def make_array(n: int, seed: int):
        _mark("producer", "start")
        import numpy as np

        x = np.random.default_rng(seed).random(n)
        _mark("producer", "return")
        return x

    def summarize(x):
        _mark("consumer", "start")
        out = {"n": int(x.size), "sum": float(x.sum()), "first": float(x[0]), "last": float(x[-1])}
        _mark("consumer", "return")
        return out

    produce_by_value, consume_by_value = ct.electron(make_array), ct.electron(summarize)

    @ct.lattice
    def by_value(n: int, seed: int):
        return consume_by_value(produce_by_value(n, seed))

    # --- local path (floor) ---------------------------------------------------------
    @ct.electron
    def save_local(n: int, seed: int):
        _mark("producer", "start")
        import numpy as np

        os.makedirs(floor_dir, exist_ok=True)
        path = os.path.join(floor_dir, f"{ct.get_context().dispatch_id}.npy")
        np.save(path, np.random.default_rng(seed).random(n))
        _mark("producer", "return")
        return path

    @ct.electron
    def load_local(path: str):
        _mark("consumer", "start")
        import numpy as np

        x = np.load(path)
        out = {"n": int(x.size), "sum": float(x.sum()), "first": float(x[0]), "last": float(x[-1])}
        _mark("consumer", "return")
        return out

    @ct.lattice
    def local_path(n: int, seed: int):
        return load_local(save_local(n, seed))

    out = {
        (BY_VALUE, None): (by_value, "make_array", "summarize"),
        (FLOOR, None): (local_path, "save_local", "load_local"),
    }

    # --- handoff, one per backend ---------------------------------------------------
    def handoff_lattice(h):
        @ct.electron(files=[h.upload()])
        def produce(n: int, seed: int, files=[]):
            _mark("producer", "start")
            import numpy as np

            np.save(h.path, np.random.default_rng(seed).random(n))
            _mark("producer", "return")
            return n  # the consumer's dependency; the bytes go through storage

        @ct.electron(files=[h.download()])
        def consume(n: int, files=[]):
            _mark("consumer", "start")
            import numpy as np

            x = np.load(h.path)
            out = {"n": int(x.size), "sum": float(x.sum()), "first": float(x[0]), "last": float(x[-1])}
            _mark("consumer", "return")
            return out

        @ct.lattice
        def handoff(n: int, seed: int):
            return consume(produce(n, seed))

        return handoff

    # --- offload, one per backend: the by-value code plus the two decorators ---------
    def offload_lattice(to: str):
        produce = ct.electron(lot.offload(to=to, staging_dir=staging)(make_array))
        consume = ct.electron(lot.offload(summarize))

        @ct.lattice
        def offload(n: int, seed: int):
            return consume(produce(n, seed))

        return offload

    for name, kit in kits.items():
        # Local files below workdir too (the default staging dir is the *client's*
        # tempdir), in the default layout: <staging>/<dispatch_id>/<uri tag>/x.npy,
        # shared by producer and consumer (on one machine the consumer finds the
        # verified file there and skips the download; see README "Handoffs").
        h = lot.handoff(kit.uri(buckets[name], "{dispatch_id}/x.npy"), staging_dir=staging)
        out[(HANDOFF, name)] = (handoff_lattice(h), "produce", "consume")
        # The offload's cache is <staging>/objects/ (content-addressed, shared by
        # producer and consumer on this machine); keys <to><dispatch_id>/<node_id>/...
        out[(OFFLOAD, name)] = (offload_lattice(kit.uri(buckets[name], "offload/")), "make_array", "summarize")
    return out


# --------------------------------------------------------------- one measured run

_TRANSFER_RE = re.compile(
    r"covalent-lot: (upload|download) \S+ -> \S+: \d+ file\(s\), ([\d.]+) MiB in ([\d.]+) s"
)


def _epoch(when) -> Optional[float]:
    """A server timestamp (UTC; naive once it has been through the database) as time.time()."""
    import datetime as dt

    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _node_info(result) -> dict:
    """name -> {"seconds": node start to end, "start"/"end": the same as time.time(),
    "stderr": text} for every node."""
    info = {}
    try:
        nodes = list(result.lattice.transport_graph._graph.nodes)
    except Exception:  # noqa: BLE001
        return info
    for node_id in nodes:
        try:
            node = result.get_node_result(node_id)
        except Exception:  # noqa: BLE001
            continue
        start, end = node.get("start_time"), node.get("end_time")
        info[node.get("node_name")] = {
            "seconds": (end - start).total_seconds() if start and end else None,
            "start": _epoch(start), "end": _epoch(end),
            "stderr": str(node.get("stderr") or ""),
        }
    return info


def _transfer_seconds(stderr_text: str, action: str) -> Optional[float]:
    seconds = [float(m.group(3)) for m in _TRANSFER_RE.finditer(stderr_text) if m.group(1) == action]
    return sum(seconds) if seconds else None


def _wait_and_get(ct, dispatch_id: str):
    """Poll the dispatch's status every POLL_INTERVAL s until it is terminal, then fetch
    the result (what ``get_result(wait=True)`` does, with a once-a-second poll)."""
    from covalent._shared_files.util_classes import RESULT_STATUS

    while not RESULT_STATUS.is_terminal(ct.get_result(dispatch_id, status_only=True)["status"]):
        time.sleep(POLL_INTERVAL)
    return ct.get_result(dispatch_id, wait=False, intermediate_outputs=INTERMEDIATE_OUTPUTS)


def _get_result(ct, dispatch_id: str, timeout: float):
    """The result with a deadline: (result, finished perf_counter, error)."""
    box: dict = {}

    def target():
        try:
            box["result"] = _wait_and_get(ct, dispatch_id)
        except BaseException as exc:  # noqa: BLE001 - reported as the row's error
            box["error"] = f"get_result raised {type(exc).__name__}: {_short(exc, 100)}"
        box["t"] = time.perf_counter()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        try:
            ct.cancel(dispatch_id)
        except Exception:  # noqa: BLE001
            pass
        return None, time.perf_counter(), f"timeout after {timeout:.0f} s"
    return box.get("result"), box["t"], box.get("error")


def _measure(ct, servers, server, lattice, producer: str, consumer: str, n: int, seed: int,
             want: dict, store_pid: Optional[int], timeout: float, workdir: Path) -> dict:
    covalent_dirs = (server.data_dir, server.results_dir)
    cache_dirs = (server.executor_cache_dir, server.dispatch_cache_dir)
    before = sum(servers.dir_bytes(d) for d in covalent_dirs)
    before_cache = sum(servers.dir_bytes(d) for d in cache_dirs)
    dispatch_id = None
    error = None
    result = None
    settle()  # untimed: no run pays for the writeback of what the one before wrote
    with PeakRSS(servers, server.pgid, store_pid) as rss:
        started_epoch = time.time()
        started = time.perf_counter()
        try:
            dispatch_id = ct.dispatch(lattice)(n, seed)
        except Exception as exc:  # noqa: BLE001
            error = f"dispatch raised {type(exc).__name__}: {_short(exc, 100)}"
            finished = time.perf_counter()
        else:
            result, finished, error = _get_result(ct, dispatch_id, timeout)
    wall = finished - started
    timeline: dict = {"dispatch": started_epoch, "done": started_epoch + wall}
    hooks: list = []
    if dispatch_id:
        for mark in _read_jsonl(workdir / "marks.jsonl", dispatch_id):
            timeline[f"{mark['role']}_{mark['event']}"] = mark["t"]
        hooks = _read_jsonl(workdir / "timings.jsonl", dispatch_id)
    added = sum(servers.dir_bytes(d) for d in covalent_dirs) - before
    cache_added = sum(servers.dir_bytes(d) for d in cache_dirs) - before_cache

    row = {
        "wall_s": wall,
        "worker_rss_mib": rss.worker_peak / MiB,
        "worker_rss_start_mib": rss.worker_start / MiB,
        "tree_rss_mib": rss.tree_peak / MiB,
        "client_rss_mib": rss.client_peak / MiB,
        "store_rss_mib": rss.store_peak / MiB if store_pid is not None else None,
        "added_mib": added / MiB,
        "cache_added_mib": cache_added / MiB,
        "server_s": None,
        "producer_s": None,
        "consumer_s": None,
        "upload_s": None,
        "download_s": None,
        "dispatch_id": dispatch_id,
        "timeline": timeline,
        "hooks": hooks,
        "error": error,
    }
    if result is not None:
        try:
            if result.start_time and result.end_time:
                row["server_s"] = (result.end_time - result.start_time).total_seconds()
        except Exception:  # noqa: BLE001
            pass
        nodes = _node_info(result)
        prod, cons = nodes.get(producer, {}), nodes.get(consumer, {})
        row["producer_s"], row["consumer_s"] = prod.get("seconds"), cons.get("seconds")
        # The server's view, for explain_gap: when each node was handed to the executor and done.
        for role, node in (("producer", prod), ("consumer", cons)):
            for event in ("start", "end"):
                if node.get(event) is not None:
                    timeline[f"{role}_node_{event}"] = node[event]
        row["upload_s"] = _transfer_seconds(prod.get("stderr", ""), "upload")
        row["download_s"] = _transfer_seconds(cons.get("stderr", ""), "download")
        for action in ("upload", "download"):  # no INFO line (logging configured otherwise): the hook's
            seconds = [h["engine_seconds"] for h in hooks if h.get("action") == action and "engine_seconds" in h]
            if row[f"{action}_s"] is None and seconds:
                row[f"{action}_s"] = sum(seconds)
        status = str(result.status)
        if status != "COMPLETED":
            tails = [n.get("stderr", "").strip().splitlines()[-1:] for n in (prod, cons)]
            detail = result.error or next((t[0] for t in tails if t), "")
            row["error"] = _short(f"{status}: {detail}")
        elif error is None:
            row["error"] = _check(result.result, want)
    # Outside the measurement: this dispatch's local files (handoff staging, the
    # offload's cache, floor).
    if dispatch_id:
        shutil.rmtree(workdir / "staging" / dispatch_id, ignore_errors=True)
        (workdir / "floor" / f"{dispatch_id}.npy").unlink(missing_ok=True)
    shutil.rmtree(workdir / "staging" / "objects", ignore_errors=True)
    return row


def _combine(runs: list[dict]) -> dict:
    """Best wall time (with that run's timings); highest memory and bytes of all runs."""
    ok = [r for r in runs if r["error"] is None]
    pool = ok or runs
    best = dict(min(pool, key=lambda r: r["wall_s"]))
    for key in ("worker_rss_mib", "worker_rss_start_mib", "tree_rss_mib", "client_rss_mib", "store_rss_mib",
                "added_mib", "cache_added_mib"):
        values = [r[key] for r in runs if r[key] is not None]
        best[key] = max(values) if values else None
    best["wall_s_all"] = [round(r["wall_s"], 3) for r in runs]
    best["runs"] = len(runs)
    if ok and len(ok) < len(runs):
        best["error"] = f"{len(runs) - len(ok)} of {len(runs)} runs failed: " + \
            _short(next(r["error"] for r in runs if r["error"]), 100)
    return best


def _add_ratios(rows: list[dict]) -> None:
    """Per row, against the same size: ``x_faster_than_by_value`` (by value's wall / this
    wall) and ``x_floor`` (this wall / the local-path floor's)."""
    for r in rows:
        same = {x["workflow"]: x for x in rows if x["size_mib"] == r["size_mib"] and x["workflow"] in (BY_VALUE, FLOOR)
                and not x.get("error") and x.get("wall_s")}
        ok = not r.get("error") and r.get("wall_s")
        r["x_faster_than_by_value"] = same[BY_VALUE]["wall_s"] / r["wall_s"] if ok and BY_VALUE in same else None
        r["x_floor"] = r["wall_s"] / same[FLOOR]["wall_s"] if ok and FLOOR in same else None


# ------------------------------------------------------------ where the gap goes

# The parts of handoff wall - floor wall, in the report's order: (key, column title).
GAP_PARTS = (
    ("imports", "imports"),
    ("settings", "settings"),
    ("client", "client construction"),
    ("hook_overhead", "Covalent hook overhead"),
    ("hash", "hashing"),
    ("transfer", "transfer"),
    ("keep_bounded", "cache trimming"),
    ("rest", "the rest"),
)
# What "the rest" is made of (shown in a second table).
REST_PARTS = (
    ("rest_hooks", "inside the hooks, outside a named phase"),
    ("rest_bodies", "electron bodies, handoff - floor"),
    ("rest_between", "between the nodes, handoff - floor"),
)


def explain_gap(handoff: dict, floor: dict) -> dict:
    """Split ``handoff["wall_s"] - floor["wall_s"]`` (one run each, same size) into parts.

    From the electrons' marks (producer/consumer body start and return) and the
    upload/download hooks' COVALENT_LOT_TIMINGS lines of the handoff's dispatch:

    * imports, settings (+ placeholder resolution), client construction (engine and
      backend construction + the engine's "connect"), hashing (the engine's "hash"),
      transfer (the engine's other phases; without engine phases the whole engine
      call, connect and hashing included), cache trimming (keep_bounded): summed
      over both hooks;
    * Covalent hook overhead: producer's return -> upload hook's start, plus
      download hook's end -> consumer's start (the wrapper unpickling the next call),
      plus the producer's task setup beyond the floor's (its node handed to the
      executor -> its body starts, as the server recorded the node: fetching the
      hooks with the task, the upload's pre-transfer hook);
    * the rest: hooks' time outside a named phase (backend close, engine time its
      phases do not cover, the hook's own bookkeeping), the electron bodies' time
      minus the floor's, and the time between the nodes minus the floor's (the
      producer's node finishing, the consumer's being scheduled and its
      pre-transfer hook);
    * unaccounted: gap minus all of these = dispatch -> the producer's node handed to
      the executor, and consumer return -> result fetched, handoff minus floor
      (``unaccounted_before`` / ``unaccounted_after``).

    Returns {"gap", parts..., "unaccounted", "engine_phases": bool} or {"error": why}.
    """
    th, tf = handoff.get("timeline") or {}, floor.get("timeline") or {}
    marks = ("producer_start", "producer_return", "consumer_start", "consumer_return")
    missing = [f"{which} {m}" for which, t in (("handoff", th), ("floor", tf)) for m in marks if m not in t]
    if missing:
        return {"error": "no electron marks: " + ", ".join(missing)}
    hooks = {r.get("action"): r for r in handoff.get("hooks") or [] if not r.get("error")}
    if "upload" not in hooks or "download" not in hooks:
        return {"error": f"no COVALENT_LOT_TIMINGS line for {', '.join(a for a in ('upload', 'download') if a not in hooks)}"}
    up, down = hooks["upload"], hooks["download"]
    both = (up, down)

    def phase(name: str) -> float:
        return sum(r.get("phases", {}).get(name, 0.0) for r in both)

    def engine(name: str) -> float:
        return sum(r.get("engine_phases", {}).get(name, 0.0) for r in both)

    reported = any(r.get("engine_phases") for r in both)
    # Phases the engine runs alongside another ("hash (alongside)": the checksum computed
    # while the bytes are sent) overlap it: shown, not summed.
    engine_total = sum(v for r in both for k, v in r.get("engine_phases", {}).items() if "alongside" not in k)
    alongside = sum(v for r in both for k, v in r.get("engine_phases", {}).items() if "alongside" in k)
    # The producer's task setup (node handed to the executor -> body starts: the task's
    # assets fetched, its pre-transfer hook run) beyond the floor's: the hooks' share.
    setup = None
    if "producer_node_start" in th and "producer_node_start" in tf:
        setup = ((th["producer_start"] - th["producer_node_start"])
                 - (tf["producer_start"] - tf["producer_node_start"]))
    parts = {
        "imports": phase("load"),
        "settings": phase("settings") + phase("resolve"),
        "client": phase("build") + engine("connect"),
        "hook_overhead": ((up["start"] - th["producer_return"]) + (th["consumer_start"] - down["end"])
                          + (setup or 0.0)),
        "hash": engine("hash"),
        "transfer": (engine_total - engine("connect") - engine("hash")) if reported else phase("engine"),
        "keep_bounded": phase("keep_bounded"),
    }
    named = sum(sum(r.get("phases", {}).values()) for r in both)
    parts["rest_hooks"] = (sum(r["end"] - r["start"] for r in both) - named + phase("close")
                           + ((phase("engine") - engine_total) if reported else 0.0))
    parts["rest_bodies"] = ((th["producer_return"] - th["producer_start"] + th["consumer_return"] - th["consumer_start"])
                            - (tf["producer_return"] - tf["producer_start"] + tf["consumer_return"] - tf["consumer_start"]))
    parts["rest_between"] = (down["start"] - up["end"]) - (tf["consumer_start"] - tf["producer_return"])
    parts["rest"] = parts["rest_hooks"] + parts["rest_bodies"] + parts["rest_between"]
    gap = handoff["wall_s"] - floor["wall_s"]
    out = {"gap": gap, **{k: round(v, 4) for k, v in parts.items()}, "engine_phases": reported,
           "alongside": round(alongside, 4), "kept": down.get("kept"),
           "engine_phase_names": sorted({k for r in both for k in r.get("engine_phases", {})})}
    out["unaccounted"] = round(gap - sum(parts[k] for k, _ in GAP_PARTS), 4)
    out["task_setup"] = None if setup is None else round(setup, 4)
    # Where the unaccounted time lies: before the producer's body (or its node, where the
    # server's times are known) and after the consumer's return, handoff - floor.
    first = "producer_node_start" if setup is not None else "producer_start"
    if "dispatch" in th and "dispatch" in tf:
        out["unaccounted_before"] = round((th[first] - th["dispatch"]) - (tf[first] - tf["dispatch"]), 4)
        out["unaccounted_after"] = round(out["unaccounted"] - out["unaccounted_before"], 4)
    return out


def _add_gaps(rows: list[dict]) -> None:
    """``gap`` (explain_gap) on every handoff row whose size has a floor row."""
    for r in rows:
        if r.get("workflow") != HANDOFF or r.get("error") or not r.get("wall_s"):
            continue
        floor = next((x for x in rows if x["workflow"] == FLOOR and x["size_mib"] == r["size_mib"]
                      and not x.get("error") and x.get("wall_s")), None)
        r["gap"] = explain_gap(r, floor) if floor else {"error": "no floor row"}


def gap_tables(rows: list[dict], size: int) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, lines) of the gap table at ``size`` (one line per handoff backend), then
    the same for the split of "the rest"."""
    def f(x: Any) -> str:
        return "—" if x is None else f"{x:.2f}"

    head = ["backend", "floor s", "handoff s", "gap s"] + [title + " s" for _, title in GAP_PARTS] + ["unaccounted s"]
    rest_head = (["backend", "the rest s"] + [title + " s" for _, title in REST_PARTS]
                 + ["alongside the transfer (overlaps it, not summed) s", "engine phases reported",
                    "of the hook overhead: producer's task setup s",
                    "unaccounted: before the producer's node s", "unaccounted: after the consumer's return s"])
    lines, rest_lines = [], []
    floor = next((x for x in rows if x.get("workflow") == FLOOR and x.get("size_mib") == size), None)
    for r in rows:
        if r.get("workflow") != HANDOFF or r.get("size_mib") != size:
            continue
        g = r.get("gap") or {}
        if r.get("error") or "error" in g or not g:
            why = r.get("error") or g.get("error") or "not computed"
            lines.append([str(r.get("backend")), f(floor and floor.get("wall_s")), f(r.get("wall_s")),
                          f"— ({_short(why, 80)})"] + [""] * (len(head) - 4))
            continue
        lines.append([str(r.get("backend")), f(floor.get("wall_s")), f(r.get("wall_s")), f(g["gap"])]
                     + [f(g.get(k)) for k, _ in GAP_PARTS] + [f(g.get("unaccounted"))])
        rest_lines.append([str(r.get("backend")), f(g.get("rest"))] + [f(g.get(k)) for k, _ in REST_PARTS]
                          + [f(g.get("alongside")), ", ".join(g.get("engine_phase_names") or []) or "none",
                             f(g.get("task_setup")), f(g.get("unaccounted_before")), f(g.get("unaccounted_after"))])
    return head, lines, rest_head, rest_lines


# ------------------------------------------------------------------- environment


def _point_covalent_at(servers, covalent_dir: Path, port: int):
    """Make this process's covalent use the private config; return what to restore.

    Before covalent is imported, the environment alone does it (the import writes
    the config file from COVALENT_*). If it is imported already (run() called
    twice, or by a caller that imported covalent), its config manager is rebuilt
    from the new environment, as at import, and the old one is put back after.
    """
    for var in [v for v in os.environ if servers.is_covalent_core_var(v)]:
        del os.environ[var]
    os.environ.update(servers.covalent_client_env(covalent_dir, port))
    if "covalent" not in sys.modules:
        return None
    from covalent._dispatcher_plugins import local as ct_local
    from covalent._shared_files import config as ct_config

    old = (ct_config._config_manager, ct_local.dispatch_cache_dir)
    ct_config._config_manager = ct_config.ConfigManager()
    # The one client path covalent reads from its config at import time.
    ct_local.dispatch_cache_dir = Path(ct_config.get_config("sdk.dispatch_cache_dir"))
    ct_local.dispatch_cache_dir.mkdir(parents=True, exist_ok=True)
    return old


def _restore_covalent(old) -> None:
    if old is None:
        return
    from covalent._dispatcher_plugins import local as ct_local
    from covalent._shared_files import config as ct_config

    ct_config._config_manager, ct_local.dispatch_cache_dir = old


def _warm_seaweed(kit, bucket: str, workdir: Path, mib: int) -> None:
    """Write ``mib`` MiB twice, untimed: a fresh SeaweedFS grows its first volumes then."""
    zeros = workdir / "warm-up.bin"
    with open(zeros, "wb") as f:
        f.truncate(mib * MiB)  # sparse: streams zeros without holding them
    try:
        for i in range(2):
            kit.client.upload_file(str(zeros), bucket, f"warm-up/{i}")
            kit.client.delete_object(Bucket=bucket, Key=f"warm-up/{i}")
    finally:
        zeros.unlink(missing_ok=True)


# --------------------------------------------------------------------------- run


def run(sizes_mib: list[int], backends: list[str], workdir: Path, quick: bool,
        timeout: float = DISPATCH_TIMEOUT) -> list[dict]:
    """Run the seed scenario at each size as by value, handoff and offload per backend, and floor.

    Returns one dict per (size, workflow, backend) with the keys size_mib,
    workflow, backend, wall_s, worker_rss_mib, client_rss_mib, added_mib, error,
    x_faster_than_by_value, x_floor and the extras described in the module docstring. ``workdir`` receives all
    state (servers' data, Covalent's config/db/results, staging files); the
    caller removes it.
    """
    unknown = [b for b in backends if b not in _kits.KIT_CLASSES]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    servers = _servers
    saved_env = dict(os.environ)
    reps = 1 if quick else 2

    covalent_dir = workdir / "covalent"
    port = servers.free_port(avoid_offsets=())
    old_covalent = _point_covalent_at(servers, covalent_dir, port)

    kits: dict = {}
    kit_errors: dict = {}  # backend, or (workflow, backend) -> why it has no rows
    server = None
    rows: list[dict] = []
    t_total = time.monotonic()
    try:
        # ---- storage servers, then Covalent with every kit's env --------------------
        kits, started_errors = start_kits(backends, workdir / "stores", _log)
        kit_errors.update({name: _short(why, 120) for name, why in started_errors.items()})
        env_extra: dict = {}
        for kit in kits.values():
            env_extra.update(kit.env)
        servers.apply_env(env_extra)  # the client builds transfers with these options
        # Only the server's (so its workers'): the hooks' timings, the electrons' marks.
        server_env = {**env_extra, TIMINGS_ENV: str(workdir / "timings.jsonl"),
                      MARKS_ENV: str(workdir / "marks.jsonl")}

        server = servers.CovalentServer(covalent_dir, env_extra=server_env, port=port)
        server.start()
        _log(f"covalent: {server.url} up in {server.start_seconds:.1f} s ({server.workers} dask workers)")

        import numpy  # noqa: F401 - fail early, before any dispatch
        import covalent as ct
        from covalent._shared_files import config as ct_config

        import covalent_lot as lot

        ct_config.reload_config()  # the server may have moved to another port

        buckets: dict[str, str] = {}
        for name, kit in list(kits.items()):
            try:
                buckets[name] = kit.new_bucket()
            except Exception as exc:  # noqa: BLE001
                kit_errors[name] = f"bucket creation failed: {_short(exc, 120)}"
                _log(f"{name}: {kit_errors[name]}")
                del kits[name]
        if "s3" in kits:
            _warm_seaweed(kits["s3"], buckets["s3"], workdir, min(256, max(sizes_mib)))

        lattices = _lattices(ct, lot, workdir, kits, buckets)
        order = ([(BY_VALUE, None)] + [(w, b) for w in STORED for b in backends if b in kits]
                 + [(FLOOR, None)])

        # ---- untimed warm-up: worker imports, first writes to each store -----------
        warm_want = _expected(WARM_N, 0)
        for config in list(order):
            lattice, producer, consumer = lattices[config]
            t0 = time.monotonic()
            warm = _measure(ct, servers, server, lattice, producer, consumer, WARM_N, 0, warm_want,
                            None, timeout, workdir)
            _log(f"warm-up {config[0]} {config[1] or ''}: {time.monotonic() - t0:.1f} s"
                 + (f" ERROR {warm['error']}" if warm["error"] else ""))
            if warm["error"] and config[0] in STORED:
                kit_errors[config] = f"warm-up failed: {warm['error']}"
                order.remove(config)
        with PeakRSS(servers, server.pgid) as idle:
            time.sleep(0.5)
        _log(f"idle after warm-up: largest server process {idle.worker_peak / MiB:.0f} MiB, "
             f"server tree {idle.tree_peak / MiB:.0f} MiB, client {idle.client_peak / MiB:.0f} MiB")

        # ---- measured rows ------------------------------------------------------------
        for mib in sizes_mib:
            n = mib * MiB // 8
            seed = mib
            want = _expected(n, seed)
            runs: dict = {config: [] for config in order}
            for rep in range(reps):
                for config in (order if rep % 2 == 0 else list(reversed(order))):
                    lattice, producer, consumer = lattices[config]
                    store_pid = kits[config[1]].server.pid if config[0] in STORED else None
                    row = _measure(ct, servers, server, lattice, producer, consumer, n, seed, want,
                                   store_pid, timeout, workdir)
                    runs[config].append(row)
                    extra = ""
                    if row["upload_s"] is not None or row["download_s"] is not None:
                        extra = f", upload {row['upload_s']} s, download {row['download_s']} s"
                    _log(f"{mib} MiB {config[0]} {config[1] or ''} run {rep + 1}/{reps}: "
                         f"wall {row['wall_s']:.2f} s, server {row['server_s']} s{extra}, "
                         f"worker peak {row['worker_rss_mib']:.0f} MiB"
                         + (f" ERROR {row['error']}" if row["error"] else ""))
            for workflow, backend in ([(BY_VALUE, None)] + [(w, b) for w in STORED for b in backends]
                                      + [(FLOOR, None)]):
                base = {"size_mib": mib, "workflow": workflow, "backend": backend}
                if (workflow, backend) in runs:
                    rows.append({**base, **_combine(runs[(workflow, backend)])})
                else:
                    error = kit_errors.get((workflow, backend)) or kit_errors.get(backend, "not run")
                    rows.append({**base, "wall_s": None, "worker_rss_mib": None, "client_rss_mib": None,
                                 "added_mib": None, "tree_rss_mib": None, "error": error})
            _add_ratios(rows)
            _add_gaps(rows)
        _log(f"done in {time.monotonic() - t_total:.0f} s")
        return rows
    finally:
        if server is not None:
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001
                _log(f"covalent stop failed: {exc}")
        for name, kit in kits.items():
            try:
                kit.stop()
            except Exception as exc:  # noqa: BLE001
                _log(f"{name} stop failed: {exc}")
        os.environ.clear()
        os.environ.update(saved_env)
        _restore_covalent(old_covalent)


# ------------------------------------------------------------------------ output


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    head = ("| size MiB | workflow | backend | wall s | x faster than by value | x floor | server s "
            "| producer s | consumer s "
            "| upload s | download s | worker peak RSS MiB | worker RSS at start MiB | server tree peak RSS MiB "
            "| client peak RSS MiB | store peak RSS MiB | added MiB | cache added MiB | error |")
    lines = [head, "|" + "---:|" * 1 + "---|---|" + "---:|" * 15 + "---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            _fmt(r["size_mib"]), r["workflow"], r["backend"] or "",
            _fmt(r.get("wall_s"), 2), _fmt(r.get("x_faster_than_by_value"), 2), _fmt(r.get("x_floor"), 2),
            _fmt(r.get("server_s"), 2), _fmt(r.get("producer_s"), 2),
            _fmt(r.get("consumer_s"), 2), _fmt(r.get("upload_s"), 2), _fmt(r.get("download_s"), 2),
            _fmt(r.get("worker_rss_mib"), 0), _fmt(r.get("worker_rss_start_mib"), 0),
            _fmt(r.get("tree_rss_mib"), 0),
            _fmt(r.get("client_rss_mib"), 0), _fmt(r.get("store_rss_mib"), 0),
            _fmt(r.get("added_mib"), 1), _fmt(r.get("cache_added_mib"), 1),
            _short(r.get("error") or "", 80).replace("|", "/"),
        ]) + " |")
    return "\n".join(lines)


def code_markdown(code: Optional[dict] = None) -> str:
    """The user code table: lines of the seed scenario per style (SEED_CODE)."""
    code = code or user_code()
    lines = ["| workflow | user code lines | lines added to the by-value code | by-value lines changed or removed |",
             "|---|---:|---:|---:|"]
    for workflow, c in code.items():
        lines.append(f"| {workflow} | {c['lines']} | {c['added']} | {c['removed']} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64", help="array sizes in MiB, comma-separated (default 16,64)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"handoff backends, comma-separated (default {','.join(BACKENDS)})")
    parser.add_argument("--quick", action="store_true", help="one run per configuration instead of best of 2")
    parser.add_argument("--workdir", type=Path, help="state dir (default: a new temp dir, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, data)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--timeout", type=float, default=DISPATCH_TIMEOUT, help="seconds per dispatch")
    parser.add_argument("--intermediate-outputs", action="store_true",
                        help="ct.get_result(..., intermediate_outputs=True) for every row (Covalent's default)")
    args = parser.parse_args(argv)

    global INTERMEDIATE_OUTPUTS
    INTERMEDIATE_OUTPUTS = args.intermediate_outputs
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lot-e2e-"))
    started = time.monotonic()
    try:
        rows = run(sizes, backends, workdir, args.quick, timeout=args.timeout)
    finally:
        if args.keep or args.workdir:
            print(f"workdir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    reps = "1 run per configuration" if args.quick else "best wall time of 2 runs, peak memory of both"
    print(f"\nseed scenario end to end (float64 array, producer -> consumer, private Covalent server, "
          f"2 dask workers, one machine), {reps}; "
          f"get_result(wait=True, intermediate_outputs={INTERMEDIATE_OUTPUTS}); total {elapsed:.0f} s\n")
    print(markdown(rows))
    for size in sorted({r["size_mib"] for r in rows if r.get("workflow") == HANDOFF}):
        head, lines, rest_head, rest_lines = gap_tables(rows, size)
        print(f"\nwhere the handoff's time over the floor goes, {size} MiB (seconds):\n")
        for h, ls in ((head, lines), (rest_head, rest_lines)):
            print("| " + " | ".join(h) + " |\n|" + "---|" * len(h))
            print("\n".join("| " + " | ".join(x) + " |" for x in ls) + "\n")
    print("\nseed scenario user code (bench/e2e.py SEED_CODE; imports, decorators and functions, blank "
          "lines not counted):\n")
    print(code_markdown())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
