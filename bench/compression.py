#!/usr/bin/env python
"""Compression trade-off of ``@lot.offload``: ``compress=False`` vs ``True`` vs ``"auto"``.

Three payloads of one size (256 MiB; 64 MiB with ``--quick``), numpy arrays
stored as ``.npy``:

* ``random float64``: ``rng.random(n)``, what zstd cannot shrink (~94%);
* ``int64 < 2^40``: ids or counters in int64, near the ``"auto"`` threshold
  (level 1 shrinks them to ~75%; "auto" compresses at <= AUTO_RATIO, 0.5);
* ``small ints``: int64 values 0-255 (labels, counts), very compressible (~13%).

For every backend (S3 on SeaweedFS; SFTP on OpenSSH sshd; both started here
through the integration kits), payload and ``compress`` choice, two fresh
child processes run outside Covalent, calling the decorated functions
directly (as an executor calls an electron's function):

* the producer: ``lot.offload(to=<kit folder>, compress=...)`` around a
  function returning the prebuilt array; timed: the call (encode into the
  local cache + sha256, the ``"auto"`` sample, zstd, upload), until it
  returns the ``lot.Ref`` (pickled to a file for the consumer);
* the consumer, with a staging dir of its own (as on another machine, so the
  object is downloaded): ``lot.offload`` around ``float(a.sum())``, called
  with the ``Ref``; timed: the call (HEAD, download + sha256, zstd
  decompress + sha256 of the decoded bytes, ``np.load``, the sum).

Each child warms up first (imports, one small offload through the store and
back), untimed; the parts are timed by wrapping ``_offload``'s steps (``sample``:
the ``"auto"`` decision; ``compress``/``decompress``: zstd including the
sha256 of its output; ``upload``/``download``: the engine's transfer time;
``decode``: ``np.load``). ``peak RSS`` = the child's VmHWM above its value
before the timed call. The consumer checks the array's sha256 against the
producer's (untimed) and removes the stored object. Median of ``--rounds``
(modes reversed every other round, payloads rotated). A CPU-only sweep of
zstd levels over 64 MiB of each payload (in memory, ``threads=-1`` as the
offload uses) and break-even link speeds complete it.

    python -m bench.compression [--quick] [--mib 256] [--rounds 3] [--backends s3,sftp] [--out bench/results]

Writes ``<out>/compression.md``, ``compression.json``, ``compression.png``.
``bench/suite.py`` runs it as its last part (``--skip-compression`` to leave it out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    # Run as a file (python bench/x.py, or a child run of one) rather than with -m:
    # the repository root makes the packages bench and integration importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e, report, throughput  # noqa: E402  (SeaweedFS warm-up, machine facts, child runner)
from bench.common import start_kits, stop_kit, write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 1 << 20

BACKENDS = ("s3", "sftp")
PAYLOADS = ("random float64", "int64 < 2^40", "small ints")
PAYLOAD_NOTES = {
    "random float64": "rng.random(n): float64 in [0, 1)",
    "int64 < 2^40": "rng.integers(0, 2**40, n): int64 ids/counters",
    "small ints": "rng.integers(0, 256, n): int64 labels/counts",
}
MODES = (False, True, "auto")
LEVELS = (-1, 1, 3)  # the CPU-only sweep
LEVEL_MIB = 64
FULL = {"mib": 256, "rounds": 3}
QUICK = {"mib": 64, "rounds": 1}
SEAWEED_WARM_MIB = 512  # SeaweedFS's first ~512 MiB into a new bucket are slow
CHILD_TIMEOUT = 900


def log(msg: str) -> None:
    print(f"[compression {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mode_name(mode: Any) -> str:
    return '"auto"' if mode == "auto" else str(mode)


# ------------------------------------------------------------------------- payloads


def make_payload(name: str, mib: int, seed: int = 0):
    import numpy as np

    n = mib * MiB // 8
    rng = np.random.default_rng(seed)
    if name == "random float64":
        return rng.random(n)
    if name == "int64 < 2^40":
        return rng.integers(0, 2**40, n, dtype=np.int64)
    if name == "small ints":
        return rng.integers(0, 256, n, dtype=np.int64)
    raise ValueError(f"unknown payload {name!r}")


def _array_sha(a) -> str:
    return hashlib.sha256(memoryview(a).cast("B")).hexdigest()


# ---------------------------------------------------------------------------- child


_high_water_mib = throughput._high_water_mib


def _reset_high_water() -> None:
    """Give freed heap back to the OS (else a later allocation reuses resident pages
    and never shows), then start VmHWM again from the current RSS (Linux: write 5
    to clear_refs)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class _Timers:
    """Wrap _offload's steps; seconds per step of the timed call."""

    def __init__(self, offload_module):
        self.m = offload_module
        self.seconds: dict[str, float] = {}
        self.on = False
        for name, step in (("_should_compress", "sample"), ("_compress", "compress"),
                           ("_decompress", "decompress"), ("_decode", "decode")):
            setattr(self.m, name, self._timed(getattr(self.m, name), step))
        build = self.m.build_engine

        def build_engine(*args, **kwargs):
            engine = build(*args, **kwargs)
            for action in ("upload", "download"):
                setattr(engine, action, self._transfer(getattr(engine, action), action))
            return engine

        self.m.build_engine = build_engine

    def _timed(self, fn, step: str):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - started
        return wrapper

    def _transfer(self, fn, action: str):
        def wrapper(*args, **kwargs):
            stats = fn(*args, **kwargs)
            if self.on:
                self.seconds[action] = self.seconds.get(action, 0.0) + stats.seconds
            return stats
        return wrapper


