"""SFTP (``sftp://[user@]host[:port]/absolute/path``), on paramiko.

For users whose storage is a file server or an HPC login node reachable over
SSH. The URI's authority (what other schemes call the bucket) is
``[user@]host[:port]``; the key is the absolute path without its leading '/'.

Security: host keys are verified against known_hosts (the ``known_hosts``
option, default ``~/.ssh/known_hosts``, plus the system's); an unknown or
changed key is refused with ``PermissionError``. Keys are taken by *path*
(``key_filename``) or from the ssh-agent, on the executor, when the transfer
runs. No shell is ever involved: every operation is an SFTP request, so a path
holding spaces, quotes or ';' is just a name.

Atomicity: an upload writes ``<dir>/.<name>.lot-partial-<random>`` and renames
it into place (``posix-rename@openssh.com`` when the server has it) only after
every byte was acknowledged. Missing parent directories are created.

Integrity: SFTP has no object metadata, so the sha256 is stored in a sidecar
file ``<name>.lot-sha256`` beside the object: 64 hex characters and a newline
(``sha256sum``-compatible digest, no file name), written atomically before the
object is renamed into place. Listings hide sidecars and partial files. Tools
that do not know the convention simply see one more small file. A reader that
races a writer of the same name may get a checksum mismatch (never wrong bytes).

Speed: paramiko's ``put``/``get`` are well under OpenSSH's. Two transports
sit behind this backend (option ``transport``): paramiko (extra ``sftp``): one
SSH transport per transfer with aes128-gcm preferred and several SFTP channels on
it; each channel keeps a bounded number of ranged read or write requests in
flight (no paramiko ``prefetch``, which stalls), downloads land in the engine's
sink with ``write_at``. asyncssh (extra ``sftp-fast``, ``_sftp_asyncssh.py``):
``max_concurrency * max_requests`` ranged requests in flight on one channel; with
checksums on it is the one that keeps up with OpenSSH on downloads, so ``auto``
picks it when installed. Memory is bounded by
``max_concurrency * max_requests * request_size`` either way.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import socket
import stat as stat_module
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, Mapping

from covalent_lot._config import Option
from covalent_lot._engine import Backend, RemoteObject, epoch_seconds
from covalent_lot._errors import ChecksumMismatchError, Classified, ErrorKind, exception_chain
from covalent_lot._errors import MissingBucket as _MissingBucket
from covalent_lot._stream import TEMP_MARK, VerifyingSink, temp_name
from covalent_lot._strategy import LotStrategy
from covalent_lot._uri import StoreURI

log = logging.getLogger("covalent_lot")

__all__ = ["SFTPStrategy", "SFTPBackend", "OPTIONS", "SIDECAR_SUFFIX", "split_authority"]

KiB = 1024
MiB = 1024 * KiB
SIDECAR_SUFFIX = ".lot-sha256"
NAME_MAX = 255  # bytes per path segment on common server filesystems
# OpenSSH's sftp-server refuses messages over 256 KiB.
MAX_REQUEST = 255 * KiB
# Measured on loopback (OpenSSH 9.2, 512 MiB, 4 channels): 32 KiB packets and a
# 2 MiB window ~215 MiB/s down; 256 KiB packets and a 16 MiB window ~390. The
# window is only flow-control credit: what is buffered per channel is bounded by
# the requests in flight (max_requests * request_size), so paramiko's receive
# buffer (a bytearray trimmed from the front, slow when large) stays small.
WINDOW_SIZE = 16 * MiB
CHANNEL_MAX_PACKET = 256 * KiB
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
TRANSPORTS = ("auto", "paramiko", "asyncssh")

OPTIONS: dict[str, Option] = {
    "username": Option("str", None, "login name (default: the user in the URI, else the local user)"),
    "port": Option("int", 22, "SSH port when the URI names none", 1, maximum=65535),
    "key_filename": Option(
        "str", None,
        "path of a private key on the executor (by reference; never its content)",
    ),
    "allow_agent": Option("bool", True, "also try the keys of a running ssh-agent"),
    "known_hosts": Option(
        "str", None,
        "known_hosts file to verify host keys against (default ~/.ssh/known_hosts; "
        "the system's /etc/ssh/ssh_known_hosts is always read)",
    ),
    "insecure_skip_host_key_check": Option(
        "bool", False,
        "DANGEROUS: accept any host key (no man-in-the-middle protection); keys are never saved",
    ),
    "connect_timeout": Option("float", 10.0, "seconds to open the TCP connection", 0.001),
    "banner_timeout": Option("float", 15.0, "seconds to wait for the SSH banner", 0.001),
    "auth_timeout": Option("float", 15.0, "seconds to wait for authentication", 0.001),
    "io_timeout": Option("float", 60.0, "seconds to wait for any SFTP reply", 0.001),
    "max_concurrency": Option("int", 4, "SFTP channels (each with its own requests) per file", 1),
    "chunk_size": Option(
        "size", 8 * MiB, "unit of work a channel takes at a time; files up to this size use one channel",
        64 * KiB,
    ),
    "request_size": Option("size", 255 * KiB, "bytes per SFTP read/write request (max 255 KiB)", 4 * KiB),
    "max_requests": Option("int", 32, "requests in flight per channel", 1),
    "transport": Option(
        "str", "auto",
        "SSH library: paramiko, asyncssh (faster; extra sftp-fast) or auto (asyncssh when installed)",
        choices=TRANSPORTS,
    ),
}


def _use_asyncssh(transport: str) -> bool:
    if transport == "paramiko":
        return False
    try:
        import asyncssh  # noqa: F401
    except ImportError as exc:
        if transport == "asyncssh":
            raise ImportError(
                "[lot.sftp] transport = asyncssh needs the asyncssh module: pip install covalent-lot[sftp-fast]"
            ) from exc
        return False
    return True


def split_authority(authority: str, default_port: int = 22) -> tuple[str | None, str, int]:
    """``[user@]host[:port]`` (or ``[v6addr]:port``) -> (user, host, port)."""
    user, sep, hostport = authority.rpartition("@")
    user = user if sep else None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:
        host, port_text = hostport, ""
    if not host:
        raise ValueError(f"no host in SFTP authority {authority!r}; expected sftp://[user@]host[:port]/path")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"invalid port {port_text!r} in SFTP authority {authority!r}; "
                             "use a port number 1-65535")
        port = int(port_text)
    else:
        port = default_port
    return (user or None), host, port


def remote_path(location: StoreURI) -> str:
    return "/" + location.key


def sidecar_path(path: str) -> str:
    return path + SIDECAR_SUFFIX


def _partial_path(path: str) -> str:
    parent, name = posixpath.split(path)
    return posixpath.join(parent, temp_name(name))


class _Unfinished:
    """An upload's partial remote file and the bytes the server confirmed in it.

    ``prefix``: every byte of ``[0, prefix)`` was written and acknowledged, so
    a retry after a dropped connection resumes there instead of starting over.
    """

    def __init__(self, partial: str, start: int = 0):
        self.partial = partial
        self.prefix = start
        self._done: dict[int, int] = {}
        self._lock = threading.Lock()

    def written(self, offset: int, length: int) -> None:
        with self._lock:
            self._done[offset] = offset + length
            while self.prefix in self._done:
                self.prefix = self._done.pop(self.prefix)


def _connection_lost(exc: BaseException) -> bool:
    """A dropped or timed-out connection (paramiko says "Socket is closed" with a plain OSError)."""
    return (isinstance(exc, (socket.timeout, ConnectionError, EOFError))
            or (type(exc) is OSError and str(exc) == "Socket is closed"))


def _host_label(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class HostKeyError(Exception):
    """The server's host key is unknown or differs from the one in known_hosts."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


