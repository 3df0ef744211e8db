"""The asyncssh transport of the SFTP backend (``transport = asyncssh``).

paramiko decrypts every packet in one Python thread and copies each byte
several times on its way to the caller, so with a checksum computed alongside
its downloads fall well behind OpenSSH's ``sftp``. asyncssh runs the SSH
connection on one event loop and does the ciphers in OpenSSL. It is optional
(``pip install covalent-lot[sftp-fast]``); ``transport = auto`` uses it when
it is installed.

Metadata (stat, listings, renames, sidecars) goes through asyncssh's SFTP
client. Files' bytes go through a second ``sftp`` channel of the session's
own (``_DataChannel``): requests are sent from the reply callbacks, read
replies land in the sink without being copied, and the channel takes packets
of up to a whole reply (docs/measurements.md).

A session here offers what the paramiko one does (see ``_sftp_wire``), raising
the same built-in exceptions. The event loop runs in one thread per session,
joined on close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import struct
import threading
from typing import Any, Awaitable, Callable, Mapping

from covalent_lot._errors import Classified, ErrorKind
from covalent_lot._pool import Watchdog
from covalent_lot._stream import VerifyingSink
from covalent_lot.strategies._sftp_wire import (
    KiB, MiB, PREFERRED_CIPHERS, Session, Target, credentials, host_key_error, openssh_command, shape,
)

__all__ = ["connect", "classify_error", "AsyncsshSession"]

# The data channel's receive window and largest packet: downloads arrive in
# packets of up to one SFTP reply instead of asyncssh's 32 KiB (the server's
# own limit, 32 KiB, applies to uploads). docs/measurements.md.
DATA_WINDOW = 16 * MiB
DATA_PACKET = 256 * KiB
# Bytes of an upload in flight (read from the file, not yet confirmed): each
# is held in memory until sent; beyond the server's 2 MiB window more only
# waits in asyncssh's send buffer.
UPLOAD_IN_FLIGHT = 8 * MiB
MAX_REQUEST_BYTES = 256 * KiB  # an SFTP request of the data channel, at most (head included)


def _translate(exc: BaseException) -> BaseException:
    """asyncssh's SFTP and connection errors as the built-ins paramiko raises."""
    import asyncssh

    if isinstance(exc, asyncssh.SFTPNoSuchFile):
        return FileNotFoundError(errno.ENOENT, exc.reason or "no such file")
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return PermissionError(errno.EACCES, exc.reason or "permission denied")
    if isinstance(exc, (asyncssh.SFTPNoConnection, asyncssh.SFTPConnectionLost)):
        # Raised on this side when the connection is gone: transient, like a disconnect.
        return ConnectionError(f"SSH connection lost: {exc.reason or type(exc).__name__}")
    if isinstance(exc, asyncssh.SFTPError):
        return OSError(exc.reason or type(exc).__name__)  # errno None: a server status, as paramiko's
    if isinstance(exc, (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable)):
        return exc  # the backend's error table tells these apart
    if isinstance(exc, asyncssh.DisconnectError):
        return ConnectionError(f"SSH connection lost: {exc.reason or type(exc).__name__}")
    return exc


def classify_error(err: BaseException, auth_hint: str) -> Classified | None:
    """asyncssh's exceptions that reach the backend untranslated (None: not asyncssh's)."""
    try:
        import asyncssh
    except ImportError:
        return None
    if isinstance(err, (asyncssh.PermissionDenied, asyncssh.KeyImportError)):
        return Classified(ErrorKind.DENIED, f"authentication failed: {err}", auth_hint)
    if isinstance(err, asyncssh.Error):  # disconnects, protocol errors
        return Classified(ErrorKind.CONNECTION, f"{type(err).__name__}: {err}")
    return None


def _discard(awaitable) -> None:
    """Close a coroutine that will never run (asyncssh wraps some, e.g. open, in an _ACMWrapper)."""
    close = getattr(getattr(awaitable, "_coro", awaitable), "close", None)
    if close is not None:
        close()


