"""SFTP (``sftp://[user@]host[:port]/absolute/path``): a file server as an object store.

The authority is the "bucket", the absolute path without its leading '/' the
key. What object stores give for free is built from files here: an upload
writes ``.<name>.lot-partial-<random>`` and renames it into place after every
byte was acknowledged; the checksum lives in a sidecar ``<name>.lot-crc32c``
or ``<name>.lot-sha256`` (the hex value) written before that rename;
listings hide both. No
shell is ever involved. Host keys are verified against known_hosts; keys are
taken by path or from the ssh-agent on the executor. The SSH libraries sit
behind ``_sftp_wire.Session`` (``_sftp_paramiko``, ``_sftp_asyncssh``); the
README's Integrity and Atomicity sections say more.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import posixpath
import stat as stat_module
import threading
from collections import deque
from typing import Any, Callable, Iterator, Mapping

from covalent_lot._backend import Backend, RemoteObject, epoch_seconds
from covalent_lot._checksum import ALGORITHMS, Checksum
from covalent_lot._errors import Classified, ErrorKind, MissingBucket
from covalent_lot._stream import TEMP_MARK, ConfirmedPrefix, VerifyingSink, temp_name
from covalent_lot._strategy import LotStrategy
from covalent_lot._uri import StoreURI
from covalent_lot.strategies import _sftp_asyncssh, _sftp_paramiko
from covalent_lot.strategies._sftp_wire import (
    OPTIONS, HostKeyError, Session, Target, chosen_transport, split_authority,
)

log = logging.getLogger("covalent_lot")

__all__ = ["SFTPStrategy", "SFTPBackend", "OPTIONS", "SIDECAR_SUFFIXES", "split_authority"]

# One sidecar per object, named after the checksum it holds; both names are as long.
SIDECAR_SUFFIXES = {algorithm: f".lot-{algorithm}" for algorithm in ALGORITHMS}
SIDECAR_LEN = max(len(suffix) for suffix in SIDECAR_SUFFIXES.values())
NAME_MAX = 255  # bytes per path segment on common server filesystems

def remote_path(location: StoreURI) -> str:
    return "/" + location.key


def sidecar_path(path: str, algorithm: str = "sha256") -> str:
    return path + SIDECAR_SUFFIXES[algorithm]


def _is_sidecar(name: str) -> bool:
    return name.endswith(tuple(SIDECAR_SUFFIXES.values()))


def partial_path(path: str) -> str:
    """Where an upload to ``path`` is written before it is renamed into place."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, temp_name(name))


class _Unfinished:
    """An upload's partial remote file and the bytes the server confirmed in it:
    a retry after a dropped connection resumes at ``prefix`` instead of starting over."""

    def __init__(self, partial: str, start: int = 0):
        self.partial = partial
        self._confirmed = ConfirmedPrefix(start)
        self._lock = threading.Lock()  # channels confirm writes from several threads

    @property
    def prefix(self) -> int:
        return self._confirmed.prefix

    def written(self, offset: int, length: int) -> None:
        with self._lock:
            self._confirmed.add(offset, offset + length)


class _MissingDirectory(MissingBucket):
    """The top-most missing directory on the way to a path (the SFTP 'bucket')."""

    def __init__(self, path: str):
        super().__init__(posixpath.basename(path), "directory")
        self.args = (f"directory {self.bucket!r} does not exist in {posixpath.dirname(path) or '/'}",)


def _remove_quietly(sftp, path: str) -> None:
    with contextlib.suppress(Exception):  # cleaning up: what failed before is what to report
        sftp.remove(path)


def _object(location: StoreURI, attrs, checksum: Checksum | None) -> RemoteObject:
    return RemoteObject(location, attrs.st_size, checksum, f"{attrs.st_size}:{attrs.st_mtime}",
                        epoch_seconds(attrs.st_mtime))