def _sample_ratio(path: str, offload_module) -> float:
    """What compress="auto" sees: the zstd ratio of its samples of the encoded file."""
    import zstandard

    m = offload_module
    size = os.path.getsize(path)
    compressor = zstandard.ZstdCompressor(level=m.ZSTD_LEVEL)
    taken = packed = 0
    with open(path, "rb") as f:
        for i in range(m.SAMPLES):
            f.seek(max(0, (size - m.SAMPLE_BYTES) * i // max(1, m.SAMPLES - 1)))
            sample = f.read(m.SAMPLE_BYTES)
            taken += len(sample)
            packed += len(compressor.compress(sample))
    return packed / taken


def _warm(lot, offload_module, to: str, staging: str) -> None:
    """Untimed: imports, the store's client, one small compressed offload and load."""
    import numpy as np

    small = np.arange(128 * 1024, dtype=np.int64) % 7

    def warm():
        return small

    ref = lot.offload(to=to, min_size=0, compress=True)(warm)()
    shutil.rmtree(os.path.join(staging, "objects"), ignore_errors=True)
    assert int(ref.load().sum()) == int(small.sum())
    _delete(ref, offload_module)
    shutil.rmtree(os.path.join(staging, "objects"), ignore_errors=True)


def _delete(ref, offload_module) -> None:
    from covalent_lot._uri import parse_uri

    m = offload_module
    engine = m.build_engine(m._load(ref.strategy).backend_path, m._settings(ref))
    try:
        engine.delete(parse_uri(ref.uri))
    finally:
        engine.backend.close()


def child_produce(spec: dict) -> dict:
    """The producer: offload the payload, write the Ref to spec["ref_file"]."""
    import covalent_lot as lot
    from covalent_lot import _offload

    timers = _Timers(_offload)
    _warm(lot, _offload, spec["to"], spec["staging"])
    array = make_payload(spec["payload"], spec["mib"])

    def produce():
        return array

    fn = lot.offload(to=spec["to"], compress=spec["mode"])(produce)
    _reset_high_water()
    base = _high_water_mib()
    timers.on = True
    started = time.perf_counter()
    ref = fn()
    seconds = time.perf_counter() - started
    timers.on = False
    peak = _high_water_mib() - base
    if not isinstance(ref, lot.Ref):
        raise RuntimeError(f"the producer returned {type(ref).__name__}, not a lot.Ref")
    with open(spec["ref_file"], "wb") as f:
        pickle.dump(ref, f)
    cached = _offload._cache_path(os.path.join(spec["staging"], "objects"), ref.raw_sha256, ref.codec)
    t = timers.seconds
    return {
        "producer_seconds": seconds, "producer_peak_mib": peak, "array_sha256": _array_sha(array),
        "stored_bytes": ref.size, "raw_bytes": ref.raw_size, "compression": ref.compression,
        "sample_ratio": _sample_ratio(cached, _offload),
        "sample_s": t.get("sample", 0.0), "compress_s": t.get("compress", 0.0), "upload_s": t.get("upload", 0.0),
        "encode_s": seconds - sum(t.get(k, 0.0) for k in ("sample", "compress", "upload")),
        "zstd_level": _offload.ZSTD_LEVEL, "auto_ratio": _offload.AUTO_RATIO,
    }


def child_consume(spec: dict) -> dict:
    """The consumer, with a staging dir of its own (another machine): load the Ref, sum."""
    import covalent_lot as lot
    from covalent_lot import _offload

    timers = _Timers(_offload)
    _warm(lot, _offload, spec["to"], spec["staging"])
    with open(spec["ref_file"], "rb") as f:
        ref = pickle.load(f)
    seen: list = []

    def consume(a):
        seen.append(a)  # checked after the timed call
        return float(a.sum())

    fn = lot.offload(consume)
    _reset_high_water()
    base = _high_water_mib()
    timers.on = True
    started = time.perf_counter()
    total = fn(ref)
    seconds = time.perf_counter() - started
    timers.on = False
    peak = _high_water_mib() - base
    correct = bool(seen) and _array_sha(seen[0]) == spec["array_sha256"] and total == float(seen[0].sum())
    seen.clear()
    _delete(ref, _offload)
    t = timers.seconds
    return {
        "consumer_seconds": seconds, "consumer_peak_mib": peak, "correct": correct,
        "download_s": t.get("download", 0.0), "decompress_s": t.get("decompress", 0.0),
        "decode_s": t.get("decode", 0.0),
        "other_s": seconds - sum(t.get(k, 0.0) for k in ("download", "decompress", "decode")),
    }


def child_levels(spec: dict) -> dict:
    """CPU only: zstd level sweep over LEVEL_MIB of each payload, in memory, threads=-1."""
    import zstandard

    rows = []
    for payload in spec["payloads"]:
        data = memoryview(make_payload(payload, spec["mib"])).cast("B")
        for level in spec["levels"]:
            best_c = best_d = float("inf")
            packed = b""
            for _ in range(2):
                started = time.perf_counter()
                packed = zstandard.ZstdCompressor(level=level, threads=-1).compress(data)
                best_c = min(best_c, time.perf_counter() - started)
                started = time.perf_counter()
                out = zstandard.ZstdDecompressor().decompress(packed)
                best_d = min(best_d, time.perf_counter() - started)
                del out
            rows.append({"payload": payload, "level": level, "ratio": len(packed) / len(data),
                         "compress_mib_s": spec["mib"] / best_c, "decompress_mib_s": spec["mib"] / best_d})
    return {"rows": rows}


def child_main(spec: dict) -> dict:
    return {"produce": child_produce, "consume": child_consume, "levels": child_levels}[spec["role"]](spec)


# ---------------------------------------------------------------------------- parent


def run_child(spec: dict, env: Optional[dict] = None, timeout: float = CHILD_TIMEOUT) -> dict:
    return throughput.run_child(spec, timeout, script=Path(__file__).resolve(), env=env)


def _child_env(work: Path, kit_env: dict, staging: Path) -> dict:
    """This process's environment with the kit's, a private HOME (importing covalent
    writes its config there) and the child's own staging dir."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("COVALENT_") and not k.startswith("COVALENT_LOT_"))}
    for key, value in kit_env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    env["HOME"] = str(work / "home")
    env["COVALENT_LOT_STAGING_DIR"] = str(staging)
    return env


def _measure_pair(name: str, kit, bucket: str, payload: str, mode: Any, mib: int, work: Path) -> dict:
    prod_staging, cons_staging = work / "staging-producer", work / "staging-consumer"
    ref_file = work / "ref.pkl"
    to = kit.uri(bucket, f"compression/{payload.replace(' ', '-').replace('^', '')}/")
    row: dict = {"backend": name, "payload": payload, "compress": mode, "size_mib": mib, "error": None}
    try:
        spec = {"role": "produce", "to": to, "payload": payload, "mode": mode, "mib": mib,
                "staging": str(prod_staging), "ref_file": str(ref_file)}
        prod = run_child(spec, _child_env(work, kit.env, prod_staging))
        if "error" in prod:
            row["error"] = f"producer: {prod['error']}"
            return row
        row.update(prod)
        spec = {"role": "consume", "to": to, "staging": str(cons_staging), "ref_file": str(ref_file),
                "array_sha256": row.pop("array_sha256")}
        cons = run_child(spec, _child_env(work, kit.env, cons_staging))
        if "error" in cons:
            row["error"] = f"consumer: {cons['error']}"
            return row
        row.update(cons)
        row["total_s"] = row["producer_seconds"] + row["consumer_seconds"]
        if not cons["correct"]:
            row["error"] = "the consumer's array differs from the producer's"
        return row
    finally:
        for path in (prod_staging, cons_staging):
            shutil.rmtree(path, ignore_errors=True)
        ref_file.unlink(missing_ok=True)


NUMERIC = ("producer_seconds", "consumer_seconds", "total_s", "producer_peak_mib", "consumer_peak_mib",
           "sample_s", "compress_s", "upload_s", "encode_s", "download_s", "decompress_s", "decode_s",
           "other_s")


def _combine(runs: list[dict]) -> dict:
    """Median of every timing over the runs that worked (the most for peak RSS)."""
    ok = [r for r in runs if not r.get("error")]
    if not ok:
        return {**runs[0], "runs": len(runs)}
    out = dict(ok[0])
    for key in NUMERIC:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = max(values) if key.endswith("peak_mib") else statistics.median(values)
    out["total_s_all"] = [round(r["total_s"], 3) for r in ok]
    out["runs"] = len(runs)
    out["ratio"] = out["stored_bytes"] / out["raw_bytes"]
    if len(ok) < len(runs):
        out["error"] = f"{len(runs) - len(ok)} of {len(runs)} runs failed: " + \
            next(r["error"] for r in runs if r.get("error"))
    return out


def breakeven(rows: list[dict]) -> list[dict]:
    """Per backend and payload, from the compress=True row: the link speed (MiB/s, same
    both ways) below which zstd saves more transfer time than it costs, for a consumer
    on another machine (upload + download saved; compress + decompress paid) and on the
    producer's (the consumer reads the producer's cached raw copy: upload saved, compress paid)."""
    out = []
    for r in rows:
        if r["compress"] is not True or r.get("error") or r.get("compress_s") is None:
            continue
        raw_mib = r["raw_bytes"] / MiB
        saved = raw_mib * (1 - r["ratio"])
        cost_cross = r["compress_s"] + r["decompress_s"]
        plain = _find(rows, backend=r["backend"], payload=r["payload"], compress=False)
        out.append({
            "backend": r["backend"], "payload": r["payload"], "ratio": r["ratio"],
            "compress_s": r["compress_s"], "decompress_s": r["decompress_s"],
            "breakeven_cross_mib_s": 2 * saved / cost_cross if cost_cross > 0 else None,
            "breakeven_same_mib_s": saved / r["compress_s"] if r["compress_s"] > 0 else None,
            "measured_saving_s": (plain["total_s"] - r["total_s"]) if plain and not plain.get("error") else None,
            "upload_mib_s": raw_mib / plain["upload_s"] if plain and plain.get("upload_s") else None,
            "download_mib_s": raw_mib / plain["download_s"] if plain and plain.get("download_s") else None,
        })
    return out


def _find(rows, **match) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def run(mib: int, rounds: int, backends: list[str], work: Path, payloads=PAYLOADS, modes=MODES) -> dict:
    """Measure every (backend, payload, mode); returns {"rows", "levels", "breakeven", "errors"}."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "home").mkdir(exist_ok=True)
    runs: dict = {}
    started, errors = start_kits(backends, work / "stores", log)
    started_kits: dict = {}
    try:
        for name, kit in started.items():
            try:
                started_kits[name] = (kit, kit.new_bucket())
                if name == "s3":
                    e2e._warm_seaweed(kit, started_kits[name][1], work, max(mib, SEAWEED_WARM_MIB))
            except Exception as exc:  # noqa: BLE001 - a backend that cannot serve: record, go on
                errors[name] = f"kit did not start: {type(exc).__name__}: {exc}"
                log(errors[name])
                stop_kit(kit)
                started_kits.pop(name, None)
        for rnd in range(rounds):
            order = list(modes) if rnd % 2 == 0 else list(reversed(modes))
            shift = rnd % len(payloads)  # payloads rotated too: no payload always runs first
            for name, (kit, bucket) in started_kits.items():
                for payload in list(payloads[shift:]) + list(payloads[:shift]):
                    for mode in order:
                        row = _measure_pair(name, kit, bucket, payload, mode, mib, work)
                        runs.setdefault((name, payload, mode), []).append(row)
                        if row.get("error"):
                            log(f"{name} {payload} compress={mode_name(mode)} round {rnd + 1}/{rounds}: "
                                f"ERROR {row['error']}")
                        else:
                            log(f"{name} {payload} compress={mode_name(mode)} round {rnd + 1}/{rounds}: "
                                f"stored {row['stored_bytes'] / MiB:.1f} MiB, producer "
                                f"{row['producer_seconds']:.2f} s, consumer {row['consumer_seconds']:.2f} s")
    finally:
        for name, (kit, _bucket) in started_kits.items():
            try:
                kit.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"{name} stop failed: {exc}")
    rows = [_combine(runs[(name, payload, mode)]) for name in backends for payload in payloads
            for mode in modes if (name, payload, mode) in runs]
    for row in rows:
        row.pop("correct", None)
    levels = run_child({"role": "levels", "payloads": list(payloads), "levels": list(LEVELS),
                        "mib": min(LEVEL_MIB, mib)}, _child_env(work, {}, work / "staging-levels"))
    if "error" in levels:
        errors["levels"] = levels["error"]
    return {"rows": rows, "levels": levels.get("rows", []), "breakeven": breakeven(rows), "errors": errors}


