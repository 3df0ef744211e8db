"""Transfers through a faulty network: each backend's strategy talks to its real
server through a :class:`FaultProxy` that drops, stalls or resets connections, or
answers HTTP requests with the service's 503.

Matrix: fault (drop, stall, reset, 503 for the HTTP backends) x direction
(upload, download) x shape (one file, a folder) x variant:

* transient (fires once): the transfer must complete with identical bytes;
* persistent (fires every time): it must fail, within a bounded time, with a
  built-in ``OSError`` (``ConnectionError``, ``TimeoutError``, ...) naming the endpoint.

Either way nothing partial is left: a local destination keeps its old content
(or gets the complete new one), and no object/file shows under a final name
unless it is complete and identical (checked with the kit's plain SDK). Only
``TEMP_MARK`` files may stay behind (an SFTP upload whose connection died
cannot remove its partial file).

``test_resume_after_one_drop`` measures how many bytes a transfer re-sends
after ONE connection drop at ~60 %, per backend and direction; the table is
printed at the end of the module and written to ``<lot_session_dir>/resume.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from covalent_lot._stream import TEMP_MARK

from integration import _faultproxy as fp

MiB = 1024 * 1024
from integration._kits import SIDECAR, is_sidecar
TIMEOUT = 2.0  # read/io timeouts: a stall longer than this makes the client retry
FAULT_AT = 1 * MiB  # bytes into a connection (in the transfer's direction)
TRANSIENT_STALL = 2 * TIMEOUT  # longer than the timeout: the client gives up and retries
PERSISTENT_STALL = 120.0  # ends early when the client hangs up; a client that waits it out HANGs
# Persistent faults use fewer attempts: SDK retries (boto3, azure-core) nest inside
# the engine's, so a persistent stall costs attempts**2 timeouts.
ATTEMPTS = {"transient": 4, "persistent": 2}
FAIL_WITHIN = 60.0  # seconds for a persistent fault to surface (measured <= ~17 s)
HANG = 90.0  # a transfer still running after this long is reported as hung

FILE_SIZE = 20 * MiB + 4321  # several parts/chunks/blocks, a ragged last one
FOLDER = {"a.bin": 9 * MiB + 17, "sub/b.bin": 6 * MiB + 5, "sub/c.txt": 1000}
RESUME_SIZE = 48 * MiB
RESUME_PART = 8 * MiB

# Small parts keep the data small while multipart/resumable/block/pipelined paths run.
PARTS = {
    "s3": lambda part: {"multipart_threshold": part, "multipart_chunksize": part},
    "gcs": lambda part: {"chunk_size": part},  # resumable above 8 MiB (the SDK's own threshold)
    "azure": lambda part: {"max_block_size": part, "max_single_put_size": part},
    "sftp": lambda part: {"chunk_size": part},
}
TIMEOUTS = {
    "s3": {"connect_timeout": TIMEOUT, "read_timeout": TIMEOUT},
    "gcs": {"timeout": TIMEOUT},
    "azure": {"connect_timeout": TIMEOUT, "read_timeout": TIMEOUT},
    "sftp": {"connect_timeout": TIMEOUT, "io_timeout": TIMEOUT, "banner_timeout": 10.0, "auth_timeout": 10.0},
}
DEFAULT_PART = {"s3": 5 * MiB, "gcs": 2 * MiB, "azure": 4 * MiB, "sftp": 4 * MiB}


# --- helpers --------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_random(path: Path, size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def local_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Route:
    """A backend reached through a fault proxy: strategies and URIs that go via it."""

    kit: object
    proxy: fp.FaultProxy
    bucket: str
    endpoint_options: dict

    def strategy(self, part: int | None = None, **options):
        name = self.kit.name
        return self.kit.strategy(**{**self.endpoint_options, **TIMEOUTS[name],
                                    **PARTS[name](part or DEFAULT_PART[name]), **options})

    def uri(self, key: str) -> str:
        if self.kit.name == "sftp":
            return f"sftp://root@{fp.LOOPBACK}:{self.proxy.port}{self.kit.root}/{self.bucket}/{key}"
        return self.kit.uri(self.bucket, key)

    def stored(self, prefix: str) -> dict[str, str]:
        """Key below ``prefix`` -> sha256 of its bytes, read with the plain SDK; TEMP_MARK
        files and SFTP sidecars are left out (their own checks are in check_store)."""
        return {key[len(prefix):]: sha256_bytes(self.kit.get_bytes(self.bucket, key))
                for key in self.kit.list_keys(self.bucket, prefix)
                if TEMP_MARK not in key and not is_sidecar(key)}


def _proxied(kit, proxy: fp.FaultProxy, workdir: Path) -> dict:
    """Strategy options that send ``kit``'s strategy through ``proxy``."""
    via = f"http://{fp.LOOPBACK}:{proxy.port}"
    if kit.name == "s3":
        return {"endpoint_url": via}
    if kit.name == "gcs":
        return {"endpoint": via}
    if kit.name == "azure":  # account_url wins over the connection string's BlobEndpoint
        return {"account_url": via + urlsplit(kit.endpoint).path}
    # SFTP: the proxy's port is in the URI; the host key is trusted under that port.
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[{fp.LOOPBACK}]:{proxy.port} {kit.server.host_public_key}\n")
    return {"known_hosts": str(known_hosts)}