def connect(settings: Mapping[str, Any], target: Target) -> "AsyncsshSession":
    import asyncssh
    from asyncssh.encryption import get_default_encryption_algs

    known_files, key_filename = credentials(settings)
    if settings["insecure_skip_host_key_check"]:
        import logging

        logging.getLogger("covalent_lot").warning(
            "SFTP host key of %s NOT VERIFIED (insecure_skip_host_key_check is on)", target.label)
    others = [a.decode() for a in get_default_encryption_algs()]
    kwargs: dict[str, Any] = {
        "host": target.host, "port": target.port,
        # None switches verification off; an empty set of known hosts trusts nothing.
        "known_hosts": None if settings["insecure_skip_host_key_check"] else (
            asyncssh.read_known_hosts(known_files) if known_files else asyncssh.import_known_hosts("")),
        "encryption_algs": list(PREFERRED_CIPHERS) + [a for a in others if a not in PREFERRED_CIPHERS],
        "connect_timeout": settings["connect_timeout"] + settings["banner_timeout"] + settings["auth_timeout"],
        "config": None,  # like paramiko here: no ~/.ssh/config
    }
    if target.user is not None:
        kwargs["username"] = target.user
    if key_filename is not None:
        kwargs["client_keys"] = [key_filename]
    if not settings["allow_agent"]:
        kwargs["agent_path"] = None
    try:
        return AsyncsshSession(settings, lambda: asyncssh.connect(**kwargs),
                               openssh_command(settings, target, known_files, key_filename))
    except asyncssh.HostKeyNotVerifiable as exc:
        raise host_key_error(target, known_files) from exc


class _Attrs:
    """The fields of paramiko's SFTPAttributes the backend reads."""

    __slots__ = ("filename", "st_mode", "st_size", "st_mtime")

    def __init__(self, attrs, filename: str = ""):
        self.filename = filename
        self.st_mode = attrs.permissions or 0
        self.st_size = attrs.size or 0
        self.st_mtime = attrs.mtime


class _SmallFile:
    """A remote file for small whole reads and writes (sidecars)."""

    def __init__(self, session: "AsyncsshSession", handle):
        self._session = session
        self._handle = handle

    def read(self, size: int) -> bytes:
        return self._session.run(self._handle.read(size))

    def write(self, data: bytes) -> None:
        self._session.run(self._handle.write(data))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._session.active:
            self._session.run(self._handle.close())


class _SyncSFTP:
    """Blocking facade over asyncssh's SFTPClient, shaped like paramiko's."""

    def __init__(self, session: "AsyncsshSession"):
        self._session = session

    def _call(self, name: str, *args):
        return self._session.run(getattr(self._session.sftp, name)(*args))

    def stat(self, path: str) -> _Attrs:
        return _Attrs(self._call("stat", path))

    def listdir_attr(self, path: str) -> list[_Attrs]:
        return [_Attrs(n.attrs, n.filename) for n in self._call("readdir", path) if n.filename not in (".", "..")]

    def open(self, path: str, mode: str) -> _SmallFile:
        return _SmallFile(self._session, self._call("open", path, mode))

    def mkdir(self, path: str) -> None:
        self._call("mkdir", path)

    def remove(self, path: str) -> None:
        self._call("remove", path)

    def rename(self, source: str, target: str) -> None:
        self._call("rename", source, target)

    def posix_rename(self, source: str, target: str) -> None:
        self._call("posix_rename", source, target)