class _MissingDirectory(_MissingBucket):
    """The top-most missing directory on the way to a path (the SFTP 'bucket')."""

    def __init__(self, name: str, parent: str):
        Exception.__init__(self, f"directory {name!r} does not exist in {parent}")
        self.bucket = name
        self.noun = "directory"


class _Replies:
    """Collects SFTP replies paramiko hands to ``_async_response``."""

    def __init__(self):
        self.done: dict[int, tuple[int, Any]] = {}

    def _async_response(self, t, msg, num):
        self.done[num] = (t, msg)


class _Connection:
    """paramiko: one SSH transport, its SFTP channels, and what was learned on it.

    The backend uses ``primary`` (an SFTP client: stat, listdir_attr, open, mkdir,
    remove, rename, posix_rename), ``transfer``, ``copy``, ``active`` and ``close``;
    the asyncssh transport offers the same.
    """

    def __init__(self, ssh, settings: Mapping[str, Any]):
        self.ssh = ssh
        self.transport = ssh.get_transport()
        self.settings = settings
        self._lock = threading.Lock()
        self._idle: list = []
        self._all: list = []
        self.known_dirs: set[str] = set()
        self.posix_rename = True
        self.copy_data = True
        self.primary = self.channel()

    def channel(self):
        import paramiko

        with self._lock:
            if self._idle:
                return self._idle.pop()
        sftp = paramiko.SFTPClient.from_transport(
            self.transport, window_size=WINDOW_SIZE, max_packet_size=CHANNEL_MAX_PACKET
        )
        sftp.get_channel().settimeout(self.settings["io_timeout"])
        with self._lock:
            self._all.append(sftp)
        return sftp

    def release(self, sftp) -> None:
        with self._lock:
            self._idle.append(sftp)

    @property
    def active(self) -> bool:
        return self.transport is not None and self.transport.is_active()

    def close(self) -> None:
        for sftp in self._all:
            try:
                sftp.close()
            except Exception:
                pass
        self._all.clear()
        self._idle.clear()
        self.ssh.close()  # ends the transport and its thread

    def copy(self, source: str, target: str, chunk: int) -> None:
        """Copy ``source`` to the new file ``target`` on the server."""
        sftp = self.primary
        with sftp.open(source, "rb") as reader, sftp.open(target, "wb") as writer:
            if self.copy_data:  # server-side copy (OpenSSH >= 9.0 'copy-data')
                from paramiko.sftp import CMD_EXTENDED
                from paramiko.sftp_client import int64

                try:
                    sftp._request(CMD_EXTENDED, "copy-data", reader.handle, int64(0), int64(0),
                                  writer.handle, int64(0))
                    return
                except OSError as exc:
                    if isinstance(exc, (FileNotFoundError, PermissionError)):
                        raise
                    self.copy_data = False  # not offered by this server
            while True:  # relayed through this machine
                block = reader.read(chunk)
                if not block:
                    break
                writer.write(block)

    # --- bulk data ----------------------------------------------------------------------
    def transfer(self, path: str, size: int, *, sink: VerifyingSink | None = None,
                 upload_fd: int | None = None, start: int = 0,
                 on_written: Callable[[int, int], None] | None = None) -> None:
        """Move bytes ``[start, size)`` of ``path`` over several channels, ``chunk_size``
        at a time; ``on_written(offset, length)`` for each write the server confirmed."""
        chunk = self.settings["chunk_size"]
        blocks = max(1, -(-(size - start) // chunk))
        workers = max(1, min(self.settings["max_concurrency"], blocks))
        state = {"next": start, "error": None}
        lock = threading.Lock()

        def take() -> tuple[int, int] | None:
            with lock:
                if state["error"] is not None or state["next"] >= size:
                    return None
                start = state["next"]
                state["next"] = min(size, start + chunk)
                return start, state["next"]

        def run(first: bool) -> None:
            sftp = None
            try:
                sftp = self.primary if first else self.channel()
                self._channel_worker(sftp, path, take, sink, upload_fd, on_written)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                with lock:
                    if state["error"] is None:
                        state["error"] = exc
            finally:
                if not first and sftp is not None and self.active:
                    self.release(sftp)

        if size <= start:
            return
        threads = [threading.Thread(target=run, args=(i == 0,), name=f"covalent-lot-sftp-{i}", daemon=True)
                   for i in range(workers)]
        self.last_reply = time.monotonic()
        for thread in threads:
            thread.start()
        self._watch(threads, path, state, lock)
        error = state["error"]
        if error is not None:
            if not isinstance(error, OSError) or _connection_lost(error):
                # A timeout or a dropped channel can leave a reply half read: never
                # reuse this transport; the engine's retry opens a fresh one.
                self.transport.close()
            raise error

    def _watch(self, threads: list[threading.Thread], path: str, state: dict, lock) -> None:
        """Wait for the channel threads; end the transfer if no reply came for io_timeout.

        A read waiting for a reply times out by itself, but a write can block
        for good inside paramiko on a socket the server stopped reading from.
        Closing the transport makes that write fail.
        """
        timeout = self.settings["io_timeout"]
        while True:
            alive = [thread for thread in threads if thread.is_alive()]
            if not alive:
                return
            alive[0].join(0.2)
            if time.monotonic() - self.last_reply > timeout:
                with lock:
                    if state["error"] is None:
                        state["error"] = TimeoutError(f"no SFTP reply in {timeout} s for {path}")
                self.transport.close()
                for thread in threads:
                    thread.join(timeout)
                return

    def _channel_worker(self, sftp, path, take, sink, upload_fd, on_written) -> None:
        from paramiko.sftp import CMD_DATA, CMD_READ, CMD_STATUS, CMD_WRITE
        from paramiko.sftp_client import int64

        request = min(self.settings["request_size"], MAX_REQUEST)
        depth = self.settings["max_requests"]
        replies = _Replies()
        inflight: deque = deque()  # (num, offset, length)
        ranges: deque = deque()  # (offset, end) still to request
        with sftp.open(path, "rb" if sink is not None else "r+b") as handle_file:
            handle = handle_file.handle
            while True:
                while len(inflight) < depth:
                    if not ranges:
                        block = take()
                        if block is None:
                            break
                        ranges.append(block)
                    offset, end = ranges.popleft()
                    length = min(request, end - offset)
                    if offset + length < end:
                        ranges.appendleft((offset + length, end))
                    if sink is not None:
                        num = sftp._async_request(replies, CMD_READ, handle, int64(offset), length)
                    else:
                        data = os.pread(upload_fd, length, offset)
                        if len(data) != length:
                            raise OSError(f"upload source shrank while it was read (at {offset})")
                        num = sftp._async_request(replies, CMD_WRITE, handle, int64(offset), data)
                    inflight.append((num, offset, length))
                if not inflight:
                    return
                num, offset, length = inflight.popleft()
                while num not in replies.done:
                    sftp._read_response()
                t, msg = replies.done.pop(num)
                self.last_reply = time.monotonic()
                if sink is None:
                    if t != CMD_STATUS:
                        raise OSError(f"unexpected SFTP reply {t} to a write of {path}")
                    _status_error(sftp, msg)
                    if on_written is not None:
                        on_written(offset, length)
                    continue
                if t == CMD_DATA:
                    data = msg.get_string()
                    if not data:
                        raise OSError(f"{path} returned no data at {offset}: it shrank while read")
                    sink.write_at(offset, data)
                    if len(data) < length:  # short read: ask for the rest
                        ranges.appendleft((offset + len(data), offset + length))
                elif t == CMD_STATUS:
                    try:
                        _status_error(sftp, msg)
                    except EOFError:
                        raise OSError(f"{path} ended at {offset}, before its size: it shrank while read")
                    raise OSError(f"unexpected SFTP status for a read of {path}")
                else:
                    raise OSError(f"unexpected SFTP reply {t} to a read of {path}")


def _cipher_order() -> list[str]:
    from asyncssh.encryption import get_default_encryption_algs

    others = [a.decode() for a in get_default_encryption_algs()]
    return list(PREFERRED_CIPHERS) + [a for a in others if a not in PREFERRED_CIPHERS]


def _security(transport) -> None:
    options = transport.get_security_options()
    preferred = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(preferred + [c for c in options.ciphers if c not in preferred])


def _status_error(sftp, msg) -> None:
    sftp._convert_status(msg)  # raises IOError/EOFError for anything but OK


class SFTPBackend(Backend):
    scheme = "sftp"
    # The checksum goes into a sidecar after the bytes: hash while uploading.
    checksum_after_upload = True

    credentials_per_host = True

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        self._authority: str | None = None
        # (local path, remote path, size) -> an upload a dropped connection cut short
        self._unfinished: dict[tuple[str, str, int], _Unfinished] = {}

    # --- connection ---------------------------------------------------------------------
    def _target(self) -> tuple[str | None, str, int]:
        if self._authority is None:
            raise RuntimeError("SFTPBackend used before any location was given")
        user, host, port = split_authority(self._authority, self.settings["port"])
        return user or self.settings["username"], host, port

    def connect(self):
        settings = self.settings
        user, host, port = self._target()
        known_files: list[str] = []
        if not settings["insecure_skip_host_key_check"]:
            if os.path.exists(SYSTEM_KNOWN_HOSTS):
                known_files.append(SYSTEM_KNOWN_HOSTS)
            known = settings["known_hosts"]
            path = os.path.expanduser(known if known is not None else "~/.ssh/known_hosts")
            if os.path.exists(path):
                known_files.append(path)
            elif known is not None:
                raise HostKeyError(
                    f"known_hosts file {known!r} does not exist on the executor",
                    "point [lot.sftp] key known_hosts at an existing file",
                )
        # A path on the machine that connects; only the path travels.
        key_filename = settings["key_filename"]
        if key_filename is not None:
            key_filename = os.path.expanduser(key_filename)
            if not os.path.exists(key_filename):
                import paramiko

                raise paramiko.AuthenticationException("key_filename does not exist on the executor")
        if _use_asyncssh(settings["transport"]):
            return self._connect_asyncssh(user, host, port, known_files, key_filename)
        return self._connect_paramiko(user, host, port, known_files, key_filename)

    def _host_key_error(self, host: str, port: int, known_files: list[str], *,
                        presented: str = "", changed: bool = False) -> HostKeyError:
        """Unknown or CHANGED: decided by whether known_hosts names the host at all."""
        import paramiko

        label = _host_label(host, port)
        listed = changed
        for path in known_files:
            try:
                listed = listed or paramiko.HostKeys(path).lookup(label) is not None
            except (OSError, paramiko.SSHException):
                pass
        if listed:
            return HostKeyError(
                f"host key of {label} CHANGED: it is not the one in known_hosts{presented}",
                "if the server was legitimately re-keyed, remove the old line "
                f"(ssh-keygen -R '{label}') and add the new one "
                f"(ssh-keyscan -p {port} {host} >> ~/.ssh/known_hosts), after checking its fingerprint",
            )
        return HostKeyError(
            f"host key of {label} is unknown (not in known_hosts)",
            f"trust it once, after checking its fingerprint: ssh-keyscan -p {port} {host} "
            ">> ~/.ssh/known_hosts (or set [lot.sftp] known_hosts to a file holding it)",
        )

    def _connect_asyncssh(self, user, host, port, known_files, key_filename):
        import asyncssh

        from covalent_lot.strategies._sftp_asyncssh import AsyncsshConnection

        settings = self.settings
        if settings["insecure_skip_host_key_check"]:
            log.warning("SFTP host key of %s NOT VERIFIED (insecure_skip_host_key_check is on)",
                        _host_label(host, port))
        kwargs: dict[str, Any] = {
            "host": host, "port": port, "username": user or None,
            # None switches verification off; an empty set of known hosts trusts nothing.
            "known_hosts": None if settings["insecure_skip_host_key_check"] else (
                asyncssh.read_known_hosts(known_files) if known_files else asyncssh.import_known_hosts("")),
            "encryption_algs": _cipher_order(),
            "connect_timeout": settings["connect_timeout"] + settings["banner_timeout"] + settings["auth_timeout"],
            "config": None,  # like paramiko here: no ~/.ssh/config
        }
        if user is None:
            kwargs.pop("username")
        if key_filename is not None:
            kwargs["client_keys"] = [key_filename]
        if not settings["allow_agent"]:
            kwargs["agent_path"] = None
        try:
            return AsyncsshConnection(settings, kwargs)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._host_key_error(host, port, known_files) from exc

    def _connect_paramiko(self, user, host, port, known_files, key_filename) -> _Connection:
        import paramiko

        settings = self.settings
        ssh = paramiko.SSHClient()
        if settings["insecure_skip_host_key_check"]:
            ssh.set_missing_host_key_policy(_InsecureAcceptPolicy())
        else:
            for path in known_files:
                try:
                    ssh.load_host_keys(path)  # never saved back: load_host_keys + no save
                except OSError:
                    pass
            ssh.set_missing_host_key_policy(paramiko.RejectPolicy())

        pkey = None
        if key_filename is not None:
            # Loaded here, so that a file that is no key is refused as such (paramiko
            # would report it as a failed connection, and it would be retried).
            try:
                pkey = paramiko.PKey.from_path(key_filename)
            except paramiko.PasswordRequiredException:
                raise paramiko.AuthenticationException(
                    "key_filename is encrypted; passphrases are not supported: use an "
                    "unencrypted key or the ssh-agent") from None
            except (paramiko.SSHException, ValueError, OSError) as exc:
                # The parser's message is about the key's content: not repeated.
                raise paramiko.AuthenticationException(
                    f"key_filename is not a readable private key ({type(exc).__name__})") from None

        def transport_factory(sock, **kwargs):
            transport = paramiko.Transport(
                sock, default_window_size=WINDOW_SIZE, **kwargs
            )
            _security(transport)
            return transport

        try:
            ssh.connect(
                host, port=port, username=user or None,
                pkey=pkey,
                allow_agent=settings["allow_agent"],
                look_for_keys=key_filename is None,
                timeout=settings["connect_timeout"],
                banner_timeout=settings["banner_timeout"],
                auth_timeout=settings["auth_timeout"],
                channel_timeout=settings["io_timeout"],
                transport_factory=transport_factory,
            )
        except paramiko.BadHostKeyException as exc:
            ssh.close()
            raise self._host_key_error(host, port, known_files, changed=True,
                                       presented=f" ({exc.key.get_name()} {exc.key.fingerprint})") from exc
        except paramiko.SSHException as exc:
            ssh.close()
            if "not found in known_hosts" in str(exc):
                raise self._host_key_error(host, port, known_files) from exc
            raise
        except BaseException:
            ssh.close()
            raise
        try:
            return _Connection(ssh, settings)
        except BaseException:
            ssh.close()
            raise

    def file_concurrency(self) -> int:
        # paramiko's transfers drive their channels' replies by hand: one file at a
        # time; asyncssh multiplexes any number of requests on its event loop.
        return super().file_concurrency() if _use_asyncssh(self.settings["transport"]) else 1

    def _conn(self, location: StoreURI) -> _Connection:
        if self._authority is None:
            self._authority = location.bucket
        elif location.bucket != self._authority:
            raise ValueError(
                f"{location}: one transfer talks to one server ({self._authority}), not {location.bucket}"
            )
        conn = self.client
        if not conn.active:  # dropped: a retry gets a fresh transport
            with self._client_lock:
                # Only this dead one: another file's thread may have replaced it already.
                if self._client is conn:
                    self._client = None
            conn.close()
            conn = self.client
        return conn

    @property
    def endpoint(self) -> str:
        if self._authority is None:
            return "sftp"
        user, host, port = self._target()
        return f"sftp://{user + '@' if user else ''}{host}:{port}"

    def close(self) -> None:
        with self._client_lock:
            conn, self._client = self._client, None
        if conn is not None:
            if conn.active:
                for upload in self._unfinished.values():  # retries that never came
                    self._remove_quietly(conn.primary, upload.partial)
            conn.close()
        self._unfinished.clear()

    # --- helpers ------------------------------------------------------------------------
    def _read_sidecar(self, sftp, path: str) -> str | None:
        try:
            with sftp.open(sidecar_path(path), "rb") as f:
                text = f.read(200).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None
        digest = text.split()[0].lower() if text else ""
        return digest if len(digest) == 64 else None

    def _missing(self, conn: _Connection, path: str, cause: BaseException) -> None:
        """Raise _MissingDirectory if a directory above ``path`` is missing."""
        sftp = conn.primary
        parent = posixpath.dirname(path)
        missing = None
        while parent not in ("/", ""):
            try:
                sftp.stat(parent)
                break
            except FileNotFoundError:
                missing = parent
                parent = posixpath.dirname(parent)
            except OSError:
                return
        if missing is not None:
            raise _MissingDirectory(posixpath.basename(missing), posixpath.dirname(missing) or "/") from cause

    def _makedirs(self, conn: _Connection, directory: str) -> None:
        if directory in ("/", "") or directory in conn.known_dirs:
            return
        sftp = conn.primary
        try:
            attrs = sftp.stat(directory)
            if not stat_module.S_ISDIR(attrs.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, f"{directory} exists and is not a directory")
        except FileNotFoundError:
            self._makedirs(conn, posixpath.dirname(directory))
            try:
                sftp.mkdir(directory)
            except OSError:
                if not stat_module.S_ISDIR(sftp.stat(directory).st_mode):
                    raise
        conn.known_dirs.add(directory)

    def _rename(self, conn: _Connection, source: str, target: str) -> None:
        sftp = conn.primary
        if conn.posix_rename:
            try:
                sftp.posix_rename(source, target)
                return
            except OSError as exc:
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise
                conn.posix_rename = False  # not offered by this server
        try:
            sftp.remove(target)
        except FileNotFoundError:
            pass
        sftp.rename(source, target)

    def _remove_quietly(self, sftp, path: str) -> None:
        try:
            sftp.remove(path)
        except Exception:
            pass

    def _write_sidecar(self, conn: _Connection, path: str, sha256: str) -> None:
        sftp = conn.primary
        partial = _partial_path(sidecar_path(path))
        try:
            with sftp.open(partial, "wb") as f:
                f.write((sha256 + "\n").encode("ascii"))
            self._rename(conn, partial, sidecar_path(path))
        except BaseException:
            self._remove_quietly(sftp, partial)
            raise

    # --- primitives ---------------------------------------------------------------------
    def stat(self, location: StoreURI) -> RemoteObject:
        conn = self._conn(location)
        path = remote_path(location)
        try:
            attrs = conn.primary.stat(path)
        except FileNotFoundError as exc:
            self._missing(conn, path, exc)
            raise
        if stat_module.S_ISDIR(attrs.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, f"{location} is a directory; end the URI with '/' to download a folder"
            )
        return RemoteObject(location, attrs.st_size, self._read_sidecar(conn.primary, path),
                            f"{attrs.st_size}:{attrs.st_mtime}", epoch_seconds(attrs.st_mtime))

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        conn = self._conn(prefix)
        sftp = conn.primary
        root = remote_path(prefix).rstrip("/") or "/"
        try:
            entries = sftp.listdir_attr(root)
        except FileNotFoundError as exc:
            self._missing(conn, root, exc)
            return  # an empty "folder", as on object stores
        pending = deque([(root, prefix.key, entries)])
        while pending:
            directory, key_prefix, entries = pending.popleft()
            names = {e.filename for e in entries}
            for entry in sorted(entries, key=lambda e: e.filename):
                name = entry.filename
                if TEMP_MARK in name or name.endswith(SIDECAR_SUFFIX):
                    continue
                path = posixpath.join(directory, name)
                key = key_prefix + name
                if stat_module.S_ISDIR(entry.st_mode):
                    pending.append((path, key + "/", sftp.listdir_attr(path)))
                elif stat_module.S_ISREG(entry.st_mode):
                    digest = None
                    if name + SIDECAR_SUFFIX in names:
                        digest = self._read_sidecar(sftp, path)
                    yield RemoteObject(StoreURI(prefix.scheme, prefix.bucket, key), entry.st_size,
                                       digest, f"{entry.st_size}:{entry.st_mtime}",
                                       epoch_seconds(entry.st_mtime))

    def put_file(self, local_path: str, location: StoreURI, size: int, sha256: str | None) -> None:
        conn = self._conn(location)
        path = remote_path(location)
        if location.is_folder:
            raise IsADirectoryError(errno.EISDIR, f"{location} names a folder")
        self._makedirs(conn, posixpath.dirname(path))
        sftp = conn.primary
        job = (local_path, path, size)
        upload = self._resumable(sftp, self._unfinished.pop(job, None))
        fresh = upload is None
        if fresh:
            upload = _Unfinished(_partial_path(path))
        try:
            if fresh:
                with sftp.open(upload.partial, "wb"):
                    pass
            with open(local_path, "rb") as f:
                conn.transfer(upload.partial, size, upload_fd=f.fileno(), start=upload.prefix,
                              on_written=lambda offset, length: (upload.written(offset, length),
                                                                 self.sent(length)))
            if sha256 is not None:
                self._write_sidecar(conn, path, sha256() if callable(sha256) else sha256)
            else:
                self._remove_quietly(sftp, sidecar_path(path))  # never a stale checksum
            self._rename(conn, upload.partial, path)
        except BaseException as exc:
            verdict = self.classify(exc) if isinstance(exc, Exception) else None
            if verdict is not None and verdict.transient:
                # The engine's retry (same backend, same file) goes on from the
                # confirmed bytes in the partial file; close() removes it if none comes.
                self._unfinished[job] = upload
            elif conn.active:
                self._remove_quietly(sftp, upload.partial)
            raise

    def _resumable(self, sftp, upload: _Unfinished | None) -> _Unfinished | None:
        """``upload`` if its partial file holds confirmed bytes to go on from, else None
        (and a partial file it may have left is removed: the upload starts over)."""
        if upload is None:
            return None
        if upload.prefix:
            try:
                if sftp.stat(upload.partial).st_size >= upload.prefix:
                    log.info("upload to %s: resuming at byte %d", upload.partial, upload.prefix)
                    return upload
            except OSError:
                return None  # gone
        self._remove_quietly(sftp, upload.partial)
        return None

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        conn = self._conn(obj.location)
        path = remote_path(obj.location)
        try:
            size = conn.primary.stat(path).st_size
        except FileNotFoundError as exc:
            self._missing(conn, path, exc)
            raise
        conn.transfer(path, size, sink=sink, start=start)
        return RemoteObject(obj.location, size, obj.sha256, obj.version)

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        conn = self._conn(source.location)
        self._conn(destination)
        src, dst = remote_path(source.location), remote_path(destination)
        self._makedirs(conn, posixpath.dirname(dst))
        sftp = conn.primary
        partial = _partial_path(dst)
        try:
            conn.copy(src, partial, self.settings["chunk_size"])
            if source.sha256 is not None:
                self._write_sidecar(conn, dst, source.sha256)
            else:
                self._remove_quietly(sftp, sidecar_path(dst))
            self._rename(conn, partial, dst)
        except FileNotFoundError as exc:
            self._remove_quietly(sftp, partial)
            self._missing(conn, src, exc)
            raise
        except BaseException:
            if conn.active:
                self._remove_quietly(sftp, partial)
            raise

    def delete(self, location: StoreURI) -> None:
        conn = self._conn(location)
        path = remote_path(location)
        conn.primary.remove(path)
        self._remove_quietly(conn.primary, sidecar_path(path))

    # --- the error table ----------------------------------------------------------------
    def classify_one(self, exc: BaseException) -> Classified | None:
        import paramiko

        try:
            import asyncssh
        except ImportError:
            asyncssh = None

        for err in exception_chain(exc):
            if isinstance(err, ChecksumMismatchError):
                return None
            if isinstance(err, _MissingBucket):
                return err.verdict()
            if isinstance(err, HostKeyError):
                return Classified(ErrorKind.DENIED, str(err), err.hint)
            if isinstance(err, paramiko.BadHostKeyException):
                return Classified(ErrorKind.DENIED, f"host key changed: {err}",
                                  "check the server's fingerprint, then update known_hosts")
            if isinstance(err, paramiko.AuthenticationException):
                return Classified(ErrorKind.DENIED, f"authentication failed: {err}", self._auth_hint())
            if asyncssh is not None:
                if isinstance(err, (asyncssh.PermissionDenied, asyncssh.KeyImportError)):
                    return Classified(ErrorKind.DENIED, f"authentication failed: {err}", self._auth_hint())
                if isinstance(err, asyncssh.Error):  # disconnects, protocol errors
                    return Classified(ErrorKind.CONNECTION, f"{type(err).__name__}: {err}")
            if isinstance(err, paramiko.ssh_exception.NoValidConnectionsError):
                causes = list(err.errors.values())
                if causes and all(isinstance(c, socket.timeout) for c in causes):
                    return Classified(ErrorKind.TIMEOUT, str(err))
                return Classified(ErrorKind.CONNECTION, str(err))
            if isinstance(err, (socket.timeout, TimeoutError)):
                return Classified(ErrorKind.TIMEOUT, str(err) or "no answer in time")
            if isinstance(err, paramiko.SSHException):
                text = str(err)
                lowered = text.lower()
                if "known_hosts" in lowered:
                    return Classified(ErrorKind.DENIED, text, "add the host key to known_hosts")
                if "no authentication methods" in lowered or "authentication" in lowered and "timeout" not in lowered:
                    return Classified(ErrorKind.DENIED, text, self._auth_hint())
                if "timeout" in lowered or "banner" in lowered:
                    return Classified(ErrorKind.TIMEOUT, text)
                return Classified(ErrorKind.CONNECTION, text)
            if isinstance(err, (EOFError, ConnectionError)):
                return Classified(ErrorKind.CONNECTION, str(err) or type(err).__name__)
            if isinstance(err, FileNotFoundError):
                return Classified(ErrorKind.NOT_FOUND, "no such file")
            if isinstance(err, PermissionError):
                return Classified(ErrorKind.DENIED, "permission denied by the server",
                                  "check the remote user's rights on this path")
            if isinstance(err, (NotADirectoryError, IsADirectoryError)):
                return Classified(ErrorKind.INVALID, str(err), "")
            if isinstance(err, paramiko.SFTPError):
                return Classified(ErrorKind.OTHER, str(err), "")
            if _connection_lost(err):
                return Classified(ErrorKind.CONNECTION, str(err) or type(err).__name__)
            if type(err) is OSError and err.errno is None and err.args:
                # paramiko's SFTP status errors (SSH_FX_FAILURE etc.)
                return Classified(ErrorKind.OTHER, f"server said: {err}", "")
        return None

    def _auth_hint(self) -> str:
        if self.settings["key_filename"] is not None:
            # The path is not repeated here: messages end up in logs and dispatch results.
            return ("check that the key_filename set in [lot.sftp] exists on the executor and is "
                    "authorized for this user (authorized_keys)")
        return "set [lot.sftp] key_filename to an authorized private key, or load one into ssh-agent"


class _InsecureAcceptPolicy:
    """insecure_skip_host_key_check: accept and do not remember any host key."""

    def missing_host_key(self, client, hostname, key):
        import logging

        logging.getLogger("covalent_lot").warning(
            "SFTP host key of %s NOT VERIFIED (insecure_skip_host_key_check is on): %s %s",
            hostname, key.get_name(), key.fingerprint,
        )


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
        if not location.is_folder and len(segments[-1].encode("utf-8")) > NAME_MAX - len(SIDECAR_SUFFIX):
            raise ValueError(
                f"SFTP file names are at most {NAME_MAX - len(SIDECAR_SUFFIX)} bytes here (the checksum "
                f"sidecar <name>{SIDECAR_SUFFIX} must fit in {NAME_MAX}); {segments[-1][:40]!r}... in "
                f"{location} is longer: shorten it"
            )