def _upstream(kit) -> tuple[str, int]:
    if kit.name == "sftp":
        return fp.LOOPBACK, kit.server.port
    parts = urlsplit(kit.endpoint)
    return parts.hostname, parts.port


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Local source data, shared by every backend: one file and a folder."""
    root = tmp_path_factory.mktemp("fault-sources")
    data = {"file": {"file.bin": write_random(root / "file.bin", FILE_SIZE)}, "folder": {}}
    for rel, size in FOLDER.items():
        data["folder"][rel] = write_random(root / "folder" / rel, size)
    return {"root": root, "data": data}


@pytest.fixture(scope="module")
def route(kit, sources, tmp_path_factory):
    """A fresh bucket holding the sources under seed/, and a proxy to the kit's server."""
    workdir = tmp_path_factory.mktemp(f"faults-{kit.name}")
    bucket = kit.new_bucket()
    with fp.FaultProxy(*_upstream(kit)) as proxy:
        r = Route(kit, proxy, bucket, _proxied(kit, proxy, workdir))
        seed = r.strategy()
        seed.put(str(sources["root"] / "file.bin"), r.uri("seed/file.bin"))
        seed.put(str(sources["root"] / "folder"), r.uri("seed/folder/"))
        yield r
    kit.delete_bucket(bucket)


@pytest.fixture(scope="module")
def fault_log(request, lot_session_dir):
    """Outcome of every fault run; summarized when the module ends."""
    rows: list[dict] = []
    yield rows
    _report(request, lot_session_dir / "faults.json", rows, _fault_summary(rows))


@pytest.fixture(scope="module")
def resume_table(request, lot_session_dir):
    rows: list[dict] = []
    yield rows
    lines = [f"{'backend':8} {'dir':5} {'size MiB':>8} {'overhead MiB':>12} {'forwarded MiB':>13} "
             f"{'re-sent MiB':>11} {'re-sent %':>9}"]
    for r in rows:
        lines.append(f"{r['backend']:8} {r['direction']:5} {r['size'] / MiB:8.1f} {r['overhead'] / MiB:12.2f} "
                     f"{r['forwarded'] / MiB:13.2f} {r['resent'] / MiB:11.2f} {100 * r['resent'] / r['size']:9.1f}")
    _report(request, lot_session_dir / "resume.json", rows,
            "resume after one drop at 60% (re-sent = forwarded - no-fault run):\n" + "\n".join(lines))


