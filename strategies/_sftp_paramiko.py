"""The paramiko transport of the SFTP backend (``transport = paramiko``).

One SSH transport per backend, aes128-gcm preferred, and several SFTP
channels on it. A transfer moves ``chunk_size`` pieces of the file over up to
``max_concurrency`` channels (the engine's bounded pool), each channel keeping
``max_requests`` ranged read or write requests in flight across pieces. No
paramiko ``prefetch`` (it stalls); downloads land in the engine's sink with
``write_at``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from typing import Any, Callable, Mapping

from covalent_lot._errors import Classified, ErrorKind
from covalent_lot._pool import Watchdog, run_bounded
from covalent_lot._stream import VerifyingSink
from covalent_lot.strategies._sftp_wire import (
    KiB, MiB, PREFERRED_CIPHERS, Session, Target, credentials, host_key_error, shape,
)

__all__ = ["connect", "classify_error", "ParamikoSession", "InsecureAcceptPolicy"]

# The window is only flow-control credit: what is buffered per channel is
# bounded by the requests in flight (max_requests * request_size), so paramiko's
# receive buffer (a bytearray trimmed from the front, slow when large) stays
# small. With paramiko's default packet and window sizes downloads are far
# slower (docs/measurements.md).
WINDOW_SIZE = 16 * MiB
CHANNEL_MAX_PACKET = 256 * KiB


def connection_lost(exc: BaseException) -> bool:
    """A dropped or timed-out connection (paramiko says "Socket is closed" with a plain OSError)."""
    return (isinstance(exc, (socket.timeout, ConnectionError, EOFError))
            or (type(exc) is OSError and str(exc) == "Socket is closed"))


def classify_error(err: BaseException, auth_hint: str) -> Classified | None:
    """paramiko's exceptions in the error table (None: not paramiko's, or no paramiko here)."""
    try:
        import paramiko
    except ImportError:
        return None
    if isinstance(err, paramiko.BadHostKeyException):
        return Classified(ErrorKind.DENIED, f"host key changed: {err}",
                          "check the server's fingerprint, then update known_hosts")
    if isinstance(err, paramiko.AuthenticationException):
        return Classified(ErrorKind.DENIED, f"authentication failed: {err}", auth_hint)
    if isinstance(err, paramiko.ssh_exception.NoValidConnectionsError):
        causes = list(err.errors.values())
        timed_out = causes and all(isinstance(c, TimeoutError) for c in causes)
        return Classified(ErrorKind.TIMEOUT if timed_out else ErrorKind.CONNECTION, str(err))
    if isinstance(err, paramiko.SSHException):
        text = str(err)
        lowered = text.lower()
        if "known_hosts" in lowered:
            return Classified(ErrorKind.DENIED, text, "add the host key to known_hosts")
        if "no authentication methods" in lowered or "authentication" in lowered and "timeout" not in lowered:
            return Classified(ErrorKind.DENIED, text, auth_hint)
        if "timeout" in lowered or "banner" in lowered:
            return Classified(ErrorKind.TIMEOUT, text)
        return Classified(ErrorKind.CONNECTION, text)
    if isinstance(err, paramiko.SFTPError):
        return Classified(ErrorKind.OTHER, str(err), "")
    if type(err) is OSError and str(err) == "Socket is closed":  # paramiko's word for a dropped connection
        return Classified(ErrorKind.CONNECTION, str(err))
    return None


class InsecureAcceptPolicy:
    """insecure_skip_host_key_check: accept and do not remember any host key."""

    def missing_host_key(self, client, hostname, key):
        import logging

        logging.getLogger("covalent_lot").warning(
            "SFTP host key of %s NOT VERIFIED (insecure_skip_host_key_check is on): %s %s",
            hostname, key.get_name(), key.fingerprint,
        )


def _private_key(key_filename: str):
    """Loaded here, so that a file that is no key is refused as such (paramiko
    would report it as a failed connection, and it would be retried)."""
    import paramiko

    try:
        return paramiko.PKey.from_path(key_filename)
    except paramiko.PasswordRequiredException:
        raise paramiko.AuthenticationException(
            "key_filename is encrypted; passphrases are not supported: use an "
            "unencrypted key or the ssh-agent") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        # The parser's message is about the key's content: not repeated.
        raise paramiko.AuthenticationException(
            f"key_filename is not a readable private key ({type(exc).__name__})") from None


def _transport(sock, **kwargs):
    import paramiko

    transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, **kwargs)
    options = transport.get_security_options()
    preferred = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(preferred + [c for c in options.ciphers if c not in preferred])
    return transport


def connect(settings: Mapping[str, Any], target: Target) -> "ParamikoSession":
    import paramiko

    known_files, key_filename = credentials(settings)
    ssh = paramiko.SSHClient()
    if settings["insecure_skip_host_key_check"]:
        ssh.set_missing_host_key_policy(InsecureAcceptPolicy())
    else:
        for path in known_files:
            try:
                ssh.load_host_keys(path)  # never saved back: load_host_keys + no save
            except OSError:
                pass
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        ssh.connect(
            target.host, port=target.port, username=target.user,
            pkey=_private_key(key_filename) if key_filename is not None else None,
            allow_agent=settings["allow_agent"],
            look_for_keys=key_filename is None,
            timeout=settings["connect_timeout"],
            banner_timeout=settings["banner_timeout"],
            auth_timeout=settings["auth_timeout"],
            channel_timeout=settings["io_timeout"],
            transport_factory=_transport,
        )
        return ParamikoSession(ssh, settings)
    except paramiko.BadHostKeyException as exc:
        ssh.close()
        raise host_key_error(target, known_files, changed=True,
                             presented=f" ({exc.key.get_name()} {exc.key.fingerprint})") from exc
    except paramiko.SSHException as exc:
        ssh.close()
        if "not found in known_hosts" in str(exc):
            raise host_key_error(target, known_files) from exc
        raise
    except BaseException:
        ssh.close()
        raise


class _Replies:
    """Collects SFTP replies paramiko hands to ``_async_response``."""

    def __init__(self):
        self.done: dict[int, tuple[int, Any]] = {}

    def _async_response(self, t, msg, num):
        self.done[num] = (t, msg)


class ParamikoSession(Session):
    """paramiko: one SSH transport, its SFTP channels, and what was learned on it."""

    def __init__(self, ssh, settings: Mapping[str, Any]):
        super().__init__(settings)
        self.ssh = ssh
        self.transport = ssh.get_transport()
        self._lock = threading.Lock()
        self._idle: list = []
        self._all: list = []
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

    def remote_copy(self, source: str, target: str) -> None:
        """Copy on the server (the copy-data extension)."""
        from paramiko.sftp import CMD_EXTENDED
        from paramiko.sftp_client import int64

        sftp = self.primary
        with sftp.open(source, "rb") as reader, sftp.open(target, "wb") as writer:
            sftp._request(CMD_EXTENDED, "copy-data", reader.handle, int64(0), int64(0), writer.handle, int64(0))

    def relay(self, source: str, target: str, chunk: int) -> None:
        """Copy through this machine."""
        sftp = self.primary
        with sftp.open(source, "rb") as reader, sftp.open(target, "wb") as writer:
            while block := reader.read(chunk):
                writer.write(block)

    # --- bulk data ----------------------------------------------------------------------
    def transfer(self, path: str, size: int, *, sink: VerifyingSink | None = None,
                 upload_fd: int | None = None, start: int = 0,
                 on_written: Callable[[int, int], None] | None = None) -> None:
        """Move bytes ``[start, size)`` of ``path`` over several channels, ``chunk_size``
        at a time; ``on_written(offset, length)`` for each write the server confirmed."""
        if size <= start:
            return
        chunk = self.settings["chunk_size"]
        pieces = iter(range(start, size, chunk))
        lock = threading.Lock()
        failed = threading.Event()  # no channel takes a new piece after a failure
        watchdog = Watchdog(self.settings["io_timeout"], f"SFTP {path}")

        def take() -> tuple[int, int] | None:
            with lock:
                offset = None if failed.is_set() else next(pieces, None)
            return None if offset is None else (offset, min(size, offset + chunk))

        def run(first: bool) -> None:
            sftp = None
            try:
                sftp = self.primary if first else self.channel()
                self._channel_worker(sftp, path, take, watchdog, sink, upload_fd, on_written)
            except BaseException:
                failed.set()
                raise
            finally:
                if not first and sftp is not None and self.active:
                    self.release(sftp)

        channels = max(1, min(self.settings["max_concurrency"], -(-(size - start) // chunk)))
        try:
            run_bounded([i == 0 for i in range(channels)], run, channels, name="covalent-lot-sftp",
                        watchdog=watchdog, on_stall=self.transport.close)
        except BaseException as error:
            if not isinstance(error, OSError) or connection_lost(error):
                # A timeout or a dropped channel can leave a reply half read: never
                # reuse this transport; the engine's retry opens a fresh one.
                self.transport.close()
            raise

    def _channel_worker(self, sftp, path, take, watchdog: Watchdog, sink, upload_fd, on_written) -> None:
        from paramiko.sftp import CMD_DATA, CMD_READ, CMD_STATUS, CMD_WRITE
        from paramiko.sftp_client import int64

        request, depth = shape(self.settings)
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
                watchdog.beat()
                if sink is None:
                    if t != CMD_STATUS:
                        raise OSError(f"unexpected SFTP reply {t} to a write of {path}")
                    sftp._convert_status(msg)  # raises IOError/EOFError for anything but OK
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
                        sftp._convert_status(msg)
                    except EOFError:
                        raise OSError(f"{path} ended at {offset}, before its size: it shrank while read")
                    raise OSError(f"unexpected SFTP status for a read of {path}")
                else:
                    raise OSError(f"unexpected SFTP reply {t} to a read of {path}")
