"""The asyncssh transport's data channel (``_sftp_asyncssh._DataChannel``) against
an in-memory SFTP v3 server: replies cut at every kind of boundary, short
reads, statuses, two files at once. No SSH, no network."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct

import pytest

pytest.importorskip("asyncssh")

from covalent_lot._pool import Watchdog  # noqa: E402
from covalent_lot.strategies import _sftp_asyncssh as t  # noqa: E402

from .test_sftp_transport import NoServer  # noqa: E402 - an SSH connection to no server


class FakeServer:
    """Answers the SFTP messages the channel writes; delivers the replies in random pieces."""

    def __init__(self, files: dict[str, bytearray], *, max_read: int = 1 << 30, seed: int = 0):
        self.files = files
        self.max_read = max_read  # a server that answers reads with fewer bytes
        self.fail_write_at: int | None = None
        self.handles: dict[bytes, str] = {}
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.channel = None
        self.closed = False
        self.rng = random.Random(seed)

    # what asyncssh's channel offers the session
    def write(self, data) -> None:
        if self.closed:
            raise BrokenPipeError("closed")
        self.inbox += data
        while len(self.inbox) >= 4:
            (n,) = struct.unpack_from(">I", self.inbox)
            if len(self.inbox) < 4 + n:
                break
            message, self.inbox = bytes(self.inbox[4:4 + n]), self.inbox[4 + n:]
            self.answer(message[0], message[1:])
        asyncio.get_running_loop().call_soon(self.deliver)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel.connection_lost(None)

    def deliver(self) -> None:
        while self.outbox and not self.closed:
            k = self.rng.choice([1, 3, 9, 12, 13, 14, 1000, 32768, 262144])
            piece, self.outbox = bytes(self.outbox[:k]), self.outbox[k:]
            self.channel.data_received(piece, None)

    def reply(self, kind: int, rid: int, body: bytes = b"") -> None:
        self.outbox += struct.pack(">IBI", 5 + len(body), kind, rid) + body

    def status(self, rid: int, code: int, text: str = "") -> None:
        self.reply(101, rid, struct.pack(">II", code, len(text)) + text.encode() + struct.pack(">I", 0))

    def answer(self, kind: int, rest: bytes) -> None:
        if kind == 1:  # INIT
            self.reply(2, 3)
            return
        (rid,) = struct.unpack_from(">I", rest)
        rest = rest[4:]
        (n,) = struct.unpack_from(">I", rest)
        handle, rest = rest[4:4 + n], rest[4 + n:]
        if kind == 3:  # OPEN: handle is the path here
            path = handle.decode()
            if path == "/denied":
                return self.status(rid, 3, "Permission denied")
            if path not in self.files:
                return self.status(rid, 2, "No such file")
            name = b"h%d" % len(self.handles)
            self.handles[name] = path
            return self.reply(102, rid, struct.pack(">I", len(name)) + name)
        data = self.files[self.handles[handle]]
        if kind == 4:  # CLOSE
            return self.status(rid, 0)
        offset, length = struct.unpack_from(">QI", rest)
        if kind == 5:  # READ
            piece = data[offset:offset + min(length, self.max_read)]
            if not piece:
                return self.status(rid, 1, "EOF")
            return self.reply(103, rid, struct.pack(">I", len(piece)) + piece)
        assert kind == 6 and len(rest) == 12 + length
        if self.fail_write_at is not None and offset >= self.fail_write_at:
            return self.status(rid, 4, "Failure")
        data[offset:offset + length] = rest[12:]
        self.status(rid, 0)


class Sink:
    def __init__(self, size: int):
        self.data = bytearray(size)
        self.written = 0

    def write_at(self, offset: int, data) -> int:
        self.data[offset:offset + len(data)] = data
        self.written += len(data)
        return len(data)


def job(path: str, size: int, *, start: int = 0, sink=None, upload_fd=None, on_written=None,
        request: int = 255 * 1024, depth: int = 8) -> t._Job:
    j = t._Job(path, start, size, request, depth, Watchdog(30, f"SFTP {path}"), sink, upload_fd, on_written)
    j.done = asyncio.get_running_loop().create_future()
    return j


async def open_channel(server: FakeServer) -> t._DataChannel:
    channel = t._DataChannel()
    server.channel = channel
    channel.connection_made(server)
    channel.session_started()
    await asyncio.wait_for(channel.ready(), 5)
    return channel


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.parametrize("seed, max_read", [(1, 1 << 30), (2, 100_000), (3, 7)])
def test_download_lands_whole_whatever_the_pieces_and_short_reads(seed, max_read):
    content = os.urandom(1_000_003 if max_read > 7 else 5000)

    async def go():
        server = FakeServer({"/f": bytearray(content)}, max_read=max_read, seed=seed)
        channel = await open_channel(server)
        sink = Sink(len(content))
        await channel.move(job("/f", len(content), sink=sink, request=4096 if max_read == 7 else 255 * 1024))
        return sink

    sink = run(go())
    assert bytes(sink.data) == content and sink.written == len(content)


def test_download_resumes_at_start():
    content = os.urandom(600_000)

    async def go():
        channel = await open_channel(FakeServer({"/f": bytearray(content)}))
        sink = Sink(len(content))
        await channel.move(job("/f", len(content), start=250_000, sink=sink))
        return sink

    sink = run(go())
    assert sink.written == 350_000 and bytes(sink.data[250_000:]) == content[250_000:]


def test_upload_writes_every_byte_and_confirms_each_write(tmp_path):
    content = os.urandom(3_000_001)
    src = tmp_path / "src"
    src.write_bytes(content)
    confirmed = []

    async def go():
        server = FakeServer({"/f": bytearray()}, seed=4)
        channel = await open_channel(server)
        with open(src, "rb") as f:
            await channel.move(job("/f", len(content), upload_fd=f.fileno(),
                                   on_written=lambda o, n: confirmed.append((o, n)), depth=3))
        return server

    server = run(go())
    assert bytes(server.files["/f"]) == content
    assert sorted(confirmed)[0][0] == 0 and sum(n for _, n in confirmed) == len(content)


@pytest.mark.parametrize("path, expected", [("/missing", FileNotFoundError), ("/denied", PermissionError)])
def test_open_statuses_become_builtins(path, expected):
    async def go():
        channel = await open_channel(FakeServer({}))
        await channel.move(job(path, 10, sink=Sink(10)))

    with pytest.raises(expected) as raised:
        run(go())
    assert raised.value.errno == (errno.ENOENT if expected is FileNotFoundError else errno.EACCES)


def test_a_file_shorter_than_its_size_fails_as_shrunk_and_the_channel_serves_the_next():
    async def go():
        channel = await open_channel(FakeServer({"/short": bytearray(b"x" * 1000), "/ok": bytearray(b"y" * 300_000)}))
        with pytest.raises(OSError, match="shrank"):
            await channel.move(job("/short", 600_000, sink=Sink(600_000)))
        sink = Sink(300_000)
        await channel.move(job("/ok", 300_000, sink=sink))
        return sink

    assert bytes(run(go()).data) == b"y" * 300_000


def test_a_refused_write_is_a_server_status_and_later_replies_are_dropped(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2_000_000))

    async def go():
        server = FakeServer({"/f": bytearray(), "/g": bytearray(b"z" * 70_000)})
        server.fail_write_at = 1_000_000
        channel = await open_channel(server)
        with open(src, "rb") as f, pytest.raises(OSError) as raised:
            await channel.move(job("/f", 2_000_000, upload_fd=f.fileno(), request=65536, depth=16))
        sink = Sink(70_000)
        await channel.move(job("/g", 70_000, sink=sink))
        return raised.value, sink

    error, sink = run(go())
    assert type(error) is OSError and error.errno is None and "Failure" in str(error)
    assert bytes(sink.data) == b"z" * 70_000


def test_two_files_share_the_channel():
    a, b = os.urandom(900_000), os.urandom(700_001)

    async def go():
        channel = await open_channel(FakeServer({"/a": bytearray(a), "/b": bytearray(b)}, seed=5))
        sa, sb = Sink(len(a)), Sink(len(b))
        await asyncio.gather(channel.move(job("/a", len(a), sink=sa, request=32768)),
                             channel.move(job("/b", len(b), sink=sb, request=32768)))
        return sa, sb

    sa, sb = run(go())
    assert bytes(sa.data) == a and bytes(sb.data) == b


def test_a_sink_failure_fails_that_file_only():
    class Full(Sink):
        def write_at(self, offset, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    async def go():
        channel = await open_channel(FakeServer({"/f": bytearray(b"q" * 500_000)}))
        with pytest.raises(OSError) as raised:
            await channel.move(job("/f", 500_000, sink=Full(500_000)))
        sink = Sink(500_000)
        await channel.move(job("/f", 500_000, sink=sink))
        return raised.value, sink

    error, sink = run(go())
    assert error.errno == errno.ENOSPC and bytes(sink.data) == b"q" * 500_000


def test_garbage_on_the_channel_fails_every_file_with_a_connection_error():
    async def go():
        server = FakeServer({"/f": bytearray(b"q" * 500_000)})
        channel = await open_channel(server)
        pending = asyncio.ensure_future(channel.move(job("/f", 500_000, sink=Sink(500_000))))
        await asyncio.sleep(0)
        server.outbox[:0] = struct.pack(">IBI", 10 << 20, 103, 0)  # a 10 MiB "reply"
        server.deliver()
        with pytest.raises(ConnectionError):
            await pending
        assert channel.closed and server.closed

    run(go())



def test_a_data_channel_asked_for_after_another_file_closed_the_connection_is_a_connection_error():
    async def open_ssh():
        return NoServer()

    session = t.AsyncsshSession({"io_timeout": 60.0}, open_ssh)
    try:
        session._ssh = None  # what close() leaves, seen by a file that was just starting
        with pytest.raises(ConnectionError, match="closed"):
            session.run(session._data_channel())
    finally:
        session.close()