class AsyncsshSession(Session):
    """One asyncssh connection and SFTP session, driven from a private event loop.

    ``open_ssh()`` makes the SSH connection (an awaitable, run on that loop).
    """

    def __init__(self, settings: Mapping[str, Any], open_ssh: Callable[[], Awaitable],
                 openssh: list[str] | None = None):
        super().__init__(settings)
        self._openssh = openssh  # the ssh command of the data channel; None: asyncssh's channel
        self._pipes: tuple[asyncio.SubprocessTransport, "_Pipes"] | None = None  # the ssh process
        self._closed = False
        self._state = threading.Lock()  # orders close() against new requests
        self._ssh = None
        self.sftp = None
        self._opening: asyncio.Future | None = None  # the data channel, opened on first use
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="covalent-lot-asyncssh", daemon=True)
        self._thread.start()
        try:
            self.run(self._open(open_ssh), timeout=None)
        except BaseException:
            self.close()
            raise
        self.primary = _SyncSFTP(self)

    async def _open(self, open_ssh: Callable[[], Awaitable]) -> None:
        if self._openssh is not None:
            # OpenSSH logs in while asyncssh does: the two handshakes overlap.
            self._opening = asyncio.ensure_future(self._openssh_or_none())
        self._ssh = await open_ssh()
        self.sftp = await self._ssh.start_sftp_client()

    def run(self, coro, timeout: float | None | str = "io", watchdog: Watchdog | None = None):
        """Run ``coro`` on the loop; asyncssh errors come back as built-ins.

        ``timeout`` bounds one request; a transfer of many passes None and a
        ``watchdog`` it beats on each reply: when it stalls the session closes.
        """
        if timeout == "io":
            timeout = self.settings["io_timeout"]
        with self._state:
            if self._closed:
                _discard(coro)
                raise ConnectionError("SSH connection closed (another file of this transfer failed)")
            future = asyncio.run_coroutine_threadsafe(
                coro if timeout is None else asyncio.wait_for(coro, timeout), self._loop)
        # Several files share the session: if another one's failure closes it,
        # this wait ends too, instead of waiting on a stopped loop forever.
        while not future.done():
            concurrent.futures.wait([future], timeout=0.2)
            if future.done():
                break
            if self._closed:
                future.cancel()
                raise ConnectionError("SSH connection closed while a request was in flight")
            if watchdog is not None and watchdog.stalled:
                # A write may wait for good on a server that stopped reading: closing
                # ends it (and a reply half read is never reused).
                self.close()
                raise watchdog.error()
        try:
            return future.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            raise ConnectionError("SSH connection closed while a request was in flight") from exc
        except BaseException as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    @property
    def active(self) -> bool:
        return not self._closed and self._ssh is not None and not self._ssh.is_closed()

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
        ssh, self._ssh = self._ssh, None

        async def shut():
            # Whatever other threads still wait for (a folder's other files) ends
            # now, with an error, instead of waiting on a stopped loop forever.
            me = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not me]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._end_pipes()
            if ssh is not None:
                ssh.close()
                await ssh.wait_closed()

        if self._loop.is_running():
            try:
                # Not wrapped in wait_for: its task would be one of the "others" cancelled above.
                asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - closing; the loop goes next
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def remote_copy(self, source: str, target: str) -> None:
        """Copy on the server (the copy-data extension)."""
        self.run(self.sftp.remote_copy(source, target))

    def relay(self, source: str, target: str, chunk: int) -> None:
        """Copy through this machine."""
        watchdog = Watchdog(self.settings["io_timeout"], f"SFTP copy of {source}")

        async def relay() -> None:
            async with await self.sftp.open(source, "rb") as reader, await self.sftp.open(target, "wb") as writer:
                while block := await reader.read(chunk):
                    watchdog.beat()
                    await writer.write(block)
                    watchdog.beat()

        self._bulk(relay(), watchdog)

    # --- bulk data ----------------------------------------------------------------------
    def _bulk(self, coro, watchdog: Watchdog) -> None:
        try:
            self.run(coro, timeout=None, watchdog=watchdog)
        except BaseException as exc:
            if not isinstance(exc, OSError) or isinstance(exc, (TimeoutError, ConnectionError)):
                self.close()  # a reply may be half read: the engine's retry opens a fresh session
            raise

    def transfer(self, path: str, size: int, *, sink: VerifyingSink | None = None,
                 upload_fd: int | None = None, start: int = 0,
                 on_written: Callable[[int, int], None] | None = None) -> None:
        """Move bytes ``[start, size)`` of ``path`` over this session's data channel;
        ``on_written(offset, length)`` for each write the server confirmed."""
        if size <= start:
            return
        watchdog = Watchdog(self.settings["io_timeout"], f"SFTP {path}")
        request, depth = shape(self.settings)
        depth *= self.settings["max_concurrency"]
        if sink is None:
            # An upload holds the bytes it has in flight: bounded (docs/measurements.md).
            depth = max(1, min(depth, UPLOAD_IN_FLIGHT // request))
        job = _Job(path, start, size, request, depth, watchdog, sink, upload_fd, on_written)
        self._bulk(self._move(job), watchdog)

    async def _move(self, job: "_Job") -> None:
        job.done = asyncio.get_running_loop().create_future()
        channel = await self._data_channel()
        job.watchdog.beat()
        await channel.move(job)

    async def _data_channel(self) -> "_DataChannel":
        """The session's data channel, opened on first use and shared by the files
        moving at once (one SFTP server process on the other side, not one per file)."""
        for _ in range(2):  # twice: the channel started with the session may have come to nothing
            task = self._opening
            if task is None or (task.done() and (task.cancelled() or task.exception() is not None
                                                 or task.result() is None or task.result().closed)):
                task = self._opening = asyncio.ensure_future(self._open_data_channel())
            channel = await asyncio.shield(task)
            if channel is not None:
                return channel
        raise ConnectionError("no SFTP data channel")  # pragma: no cover - the second try raises or returns

    async def _openssh_or_none(self) -> "_DataChannel | None":
        """The OpenSSH data channel started with the session, or None (logged) when it fails."""
        try:
            return await self._open_openssh_channel()
        except Exception as exc:  # noqa: BLE001 - the library's channel still works
            import logging

            logging.getLogger("covalent_lot").info("SFTP: no OpenSSH data channel (%s); using asyncssh's", exc)
            self._openssh = None
            return None

    async def _open_data_channel(self) -> "_DataChannel":
        import asyncssh

        channel = await self._openssh_or_none() if self._openssh is not None else None
        if channel is not None:
            return channel
        ssh = self._ssh
        if ssh is None:  # another file's failure closed the session meanwhile
            raise ConnectionError("SSH connection closed (another file of this transfer failed)")
        try:
            _chan, channel = await ssh.create_session(
                _DataChannel, subsystem="sftp", encoding=None, window=DATA_WINDOW, max_pktsize=DATA_PACKET)
        except asyncssh.ChannelOpenError as exc:
            raise ConnectionError(f"SFTP data channel refused: {exc.reason}") from exc
        await channel.ready()
        return channel

    async def _open_openssh_channel(self) -> "_DataChannel":
        """A data channel through ``ssh -s ... sftp``: OpenSSH's ciphers in a process of
        their own, the SFTP messages over its pipes."""
        await self._end_pipes()
        loop = asyncio.get_running_loop()
        channel = _DataChannel()
        pipes, link = await loop.subprocess_exec(
            lambda: _Pipes(channel), *self._openssh, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._pipes = pipes, link
        settings = self.settings
        try:
            await asyncio.wait_for(channel.ready(), settings["connect_timeout"] + settings["banner_timeout"]
                                   + settings["auth_timeout"])
        except BaseException as exc:
            await self._end_pipes()
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectionError(f"ssh started no SFTP session{link.said()}") from None
            raise
        return channel

    async def _end_pipes(self) -> None:
        """Stop the ssh process (if any) and wait for its exit: a loop closed before it
        is reaped makes asyncio complain on stderr."""
        if self._pipes is None:
            return
        (pipes, link), self._pipes = self._pipes, None
        pipes.close()  # kills the process if it still runs
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(link.exited), 5)


class _Pipes(asyncio.SubprocessProtocol):
    """The ssh process's pipes as the data channel's SSH channel (``write``, ``close``)."""

    def __init__(self, channel: "_DataChannel"):
        self._channel = channel
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin = None
        self._stderr = bytearray()
        self.exited = asyncio.get_running_loop().create_future()  # done when ssh is reaped

    def said(self) -> str:
        text = self._stderr.decode("utf-8", "replace").strip()
        return f": {text.splitlines()[-1]}" if text else ""

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._stdin = transport.get_pipe_transport(0)
        self._stdin.set_write_buffer_limits(high=MAX_REQUEST_BYTES)
        self._channel.paced = True
        for fd in (0, 1):  # 1 MiB pipes instead of 64 KiB: fewer, larger reads and writes
            pipe = transport.get_pipe_transport(fd).get_extra_info("pipe")
            try:
                import fcntl

                fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), MiB)
            except (OSError, AttributeError, ImportError, ValueError):
                pass
        self._channel.connection_made(self)
        self._channel.session_started()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._channel.data_received(data, None)
        elif len(self._stderr) < 4096:
            self._stderr += data[:4096]

    def pause_writing(self) -> None:
        self._channel.pause_writing()

    def resume_writing(self) -> None:
        self._channel.resume_writing()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        # ssh ended (or was closed) and its pipes are drained: what it said is all here.
        code = self._transport.get_returncode() if self._transport is not None else None
        status = f" with status {code}" if code is not None else ""
        self._channel.connection_lost(ConnectionError(f"ssh ended{status}{self.said()}"))

    # --- what _DataChannel calls on its channel -----------------------------------------------
    def write(self, data) -> None:
        self._stdin.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# --- bulk data: an SFTP channel of its own ---------------------------------------------------
