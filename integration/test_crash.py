"""Crashes mid-transfer, against the real servers: a killed transferring process,
and a server killed and restarted under a running transfer.

Each transfer runs in ``_crash_child.py``, a process of its own that reports
the bytes it has moved; the test strikes (SIGKILL of the child, or of the
server) once a good part of the 64 MiB has moved and the rest has not. Whatever
the timing, nobody may ever see a truncated file or a partial object: the
destination holds the old version, nothing, or (after a survived restart) the
complete new one. Leftovers of a killed process must be recognisable
(``TEMP_MARK``) and ignored by the next folder transfer.

Lines starting ``FINDING`` (shown with ``-rP``) record what each backend
leaves behind and how it takes a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from covalent_lot import _stream
from covalent_lot._stream import TEMP_MARK

from integration import _servers

MiB = 1024 * 1024
SIZE = 64 * MiB
STRIKE_AT = 12 * MiB  # past two S3 parts of 5 MiB: the store holds some of it
KEY = "crash/data.bin"
OLD = b"the old version, complete\n" * 4096
CHILD = Path(__file__).with_name("_crash_child.py")
from integration._kits import SIDECAR, SIDECARS, crc32c_of, stored_checksum  # SFTP's checksum files

# The old objects these tests replace are stored as covalent-lot stored them
# before crc32c became the default: with lot-sha256 (they keep verifying).
CHECKSUM_KEY = "lot-sha256"

# Small parts, one request at a time: 64 MiB then last a second or more on
# loopback, long enough to be struck mid-way.
SLOW = {
    "s3": {"multipart_threshold": "5MiB", "multipart_chunksize": "5MiB", "max_concurrency": 1},
    "gcs": {"chunk_size": "4MiB"},
    "azure": {"max_block_size": "1MiB", "max_single_put_size": 0, "max_concurrency": 1},
    "sftp": {"chunk_size": "1MiB", "max_concurrency": 1, "max_requests": 4, "request_size": "64KiB"},
}
# Retries that span a server restart of a few seconds.
ACROSS_RESTART = {"max_attempts": 8, "base_delay": 0.5, "max_delay": 3.0}
OUTAGE_SECONDS = 1.0
# Generous bounds on waits (measured: a few seconds each).
MOVE_TIMEOUT = 60
FINISH_TIMEOUT = 150


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    return _stream.sha256_file(str(path))[0]


def finding(kit, text: str) -> None:
    print(f"FINDING {kit.name}: {text}")


def temp_names(folder) -> list[str]:
    return sorted(name for _, _, names in os.walk(folder) for name in names if TEMP_MARK in name)


# --- the transferring child ------------------------------------------------------------


class Child:
    """A transfer running in ``_crash_child.py``; its stdout is read by a thread."""

    def __init__(self, action: str, uri: str, local, options: dict, env: dict, log_dir: Path):
        spec = {"action": action, "uri": uri, "local": str(local), "options": options}
        self.stderr_path = log_dir / f"child-{uuid.uuid4().hex[:8]}.err"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), json.dumps(spec)], env=env, text=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            )
        self.lines: queue.Queue = queue.Queue()
        self.last = ""  # the last line read
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next(self, deadline: float):
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is not None:
            self.last = line
        return line

    def _stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def wait_moved(self, nbytes: int) -> int:
        """Block until the child has moved ``nbytes``; fail if it ended or stalled first."""
        deadline = time.monotonic() + MOVE_TIMEOUT
        while True:
            line = self._next(deadline)
            if line is None or line.startswith(("done", "error")):
                pytest.fail(f"transfer ended or stalled before {nbytes} bytes moved "
                            f"(last line {self.last!r}); stderr:\n{self._stderr()}")
            if line.startswith("moved ") and int(line.split()[1]) >= nbytes:
                return int(line.split()[1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        while self._next(time.monotonic() + 5) is not None:
            pass
        assert not self.last.startswith("done"), "the transfer finished before it was killed"

    def outcome(self) -> str:
        """The final 'done ...' or 'error ...' line; fails on a hang or a crash."""
        try:
            self.proc.wait(timeout=FINISH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"transfer still running after {FINISH_TIMEOUT} s (hang); stderr:\n{self._stderr()}")
        while self._next(time.monotonic() + 5) is not None:
            pass
        assert self.last.startswith(("done", "error")), f"child died: {self.last!r}\n{self._stderr()}"
        return self.last

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def kit_env(kit):
    """This process's environment as the kit's clients see it (its credentials)."""
    saved = _servers.apply_env(kit.env)
    try:
        yield dict(os.environ)
    finally:
        _servers.apply_env(saved)


@pytest.fixture
def spawn(tmp_path):
    """``spawn(action, uri, local, kit, **options)``: a transfer in a child process,
    with the strategy ``kit.strategy(**options)`` resolves to and the kit's
    environment. Children still alive at teardown are killed."""
    children: list[Child] = []

    def start(action, uri, local, kit, **options) -> Child:
        with kit_env(kit) as env:
            settings = kit.strategy(**options).settings
        resolved = {k: v for k, v in settings.items() if v is not None}
        children.append(Child(action, uri, local, resolved, env, tmp_path))
        return children[-1]

    yield start
    for child in children:
        child.stop()


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> tuple[Path, str]:
    """64 MiB of random bytes and their sha256, shared by the module's tests."""
    path = tmp_path_factory.mktemp("payload") / "payload.bin"
    with open(path, "wb") as f:
        for _ in range(SIZE // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    return path, sha256_file(path)


def assert_holds_old_or_nothing(kit, bucket: str, key: str = KEY) -> str:
    """``key`` holds the old object (bytes and checksum) or nothing, with only
    recognisable temporary keys beside it. Returns which of the two."""
    keys = kit.list_keys(bucket, posixpath.dirname(key) + "/")
    strays = [k for k in keys if k != key and k not in [key + s for s in SIDECARS] and TEMP_MARK not in k]
    assert not strays, f"unexpected keys after the crash: {strays}"
    if key not in keys:
        return "nothing"
    assert kit.get_bytes(bucket, key) == OLD, "the final key holds a partial or mixed object"
    assert kit.get_metadata(bucket, key).get(CHECKSUM_KEY) == sha256_of(OLD)
    return "old object"


# --- 1. the transferring process is killed --------------------------------------------


def test_killed_upload_leaves_old_object(kit, bucket, payload, tmp_path, spawn):
    path, digest = payload
    uri = kit.uri(bucket, KEY)
    kit.put_bytes(bucket, KEY, OLD, {CHECKSUM_KEY: sha256_of(OLD)})
    child = spawn("put", uri, path, kit, **SLOW[kit.name])
    moved = child.wait_moved(STRIKE_AT)
    child.kill()

    held = assert_holds_old_or_nothing(kit, bucket)
    finding(kit, f"upload killed after {moved / MiB:.0f} MiB: key holds {held}; leftovers "
                 f"{kit.unfinished_uploads(bucket) or 'none visible'}")
    assert held == "old object"

    strategy = kit.strategy()
    # The next folder download skips the leftovers.
    strategy.get(kit.uri(bucket, "crash/"), str(tmp_path / "folder"))
    assert os.listdir(tmp_path / "folder") == ["data.bin"]
    assert (tmp_path / "folder" / "data.bin").read_bytes() == OLD
    # The next upload to the same place succeeds and verifies.
    stats = strategy.put(str(path), uri)
    assert stats.verified == 1
    assert stored_checksum(kit, bucket, KEY) == crc32c_of(path)
    finding(kit, f"after the next upload: leftovers {kit.unfinished_uploads(bucket) or 'none visible'}")


def test_killed_download_keeps_old_file(kit, bucket, payload, tmp_path, spawn):
    path, digest = payload
    uri = kit.uri(bucket, KEY)
    strategy = kit.strategy()
    strategy.put(str(path), uri)
    dest = tmp_path / "dl" / "data.bin"
    dest.parent.mkdir()
    dest.write_bytes(OLD)
    child = spawn("get", uri, dest, kit, **SLOW[kit.name])
    moved = child.wait_moved(STRIKE_AT)
    child.kill()

    assert dest.read_bytes() == OLD, "the destination was truncated or replaced by a partial file"
    leftovers = [name for name in os.listdir(dest.parent) if name != "data.bin"]
    assert all(TEMP_MARK in name for name in leftovers), leftovers
    finding(kit, f"download killed after {moved / MiB:.0f} MiB: local leftovers {leftovers or 'none'}")

    # The next folder upload skips the leftovers.
    strategy.put(str(dest.parent), kit.uri(bucket, "again/"))
    assert kit.list_keys(bucket, "again/") in (["again/data.bin"], ["again/data.bin", "again/data.bin" + SIDECAR])
    # The next download to the same place succeeds and verifies.
    stats = strategy.get(uri, str(dest))
    assert stats.verified == 1 and sha256_file(dest) == digest
    assert temp_names(dest.parent) == leftovers  # stays until someone removes it


# --- 2. the server is killed and restarted under a transfer ---------------------------


@pytest.fixture(scope="module")
def own_server(kit, payload, tmp_path_factory):
    """A second server of ``kit``'s backend, for this module alone, to crash and
    revive; with a bucket holding the old object (``put/``) and the payload (``get/``)."""
    path, _digest = payload
    own = type(kit)()
    own.start(tmp_path_factory.mktemp(f"own-{kit.name}"))
    outage = _servers.Outage(own.server)
    try:
        bucket = own.new_bucket()
        own.put_bytes(bucket, "put/data.bin", OLD, {CHECKSUM_KEY: sha256_of(OLD)})
        with kit_env(own):
            own.strategy().put(str(path), own.uri(bucket, "get/data.bin"))
        # A clean stop persists what the server keeps in memory (Azurite saves
        # its metadata every few seconds): the crash then loses no setup.
        own.server.stop()
        outage.revive()
        yield own, outage, bucket
    finally:
        outage.crash()  # its data is thrown away: no need to wait for a clean exit
        own.stop()


@pytest.mark.parametrize("action", ["put", "get"])
def test_server_restart_mid_transfer(action, own_server, payload, tmp_path, spawn):
    """The retries span the outage, so the transfer must complete, verified; and if it
    did not, it would have to leave the old content, never a partial one."""
    own, outage, bucket = own_server
    path, digest = payload
    key = f"{action}/data.bin"
    uri = own.uri(bucket, key)
    options = {**SLOW[own.name], **ACROSS_RESTART}
    if action == "put":
        child = spawn("put", uri, path, own, **options)
    else:
        dest = tmp_path / "dl" / "data.bin"
        dest.parent.mkdir()
        dest.write_bytes(OLD)
        child = spawn("get", uri, dest, own, **options)
    child.wait_moved(STRIKE_AT)
    started = time.monotonic()
    outage.crash()
    time.sleep(OUTAGE_SECONDS)
    back_after = outage.revive()
    result = child.outcome()
    elapsed = time.monotonic() - started

    kind = result.split()[1] if result.startswith("error") else "completed"
    leftovers = own.unfinished_uploads(bucket) if action == "put" else temp_names(dest.parent)
    finding(own, f"{action} across a restart (server back after {back_after:.1f} s): {result[:200]} "
                 f"[{elapsed:.1f} s after the crash]; leftovers {leftovers or 'none visible'}")
    if kind != "completed":
        assert kind.startswith("builtins.") or kind.endswith("ChecksumMismatchError"), result
    if action == "put":
        if kind == "completed":
            stored = own.get_bytes(bucket, key)
            assert sha256_of(stored) == digest and stored_checksum(own, bucket, key) == crc32c_of(stored)
        else:
            assert_holds_old_or_nothing(own, bucket, key)
    else:
        assert sha256_file(dest) == (digest if kind == "completed" else sha256_of(OLD))
        assert temp_names(dest.parent) == [], "a transfer that ended by itself left a partial file"
    assert kind == "completed", f"not retried across a {OUTAGE_SECONDS} s outage: {result}"
