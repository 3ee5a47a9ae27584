"""Tests of tests.faultproxy: pass-through, cut_after, refuse, stall, rate_limit, stats, cut_all.

Real sockets on 127.0.0.1: a small recording echo server (a Protocol, so it sees every byte
that arrived even when the connection is then reset), raw non-blocking client sockets, and an
aiohttp server and client for the HTTP stack the sync engine uses.
"""

from __future__ import annotations

import asyncio
import io
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from tests.faultproxy import FaultProxy

MiB = 1024 * 1024
KiB = 1024
TIMEOUT = 5.0  # generous: only reached when something is broken


# ----------------------------------------------------------------------------- test server


class _ServerConn(asyncio.Protocol):
    """One connection to the recording server: keeps every byte; echoes if asked."""

    def __init__(self, server: RecordingServer) -> None:
        self._server = server
        self.received = bytearray()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._server.conns.append(self)
        if self._server.greeting:
            transport.write(self._server.greeting)

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self._server.echo and self.transport is not None:
            self.transport.write(data)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()


class RecordingServer:
    def __init__(self, *, echo: bool = True, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.conns: list[_ServerConn] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RecordingServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConn(self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.abort()
        await self._server.wait_closed()

    async def wait_conns(self, n: int) -> list[_ServerConn]:
        await wait_until(lambda: len(self.conns) >= n)
        return self.conns


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a condition on state the test does not own (sockets, the proxy's counters)."""
    async with asyncio.timeout(TIMEOUT):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# ----------------------------------------------------------------------------- raw client


async def connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while len(buf) < n:
            data = await loop.sock_recv(sock, min(n - len(buf), 256 * KiB))
            if not data:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += data
    return bytes(buf)


async def recv_until_closed(sock: socket.socket) -> tuple[bytes, OSError | None]:
    """Everything until EOF or an error; returns the bytes and the error (None on clean EOF)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                data = await loop.sock_recv(sock, 256 * KiB)
            except OSError as exc:
                return bytes(buf), exc
            if not data:
                return bytes(buf), None
            buf += data


async def roundtrip(sock: socket.socket, payload: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, payload)
    assert await recv_exactly(sock, len(payload)) == payload


def payload_of(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@asynccontextmanager
async def echo_proxy(
    *, echo: bool = True, greeting: bytes = b""
) -> AsyncIterator[tuple[RecordingServer, FaultProxy]]:
    async with (
        RecordingServer(echo=echo, greeting=greeting) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        yield server, proxy


# ----------------------------------------------------------------------------- aiohttp server


BLOB = payload_of(3 * MiB, seed=7)


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def _blob(request: web.Request) -> web.Response:
    return web.Response(body=BLOB)


@asynccontextmanager
async def http_server() -> AsyncIterator[int]:
    app = web.Application(client_max_size=16 * MiB)
    app.router.add_post("/echo", _echo)
    app.router.add_get("/blob", _blob)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------------------- pass-through


async def test_pass_through_is_byte_identical_for_a_few_megabytes_both_ways() -> None:
    payload = payload_of(4 * MiB)
    async with echo_proxy() as (server, proxy):
        with await connect(proxy.port) as sock:
            loop = asyncio.get_running_loop()
            _, echoed = await asyncio.gather(
                loop.sock_sendall(sock, payload), recv_exactly(sock, len(payload))
            )
            assert echoed == payload
            (conn,) = await server.wait_conns(1)
            assert conn.received == payload
        stats = proxy.stats
        assert stats.bytes_upstream == len(payload)
        assert stats.bytes_downstream == len(payload)
        assert stats.connections_accepted == 1
        assert stats.connections_cut == 0
        await wait_until(lambda: proxy.stats.connections_open == 0)


async def test_half_close_is_passed_on_and_connection_closes_cleanly() -> None:
    async with echo_proxy() as (server, proxy):
        with await connect(proxy.port) as sock:
            await roundtrip(sock, b"hello")
            sock.shutdown(socket.SHUT_WR)
            data, exc = await recv_until_closed(sock)
            assert (data, exc) == (b"", None)  # a clean EOF, not a reset
        (conn,) = server.conns
        await asyncio.wait_for(conn.lost.wait(), TIMEOUT)
        assert conn.lost_exc is None
        await wait_until(lambda: proxy.stats.connections_open == 0)


async def test_aiohttp_through_the_proxy_is_byte_identical() -> None:
    body = payload_of(2 * MiB, seed=3)
    async with (
        http_server() as port,
        FaultProxy("127.0.0.1", port) as proxy,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(proxy.url_for("/echo"), data=io.BytesIO(body)) as resp:
            assert resp.status == 200
            assert await resp.read() == body
        async with session.get(proxy.url_for("blob")) as resp:
            assert await resp.read() == BLOB
        assert proxy.stats.bytes_upstream > len(body)
        assert proxy.stats.bytes_downstream > len(body) + len(BLOB)


async def test_url_for_and_target_must_be_loopback() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(RuntimeError, match="not started"):
        _ = proxy.port
    async with proxy:
        base = f"http://127.0.0.1:{proxy.port}"
        assert proxy.port > 0
        assert proxy.url_for() == base
        assert proxy.url_for("/a/b") == base + "/a/b"
        assert proxy.url_for("a") == base + "/a"
    FaultProxy("localhost", 1)
    FaultProxy("::1", 1)
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("10.0.0.1", 80)
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("example.com", 80)


# ----------------------------------------------------------------------------- cut_after


async def test_cut_after_upstream_delivers_exactly_n_bytes_then_resets_both_sides() -> None:
    async with echo_proxy(echo=False) as (server, proxy):
        proxy.cut_after(1000, "upstream")
        with await connect(proxy.port) as sock:
            await asyncio.get_running_loop().sock_sendall(sock, payload_of(50_000))
            data, exc = await recv_until_closed(sock)
            assert data == b""
            assert isinstance(exc, ConnectionResetError)
        (conn,) = await server.wait_conns(1)
        await asyncio.wait_for(conn.lost.wait(), TIMEOUT)
        assert bytes(conn.received) == payload_of(50_000)[:1000]
        assert isinstance(conn.lost_exc, ConnectionResetError)
        assert proxy.stats.connections_cut == 1
        assert proxy.stats.bytes_upstream == 1000

        # once=True: the next connection is not cut
        with await connect(proxy.port) as sock:
            await asyncio.get_running_loop().sock_sendall(sock, payload_of(50_000))
            conns = await server.wait_conns(2)
            await wait_until(lambda: len(conns[1].received) == 50_000)
        assert proxy.stats.connections_cut == 1


async def test_cut_after_downstream_gives_client_exactly_n_bytes_then_a_reset() -> None:
    greeting = payload_of(1 * MiB, seed=2)
    async with echo_proxy(greeting=greeting) as (server, proxy):
        proxy.cut_after(10_000, "downstream")
        with await connect(proxy.port) as sock:
            data, exc = await recv_until_closed(sock)
        assert data == greeting[:10_000]
        assert isinstance(exc, ConnectionResetError)
        (conn,) = server.conns
        await asyncio.wait_for(conn.lost.wait(), TIMEOUT)
        assert proxy.stats.bytes_downstream == 10_000


async def test_cut_after_both_counts_the_two_directions_together() -> None:
    async with echo_proxy() as (server, proxy):
        proxy.cut_after(1500, "both")
        with await connect(proxy.port) as sock:
            await asyncio.get_running_loop().sock_sendall(sock, payload_of(1000))
            echoed, exc = await recv_until_closed(sock)
        assert isinstance(exc, ConnectionResetError)
        (conn,) = server.conns
        await asyncio.wait_for(conn.lost.wait(), TIMEOUT)
        assert len(conn.received) + len(echoed) == 1500
        assert proxy.stats.bytes_upstream + proxy.stats.bytes_downstream == 1500


async def test_cut_after_persistent_cuts_every_connection_and_clear_stops_it() -> None:
    async with echo_proxy(echo=False) as (server, proxy):
        proxy.cut_after(100, "upstream", once=False)
        for i in range(3):
            with await connect(proxy.port) as sock:
                await asyncio.get_running_loop().sock_sendall(sock, payload_of(5000))
                _, exc = await recv_until_closed(sock)
                assert isinstance(exc, ConnectionResetError)
            conns = await server.wait_conns(i + 1)
            await asyncio.wait_for(conns[i].lost.wait(), TIMEOUT)
            assert len(conns[i].received) == 100
        assert proxy.stats.connections_cut == 3
        proxy.clear()
        with await connect(proxy.port) as sock:
            await asyncio.get_running_loop().sock_sendall(sock, payload_of(5000))
            conns = await server.wait_conns(4)
            await wait_until(lambda: len(conns[3].received) == 5000)
        assert proxy.stats.connections_cut == 3


async def test_cut_after_also_catches_an_already_open_connection() -> None:
    """A pooled keep-alive connection must not dodge the fault: bytes count from the rule."""
    async with echo_proxy() as (server, proxy):
        with await connect(proxy.port) as sock:
            await roundtrip(sock, payload_of(3000))
            proxy.cut_after(200, "upstream")
            await asyncio.get_running_loop().sock_sendall(sock, payload_of(1000, seed=5))
            echoed, exc = await recv_until_closed(sock)
        assert isinstance(exc, ConnectionResetError)
        (conn,) = server.conns
        await asyncio.wait_for(conn.lost.wait(), TIMEOUT)
        assert bytes(conn.received) == payload_of(3000) + payload_of(1000, seed=5)[:200]
        assert len(echoed) <= 200


async def test_cut_after_mid_request_makes_aiohttp_fail_and_the_retry_succeed() -> None:
    body = payload_of(1 * MiB, seed=4)
    async with (
        http_server() as port,
        FaultProxy("127.0.0.1", port) as proxy,
        aiohttp.ClientSession() as session,
    ):
        proxy.cut_after(100_000, "upstream")
        with pytest.raises(aiohttp.ClientError):
            async with session.post(proxy.url_for("/echo"), data=io.BytesIO(body)) as resp:
                await resp.read()
        async with session.post(proxy.url_for("/echo"), data=io.BytesIO(body)) as resp:
            assert await resp.read() == body
        assert proxy.stats.connections_cut == 1


# ----------------------------------------------------------------------------- refuse


async def test_refuse_resets_new_connections_without_reaching_the_server() -> None:
    async with echo_proxy() as (server, proxy):
        with await connect(proxy.port) as open_sock:
            await roundtrip(open_sock, b"before")
            proxy.refuse(True)
            with await connect(proxy.port) as sock:
                data, exc = await recv_until_closed(sock)
            assert data == b""
            assert isinstance(exc, ConnectionResetError)
            assert len(server.conns) == 1
            assert proxy.stats.connections_refused == 1
            await roundtrip(open_sock, b"open connections are left alone")
            proxy.refuse(False)
            with await connect(proxy.port) as sock:
                await roundtrip(sock, b"after")
        assert proxy.stats.connections_accepted == 3


async def test_refuse_gives_aiohttp_a_client_error() -> None:
    async with (
        http_server() as port,
        FaultProxy("127.0.0.1", port) as proxy,
        aiohttp.ClientSession() as session,
    ):
        proxy.refuse(True)
        with pytest.raises(aiohttp.ClientError):
            async with session.get(proxy.url_for("/blob")) as resp:
                await resp.read()
        proxy.refuse(False)
        async with session.get(proxy.url_for("/blob")) as resp:
            assert await resp.read() == BLOB


async def test_unreachable_target_resets_the_client() -> None:
    # bound but not listening: connecting to it is refused, and nobody else can take the port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        async with FaultProxy("127.0.0.1", placeholder.getsockname()[1]) as proxy:
            with await connect(proxy.port) as sock:
                data, exc = await recv_until_closed(sock)
            assert data == b""
            assert isinstance(exc, ConnectionResetError)
            assert proxy.stats.connect_failures == 1


# ----------------------------------------------------------------------------- stall


async def test_stall_holds_data_until_unstalled() -> None:
    loop = asyncio.get_running_loop()
    async with echo_proxy() as (server, proxy):
        with await connect(proxy.port) as sock:
            await roundtrip(sock, b"warm")
            proxy.stall(True)
            await loop.sock_sendall(sock, b"ping")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.sock_recv(sock, 100), 0.3)
            (conn,) = server.conns
            assert conn.received == b"warm"  # held by the proxy, not forwarded
            proxy.stall(False)
            assert await recv_exactly(sock, 4) == b"ping"
        assert proxy.stats.connections_cut == 0


async def test_stall_makes_aiohttp_time_out_then_recovers() -> None:
    async with (
        http_server() as port,
        FaultProxy("127.0.0.1", port) as proxy,
        aiohttp.ClientSession() as session,
    ):
        proxy.stall(True)
        with pytest.raises(TimeoutError):
            async with session.get(
                proxy.url_for("/blob"), timeout=aiohttp.ClientTimeout(total=0.3)
            ) as resp:
                await resp.read()
        proxy.cut_all()  # drop the abandoned request rather than deliver it late
        proxy.stall(False)
        async with session.get(proxy.url_for("/blob")) as resp:
            assert await resp.read() == BLOB


# ----------------------------------------------------------------------------- rate_limit


async def test_rate_limit_trickles_at_about_the_given_rate() -> None:
    payload = payload_of(100 * KiB)
    async with echo_proxy(echo=False) as (server, proxy):
        proxy.rate_limit(200 * KiB)
        with await connect(proxy.port) as sock:
            start = time.monotonic()
            await asyncio.get_running_loop().sock_sendall(sock, payload)
            conns = await server.wait_conns(1)
            await wait_until(lambda: len(conns[0].received) == len(payload))
            elapsed = time.monotonic() - start
        assert elapsed >= 0.4, elapsed  # 100 KiB at 200 KiB/s: ~0.5 s
        assert bytes(conns[0].received) == payload


async def test_rate_limit_can_be_lifted_mid_transfer() -> None:
    payload = payload_of(2 * MiB)
    async with echo_proxy(echo=False) as (server, proxy):
        proxy.rate_limit(10 * KiB)
        with await connect(proxy.port) as sock:
            send = asyncio.create_task(asyncio.get_running_loop().sock_sendall(sock, payload))
            conns = await server.wait_conns(1)
            await wait_until(lambda: len(conns[0].received) > 0)
            proxy.rate_limit(None)  # 2 MiB at 10 KiB/s would take minutes
            await wait_until(lambda: len(conns[0].received) == len(payload))
            await send
        assert bytes(conns[0].received) == payload


# ----------------------------------------------------------------------------- cut_all, close


async def test_cut_all_resets_every_open_connection() -> None:
    async with echo_proxy() as (server, proxy):
        with await connect(proxy.port) as a, await connect(proxy.port) as b:
            await roundtrip(a, b"a")
            await roundtrip(b, b"b")
            assert proxy.stats.connections_open == 2
            assert proxy.cut_all() == 2
            for sock in (a, b):
                data, exc = await recv_until_closed(sock)
                assert data == b""
                assert isinstance(exc, ConnectionResetError)
        for conn in server.conns:
            await asyncio.wait_for(conn.lost.wait(), TIMEOUT)
            assert isinstance(conn.lost_exc, ConnectionResetError)
        stats = proxy.stats
        assert (stats.connections_cut, stats.connections_open) == (2, 0)
        with await connect(proxy.port) as sock:
            await roundtrip(sock, b"new connections still work")


async def test_close_resets_connections_and_stops_listening() -> None:
    async with RecordingServer() as server:
        async with FaultProxy("127.0.0.1", server.port) as proxy:
            sock = await connect(proxy.port)
            await roundtrip(sock, b"x")
            proxy.stall(True)  # a held connection must not keep close() waiting
        with sock:
            _, exc = await recv_until_closed(sock)
            assert isinstance(exc, ConnectionResetError)
        with pytest.raises(ConnectionRefusedError):
            (await connect(proxy.port)).close()


async def test_faults_can_be_combined_and_cleared() -> None:
    setters: list[Callable[[FaultProxy], object]] = [
        lambda p: p.stall(True),
        lambda p: p.rate_limit(1),
        lambda p: p.refuse(True),
        lambda p: p.cut_after(0, "both", once=False),
    ]
    async with echo_proxy() as (_server, proxy):
        for setter in setters:
            setter(proxy)
        proxy.clear()
        with await connect(proxy.port) as sock:
            await roundtrip(sock, payload_of(200 * KiB))
        assert proxy.stats.connections_cut == 0