# SFTP version 3 (draft-ietf-secsh-filexfer-02): what moving a file's bytes sends and reads.
_FXP_INIT, _FXP_VERSION, _FXP_OPEN, _FXP_CLOSE, _FXP_READ, _FXP_WRITE = 1, 2, 3, 4, 5, 6
_FXP_STATUS, _FXP_HANDLE, _FXP_DATA = 101, 102, 103
_FXF_READ, _FXF_WRITE = 0x1, 0x2
_FX_OK, _FX_EOF, _FX_NO_SUCH_FILE, _FX_PERMISSION_DENIED = 0, 1, 2, 3
_HEAD = struct.Struct(">IBI")  # a message's length, type and request id
_U32 = struct.Struct(">I")
_LARGEST_REPLY = 256 * KiB + 1024  # OpenSSH's sftp-server sends at most 256 KiB


def _string(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def _status_error(body: bytes, what: str) -> OSError:
    """An SFTP status reply other than OK, as the built-in both transports raise."""
    code = _U32.unpack_from(body)[0] if len(body) >= 4 else -1
    message = ""
    if len(body) >= 8:
        (n,) = _U32.unpack_from(body, 4)
        message = bytes(body[8:8 + n]).decode("utf-8", "replace")
    if code == _FX_NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, message or "no such file", what)
    if code == _FX_PERMISSION_DENIED:
        return PermissionError(errno.EACCES, message or "permission denied", what)
    return OSError(f"{message or f'SFTP status {code}'} ({what})")  # errno None: a server status


