"""A loopback TCP proxy that injects network faults between a client and a real server.

The fault tests put it between a strategy and its server: every byte is
forwarded both ways and counted (per direction, in total and per connection),
and a *fault plan* set between transfers decides what goes wrong:

* :class:`Drop` closes a connection once it has carried ``after`` bytes in one
  direction (:data:`UP` = client to server, :data:`DOWN` = server to client);
  :class:`Reset` does the same with a TCP RST (``SO_LINGER`` 0) instead of a FIN;
* :class:`Stall` stops forwarding one direction for ``seconds`` after ``after`` bytes;
* :class:`Http503` answers whole HTTP requests with 503 (the body each service
  sends when it is busy) instead of forwarding them.

Each fault fires at most ``times`` times (1: transient; a huge number:
persistent). ``after`` counts bytes since the plan was set, on each connection
(``per_connection=True``) or over all of them (to hit a point in a transfer
that uses parallel connections). The proxy runs its own event loop in a daemon
thread; every wait in it is bounded (timeouts, or ends when a side closes).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
UP, DOWN = "up", "down"  # client -> server, server -> client
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0  # reading a request that is answered with 503
ALWAYS = 10**9  # ``times`` of a persistent fault


@dataclass(frozen=True)
class Drop:
    direction: str = DOWN
    after: int = 0
    times: int = 1
    per_connection: bool = True
    rst: bool = False


@dataclass(frozen=True)
class Reset(Drop):
    """A connection reset in the middle of a response."""

    direction: str = DOWN
    rst: bool = True


@dataclass(frozen=True)
class Stall:
    direction: str = DOWN
    after: int = 0
    seconds: float = 10.0
    times: int = 1
    per_connection: bool = True


@dataclass(frozen=True)
class Http503:
    """Connections opened while fewer than ``times`` were answered get one 503 each."""

    service: str = "s3"  # s3 | gcs | azure: which error body to send
    times: int = 1


_BUSY = {
    "s3": ("application/xml", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
           b"<Message>Please reduce your request rate.</Message><RequestId>lotfault</RequestId></Error>", ""),
    "gcs": ("application/json; charset=UTF-8", b'{"error":{"code":503,"message":"Backend Error",'
            b'"errors":[{"message":"Backend Error","domain":"global","reason":"backendError"}]}}', ""),
    "azure": ("application/xml", b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
              b"<Message>The server is busy.</Message></Error>", "x-ms-error-code: ServerBusy\r\n"),
}


@dataclass
class Connection:
    """Bytes one proxied connection forwarded, by direction."""

    forwarded: dict = field(default_factory=lambda: {UP: 0, DOWN: 0})
    since_plan: dict = field(default_factory=lambda: {UP: 0, DOWN: 0})
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list = field(default_factory=list)


class FaultProxy:
    """``127.0.0.1:<port>`` forwarding to ``upstream_host:upstream_port``, with faults."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.connections: list[Connection] = []
        self.forwarded = {UP: 0, DOWN: 0}  # since the last reset_counters()
        self._since_plan = {UP: 0, DOWN: 0}
        self._fault = None
        self._fired = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, LOOPBACK, 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    # --- control, from the test's thread ---------------------------------------------------
    def set_fault(self, fault=None) -> None:
        """Arm ``fault`` (None: plain forwarding); byte positions count from now."""
        def arm():
            self._fault, self._fired = fault, 0
            self._since_plan = {UP: 0, DOWN: 0}
            for conn in self.connections:
                conn.since_plan = {UP: 0, DOWN: 0}
        self._loop.call_soon_threadsafe(arm)
        self._call(asyncio.sleep(0))  # armed before the next transfer starts

    @property
    def fired(self) -> int:
        """How often the current fault fired."""
        return self._fired

    def reset_counters(self) -> None:
        def reset():
            self.forwarded = {UP: 0, DOWN: 0}
            self.connections = [c for c in self.connections if not c.closed.is_set()]
        self._loop.call_soon_threadsafe(reset)
        self._call(asyncio.sleep(0))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, coro, timeout: float = 15.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _shutdown(self) -> None:
        self._server.close()
        for conn in self.connections:
            _close(conn, abort=True)
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()

    # --- the proxy, on its loop -------------------------------------------------------------
    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        conn = Connection(writers=[client_w])
        self.connections.append(conn)
        fault = self._fault
        try:
            if isinstance(fault, Http503) and self._fired < fault.times:
                self._fired += 1
                await asyncio.wait_for(_answer_busy(client_r, client_w, fault.service), REQUEST_TIMEOUT)
                return
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT)
            conn.writers.append(up_w)
            await asyncio.gather(self._pump(client_r, up_w, conn, UP), self._pump(up_r, client_w, conn, DOWN))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            _close(conn, abort=False)

    async def _pump(self, reader, writer, conn: Connection, direction: str) -> None:
        """Forward one direction until EOF or a fault; then close both sides."""
        abort = False
        try:
            while not conn.closed.is_set():
                data = await reader.read(CHUNK)
                if not data:
                    break
                fault, cut = self._trigger(conn, direction, len(data))
                if cut is not None:
                    self._forward(writer, conn, direction, data[:cut])
                    await writer.drain()
                    if isinstance(fault, Drop):
                        abort = fault.rst
                        if fault.rst:
                            _set_rst(conn.writers[0])  # the client sees "connection reset"
                        break
                    held = await _hold(reader, conn, fault.seconds)
                    if held is None:
                        break  # the sender went away while stalled
                    data = data[cut:] + held
                self._forward(writer, conn, direction, data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            _close(conn, abort=abort)

    def _trigger(self, conn: Connection, direction: str, size: int):
        """(fault, bytes to forward before it) if ``size`` more bytes cross its position."""
        fault = self._fault
        if not isinstance(fault, (Drop, Stall)) or fault.direction != direction or self._fired >= fault.times:
            return None, None
        position = (conn.since_plan if fault.per_connection else self._since_plan)[direction]
        if not position <= fault.after < position + size:
            return None, None
        self._fired += 1
        return fault, fault.after - position

    def _forward(self, writer, conn: Connection, direction: str, data: bytes) -> None:
        writer.write(data)
        for counts in (conn.forwarded, conn.since_plan, self.forwarded, self._since_plan):
            counts[direction] += len(data)


async def _hold(reader, conn: Connection, seconds: float) -> bytes | None:
    """Stall: keep reading (to notice a sender that gives up) but forward nothing for
    ``seconds``; the bytes read meanwhile, or None if the connection ended."""
    held = bytearray()
    deadline = asyncio.get_running_loop().time() + seconds
    while not conn.closed.is_set():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return bytes(held)
        try:
            data = await asyncio.wait_for(reader.read(CHUNK), left)
        except asyncio.TimeoutError:
            return bytes(held)
        if not data:
            return None
        held += data
    return None


async def _answer_busy(reader, writer, service: str) -> None:
    """Read one whole HTTP request (body by Content-Length, chunked, after 100-continue)
    and answer it with the service's 503, closing the connection."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    method = head.split(" ", 1)[0]
    headers = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if headers.get("expect") == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers (e.g. aws-chunked checksums) up to the empty line
                break
            await reader.readexactly(size + 2)  # the data and its CRLF
    else:
        await reader.readexactly(int(headers.get("content-length", 0)))
    content_type, body, extra = _BUSY[service]
    writer.write(
        (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {content_type}\r\n"
         f"Content-Length: {len(body)}\r\n{extra}Retry-After: 0\r\nConnection: close\r\n\r\n").encode()
        + (b"" if method == "HEAD" else body)
    )
    await writer.drain()


def _set_rst(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _close(conn: Connection, abort: bool) -> None:
    """End both sides: ``abort`` drops unsent bytes (and sends RST if SO_LINGER 0 is set)."""
    conn.closed.set()
    for writer in conn.writers:
        if abort:
            writer.transport.abort()
        else:
            writer.close()
