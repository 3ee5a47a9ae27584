"""Network fault injection for tests: an asyncio TCP proxy on 127.0.0.1 that cuts, refuses, stalls and throttles.

There is no netem or toxiproxy on the test machines, so tests put a `FaultProxy` between a
client (the appliance's sync engine) and a server (the receiver)::

    async with FaultProxy("127.0.0.1", receiver_port) as proxy:
        client_url = proxy.url_for("/ingest")
        proxy.cut_after(10_000, "upstream")  # the next connection dies mid-request
        ...
        proxy.clear()

Faults can be set and changed at any time while the proxy runs:

* ``cut_after(n, direction, once=True)`` -- after ``n`` more bytes have been forwarded in
  ``direction`` ("upstream" = client to server, "downstream" = server to client, "both" = the
  two directions counted together) a connection is cut: exactly ``n`` bytes are forwarded (and
  flushed to the kernel), then both of its sockets are reset (SO_LINGER 0 + abort, so each peer
  sees ECONNRESET rather than a clean EOF).  Bytes are counted per connection from the moment
  the rule is set, so the rule also catches a pooled keep-alive connection that is already open.
  With ``once=True`` (the default) only the first connection to reach ``n`` is cut and the rule
  is then removed; with ``once=False`` every connection is cut when it reaches ``n``.  Setting a
  new rule replaces the previous one.
* ``refuse(True)`` -- new connections are accepted and immediately reset (RST).  The listener
  keeps its port (closing and re-binding it could lose the port to another process), so a
  client's ``connect()`` succeeds and its first read or write fails with ECONNRESET: aiohttp
  raises ``ClientOSError`` or ``ServerDisconnectedError`` (both ``aiohttp.ClientError``), not
  ``ClientConnectorError``.  Open connections are not touched: call ``cut_all()`` as well to
  also drop pooled keep-alive connections.
* ``stall(True)`` -- no more data is forwarded in either direction, on open and new
  connections; what is in flight is held (bounded: one chunk per direction plus the socket
  buffers), so the peers see a timeout.  ``stall(False)`` delivers the held data, like a link
  that comes back -- including a request the client has given up on; ``cut_all()`` before
  un-stalling drops it instead.
* ``rate_limit(bytes_per_s)`` -- a token bucket per direction, shared by all connections (one
  link), forwarding in small pieces (about 20 ms worth, at most 64 KiB); ``None`` removes it.
* ``clear()`` removes every fault; ``cut_all()`` resets every open connection now.

Memory is bounded: each direction reads at most 64 KiB at a time, awaits ``drain()`` after
every write, and stops reading while it holds data it may not forward yet.  The proxy only
ever connects to its configured target, which must be a loopback address unless
``allow_remote_target=True``.  Closing the proxy resets every connection and stops the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

Direction = Literal["upstream", "downstream", "both"]
"""Upstream: client to server (the target); downstream: server to client."""

CHUNK = 64 * 1024
"""The most the proxy reads from one socket at a time, and the largest rate-limited piece."""

_DIRECTIONS: tuple[Direction, ...] = ("upstream", "downstream", "both")
_FLUSH_TIMEOUT_S = 1.0  # how long a cut waits for its last bytes to reach the kernel
_MAX_SLEEP_S = 0.05  # a throttled pump re-checks the faults at least this often
_LINGER_RESET = struct.pack("ii", 1, 0)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy's counters (``FaultProxy.stats``)."""

    bytes_upstream: int
    """Bytes forwarded from clients to the target."""
    bytes_downstream: int
    """Bytes forwarded from the target to clients."""
    connections_accepted: int
    """Every incoming connection, refused ones included."""
    connections_refused: int
    """Connections reset on arrival because ``refuse(True)`` was in force."""
    connections_cut: int
    """Connections reset by ``cut_after`` or ``cut_all``."""
    connect_failures: int
    """Incoming connections reset because the target could not be reached."""
    connections_open: int
    """Connections currently being proxied."""


@dataclass
class _Counters:
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0
    connections_cut: int = 0
    connect_failures: int = 0


@dataclass(frozen=True)
class _CutRule:
    n_bytes: int
    direction: Direction
    once: bool
    generation: int


