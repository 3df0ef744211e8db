"""The SFTP transport choice (paramiko / asyncssh) and the sink's in-order hashing, no server."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from covalent_lot._pool import Watchdog
from covalent_lot._stream import VerifyingSink, atomic_download

from .lot_fakes import run_python

sftp = pytest.importorskip("covalent_lot.strategies.sftp")


@pytest.fixture(scope="module")
def asyncssh():
    return pytest.importorskip("asyncssh")


@pytest.fixture(scope="module")
def transport(asyncssh):
    from covalent_lot.strategies import _sftp_asyncssh

    return _sftp_asyncssh


# --- the sink's in-order fast path --------------------------------------------------------
def test_in_order_writes_are_hashed_from_memory_without_a_re_read(tmp_path, monkeypatch):
    blocks = [bytes([i]) * 5000 for i in range(20)]
    real_pread = os.pread

    def no_pread(fd, n, offset):
        raise AssertionError("in-order bytes were read back from the file")

    with atomic_download(str(tmp_path / "out")) as (f, _):
        sink = VerifyingSink(f, "sha256")
        monkeypatch.setattr(os, "pread", no_pread)
        for i, block in enumerate(blocks):
            sink.write_at(i * 5000, block)
        assert sink.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()
        monkeypatch.setattr(os, "pread", real_pread)
        sink.close()


def test_in_order_then_out_of_order_writes_still_verify(tmp_path):
    blocks = [bytes([i]) * 5000 for i in range(8)]
    order = [0, 1, 3, 2, 5, 4, 6, 7]
    with atomic_download(str(tmp_path / "out")) as (f, _):
        sink = VerifyingSink(f, "sha256")
        for i in order:
            sink.write_at(i * 5000, blocks[i])
        assert sink.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()
        sink.close()


# --- transport option ---------------------------------------------------------------------
def test_transport_option_is_checked():
    with pytest.raises(ValueError, match="transport .*must be one of auto, paramiko, asyncssh.*'ssh2'"):
        sftp.SFTPStrategy(transport="ssh2")


@pytest.mark.parametrize("value", ["auto", "paramiko", "asyncssh"])
def test_transport_choices(value):
    assert sftp.SFTPStrategy(transport=value).settings["transport"] == value


def test_auto_uses_asyncssh_when_installed(asyncssh):
    assert sftp.chosen_transport("auto") == "asyncssh"
    assert sftp.chosen_transport("paramiko") == "paramiko"


def test_without_asyncssh_auto_falls_back_and_asyncssh_says_how_to_install():
    result = run_python("""
        import sys
        import covalent  # its executor plugins (covalent-ssh-plugin) import asyncssh
        sys.modules["asyncssh"] = None
        from covalent_lot.strategies.sftp import chosen_transport
        print("AUTO", chosen_transport("auto"))
        try:
            chosen_transport("asyncssh")
        except ImportError as exc:
            print("ERR", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert "AUTO paramiko" in result.stdout
    assert "pip install covalent-lot[sftp-fast]" in result.stdout


# --- asyncssh errors as built-ins ---------------------------------------------------------
class NoServer:
    """An SSH connection that talks to no server: the session's loop runs the tests' requests."""

    async def start_sftp_client(self):
        return None

    def is_closed(self) -> bool:
        return False

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


def offline_session(transport):
    """An asyncssh session with its loop running and no server behind it."""

    async def open_ssh():
        return NoServer()

    return transport.AsyncsshSession({"io_timeout": 60.0}, open_ssh)


async def raising(error):
    raise error


@pytest.mark.parametrize("name, args, expected", [
    ("SFTPNoSuchFile", ("gone",), FileNotFoundError),
    ("SFTPPermissionDenied", ("no",), PermissionError),
    ("SFTPFailure", ("odd",), OSError),
    ("ConnectionLost", ("reset",), ConnectionError),
    ("SFTPNoConnection", ("no connection",), ConnectionError),  # raised locally: transient
    ("SFTPConnectionLost", ("lost",), ConnectionError),
])
def test_asyncssh_errors_become_builtins(asyncssh, transport, name, args, expected):
    session = offline_session(transport)
    try:
        with pytest.raises(OSError) as raised:
            session.run(raising(getattr(asyncssh, name)(*args)))
    finally:
        session.close()
    assert type(raised.value) is expected
    if expected is OSError:
        assert raised.value.errno is None  # a server status, like paramiko's


def test_auth_and_host_key_errors_are_left_to_the_error_table(asyncssh, transport):
    denied = asyncssh.PermissionDenied("Permission denied")
    session = offline_session(transport)
    try:
        with pytest.raises(asyncssh.PermissionDenied) as raised:
            session.run(raising(denied))
    finally:
        session.close()
    assert raised.value is denied
    backend = sftp.SFTPBackend(sftp.SFTPStrategy().settings)
    verdict = backend.classify(denied)
    assert verdict is not None and verdict.kind.name == "DENIED"
    lost = backend.classify(asyncssh.ProtocolError("garbled"))
    assert lost is not None and lost.kind.name == "CONNECTION"


def test_a_closed_connection_refuses_new_requests_at_once(transport):
    import asyncio

    session = offline_session(transport)
    session.close()
    with pytest.raises(ConnectionError, match="closed"):
        session.run(asyncio.sleep(0), timeout=None)


def wait_in_a_thread(session, coro, **options):
    """Start ``session.run(coro)`` in a thread; its outcome lands in the returned list."""
    outcome = []

    def waiter():
        try:
            session.run(coro, **options)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    return thread, outcome


def test_a_request_the_loop_never_finishes_ends_when_the_connection_closes(transport):
    """Another file's failure stopped the loop while this request waited on it:
    the loop never finishes the request; the wait ends all the same."""
    import asyncio

    async def stops_the_loop():
        asyncio.get_running_loop().stop()
        await asyncio.sleep(30)

    session = offline_session(transport)
    thread, outcome = wait_in_a_thread(session, stops_the_loop(), timeout=None)
    session.close()
    thread.join(5)
    assert not thread.is_alive() and type(outcome[0]) is ConnectionError


def test_closing_the_connection_ends_requests_other_threads_wait_for(transport):
    import asyncio

    before = set(threading.enumerate())
    session = offline_session(transport)
    loop_thread, = [t for t in threading.enumerate() if t not in before and t.name == "covalent-lot-asyncssh"]
    thread, outcome = wait_in_a_thread(session, asyncio.sleep(30), timeout=None)  # never answers
    session.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and type(outcome[0]) is ConnectionError
    assert not loop_thread.is_alive()


def test_a_stalled_transfer_times_out_and_closes_the_connection(transport):
    import asyncio

    session = offline_session(transport)
    with pytest.raises(TimeoutError, match="no reply in 0.3 s for SFTP /x"):
        session.run(asyncio.sleep(30), timeout=None, watchdog=Watchdog(0.3, "SFTP /x"))
    assert not session.active


def test_a_closed_connection_refuses_asyncssh_context_manager_requests_too(transport):
    """asyncssh's open() returns an _ACMWrapper, not a coroutine: refused all the same."""
    import asyncio

    from asyncssh.misc import async_context_manager

    @async_context_manager
    async def opener():
        await asyncio.sleep(0)

    session = offline_session(transport)
    session.close()
    with pytest.raises(ConnectionError, match="closed"):
        session.run(opener(), timeout=1.0)


# --- the data channel paced by OpenSSH's pipe ------------------------------------------------
def test_an_upload_waits_while_the_pipe_is_full_and_is_not_done_before_a_byte_went(transport, tmp_path):
    import asyncio

    source = tmp_path / "src"
    source.write_bytes(os.urandom(3000))
    sent = []

    class Pipe:
        def write(self, data):
            sent.append(bytes(data))

        def close(self):
            pass

    async def scenario():
        channel = transport._DataChannel()
        channel.connection_made(Pipe())
        channel.paced = True
        channel.pause_writing()  # the pipe is full before this file's first request
        with open(source, "rb") as f:
            job = transport._Job("/r/src", 0, 3000, 1000, 8, Watchdog(60, "t"), None, f.fileno(), None)
            job.done = asyncio.get_running_loop().create_future()
            channel._jobs.add(job)
            channel.fill(job)
            assert not job.done.done() and not sent  # waiting, not finished with nothing sent
            channel.resume_writing()
            assert len(sent) == 3 and job.in_flight == 3
            assert b"".join(m[-1000:] for m in sent) == source.read_bytes()

    asyncio.run(scenario())
