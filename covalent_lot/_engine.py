"""The transfer engine shared by every backend.

A backend (``_backend.Backend``) adapts one storage service with a few
primitives; everything else lives here once: folders and key-to-path mapping,
checksums, atomic local writes, resumed downloads, parallel files, retries,
the translation of service errors into built-in exceptions, stats.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import posixpath
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from ._checksum import DEFAULT, Checksum, file_checksum
from ._errors import ChecksumMismatchError, ErrorKind, MissingBucket, exception_chain, translate
from ._backend import Backend, RemoteObject
from ._pool import run_bounded
from ._retry import RetryPolicy
from ._stream import (
    TEMP_MARK, VerifyingSink, atomic_download, holds_verified, mark_verified, recorded_checksum,
)
from ._uri import StoreURI

__all__ = ["TransferStats", "Engine", "local_path_for_key"]

log = logging.getLogger("covalent_lot")
T = TypeVar("T")
MiB = 1024 * 1024


@dataclass
class TransferStats:
    """Counts for one engine call (a file or a whole folder)."""

    action: str
    source: str
    destination: str
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0
    verified: int = 0  # files whose checksum was checked (download) or stored (upload)
    kept: int = 0  # downloads skipped: the local file already held the verified bytes
    unverified: list[str] = field(default_factory=list)
    # Seconds spent per phase, summed over files (several files overlap):
    # "hash" (checksums computed before or after the bytes moved), "transfer".
    phases: dict[str, float] = field(default_factory=dict)
    checksum: str | None = None  # the algorithm uploads stored / downloads checked

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    @property
    def mib_per_s(self) -> float:
        return self.bytes / MiB / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.action == "delete":
            return (f"delete {self.source}: {self.files} object(s), "
                    f"{self.bytes / MiB:.1f} MiB in {self.seconds:.2f} s, {self.retries} retries")
        word = {"upload": "stored", "copy": "kept"}.get(self.action, "verified")
        check = f"{self.verified}/{self.files} {self.checksum or 'checksums'} {word}"
        if self.kept:
            check += f", {self.kept} already here (local copy matched)"
        return (
            f"{self.action} {self.source} -> {self.destination}: {self.files} file(s), "
            f"{self.bytes / MiB:.1f} MiB in {self.seconds:.2f} s ({self.mib_per_s:.1f} MiB/s), "
            f"{self.retries} retries, {check}"
        )


def local_path_for_key(root: str, relative_key: str, uri: str, root_abs: str | None = None) -> str:
    """Map a key below a folder onto a path below ``root``, refusing escapes
    (``root_abs``: ``os.path.realpath(root)``, when the caller resolved it once for many keys)."""
    shown = uri if uri.isprintable() else repr(uri)  # a NUL or newline, visibly
    if (
        not relative_key
        or relative_key.startswith("/")
        or "\\" in relative_key
        or "\x00" in relative_key
        or any(part in ("", ".", "..") for part in relative_key.split("/"))
    ):
        raise ValueError(
            f"refusing to download {shown}: its key maps outside the destination folder "
            f"{root!r} (empty, '.' or '..' segments, absolute or backslash paths); rename the "
            "object, or download it on its own to a path you choose"
        )
    root_abs = os.path.realpath(root) if root_abs is None else root_abs
    path = os.path.realpath(os.path.join(root_abs, *relative_key.split("/")))
    if os.path.commonpath([root_abs, path]) != root_abs:
        raise ValueError(
            f"refusing to download {shown}: it resolves to {path!r}, outside {root!r} (a symbolic "
            "link in the destination?); rename the object, or download it on its own to a path you choose"
        )
    return path


class Engine:
    """Runs uploads, downloads, copies, listings and removals for one backend, with one retry policy."""

    def __init__(self, backend: Backend, policy: RetryPolicy, verify: bool = True,
                 progress: Callable[[int], None] | None = None):
        self.backend = backend
        self.policy = policy
        self.verify = verify
        # What uploads store, and what a download checks when the object's own is not known yet.
        self.algorithm = str(backend.settings.get("checksum", DEFAULT)) if verify else None
        # progress(nbytes) as bytes move, from any thread (a progress bar); uploads
        # report through the backend, downloads through the sink, copies per file.
        self.progress = progress
        backend.progress = progress
        self._count = threading.Lock()  # stats are updated from folder workers
        self._connect_counted = False

    def _each(self, items: list, fn: Callable[[Any], None]) -> None:
        """``fn(item)`` for each item, several files at once (``max_files``); each
        file is atomic on its own, as in a sequential run."""
        run_bounded(items, fn, self.backend.file_concurrency(), name="covalent-lot-file")

    # --- one guarded service call -------------------------------------------------------
    def _guard(self, action: str, target: str, fn: Callable[[], T], stats: TransferStats,
               location: StoreURI | None = None) -> T:
        """Run ``fn`` with retries on transient errors; translate service errors.

        With ``location``, a "not found" is checked once more: is it the object,
        or the bucket above it (``Backend.missing_container``)?
        """

        def on_retry(attempt: int, exc: BaseException, wait: float) -> None:
            with self._count:
                stats.retries += 1
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("%s %s: attempt %d failed (%s); retrying in %.1f s",
                        action, target, attempt, first_line, wait)

        try:
            return self.policy.run(fn, self.backend.is_transient, on_retry)
        except ChecksumMismatchError:
            raise
        except Exception as exc:
            verdict = self.backend.classify(exc)
            if verdict is None:
                raise
            if location is not None and verdict.kind is ErrorKind.NOT_FOUND and not any(
                    isinstance(err, MissingBucket) for err in exception_chain(exc)):
                try:
                    missing = self.backend.missing_container(location, exc)
                except Exception:  # noqa: BLE001 - no answer (e.g. no right to look): the 404 stands
                    missing = None
                if missing is not None:
                    verdict = missing.verdict()
            raise translate(
                verdict, action=action, target=target, endpoint=self.backend.endpoint
            ) from exc

    def _start(self, action: str, source: str, destination: str) -> tuple[TransferStats, float]:
        log.info("%s %s -> %s: started", action, source, destination)
        return TransferStats(action, source, destination, checksum=self.algorithm), time.perf_counter()

    def _finish(self, stats: TransferStats, started: float) -> TransferStats:
        stats.seconds = time.perf_counter() - started
        if self.backend.connected and not self._connect_counted:
            self._connect_counted = True  # the client is made once per engine
            stats.phases["connect"] = self.backend.connect_seconds
        log.info("%s", stats.summary())
        if stats.unverified:
            log.debug("not verified (no stored checksum, e.g. written by another tool): %s",
                      ", ".join(stats.unverified[:20]))
        return stats

    # --- upload ---------------------------------------------------------------------------
    def upload(self, local_path: str, destination: StoreURI) -> TransferStats:
        stats, started = self._start("upload", local_path, str(destination))
        if os.path.isdir(local_path):
            if not destination.is_folder:
                raise IsADirectoryError(
                    f"upload source {local_path!r} is a folder but {destination} names an object; "
                    "end the URI with '/' to upload a folder"
                )
            # Walk first: a refused entry (a symlink) stops the upload before any byte moves.
            files = list(_walk_files(local_path))
            self._each(files, lambda item: self._upload_one(item[0], destination.child(item[1]), stats))
        elif os.path.isfile(local_path):
            if destination.is_folder:
                _require_utf8(os.path.basename(local_path), local_path)
                destination = destination.child(os.path.basename(local_path))
                stats.destination = str(destination)
            self._upload_one(local_path, destination, stats)
        elif os.path.exists(local_path):
            raise ValueError(
                f"upload source {local_path!r} is neither a file nor a folder; upload a regular "
                "file or a folder"
            )
        else:
            raise FileNotFoundError(
                f"upload source {local_path!r} does not exist (did the electron write it?)"
            )
        return self._finish(stats, started)

    def _upload_one(self, path: str, destination: StoreURI, stats: TransferStats) -> None:
        before = os.stat(path)
        hashing = None
        algorithm = self.algorithm
        recorded = recorded_checksum(path) if self._reuse_local else None
        began = time.perf_counter()
        if algorithm is None:
            digest = _known(None)
        elif recorded is not None and recorded.algorithm == algorithm:
            # Checked when it was written here (an offloaded value) or verified by a
            # download, unchanged since: the same trust as reuse_local's.
            digest = _known(recorded)
        elif self.backend.checksum_after_upload:
            # The checksum is needed only after the bytes: computed alongside the upload.
            hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="covalent-lot-checksum")
            future = hashing.submit(_timed, file_checksum, path, algorithm)
            digest = lambda: future.result()[0][0]  # noqa: E731
        else:
            # Object stores take metadata when an upload starts, so the checksum
            # is computed in one streaming pass first (crc32c: ~0.1 s per 512 MiB
            # here); a copy afterwards to attach it would cost more than the pass.
            digest = _known(file_checksum(path, algorithm)[0])
            with self._count:  # files of a folder run in several threads
                stats.add_phase("hash", time.perf_counter() - began)
        sending, connected = time.perf_counter(), self.backend.connected
        try:
            self._guard(
                "upload to", str(destination),
                lambda: self.backend.put_file(path, destination, before.st_size, digest),
                stats, destination,
            )
        finally:
            if hashing is not None:
                hashing.shutdown(wait=True)
        with self._count:
            stats.add_phase("transfer", time.perf_counter() - sending
                            - (self.backend.connect_seconds if not connected else 0.0))  # "connect" has that
            if hashing is not None and not future.exception():
                stats.add_phase("hash (alongside)", future.result()[1])
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            self._guard("remove", str(destination), lambda: self.backend.delete(destination), stats)
            raise OSError(
                f"upload source {path!r} changed while it was uploaded; the object "
                f"{destination} was removed again. Write the file completely before the upload runs."
            )
        if self._reuse_local and digest() is not None:
            # A consumer on this machine whose local path is this file skips its download.
            mark_verified(path, digest())
        log.debug("uploaded %s -> %s (%d bytes, %s)", path, destination, before.st_size,
                  digest() or "no checksum")
        with self._count:
            stats.files += 1
            stats.bytes += before.st_size
            stats.verified += self.verify

    # --- download -------------------------------------------------------------------------
    def download(self, source: StoreURI, local_path: str) -> TransferStats:
        stats, started = self._start("download", str(source), local_path)
        stats.checksum = None  # named by what each object stores (_checked)
        if source.is_folder:
            if os.path.exists(local_path) and not os.path.isdir(local_path):
                raise NotADirectoryError(
                    f"download destination {local_path!r} is a file but {source} is a folder; "
                    "give a folder path, or a URI without the final '/' to download one object"
                )
            jobs = []
            root_abs = os.path.realpath(local_path)
            for obj in self._list(source, stats):
                relative = obj.location.key[len(source.key):]
                if not relative or relative.endswith("/") or TEMP_MARK in relative:
                    continue  # folder markers made by consoles; our own leftovers
                # Every key is checked before any byte moves.
                jobs.append((obj, local_path_for_key(local_path, relative, str(obj.location), root_abs)))
            self._each(jobs, lambda job: self._download_one(job[0], job[1], stats))
            if not jobs:
                raise FileNotFoundError(
                    f"download {source}: no objects under this folder [endpoint "
                    f"{self.backend.endpoint}]; check the prefix (a folder with no files "
                    "uploads nothing)"
                )
        else:
            began, connected = time.perf_counter(), self.backend.connected
            obj = self._guard("read", str(source), lambda: self.backend.stat(source), stats, source)
            stats.add_phase("stat", time.perf_counter() - began
                            - (self.backend.connect_seconds if not connected else 0.0))
            self._download_one(obj, local_path, stats)
        return self._finish(stats, started)

    def _list(self, prefix: StoreURI, stats: TransferStats) -> list[RemoteObject]:
        return self._guard("list", str(prefix), lambda: list(self.backend.iter_objects(prefix)), stats, prefix)

    @property
    def _reuse_local(self) -> bool:
        return self.verify and bool(self.backend.settings.get("reuse_local", True))

    def _download_one(self, obj: RemoteObject, local_path: str, stats: TransferStats) -> None:
        if self._reuse_local and obj.checksum is not None and holds_verified(local_path, obj.checksum, obj.size):
            # Already here: uploaded from, or downloaded and verified to, this very
            # path, unchanged since (size and mtime), with the stored checksum.
            with self._count:
                stats.files += 1
                stats.verified += 1
                stats.kept += 1
                _checked(stats, obj.checksum.algorithm)
            return

        fsync = bool(self.backend.settings.get("fsync", False))
        # Check what the object stores; before its metadata is known (a listing
        # without it), what this strategy stores.
        algorithm = (obj.checksum.algorithm if obj.checksum is not None else self.algorithm) if self.verify else None
        began = time.perf_counter()
        with atomic_download(local_path, fsync=fsync) as (f, _temp):
            sink = VerifyingSink(f, algorithm, on_bytes=self.progress)
            try:
                seen = self._guard("download", str(obj.location),
                                   lambda: self._get_resuming(obj, sink), stats, obj.location)
                expected = seen.checksum if seen.checksum is not None else obj.checksum
                finishing = time.perf_counter()
                actual = None
                if self.verify and expected is not None:
                    if expected.algorithm == sink.algorithm:
                        actual = sink.checksum()
                    else:  # stored with the other algorithm than expected: read the file back once
                        f.flush()
                        actual = file_checksum(f.fileno(), expected.algorithm)[0]
                stats_hash = time.perf_counter() - finishing
            finally:
                sink.close()
            if actual is not None:
                if actual != expected:
                    raise ChecksumMismatchError(
                        f"checksum mismatch for {obj.location}: stored {expected}, "
                        f"received {actual} ({sink.bytes_written} bytes); the object was "
                        f"changed or corrupted. {local_path!r} was left untouched."
                    )
                if self._reuse_local:
                    f.flush()  # the recorded mtime is the final one
                    mark_verified(f.fileno(), actual)
        with self._count:
            stats.add_phase("hash", stats_hash)
            stats.add_phase("transfer", time.perf_counter() - began - stats_hash)
        log.debug("downloaded %s -> %s (%d bytes)", obj.location, local_path, seen.size)
        with self._count:
            stats.files += 1
            stats.bytes += seen.size
            if self.verify and (seen.checksum or obj.checksum):
                stats.verified += 1
                _checked(stats, (seen.checksum or obj.checksum).algorithm)
            else:
                stats.unverified.append(str(obj.location))

    def _get_resuming(self, obj: RemoteObject, sink: VerifyingSink) -> RemoteObject:
        """One download attempt; a retry resumes where the last one stopped.

        The bytes already received in order stay in the temporary file when the
        read is pinned to one version of the object (``obj.version``) and the
        whole is checked against the stored checksum at the end; otherwise the
        attempt starts over. Either way nothing reaches the destination unchecked.
        """
        start = sink.rewind(keep_prefix=self.verify and obj.version is not None)
        if start and start >= obj.size:
            start = sink.rewind(keep_prefix=False)  # nothing left to ask for: read it all again
        if start:
            log.info("download %s: resuming at byte %d of %d", obj.location, start, obj.size)
        return self.backend.get_into(obj, sink, start)

    # --- copy -----------------------------------------------------------------------------
    def copy(self, source: StoreURI, destination: StoreURI) -> TransferStats:
        stats, started = self._start("copy", str(source), str(destination))
        if source.is_folder != destination.is_folder:
            raise ValueError(
                f"copy {source} -> {destination}: both must be folders (ending in '/') or both objects"
            )
        if source.is_folder:
            pairs = [
                (obj, destination.child(obj.location.key[len(source.key):]))
                for obj in self._list(source, stats)
                if not obj.location.key.endswith("/")
            ]
            if not pairs:
                raise FileNotFoundError(f"copy {source}: no objects under this folder")
        else:
            pairs = [(self._guard("read", str(source), lambda: self.backend.stat(source), stats, source),
                      destination)]
        def copy_one(pair: tuple[RemoteObject, StoreURI]) -> None:
            obj, target = pair
            if obj.checksum is None:  # some listings leave out metadata: say truly whether it goes along
                obj = self._guard("read", str(obj.location), lambda: self.backend.stat(obj.location), stats,
                                  obj.location)
            self._guard("copy", f"{obj.location} -> {target}", lambda: self.backend.copy(obj, target), stats,
                        target)
            if self.progress is not None:
                self.progress(obj.size)
            with self._count:
                stats.files += 1
                stats.bytes += obj.size
                stats.verified += obj.checksum is not None

        self._each(pairs, copy_one)
        return self._finish(stats, started)


    # --- listing and removal ----------------------------------------------------------------
    def ls(self, location: StoreURI) -> list[RemoteObject]:
        """Every object below a folder URI (recursively), or the one object a URI names."""
        stats = TransferStats("list", str(location), "")
        if location.is_folder:
            return self._list(location, stats)
        return [self._guard("read", str(location), lambda: self.backend.stat(location), stats, location)]

    def delete(self, location: StoreURI) -> TransferStats:
        """Remove one object, or every object below a folder URI."""
        objects = self.ls(location)
        if location.is_folder and not objects:
            raise FileNotFoundError(f"delete {location}: no objects under this folder "
                                    f"[endpoint {self.backend.endpoint}]")
        return self.remove(objects, str(location))

    def remove(self, objects: list[RemoteObject], what: str) -> TransferStats:
        """Remove listed objects, several at once; one gone meanwhile is not an error."""
        stats, started = self._start("delete", what, "")

        def delete_one(obj: RemoteObject) -> None:
            try:
                self._guard("remove", str(obj.location), lambda: self.backend.delete(obj.location), stats)
            except FileNotFoundError:
                log.debug("%s was already gone", obj.location)
                return
            log.debug("removed %s (%d bytes)", obj.location, obj.size)
            with self._count:
                stats.files += 1
                stats.bytes += obj.size

        self._each(objects, delete_one)
        return self._finish(stats, started)


def _known(value: Checksum | None) -> Callable[[], Checksum | None]:
    return lambda: value


def _checked(stats: TransferStats, algorithm: str) -> None:
    """Name the checksum a download checked: the objects' own; "checksums" when they differ."""
    stats.checksum = algorithm if stats.checksum in (None, algorithm) else "checksums"


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    began = time.perf_counter()
    return fn(*args), time.perf_counter() - began


def _walk_files(root: str) -> Iterator[tuple[str, str]]:
    """(path, relative key) of every regular file below ``root``; refuses symlinks."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                raise ValueError(
                    f"refusing to upload {root!r}: {full!r} is a symbolic link "
                    "(links are not followed; copy the target into the folder instead)"
                )
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if TEMP_MARK in name:
                continue
            if os.path.islink(full):
                raise ValueError(
                    f"refusing to upload {root!r}: {full!r} is a symbolic link "
                    "(links are not followed; copy the target into the folder instead)"
                )
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            _require_utf8(relative, full)
            yield full, posixpath.normpath(relative)


def _require_utf8(name: str, path: str) -> None:
    """Refuse a local name with undecodable bytes before anything is sent."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"refusing to upload {path!r}: its name is not valid UTF-8, which object stores "
            "cannot hold; rename it"
        ) from None