def _fault_summary(rows: list[dict]) -> str:
    lines = [f"fault runs: {len(rows)}"]
    for r in rows:
        outcome = r.get("error", "").split(":")[0] or f"ok, {r.get('retries')} retries"
        lines.append(f"  {r['backend']:6} {r['fault']:6} {r['direction']:5} {r['shape']:6} "
                     f"{r['variant']:10} {r['seconds']:5.1f}s fired={r['fired']:<3} "
                     f"{outcome} leftovers={r.get('leftovers', '?')}")
    return "\n".join(lines)


def _report(request, path: Path, rows: list[dict], text: str) -> None:
    if not rows:
        return
    path.write_text(json.dumps(rows, indent=1))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{text}\n(written to {path})")


# --- the matrix -----------------------------------------------------------------------------

def make_fault(name: str, direction: str, variant: str, service: str):
    times = 1 if variant == "transient" else fp.ALWAYS
    if name == "drop":
        return fp.Drop(direction, FAULT_AT, times)
    if name == "reset":  # RST to the client: mid-response (download) or mid-request (upload)
        return fp.Reset(direction, FAULT_AT, times)
    if name == "stall":
        seconds = TRANSIENT_STALL if variant == "transient" else PERSISTENT_STALL
        return fp.Stall(direction, FAULT_AT, seconds, times)
    return fp.Http503(service, times)


def check_error(exc: BaseException, route: Route) -> None:
    """Persistent faults end in a built-in OSError (not an SDK's) that names the endpoint."""
    assert isinstance(exc, OSError) and type(exc).__module__ == "builtins", repr(exc)
    assert f"{fp.LOOPBACK}:{route.proxy.port}" in str(exc), str(exc)


def check_store(route: Route, prefix: str, expected: dict[str, bytes], complete: bool) -> list[str]:
    """After an upload: every visible object is complete and identical (all of them if
    ``complete``); returns the TEMP_MARK leftovers."""
    stored = route.stored(prefix)
    want = {rel: sha256_bytes(data) for rel, data in expected.items()}
    if complete:
        assert stored == want
    else:
        assert set(stored) <= set(want) and all(stored[k] == want[k] for k in stored), sorted(stored)
    keys = route.kit.list_keys(route.bucket, prefix)
    if route.kit.name == "sftp":  # a sidecar only beside its object
        assert {k for k in keys if k.endswith(SIDECAR)} == {prefix + k + SIDECAR for k in stored}, keys
    return [k for k in keys if TEMP_MARK in k]


def check_local(dest: Path, old: dict[str, bytes], new: dict[str, bytes], complete: bool) -> list:
    """After a download: every file holds its old or its complete new content; no partials."""
    found = local_files(dest)
    assert set(found) == set(old), sorted(found)
    for rel, data in found.items():
        assert data == new[rel] or (not complete and data == old[rel]), f"{rel}: partial or corrupt"
    return []  # (the engine removes its local temporary files itself)


def bounded(fn, seconds: float = HANG):
    """``fn()`` in a daemon thread: a hung transfer fails the test instead of the run."""
    outcome: dict = {}

    def call():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=call, name="fault-transfer", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"transfer HUNG: still running after {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_transfer(route: Route, direction: str, shape: str, sources: dict, tmp_path: Path, variant: str):
    """(transfer, check) for one upload or download of ``shape``; ``check(complete)``
    looks at the result and returns the TEMP_MARK leftovers."""
    strategy = route.strategy(max_attempts=ATTEMPTS[variant], base_delay=0.05)
    data = sources["data"][shape]  # relative path -> bytes; "file.bin" for the file
    name = "file.bin" if shape == "file" else "folder/"
    if direction == fp.UP:
        prefix = f"{route.kit.unique('up')}/"
        below = prefix if shape == "file" else prefix + name
        return (lambda: strategy.put(str(sources["root"] / name), route.uri(prefix + name)),
                lambda complete: check_store(route, below, data, complete))
    # The destination exists with old content, which a failure must leave in place.
    root = tmp_path / "dest" if shape == "file" else tmp_path / "dest" / "folder"
    old = {rel: b"old content of " + rel.encode() for rel in data}
    for rel, content in old.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    destination = root / name if shape == "file" else root
    return (lambda: strategy.get(route.uri("seed/" + name), str(destination)),
            lambda complete: check_local(root, old, data, complete))