class _Job:
    """One file's transfer on the data channel, and how far it got."""

    def __init__(self, path: str, start: int, size: int, request: int, depth: int, watchdog: Watchdog,
                 sink: VerifyingSink | None, upload_fd: int | None,
                 on_written: Callable[[int, int], None] | None):
        self.path, self.size, self.request, self.depth = path, size, request, depth
        self.watchdog, self.sink, self.upload_fd, self.on_written = watchdog, sink, upload_fd, on_written
        self.handle = b""  # as an SFTP string (length first)
        self.next = start  # the first byte not asked for yet
        self.again: list[tuple[int, int]] = []  # ranges short reads left to ask for again
        self.in_flight = 0
        self.buffer: memoryview | None = None  # an upload's requests are read into this
        self.done: asyncio.Future  # made on the loop

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _DataChannel:
    """A second ``sftp`` subsystem channel that moves files' bytes (asyncssh's session callbacks).

    asyncssh's SFTP client spends a task, a future and three copies of the data
    on each request. Here requests go out from the reply callbacks, replies are
    parsed as the channel delivers them, and the bytes of a read reply go to
    the sink in the pieces the SSH packets brought (memoryviews, no copy); a
    write request's bytes are read from the file into the buffer it is sent
    from. Each file keeps at most ``job.depth`` requests in flight.
    """

    def __init__(self):
        loop = asyncio.get_running_loop()  # asyncssh calls the factory on its loop
        self._chan = None
        self.closed = False
        self._next_id = 0
        self._in_flight: dict[int, tuple[_Job, int, int]] = {}  # id -> (job, offset, length)
        self._calls: dict[int, asyncio.Future | None] = {}  # open/close: id -> (type, body) waiter
        self._jobs: set[_Job] = set()
        self._head = bytearray()  # the message being collected (of a data reply: its head only)
        self._data: tuple[_Job, int, int] | None = None  # the read whose reply's bytes are arriving
        self._data_at = 0  # where its next byte goes
        self._data_left = 0
        self._version: asyncio.Future = loop.create_future()
        # Through OpenSSH's pipes: uploads wait while the pipe is full (``pause_writing``)
        # instead of piling their requests into the transport's buffer (a copy each).
        self.paced = False
        self._paused = False

    # --- asyncssh's session callbacks -------------------------------------------------------
    def connection_made(self, chan) -> None:
        self._chan = chan

    def session_started(self) -> None:
        self._chan.write(_HEAD.pack(5, _FXP_INIT, 3))  # version 3 (in the id's place)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost(ConnectionError(f"SFTP data channel closed{f': {exc}' if exc is not None else ''}"))

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._paused = self.paced

    def resume_writing(self) -> None:
        if self._paused:
            self._paused = False
            for job in list(self._jobs):
                if job.sink is None:
                    self.fill(job)

    def exit_status_received(self, status: int) -> None:
        pass

    def exit_signal_received(self, *args) -> None:
        pass

    def xon_xoff_requested(self, client_can_do: bool) -> None:
        pass

    def data_received(self, data: bytes, datatype) -> None:
        if datatype is not None:
            return  # the subsystem's stderr
        try:
            self._parse(memoryview(data))
        except Exception as exc:  # noqa: BLE001 - not SFTP: no reply after this one can be trusted
            self._lost(exc)
            self._chan.close()

    def _lost(self, exc: BaseException) -> None:
        self.closed = True
        if not self._version.done():
            self._version.set_exception(exc)
        for waiter in self._calls.values():
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        self._calls.clear()
        for job in self._jobs:
            job.fail(exc)
        self._in_flight.clear()

    # --- replies ----------------------------------------------------------------------------
    def _parse(self, view: memoryview) -> None:
        i, n, head = 0, len(view), self._head
        while i < n:
            if self._data_left:  # bytes of a read reply: straight to the sink
                k = min(self._data_left, n - i)
                job, offset, asked = self._data
                if not job.done.done():
                    try:
                        job.sink.write_at(self._data_at, view[i:i + k])
                    except Exception as exc:  # noqa: BLE001 - this file's failure, not the channel's
                        self._abandon(job, exc)
                self._data_at += k
                self._data_left -= k
                i += k
                if not self._data_left:
                    self._read_done(job, offset, asked, self._data_at - offset)
                continue
            if len(head) < 9:
                k = min(9 - len(head), n - i)
                head += view[i:i + k]
                i += k
                if len(head) < 9:
                    break
            length, kind, rid = _HEAD.unpack_from(head)
            if not 5 <= length <= _LARGEST_REPLY:
                raise ConnectionError(f"SFTP message of {length} bytes on the data channel")
            reading = kind == _FXP_DATA and rid in self._in_flight
            want = 13 if reading else 4 + length
            k = min(want - len(head), n - i)
            head += view[i:i + k]
            i += k
            if len(head) < want:
                break
            if reading:
                (count,) = _U32.unpack_from(head, 9)
                job, offset, asked = self._data = self._in_flight.pop(rid)
                if count != length - 9 or count > asked:
                    raise ConnectionError(f"malformed SFTP data reply for {job.path}")
                self._data_at, self._data_left = offset, count
                head.clear()
                if not count:
                    self._read_done(job, offset, asked, 0)
                continue
            body = bytes(head[9:])
            head.clear()
            self._reply(kind, rid, body)

    def _read_done(self, job: _Job, offset: int, asked: int, got: int) -> None:
        job.in_flight -= 1
        if job.done.done():
            return
        job.watchdog.beat()
        if not got:
            return self._abandon(job, OSError(f"{job.path} returned no data at {offset}: it shrank while read"))
        if got < asked:  # a short read: ask for the rest
            job.again.append((offset + got, asked - got))
        self.fill(job)

    def _reply(self, kind: int, rid: int, body: bytes) -> None:
        if kind == _FXP_VERSION:
            if not self._version.done():
                self._version.set_result(rid)  # the version, in the id's place
            return
        if rid in self._calls:
            waiter = self._calls.pop(rid)
            if waiter is not None and not waiter.done():
                waiter.set_result((kind, body))
            return
        if rid not in self._in_flight:
            raise ConnectionError(f"SFTP reply {kind} to no request (id {rid})")
        job, offset, length = self._in_flight.pop(rid)
        job.in_flight -= 1
        if job.done.done():
            return
        job.watchdog.beat()
        code = _U32.unpack_from(body)[0] if kind == _FXP_STATUS and len(body) >= 4 else None
        if job.sink is not None:  # a read answered with a status
            if code == _FX_EOF:
                error = OSError(f"{job.path} ended at {offset}, before its size: it shrank while read")
            elif code is None:
                error = OSError(f"unexpected SFTP reply {kind} to a read of {job.path}")
            else:
                error = _status_error(body, f"read of {job.path}")
            return self._abandon(job, error)
        if code != _FX_OK:
            return self._abandon(job, _status_error(body, f"write to {job.path}") if code is not None
                                 else OSError(f"unexpected SFTP reply {kind} to a write to {job.path}"))
        if job.on_written is not None:
            job.on_written(offset, length)
        self.fill(job)

    # --- requests ---------------------------------------------------------------------------
    def _id(self) -> int:
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFFFFFF
        return rid

    def _send_call(self, kind: int, payload: bytes, waiter: asyncio.Future | None) -> None:
        if self.closed:
            raise ConnectionError("SFTP data channel closed")
        rid = self._id()
        self._calls[rid] = waiter
        self._chan.write(_HEAD.pack(5 + len(payload), kind, rid) + payload)

    async def _call(self, kind: int, payload: bytes) -> tuple[int, bytes]:
        waiter = asyncio.get_running_loop().create_future()
        self._send_call(kind, payload, waiter)
        return await waiter

    async def ready(self) -> None:
        await self._version

    async def move(self, job: _Job) -> None:
        """Open ``job``'s file, move its bytes, close it."""
        kind, body = await self._call(_FXP_OPEN, _string(job.path.encode("utf-8"))
                                      + _U32.pack(_FXF_READ if job.sink is not None else _FXF_READ | _FXF_WRITE)
                                      + _U32.pack(0))  # no attributes
        if kind == _FXP_STATUS:
            raise _status_error(body, f"open {job.path}")
        if kind != _FXP_HANDLE or len(body) < 4:
            raise ConnectionError(f"unexpected SFTP reply {kind} to opening {job.path}")
        job.handle = body[:4 + _U32.unpack_from(body)[0]]
        self._jobs.add(job)
        try:
            self.fill(job)
            await job.done
        finally:
            self._jobs.discard(job)
        kind, body = await self._call(_FXP_CLOSE, job.handle)
        if kind != _FXP_STATUS or _U32.unpack_from(body)[0] != _FX_OK:
            raise _status_error(body, f"close {job.path}")

    def _abandon(self, job: _Job, exc: BaseException) -> None:
        """``job`` failed: replies to its requests still on the way are dropped; its file is closed."""
        job.fail(exc)
        if not self.closed:
            try:
                self._send_call(_FXP_CLOSE, job.handle, None)
            except OSError:  # the channel is closing: that closes the file too
                pass

    def fill(self, job: _Job) -> None:
        """Send ``job``'s requests until ``depth`` are in flight; it is done when none is left."""
        try:
            self._fill(job)
        except Exception as exc:  # noqa: BLE001 - this file's failure, not the channel's
            self._abandon(job, exc)

    def _fill(self, job: _Job) -> None:
        if job.done.done():
            return
        handle, write = job.handle, self._chan.write
        while job.in_flight < job.depth and not (self._paused and job.sink is None):
            if job.again:
                offset, length = job.again.pop()
            elif job.next < job.size:
                offset, length = job.next, min(job.request, job.size - job.next)
                job.next += length
            else:
                break
            rid = self._id()
            if job.sink is not None:
                write(_HEAD.pack(17 + len(handle), _FXP_READ, rid) + handle + struct.pack(">QI", offset, length))
            else:
                # The request's head, then the file's bytes read in after it: one buffer,
                # reused (asyncssh copies what it is given to write).
                head = (_HEAD.pack(17 + len(handle) + length, _FXP_WRITE, rid) + handle
                        + struct.pack(">QI", offset, length))
                end = len(head) + length
                if job.buffer is None or len(job.buffer) < end:
                    job.buffer = memoryview(bytearray(end))
                job.buffer[:len(head)] = head
                if os.preadv(job.upload_fd, [job.buffer[len(head):end]], offset) != length:
                    raise OSError(f"upload source shrank while it was read (at {offset})")
                write(job.buffer[:end])
            self._in_flight[rid] = (job, offset, length)
            job.in_flight += 1
        if not job.in_flight and not job.again and job.next >= job.size:
            job.done.set_result(None)  # all asked for and answered (not merely paused)