class _TokenBucket:
    """Bytes per second for one direction; ``rate is None`` means unlimited."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._burst = 1.0
        self._tokens = 0.0
        self._last = 0.0

    def set_rate(self, rate: float | None, now: float) -> None:
        self.rate = rate
        if rate is not None:
            self._burst = max(1.0, min(rate / 50, float(CHUNK)))
            self._tokens = self._burst
            self._last = now

    def take(self, wanted: int, now: float) -> tuple[int, float]:
        """Grant up to ``wanted`` bytes now: (granted, 0.0), or (0, seconds to wait)."""
        if self.rate is None:
            return wanted, 0.0
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        need = min(float(wanted), self._burst)
        if self._tokens >= need:
            granted = min(wanted, int(self._tokens))
            self._tokens -= granted
            return granted, 0.0
        return 0, (need - self._tokens) / self.rate


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection abruptly: SO_LINGER 0 makes the kernel send RST, not FIN."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Connection:
    """One proxied client connection and its connection to the target."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._client_reader = reader
        self._client_writer = writer
        self._upstream_writer: asyncio.StreamWriter | None = None
        self._connect_task: (
            asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None
        ) = None
        self._pumps: list[asyncio.Task[None]] = []
        self.closed = False
        self.cutting = False
        # cut_after bookkeeping: bytes counted under the rule of this generation
        self.cut_generation = -1
        self.cut_count = 0

    def abort(self) -> None:
        """Reset both sockets and stop forwarding (idempotent)."""
        if self.closed:
            return
        self.closed = True
        _reset(self._client_writer)
        if self._upstream_writer is not None:
            _reset(self._upstream_writer)
        current = asyncio.current_task()
        for task in self._pumps:
            if task is not current:
                task.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()

    async def run(self) -> None:
        proxy = self._proxy
        connect = self._connect_task = asyncio.create_task(
            asyncio.open_connection(proxy.target_host, proxy.target_port, limit=CHUNK)
        )
        await asyncio.wait({connect})
        if connect.cancelled():
            self.abort()
            return
        exc = connect.exception()
        if exc is not None:
            if not isinstance(exc, OSError):
                raise exc
            proxy._counters.connect_failures += 1
            logger.debug("fault proxy: target unreachable: %r", exc)
            self.abort()
            return
        upstream_reader, upstream_writer = connect.result()
        self._upstream_writer = upstream_writer
        if self.closed:  # cut while connecting
            _reset(upstream_writer)
            return
        self._pumps = [
            asyncio.create_task(self._pump(self._client_reader, upstream_writer, "upstream")),
            asyncio.create_task(self._pump(upstream_reader, self._client_writer, "downstream")),
        ]
        results = await asyncio.gather(*self._pumps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        if not self.closed:  # both directions reached EOF: close politely
            for writer in (self._client_writer, upstream_writer):
                writer.close()
            for writer in (self._client_writer, upstream_writer):
                with contextlib.suppress(OSError):
                    await writer.wait_closed()  # abort() (proxy closing) still ends this
            self.closed = True

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["upstream", "downstream"],
    ) -> None:
        try:
            while not self.closed:
                data = await reader.read(CHUNK)
                if not data:
                    if not self.closed and writer.can_write_eof():
                        writer.write_eof()  # pass the half-close on
                    return
                if not await self._forward(data, writer, direction):
                    return
        except OSError:
            # a peer reset the connection (or vanished): pass the reset on to the other peer
            self.abort()

    async def _forward(
        self,
        data: bytes,
        writer: asyncio.StreamWriter,
        direction: Literal["upstream", "downstream"],
    ) -> bool:
        """Forward one chunk under the current faults; False once the connection is done."""
        proxy = self._proxy
        view = memoryview(data)
        while view:
            granted = await proxy._wait_turn(direction, len(view))
            if self.closed or self.cutting:
                return False
            allowed, cut = proxy._reserve_cut(self, direction, granted)
            if allowed:
                writer.write(view[:allowed])
                proxy._count(direction, allowed)
                view = view[allowed:]
            if cut:
                await self._cut(writer)
                return False
            await writer.drain()
        return True

    async def _cut(self, writer: asyncio.StreamWriter) -> None:
        """Flush the last permitted bytes to the kernel, then reset both sockets."""
        self._proxy._counters.connections_cut += 1
        with contextlib.suppress(OSError, TimeoutError):
            writer.transport.set_write_buffer_limits(high=0)
            async with asyncio.timeout(_FLUSH_TIMEOUT_S):
                await writer.drain()
        self.abort()