class SFTPBackend(Backend):
    scheme = "sftp"
    # The checksum goes into a sidecar after the bytes: hash while uploading.
    checksum_after_upload = True
    credentials_per_host = True

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        self._authority: str | None = None
        self._target: Target | None = None  # the authority, parsed once
        self._session: Session | None = None
        self._session_lock = threading.Lock()
        # (local path, remote path, size) -> an upload a dropped connection cut short
        self._unfinished: dict[tuple[str, str, int], _Unfinished] = {}

    # --- connection ---------------------------------------------------------------------
    def connect(self) -> Session:
        if self._target is None:
            raise RuntimeError("SFTPBackend used before any location was given")
        asyncssh = chosen_transport(self.settings["transport"]) == "asyncssh"
        return (_sftp_asyncssh if asyncssh else _sftp_paramiko).connect(self.settings, self._target)

    @property
    def client(self) -> Session:
        """The session, opened on first use; a dropped one is replaced (a retry gets a fresh one)."""
        with self._session_lock:
            if self._session is not None and not self._session.active:
                dead, self._session = self._session, None
                dead.close()
            if self._session is None:
                self._session = self.connect()
            return self._session

    @property
    def connected(self) -> bool:
        return self._session is not None

    def _session_for(self, location: StoreURI) -> Session:
        if self._authority is None:
            user, host, port = split_authority(location.bucket, self.settings["port"])
            self._target = Target(user if user is not None else self.settings["username"], host, port)
            self._authority = location.bucket
        elif location.bucket != self._authority:
            raise ValueError(
                f"{location}: one transfer talks to one server ({self._authority}), not {location.bucket}"
            )
        return self.client

    def file_concurrency(self) -> int:
        # paramiko's transfers drive their channels' replies by hand: one file at a
        # time; asyncssh multiplexes any number of requests on its event loop.
        return super().file_concurrency() if chosen_transport(self.settings["transport"]) == "asyncssh" else 1

    @property
    def endpoint(self) -> str:
        if self._target is None:
            return "sftp"
        user, host, port = self._target
        return f"sftp://{user + '@' if user else ''}{host}:{port}"

    def close(self) -> None:
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            if session.active:
                for upload in self._unfinished.values():  # retries that never came
                    _remove_quietly(session.primary, upload.partial)
            session.close()
        self._unfinished.clear()

    # --- files and directories ----------------------------------------------------------
    def _read_sidecar(self, sftp, path: str, names: set[str] | None = None) -> Checksum | None:
        """The checksum beside ``path`` (crc32c's sidecar first); ``names``: the
        directory's entries, when a listing already says which sidecar exists."""
        for algorithm in ALGORITHMS:
            side = sidecar_path(path, algorithm)
            if names is not None and posixpath.basename(side) not in names:
                continue
            try:
                with sftp.open(side, "rb") as f:
                    text = f.read(200).decode("ascii", "replace").strip()
            except FileNotFoundError:
                continue
            return Checksum.of(algorithm, text.split()[0] if text else "")
        return None

    def _makedirs(self, session: Session, directory: str) -> None:
        if directory in ("/", "") or directory in session.known_dirs:
            return
        sftp = session.primary
        try:
            if not stat_module.S_ISDIR(sftp.stat(directory).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, f"{directory} exists and is not a directory")
        except FileNotFoundError:
            self._makedirs(session, posixpath.dirname(directory))
            try:
                sftp.mkdir(directory)
            except OSError:
                if not stat_module.S_ISDIR(sftp.stat(directory).st_mode):
                    raise
        session.known_dirs.add(directory)

    @staticmethod
    def _extension(session: Session, name: str, use: Callable[[], None], otherwise: Callable[[], None]) -> None:
        """``use()`` while the server offers the extension ``name``, else ``otherwise()``."""
        if session.offers[name]:
            try:
                return use()
            except OSError as exc:
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise
                session.offers[name] = False  # not offered by this server
        otherwise()

    def _rename(self, session: Session, source: str, target: str) -> None:
        sftp = session.primary

        def replace() -> None:
            _remove_quietly(sftp, target)
            sftp.rename(source, target)

        self._extension(session, "posix-rename", lambda: sftp.posix_rename(source, target), replace)

    def _place(self, session: Session, partial: str, path: str, checksum: Checksum | None) -> None:
        """The sidecar first (written atomically; any other removed: never a stale
        checksum), then the partial file renamed to ``path``."""
        sftp = session.primary
        for algorithm in ALGORITHMS:
            if checksum is None or algorithm != checksum.algorithm:
                _remove_quietly(sftp, sidecar_path(path, algorithm))
        if checksum is not None:
            side = partial_path(sidecar_path(path, checksum.algorithm))
            try:
                with sftp.open(side, "wb") as f:
                    f.write((checksum.value + "\n").encode("ascii"))
                self._rename(session, side, sidecar_path(path, checksum.algorithm))
            except BaseException:
                _remove_quietly(sftp, side)
                raise
        self._rename(session, partial, path)

    # --- primitives ---------------------------------------------------------------------
    def stat(self, location: StoreURI) -> RemoteObject:
        sftp = self._session_for(location).primary
        path = remote_path(location)
        attrs = sftp.stat(path)
        if stat_module.S_ISDIR(attrs.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, f"{location} is a directory; end the URI with '/' to download a folder"
            )
        return _object(location, attrs, self._read_sidecar(sftp, path))

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        sftp = self._session_for(prefix).primary
        root = remote_path(prefix).rstrip("/") or "/"
        try:
            entries = sftp.listdir_attr(root)
        except FileNotFoundError as exc:
            missing = self.missing_container(prefix, exc)
            if missing is not None:
                raise missing from exc
            return  # an empty "folder", as on object stores
        pending = deque([(root, prefix.key, entries)])
        while pending:
            directory, key_prefix, entries = pending.popleft()
            names = {e.filename for e in entries}
            for entry in sorted(entries, key=lambda e: e.filename):
                name = entry.filename
                if TEMP_MARK in name or _is_sidecar(name):
                    continue
                path = posixpath.join(directory, name)
                if stat_module.S_ISDIR(entry.st_mode):
                    pending.append((path, key_prefix + name + "/", sftp.listdir_attr(path)))
                elif stat_module.S_ISREG(entry.st_mode):
                    digest = self._read_sidecar(sftp, path, names)
                    yield _object(StoreURI(prefix.scheme, prefix.bucket, key_prefix + name), entry, digest)

    def missing_container(self, location: StoreURI, cause: BaseException) -> MissingBucket | None:
        """The top-most missing directory above ``location``, if one is."""
        sftp = self._session_for(location).primary
        parent, missing = posixpath.dirname(remote_path(location).rstrip("/")), None
        while parent not in ("/", ""):
            try:
                sftp.stat(parent)
                break
            except FileNotFoundError:
                missing, parent = parent, posixpath.dirname(parent)
            except OSError:
                return None
        return None if missing is None else _MissingDirectory(missing)

    def put_file(self, local_path: str, location: StoreURI, size: int,
                 digest: Callable[[], Checksum | None]) -> None:
        session = self._session_for(location)
        path = remote_path(location)
        if location.is_folder:
            raise IsADirectoryError(errno.EISDIR, f"{location} names a folder")
        self._makedirs(session, posixpath.dirname(path))
        sftp = session.primary
        job = (local_path, path, size)
        upload = self._resumable(sftp, job) or _Unfinished(partial_path(path))
        try:
            if not upload.prefix:
                with sftp.open(upload.partial, "wb"):
                    pass
            with open(local_path, "rb") as f:
                session.transfer(upload.partial, size, upload_fd=f.fileno(), start=upload.prefix,
                                 on_written=lambda offset, length: (upload.written(offset, length),
                                                                    self.sent(length)))
            self._place(session, upload.partial, path, digest())
        except BaseException as exc:
            if isinstance(exc, Exception) and self.is_transient(exc):
                # The engine's retry (same backend, same file) goes on from the
                # confirmed bytes in the partial file; close() removes it if none comes.
                self._unfinished[job] = upload
            elif session.active:
                _remove_quietly(sftp, upload.partial)
            raise

    def _resumable(self, sftp, job: tuple[str, str, int]) -> _Unfinished | None:
        """The cut-short upload of ``job`` if its partial file holds confirmed bytes to go
        on from, else None (and a partial file it may have left is removed)."""
        upload = self._unfinished.pop(job, None)
        if upload is None:
            return None
        with contextlib.suppress(OSError):  # gone: start over
            if upload.prefix and sftp.stat(upload.partial).st_size >= upload.prefix:
                log.info("upload to %s: resuming at byte %d", upload.partial, upload.prefix)
                return upload
        _remove_quietly(sftp, upload.partial)
        return None

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        session = self._session_for(obj.location)
        path = remote_path(obj.location)
        size = session.primary.stat(path).st_size
        session.transfer(path, size, sink=sink, start=start)
        return RemoteObject(obj.location, size, obj.checksum, obj.version)

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        session = self._session_for(source.location)
        self._session_for(destination)
        src, dst = remote_path(source.location), remote_path(destination)
        self._makedirs(session, posixpath.dirname(dst))
        partial = partial_path(dst)
        try:
            self._extension(session, "copy-data", lambda: session.remote_copy(src, partial),
                            lambda: session.relay(src, partial, self.settings["chunk_size"]))
            self._place(session, partial, dst, source.checksum)
        except BaseException:
            if session.active:
                _remove_quietly(session.primary, partial)
            raise

    def delete(self, location: StoreURI) -> None:
        sftp = self._session_for(location).primary
        path = remote_path(location)
        sftp.remove(path)
        for algorithm in ALGORITHMS:
            _remove_quietly(sftp, sidecar_path(path, algorithm))

    # --- the error table ----------------------------------------------------------------
    def classify_one(self, err: BaseException) -> Classified | None:
        if isinstance(err, HostKeyError):
            return Classified(ErrorKind.DENIED, str(err), err.hint)
        for transport in (_sftp_paramiko, _sftp_asyncssh):  # each knows its library's errors
            verdict = transport.classify_error(err, self._auth_hint())
            if verdict is not None:
                return verdict
        # SFTP statuses, as both transports raise them.
        if isinstance(err, FileNotFoundError):
            return Classified(ErrorKind.NOT_FOUND, "no such file")
        if isinstance(err, PermissionError):
            return Classified(ErrorKind.DENIED, "permission denied by the server",
                              "check the remote user's rights on this path")
        if isinstance(err, (NotADirectoryError, IsADirectoryError)):
            return Classified(ErrorKind.INVALID, str(err), "")
        if type(err) is OSError and err.errno is None and err.args:  # SSH_FX_FAILURE etc.
            return Classified(ErrorKind.OTHER, f"server said: {err}", "")
        return None

    def _auth_hint(self) -> str:
        if self.settings["key_filename"] is not None:
            # The path is not repeated here: messages end up in logs and dispatch results.
            return ("check that the key_filename set in [lot.sftp] exists on the executor and is "
                    "authorized for this user (authorized_keys)")
        return "set [lot.sftp] key_filename to an authorized private key, or load one into ssh-agent"


class SFTPStrategy(LotStrategy):
    """covalent-lot's SFTP strategy; every option can come from ``[lot.sftp]``."""

    scheme = "sftp"
    section = "sftp"
    extra = "sftp"
    sdk_module = "paramiko"
    backend_path = "covalent_lot.strategies.sftp:SFTPBackend"
    options = OPTIONS

    def check_location(self, location: StoreURI) -> None:
        split_authority(location.bucket, self.settings["port"])
        segments = location.key.rstrip("/").split("/")
        for segment in segments:
            if len(segment.encode("utf-8")) > NAME_MAX:
                raise ValueError(
                    f"SFTP file names are at most {NAME_MAX} bytes per path segment; "
                    f"{segment[:40]!r}... in {location} is longer: shorten it"
                )
        if not location.is_folder and len(segments[-1].encode("utf-8")) > NAME_MAX - SIDECAR_LEN:
            raise ValueError(
                f"SFTP file names are at most {NAME_MAX - SIDECAR_LEN} bytes here (the checksum "
                f"sidecar <name>.lot-crc32c must fit in {NAME_MAX}); {segments[-1][:40]!r}... in "
                f"{location} is longer: shorten it"
            )
