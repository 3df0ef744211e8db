"""The asyncssh transport of the SFTP backend (``transport = asyncssh``).

paramiko decrypts every packet in one Python thread and copies each byte
several times on its way to the caller, so with a checksum computed alongside
its downloads fall well behind OpenSSH's ``sftp``. asyncssh's SFTP client keeps
``max_concurrency * max_requests`` ranged requests in flight on one channel
and one event loop and keeps up with OpenSSH (docs/measurements.md). It is
optional (``pip install covalent-lot[sftp-fast]``); ``transport = auto`` uses
it when it is installed.

A session here offers what the paramiko one does (see ``_sftp_wire``), raising
the same built-in exceptions. The event loop runs in one thread per session,
joined on close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import threading
from typing import Any, Awaitable, Callable, Mapping

from covalent_lot._errors import Classified, ErrorKind
from covalent_lot._pool import Watchdog
from covalent_lot._stream import VerifyingSink
from covalent_lot.strategies._sftp_wire import PREFERRED_CIPHERS, Session, Target, credentials, host_key_error, shape

__all__ = ["connect", "classify_error", "AsyncsshSession"]


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
        return AsyncsshSession(settings, lambda: asyncssh.connect(**kwargs))
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

    def __init__(self, settings: Mapping[str, Any], open_ssh: Callable[[], Awaitable]):
        super().__init__(settings)
        self._closed = False
        self._state = threading.Lock()  # orders close() against new requests
        self._ssh = None
        self.sftp = None
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
            if ssh is not None:
                ssh.close()
                await ssh.wait_closed()

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(shut(), 5), self._loop).result()
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
        if size <= start:
            return
        watchdog = Watchdog(self.settings["io_timeout"], f"SFTP {path}")

        async def get(f, offset: int, length: int) -> None:
            while length:
                data = await f.read(length, offset)
                watchdog.beat()
                if not data:
                    raise OSError(f"{path} ended at {offset}, before its size: it shrank while read")
                sink.write_at(offset, data)  # replies come in order: the sink hashes inline
                offset += len(data)
                length -= len(data)

        # The engine hashes an upload in a thread alongside: faster than hashing
        # these same bytes here, on the loop's thread.
        async def put(f, offset: int, length: int) -> None:
            data = os.pread(upload_fd, length, offset)
            if len(data) != length:
                raise OSError(f"upload source shrank while it was read (at {offset})")
            await f.write(data, offset)
            watchdog.beat()
            if on_written is not None:
                on_written(offset, length)

        reading = sink is not None
        self._bulk(self._pipeline(path, "rb" if reading else "r+b", start, size, get if reading else put,
                                  watchdog), watchdog)

    async def _pipeline(self, path: str, mode: str, start: int, size: int, step, watchdog: Watchdog) -> None:
        """Run ``step(file, offset, length)`` for each request-sized range of bytes
        ``[start, size)``, at most ``depth`` at a time: bytes held are bounded by
        depth * request_size whatever the file size. (block_size=0 makes each
        read/write one SFTP request; replies are handled as they arrive.)
        """
        request, depth = shape(self.settings)
        slots = asyncio.Semaphore(depth * self.settings["max_concurrency"])
        failures: list[BaseException] = []
        pending: set[asyncio.Future] = set()

        async def run(f, offset: int, length: int) -> None:
            try:
                await step(f, offset, length)
            except BaseException as exc:  # noqa: BLE001 - raised below, after the others stop
                failures.append(exc)
            finally:
                slots.release()

        f = await self.sftp.open(path, mode, block_size=0)
        watchdog.beat()
        try:
            try:
                for offset in range(start, size, request):
                    await slots.acquire()
                    if failures:
                        break
                    task = asyncio.ensure_future(run(f, offset, min(request, size - offset)))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending and not failures:
                    await asyncio.wait(set(pending))
            finally:
                for task in list(pending):
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
            if failures:
                raise failures[0]
        except asyncio.CancelledError:
            raise  # the session is closing, and the file with it
        except BaseException:
            try:
                await f.close()
            except BaseException:  # noqa: BLE001 - that failure is the one to report
                pass
            raise
        await f.close()
