"""The SFTP transport choice (paramiko / asyncssh) and the sink's in-order hashing, no server."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from covalent_lot._stream import VerifyingSink, atomic_download

from .lot_fakes import run_python

asyncssh = pytest.importorskip("asyncssh")
sftp = pytest.importorskip("covalent_lot.strategies.sftp")
transport = pytest.importorskip("covalent_lot.strategies._sftp_asyncssh")


# --- the sink's in-order fast path --------------------------------------------------------
def test_in_order_writes_are_hashed_from_memory_without_a_re_read(tmp_path, monkeypatch):
    blocks = [bytes([i]) * 5000 for i in range(20)]
    real_pread = os.pread

    def no_pread(fd, n, offset):
        raise AssertionError("in-order bytes were read back from the file")

    with atomic_download(str(tmp_path / "out")) as (f, _):
        sink = VerifyingSink(f)
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
        sink = VerifyingSink(f)
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


def test_auto_uses_asyncssh_when_installed():
    assert sftp._use_asyncssh("auto") is True
    assert sftp._use_asyncssh("paramiko") is False


def test_without_asyncssh_auto_falls_back_and_asyncssh_says_how_to_install():
    result = run_python("""
        import sys
        import covalent  # its executor plugins (covalent-ssh-plugin) import asyncssh
        sys.modules["asyncssh"] = None
        from covalent_lot.strategies.sftp import _use_asyncssh
        print("AUTO", _use_asyncssh("auto"))
        try:
            _use_asyncssh("asyncssh")
        except ImportError as exc:
            print("ERR", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert "AUTO False" in result.stdout
    assert "pip install covalent-lot[sftp-fast]" in result.stdout


# --- asyncssh errors as built-ins ---------------------------------------------------------
@pytest.mark.parametrize("error, expected", [
    (asyncssh.SFTPNoSuchFile("gone"), FileNotFoundError),
    (asyncssh.SFTPPermissionDenied("no"), PermissionError),
    (asyncssh.SFTPFailure("odd"), OSError),
    (asyncssh.ConnectionLost("reset"), ConnectionError),
    (asyncssh.SFTPNoConnection("no connection"), ConnectionError),  # raised locally: transient
    (asyncssh.SFTPConnectionLost("lost"), ConnectionError),
])
def test_asyncssh_errors_become_builtins(error, expected):
    translated = transport._translate(error)
    assert type(translated) is expected
    if expected is OSError:
        assert translated.errno is None  # a server status, like paramiko's


def test_auth_and_host_key_errors_are_left_to_the_error_table():
    denied = asyncssh.PermissionDenied("Permission denied")
    assert transport._translate(denied) is denied
    backend = sftp.SFTPBackend(sftp.SFTPStrategy().settings)
    verdict = backend.classify(denied)
    assert verdict is not None and verdict.kind.name == "DENIED"
    lost = backend.classify(asyncssh.ProtocolError("garbled"))
    assert lost is not None and lost.kind.name == "CONNECTION"


def bare_connection():
    """An AsyncsshConnection with its loop running and no SSH connection."""
    import asyncio

    conn = object.__new__(transport.AsyncsshConnection)
    conn.settings = {"io_timeout": 60.0}
    conn._closed = False
    conn._state = threading.Lock()
    conn._ssh = None
    conn._loop = asyncio.new_event_loop()
    conn._thread = threading.Thread(target=conn._loop.run_forever, daemon=True)
    conn._thread.start()
    return conn


def test_a_closed_connection_refuses_new_requests_at_once():
    import asyncio

    conn = bare_connection()
    conn.close()
    with pytest.raises(ConnectionError, match="closed"):
        conn.run(asyncio.sleep(0), timeout=None)


def test_a_request_the_loop_never_runs_ends_when_the_connection_closes():
    """Another file's failure closed the connection just after this request was
    scheduled: the loop stops before running it; the wait ends all the same."""
    import asyncio

    conn = bare_connection()
    conn._loop.call_soon_threadsafe(conn._loop.stop)  # the loop stops, not yet marked closed
    conn._thread.join(5)
    outcome = []
    never_run = asyncio.sleep(0)

    def waiter():
        try:
            conn.run(never_run, timeout=None)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    conn._closed = True
    thread.join(5)
    assert not thread.is_alive() and type(outcome[0]) is ConnectionError
    conn._loop.close()
    never_run.close()


def test_closing_the_connection_ends_requests_other_threads_wait_for():
    import asyncio

    conn = bare_connection()
    outcome = []

    def waiter():
        try:
            conn.run(asyncio.sleep(30), timeout=None)  # a request that never answers
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    conn.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and type(outcome[0]) is ConnectionError
    assert not conn._thread.is_alive()


def test_a_closed_connection_refuses_asyncssh_context_manager_requests_too():
    """asyncssh's open() returns an _ACMWrapper, not a coroutine: refused all the same."""
    import asyncio

    from asyncssh.misc import async_context_manager

    @async_context_manager
    async def opener():
        await asyncio.sleep(0)

    conn = bare_connection()
    conn.close()
    with pytest.raises(ConnectionError, match="closed"):
        conn.run(opener(), timeout=1.0)