@pytest.mark.parametrize("variant", ["transient", "persistent"])
@pytest.mark.parametrize("shape", ["file", "folder"])
@pytest.mark.parametrize("direction", [fp.UP, fp.DOWN], ids=["upload", "download"])
@pytest.mark.parametrize("fault", ["drop", "stall", "reset", "503"])
def test_fault(route, fault, direction, shape, variant, sources, tmp_path, fault_log):
    kit = route.kit
    if fault == "503" and kit.name == "sftp":
        pytest.skip("SFTP is not HTTP")
    transfer, check = run_transfer(route, direction, shape, sources, tmp_path, variant)
    row = {"backend": kit.name, "fault": fault, "direction": direction, "shape": shape, "variant": variant}
    route.proxy.set_fault(make_fault(fault, direction, variant, kit.name))
    started = time.monotonic()
    try:
        if variant == "transient":
            stats = bounded(transfer)
            row["retries"] = stats.retries
        else:
            with pytest.raises(Exception) as info:
                bounded(transfer)
            row["error"] = f"{type(info.value).__name__}: {str(info.value)[:160]}"
    finally:
        row["seconds"] = round(time.monotonic() - started, 2)
        row["fired"] = route.proxy.fired
        route.proxy.set_fault(None)
        fault_log.append(row)
    assert row["fired"] >= 1, "the fault never fired: the cell tested nothing"
    if variant == "persistent":
        check_error(info.value, route)
        assert row["seconds"] < FAIL_WITHIN
    row["leftovers"] = len(check(variant == "transient"))


# --- resume ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("resume") / "big.bin"
    return path, sha256_bytes(write_random(path, RESUME_SIZE))


@pytest.mark.parametrize("direction", [fp.UP, fp.DOWN], ids=["upload", "download"])
def test_resume_after_one_drop(route, direction, big_source, tmp_path, resume_table, record_property):
    """Bytes forwarded in the transfer's direction with ONE drop at 60 %, minus a run
    without faults (protocol overhead): what the retry re-sent. Measured, not asserted."""
    path, digest = big_source
    strategy = route.strategy(part=RESUME_PART, max_attempts=4, base_delay=0.05)
    key = route.kit.unique("resume")
    if direction == fp.DOWN:
        strategy.put(str(path), route.uri(key))

    def once(n: int) -> int:
        route.proxy.reset_counters()
        if direction == fp.UP:
            strategy.put(str(path), route.uri(f"{key}-{n}"))
            assert route.stored(f"{key}-{n}") == {"": digest}
        else:
            strategy.get(route.uri(key), str(tmp_path / f"big-{n}.bin"))
            assert sha256_bytes((tmp_path / f"big-{n}.bin").read_bytes()) == digest
        return route.proxy.forwarded[direction]

    baseline = once(0)
    route.proxy.set_fault(fp.Drop(direction, int(0.6 * RESUME_SIZE), times=1, per_connection=False))
    try:
        forwarded = once(1)
        fired = route.proxy.fired
    finally:
        route.proxy.set_fault(None)
    assert fired == 1
    row = {"backend": route.kit.name, "direction": direction, "size": RESUME_SIZE, "part": RESUME_PART,
           "overhead": baseline - RESUME_SIZE, "forwarded": forwarded, "resent": forwarded - baseline}
    resume_table.append(row)
    for name in ("forwarded", "resent", "overhead"):
        record_property(f"resume_{name}_bytes", row[name])