class FaultProxy:
    """A TCP proxy from 127.0.0.1:``port`` to ``target_host:target_port`` with injectable faults.

    Use as ``async with FaultProxy(host, port) as proxy:`` (or ``await start()`` /
    ``await close()``).  See the module docstring for what each fault does.
    """

    def __init__(
        self, target_host: str, target_port: int, *, allow_remote_target: bool = False
    ) -> None:
        if not allow_remote_target and not _is_loopback(target_host):
            raise ValueError(
                f"FaultProxy target {target_host!r} is not a loopback address; "
                "pass allow_remote_target=True if you really mean it"
            )
        self.target_host = target_host
        self.target_port = target_port
        self.errors: list[BaseException] = []
        """Unexpected exceptions inside the proxy; ``__aexit__`` raises if there are any."""
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._closing = False
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self._counters = _Counters()
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cut_rule: _CutRule | None = None
        self._cut_generation = 0
        self._buckets = {"upstream": _TokenBucket(), "downstream": _TokenBucket()}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=CHUNK)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and reset every connection (idempotent)."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for _ in range(5):  # let connections accepted just now reach _handle (which resets them)
            await asyncio.sleep(0)
        for conn in list(self._conns):
            conn.abort()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
        if self.errors and exc is None:
            raise RuntimeError(f"FaultProxy had internal errors: {self.errors!r}") from self.errors[
                0
            ]

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    def url_for(self, path: str = "") -> str:
        """``http://127.0.0.1:{port}`` followed by ``path`` (a leading "/" is added if missing)."""
        if path and not path.startswith("/"):
            path = "/" + path
        return f"http://127.0.0.1:{self.port}{path}"

    # ------------------------------------------------------------------ faults

    def cut_after(
        self, n_bytes: int, direction: Direction = "upstream", *, once: bool = True
    ) -> None:
        """Cut a connection once ``n_bytes`` more have been forwarded in ``direction``."""
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, not {direction!r}")
        self._cut_generation += 1
        self._cut_rule = _CutRule(n_bytes, direction, once, self._cut_generation)

    def refuse(self, on: bool = True) -> None:
        """Reset new connections on arrival (open ones are left alone; see ``cut_all``)."""
        self._refusing = on

    def stall(self, on: bool = True) -> None:
        """Hold all data (open and new connections) until ``stall(False)``."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def rate_limit(self, bytes_per_s: float | None) -> None:
        """Forward at most ``bytes_per_s`` in each direction (all connections together)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be > 0 (or None for no limit)")
        now = asyncio.get_running_loop().time()
        for bucket in self._buckets.values():
            bucket.set_rate(bytes_per_s, now)

    def clear(self) -> None:
        """Remove every fault: no cut rule, no refusing, no stall, no rate limit."""
        self._cut_rule = None
        self._refusing = False
        self._flowing.set()
        for bucket in self._buckets.values():
            bucket.rate = None

    def cut_all(self) -> int:
        """Reset every open connection now; returns how many were cut."""
        count = 0
        for conn in list(self._conns):
            if not conn.closed and not conn.cutting:
                count += 1
            conn.abort()
        self._counters.connections_cut += count
        return count

    @property
    def stats(self) -> ProxyStats:
        c = self._counters
        return ProxyStats(
            bytes_upstream=c.bytes_upstream,
            bytes_downstream=c.bytes_downstream,
            connections_accepted=c.connections_accepted,
            connections_refused=c.connections_refused,
            connections_cut=c.connections_cut,
            connect_failures=c.connect_failures,
            connections_open=sum(1 for conn in self._conns if not conn.closed),
        )

    # ------------------------------------------------------------------ internals

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counters.connections_accepted += 1
        if self._refusing or self._closing:
            if self._refusing:
                self._counters.connections_refused += 1
            _reset(writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        conn = _Connection(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.run()
        except Exception as exc:
            logger.exception("fault proxy: connection failed")
            self.errors.append(exc)
            conn.abort()
        finally:
            self._conns.discard(conn)
            if task is not None:
                self._handlers.discard(task)

    async def _wait_turn(self, direction: Literal["upstream", "downstream"], wanted: int) -> int:
        """Wait until not stalled and the rate limit grants some bytes; how many."""
        bucket = self._buckets[direction]
        loop = asyncio.get_running_loop()
        while True:
            await self._flowing.wait()
            granted, wait_s = bucket.take(wanted, loop.time())
            if granted:
                return granted
            await asyncio.sleep(min(wait_s, _MAX_SLEEP_S))

    def _reserve_cut(
        self, conn: _Connection, direction: Literal["upstream", "downstream"], n: int
    ) -> tuple[int, bool]:
        """How many of ``n`` bytes may pass, and whether the connection is cut after them."""
        rule = self._cut_rule
        if rule is None or rule.direction not in (direction, "both"):
            return n, False
        if conn.cut_generation != rule.generation:
            conn.cut_generation = rule.generation
            conn.cut_count = 0
        remaining = rule.n_bytes - conn.cut_count
        if n < remaining:
            conn.cut_count += n
            return n, False
        conn.cut_count += remaining
        conn.cutting = True
        if rule.once:
            self._cut_rule = None
        return remaining, True

    def _count(self, direction: Literal["upstream", "downstream"], n: int) -> None:
        if direction == "upstream":
            self._counters.bytes_upstream += n
        else:
            self._counters.bytes_downstream += n