# ------------------------------------------------------------------------ output


def _f(x: Optional[float], fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def tables(result: dict) -> str:
    """The markdown tables (also a section of bench/suite.py's latest.md)."""
    rows = result.get("rows", [])
    parts = []
    if rows:
        body = []
        for r in rows:
            if r.get("error") and r.get("total_s") is None:
                body.append([r["backend"], r["payload"], mode_name(r["compress"])] + ["—"] * 7
                            + [f"failed: {str(r['error'])[:100]}"])
                continue
            plain = _find(rows, backend=r["backend"], payload=r["payload"], compress=False)
            vs = plain["total_s"] / r["total_s"] if plain and plain.get("total_s") else None
            body.append([r["backend"], r["payload"], mode_name(r["compress"]),
                         _f(r["stored_bytes"] / MiB, "{:.1f}"), _f(r["ratio"]), _f(r["producer_seconds"]),
                         _f(r["consumer_seconds"]), _f(r["total_s"]), _f(vs, "{:.2f}x"),
                         f"{r['producer_peak_mib']:.0f} / {r['consumer_peak_mib']:.0f}",
                         "yes" if not r.get("error") else str(r["error"])[:100]])
        parts.append(_table(["backend", "payload", "compress", "stored MiB", "stored / raw", "producer s",
                             "consumer s", "total s", "speed vs False", "peak RSS MiB prod / cons", "correct?"],
                            body, ["---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:",
                                   "---"]))
        body = [[r["backend"], r["payload"], mode_name(r["compress"]), _f(r.get("sample_ratio")),
                 _f(r.get("encode_s")), _f(r.get("sample_s"), "{:.3f}"), _f(r.get("compress_s")),
                 _f(r.get("upload_s")), _f(r.get("download_s")), _f(r.get("decompress_s")), _f(r.get("decode_s")),
                 _f(r.get("other_s"))] for r in rows if r.get("total_s") is not None]
        parts += ["", "Where the time goes (seconds, medians):", "",
                  _table(["backend", "payload", "compress", "auto's sample ratio", "encode + sha256", "sample",
                          "zstd + sha256", "upload", "download", "unzstd + sha256", "np.load", "consumer other"],
                         body, ["---", "---", "---"] + ["---:"] * 9)]
    be = result.get("breakeven", [])
    if be:
        body = [[b["backend"], b["payload"], _f(b["ratio"]), _f(b["compress_s"]), _f(b["decompress_s"]),
                 _f(b["upload_mib_s"], "{:.0f}"), _f(b["download_mib_s"], "{:.0f}"),
                 _f(b["breakeven_cross_mib_s"], "{:.0f}"), _f(b["breakeven_same_mib_s"], "{:.0f}"),
                 _f(b["measured_saving_s"], "{:+.2f}")] for b in be]
        parts += ["", "Break-even link speed (compress=True vs False): zstd wins when the store is reached "
                  "slower than this (MiB/s, both directions alike); *other machine*: upload and download "
                  "saved, compress and decompress paid; *same machine*: the consumer reads the producer's "
                  "cached raw copy, so only the upload is saved and only compress paid.", "",
                  _table(["backend", "payload", "stored / raw", "zstd s", "unzstd s", "upload MiB/s here",
                          "download MiB/s here", "break-even, other machine", "break-even, same machine",
                          "measured saving here s"], body, ["---", "---"] + ["---:"] * 8)]
    lv = result.get("levels", [])
    if lv:
        body = [[r["payload"], str(r["level"]), _f(r["ratio"], "{:.3f}"), _f(r["compress_mib_s"], "{:.0f}"),
                 _f(r["decompress_mib_s"], "{:.0f}")] for r in lv]
        parts += ["", f"zstd levels, CPU only ({min(LEVEL_MIB, result.get('settings', {}).get('size_mib', LEVEL_MIB))} "
                  "MiB in memory, threads=-1, best of 2):", "",
                  _table(["payload", "level", "stored / raw", "compress MiB/s", "decompress MiB/s"], body,
                         ["---", "---:", "---:", "---:", "---:"])]
    return "\n".join(parts)


def markdown(result: dict) -> str:
    s = result.get("settings", {})
    m = result.get("machine", {})
    lines = [f"# covalent-lot offload compression — {result.get('date', '?')}", "",
             f"- {m.get('cores')} cores ({m.get('cpu', '?')}), {m.get('ram_gib', '?')} GiB RAM; Python "
             f"{m.get('python')}; zstandard {m.get('zstandard')}; stores on 127.0.0.1 (SeaweedFS S3, OpenSSH sshd)",
             f"- mode **{s.get('mode')}**: {s.get('size_mib')} MiB per payload, median of {s.get('rounds')} "
             f"round(s); backends {', '.join(s.get('backends', []))}; zstd level {s.get('zstd_level')}, "
             f"AUTO_RATIO {s.get('auto_ratio')}",
             "- payloads (numpy arrays, stored as .npy): " + "; ".join(
                 f"*{p}*: {PAYLOAD_NOTES[p]}" for p in s.get("payloads", PAYLOADS)),
             "- producer and consumer each in a fresh process (warmed up: imports, a small offload and "
             "load): the producer `lot.offload(to=..., compress=...)` called directly, timed from the call "
             "to the returned `Ref`: encode into the local cache + sha256, auto's sample, zstd (+ sha256), "
             "upload; the consumer with a staging dir of its own (as on another machine), timed from the "
             "call with the `Ref` to its return: HEAD, download (+ sha256), decompress (+ sha256), "
             "np.load, the sum; peak RSS: VmHWM above its value before the call",
             "- every array checked by sha256 between producer and consumer, untimed",
             f"- load average (1/5/15 min) at the start {m.get('loadavg_start')}, at the end "
             f"{m.get('loadavg_end')}", ""]
    lines.append(tables(result))
    errors = result.get("errors", {})
    if errors:
        lines += ["", "Errors:", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    if result.get("run_seconds") is not None:
        lines += ["", f"Run time: {result['run_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.get("rows", []) if r.get("total_s") is not None]
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(backends)), figsize=(6.5 * max(1, len(backends)), 4.6), squeeze=False)
    colors = {"encode_s": "tab:gray", "sample_s": "tab:olive", "compress_s": "tab:red", "upload_s": "tab:blue",
              "download_s": "tab:cyan", "decompress_s": "tab:pink", "decode_s": "tab:green",
              "other_s": "tab:brown"}
    labels = {"encode_s": "encode + sha256", "sample_s": "auto sample", "compress_s": "zstd",
              "upload_s": "upload", "download_s": "download", "decompress_s": "unzstd", "decode_s": "np.load",
              "other_s": "consumer other"}
    for ax, backend in zip(axes.flat, backends):
        xs, ticks = 0, []
        for payload in PAYLOADS:
            for mode in MODES:
                r = _find(rows, backend=backend, payload=payload, compress=mode)
                if r is None:
                    continue
                bottom = 0.0
                for key, color in colors.items():
                    value = max(0.0, r.get(key) or 0.0)
                    ax.bar(xs, value, 0.8, bottom=bottom, color=color,
                           label=labels[key] if backend == backends[0] and not ticks else None)
                    bottom += value
                ax.text(xs, bottom, f"{r['ratio']:.2f}", ha="center", va="bottom", fontsize=7)
                ticks.append((xs, f"{payload}\n{mode_name(mode)}"))
                xs += 1
            xs += 0.6
        ax.set_xticks([t[0] for t in ticks])
        ax.set_xticklabels([t[1] for t in ticks], fontsize=6.5, rotation=45, ha="right")
        ax.set_ylabel("seconds (producer + consumer)")
        ax.set_title(f"{backend}: time per step; stored / raw above each bar")
        ax.grid(True, axis="y", alpha=0.3)
    if backends:
        axes.flat[0].legend(fontsize=7)
    else:
        axes.flat[0].text(0.5, 0.5, "no rows", ha="center")
    s = result.get("settings", {})
    fig.suptitle(f"@lot.offload compress=False / True / \"auto\", {s.get('size_mib')} MiB "
                 f"({result.get('date', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_facts() -> dict:
    facts = report.machine_facts()
    try:
        import importlib.metadata

        facts["zstandard"] = importlib.metadata.version("zstandard")
    except Exception:  # noqa: BLE001
        facts["zstandard"] = "not installed"
    return facts


def measure(mib: int, rounds: int, backends: list[str], quick: bool, work: Path) -> dict:
    """Everything bench/suite.py needs: run() plus date, machine, settings, run time."""
    started = time.monotonic()
    facts = machine_facts()
    facts["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]  # other work skews every figure
    result: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": facts,
                    "settings": {"mode": "quick" if quick else "full", "size_mib": mib, "rounds": rounds,
                                 "backends": backends, "payloads": list(PAYLOADS),
                                 "modes": [m if isinstance(m, str) else bool(m) for m in MODES]}}
    try:
        result.update(run(mib, rounds, backends, work))
    except Exception as exc:  # noqa: BLE001 - record and carry on (KeyboardInterrupt re-raised)
        if isinstance(exc, KeyboardInterrupt):
            raise
        log(traceback.format_exc())
        result.setdefault("rows", [])
        result.setdefault("errors", {})["run"] = f"{type(exc).__name__}: {exc}"
    first = next((r for r in result.get("rows", []) if r.get("zstd_level") is not None), {})
    result["settings"]["zstd_level"] = first.get("zstd_level")
    result["settings"]["auto_ratio"] = first.get("auto_ratio")
    result["run_seconds"] = time.monotonic() - started
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def write(result: dict, out: Path) -> str:
    return write_report(out, "compression", markdown(result), result,
                        {"compression.png": lambda path: plot(result, path)}, log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['mib']} MiB, {QUICK['rounds']} round")
    parser.add_argument("--mib", type=int, help=f"payload size (default {FULL['mib']})")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']})")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    work = Path(tempfile.mkdtemp(prefix="lot-compression-"))
    try:
        result = measure(args.mib or mode["mib"], args.rounds or mode["rounds"], backends, args.quick, work)
        text = write(result, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    log(f"wrote {args.out}/compression.md, compression.json, compression.png in {result['run_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        import logging

        logging.getLogger("covalent_lot").setLevel(logging.WARNING)
        print(json.dumps(child_main(spec)))
        sys.exit(0)
    sys.exit(main())
