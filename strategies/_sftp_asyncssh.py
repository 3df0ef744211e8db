"""The asyncssh transport of the SFTP backend (``transport = asyncssh``).

paramiko decrypts every packet in one Python thread and copies each byte
several times on its way to the caller; with a checksum computed alongside,
its downloads reach ~0.7x OpenSSH's ``sftp`` on two cores. asyncssh's SFTP
client keeps many ranged requests in flight on one event loop and reaches
OpenSSH's speed with the checksum on (numbers in the README). It is optional
(``pip install covalent-lot[sftp-fast]``); ``transport = auto`` uses it when it
is installed.

This module offers the same small surface as the paramiko connection in
``sftp.py`` (``primary`` with stat/listdir_attr/open/mkdir/remove/rename/
posix_rename, ``transfer``, ``copy``, ``active``, ``close``), raising the same
built-in exceptions, so the backend's logic (sidecars, partial names, renames,
directories, the error table) is shared. The event loop runs in one thread per
connection, joined on close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import threading
from typing import Any, Callable, Mapping

from covalent_lot._stream import VerifyingSink

log = logging.getLogger("covalent_lot")


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


def _discard(awaitable) -> None:
    """Close a coroutine that will never run (asyncssh wraps some, e.g. open, in an _ACMWrapper)."""
    close = getattr(getattr(awaitable, "_coro", awaitable), "close", None)
    if close is not None:
        close()


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

    def __init__(self, conn: "AsyncsshConnection", handle):
        self._conn = conn
        self._handle = handle

    def read(self, size: int) -> bytes:
        return self._conn.run(self._handle.read(size))

    def write(self, data: bytes) -> None:
        self._conn.run(self._handle.write(data))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._conn.active:
            self._conn.run(self._handle.close())


class _SyncSFTP:
    """Blocking facade over asyncssh's SFTPClient, shaped like paramiko's."""

    def __init__(self, conn: "AsyncsshConnection"):
        self._conn = conn

    def stat(self, path: str) -> _Attrs:
        return _Attrs(self._conn.run(self._conn.sftp.stat(path)))

    def listdir_attr(self, path: str) -> list[_Attrs]:
        names = self._conn.run(self._conn.sftp.readdir(path))
        return [_Attrs(n.attrs, n.filename) for n in names if n.filename not in (".", "..")]

    def open(self, path: str, mode: str) -> _SmallFile:
        return _SmallFile(self._conn, self._conn.run(self._conn.sftp.open(path, mode)))

    def mkdir(self, path: str) -> None:
        self._conn.run(self._conn.sftp.mkdir(path))

    def remove(self, path: str) -> None:
        self._conn.run(self._conn.sftp.remove(path))

    def rename(self, source: str, target: str) -> None:
        self._conn.run(self._conn.sftp.rename(source, target))

    def posix_rename(self, source: str, target: str) -> None:
        self._conn.run(self._conn.sftp.posix_rename(source, target))


class AsyncsshConnection:
    """One asyncssh connection and SFTP session, driven from a private event loop."""

    def __init__(self, settings: Mapping[str, Any], connect_kwargs: dict[str, Any]):
        self.settings = settings
        self.known_dirs: set[str] = set()
        self.posix_rename = True
        self.copy_data = True
        self._closed = False
        self._state = threading.Lock()  # orders close() against new requests
        self._ssh = None
        self.sftp = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="covalent-lot-asyncssh", daemon=True)
        self._thread.start()
        try:
            self.run(self._open(connect_kwargs), timeout=None)
        except BaseException:
            self.close()
            raise
        self.primary = _SyncSFTP(self)

    async def _open(self, connect_kwargs: dict[str, Any]) -> None:
        import asyncssh

        self._ssh = await asyncssh.connect(**connect_kwargs)
        self.sftp = await self._ssh.start_sftp_client()

    def run(self, coro, timeout: float | None | str = "io"):
        """Run ``coro`` on the loop; asyncssh errors come back as built-ins."""
        if timeout == "io":
            timeout = self.settings["io_timeout"]
        with self._state:
            if self._closed:
                _discard(coro)
                raise ConnectionError("SSH connection closed (another file of this transfer failed)")
            future = asyncio.run_coroutine_threadsafe(
                coro if timeout is None else asyncio.wait_for(coro, timeout), self._loop)
        # Several files share the connection: if another one's failure closes it,
        # this wait ends too, instead of waiting on a stopped loop forever.
        while not future.done():
            concurrent.futures.wait([future], timeout=0.5)
            if self._closed and not future.done():
                future.cancel()
                raise ConnectionError("SSH connection closed while a request was in flight")
        try:
            return future.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            raise ConnectionError("SSH connection closed while a request was in flight") from exc
        except BaseException as exc:
            future.cancel()
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

    # --- bulk data ----------------------------------------------------------------------
    def transfer(self, path: str, size: int, *, sink: VerifyingSink | None = None,
                 upload_fd: int | None = None, start: int = 0,
                 on_written: Callable[[int, int], None] | None = None) -> None:
        if size <= start:
            return
        try:
            self.run(self._download(path, start, size, sink) if sink is not None
                     else self._upload(path, start, size, upload_fd, on_written), timeout=None)
        except BaseException as exc:
            if not isinstance(exc, OSError) or isinstance(exc, (TimeoutError, ConnectionError)):
                self.close()  # a reply may be half read: the engine's retry opens a fresh one
            raise

    async def _download(self, path: str, start: int, size: int, sink: VerifyingSink) -> None:
        async def get(f, offset: int, length: int) -> None:
            while length:
                data = await f.read(length, offset)
                if not data:
                    raise OSError(f"{path} ended at {offset}, before its size: it shrank while read")
                sink.write_at(offset, data)  # replies come in order: the sink hashes inline
                offset += len(data)
                length -= len(data)

        await self._pipeline(path, "rb", start, size, get)

    async def _upload(self, path: str, start: int, size: int, fd: int,
                      on_written: Callable[[int, int], None] | None) -> None:
        # (The engine hashes the file in a thread alongside: measured faster on
        # two cores than hashing these same bytes here, on the loop's thread.)
        async def put(f, offset: int, length: int) -> None:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(f"upload source shrank while it was read (at {offset})")
            await f.write(data, offset)
            if on_written is not None:
                on_written(offset, length)

        await self._pipeline(path, "r+b", start, size, put)

    async def _pipeline(self, path: str, mode: str, start: int, size: int, step) -> None:
        """Run ``step(file, offset, length)`` for each request-sized range of bytes
        ``[start, size)``, at most ``depth`` at a time: bytes held are bounded by
        depth * request_size whatever the file size. (block_size=0 makes each
        read/write one SFTP request; replies are handled as they arrive.)
        """
        request, depth = _shape(self.settings)
        timeout = self.settings["io_timeout"]
        slots = asyncio.Semaphore(depth)
        failures: list[BaseException] = []
        pending: set[asyncio.Future] = set()

        async def run(f, offset: int, length: int) -> None:
            try:
                await step(f, offset, length)
            except BaseException as exc:  # noqa: BLE001 - raised below, after the others stop
                failures.append(exc)
            finally:
                slots.release()

        # Opening and closing are requests too: bounded like the data requests.
        f = await asyncio.wait_for(self.sftp.open(path, mode, block_size=0), timeout)
        try:
            try:
                for offset in range(start, size, request):
                    if slots.locked():  # all requests in flight: the server must answer in time
                        await asyncio.wait_for(slots.acquire(), timeout)
                    else:
                        await slots.acquire()
                    if failures:
                        break
                    task = asyncio.ensure_future(run(f, offset, min(request, size - offset)))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending and not failures:
                    _, late = await asyncio.wait(set(pending), timeout=timeout)
                    if late:
                        raise TimeoutError(f"no SFTP reply in {timeout} s for {path}")
            finally:
                for task in list(pending):
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        except BaseException:
            await self._close_quietly(f, timeout)
            raise
        if failures:
            await self._close_quietly(f, timeout)
            raise failures[0]
        await asyncio.wait_for(f.close(), timeout)

    @staticmethod
    async def _close_quietly(f, timeout: float) -> None:
        """Close after a failure: that failure is the one to report."""
        try:
            await asyncio.wait_for(f.close(), timeout)
        except BaseException:  # noqa: BLE001 - a broken connection fails the close as well
            pass

    def copy(self, source: str, target: str, chunk: int) -> None:
        if self.copy_data:
            try:
                self.run(self.sftp.remote_copy(source, target))
                return
            except OSError as exc:
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise
                self.copy_data = False  # not offered by this server
        self.run(self._relay(source, target, chunk), timeout=None)

    async def _relay(self, source: str, target: str, chunk: int) -> None:
        timeout = self.settings["io_timeout"]
        async with await asyncio.wait_for(self.sftp.open(source, "rb"), timeout) as reader, \
                await asyncio.wait_for(self.sftp.open(target, "wb"), timeout) as writer:
            while True:
                block = await asyncio.wait_for(reader.read(chunk), timeout)
                if not block:
                    break
                await asyncio.wait_for(writer.write(block), timeout)


def _shape(settings: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes per request, requests in flight) for one file."""
    from covalent_lot.strategies.sftp import MAX_REQUEST

    request = min(settings["request_size"], MAX_REQUEST)
    return request, settings["max_concurrency"] * settings["max_requests"]
