"""The http destination against the real reference receiver, through the fault proxy: cuts at
random points of batches and payload uploads, refusals, stalls, trickles and receiver restarts,
and still every record exactly once and every payload byte-identical."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from config.shipping import HttpDestination, SyncSection
from receiver import build_receiver_app, serve_receiver
from sync import Journal, NewRecord, PayloadRef, PayloadStore, Priority
from sync.destination import DestinationError
from sync.engine import SyncEngine
from sync.http_client import HttpTarget
from tests.conftest import APPLIANCE_ID
from tests.faultproxy import FaultProxy

TOKEN = "s3cret-token"
FAULT_CYCLES = 50


class ServerErrors:
    """Injected 5xx answers from the real receiver: `before` refuses requests unhandled (an
    overloaded server), `after` lets the receiver store what it got and then answers 500 (the
    acknowledgement lost), which is the case that tests deduplication."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.every = 1
        self.injected = 0
        self._seen = 0

    def set(self, mode: str | None, every: int = 1) -> None:
        self.mode, self.every, self._seen = mode, every, 0

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.mode is None or request.path == "/v1/health":
            return await handler(request)
        self._seen += 1
        if self._seen % self.every:
            return await handler(request)
        self.injected += 1
        if self.mode == "after":
            await handler(request)
            return web.json_response({"error": "injected"}, status=500)
        return web.json_response({"error": "injected"}, status=503)


@asynccontextmanager
async def receiver(
    data: Path, tokens: dict[str, str] | None = None, errors: ServerErrors | None = None
) -> AsyncIterator[int]:
    app = build_receiver_app(data, tokens if tokens is not None else {APPLIANCE_ID: TOKEN})
    if errors is not None:
        app.middlewares.append(errors.middleware)
    async with serve_receiver(app, "127.0.0.1", 0) as bound:
        yield bound[0][1]


async def fill(journal: Journal, store: PayloadStore, rng: random.Random) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    for i in range(400):
        priority = Priority(1 + i % 4)
        refs: tuple[PayloadRef, ...] = ()
        if priority in (Priority.ALERT, Priority.SAMPLE) and i % 6 == 0:
            data = rng.randbytes(rng.randint(1_000, 300_000))
            ref = await store.put(data)
            blobs[ref.sha256] = data
            refs = (ref,)
        await journal.append(
            NewRecord("cam", "reading", priority, {"i": i, "pad": "x" * 300}, payloads=refs)
        )
    return blobs


def engine_for(
    journal: Journal, store: PayloadStore, url: str, token_file: Path, **extra: object
) -> tuple[SyncEngine, HttpTarget]:
    cfg = HttpDestination.model_validate(
        {
            "name": "shore",
            "type": "http",
            "url": url,
            "token_file": str(token_file),
            "timeout": "2s",
            **extra,
        }
    )
    settings = SyncSection.model_validate({"batch_records": 25, "chunk_size": "64KiB"})
    target = HttpTarget(cfg, APPLIANCE_ID, settings.chunk_size)
    return SyncEngine(journal, store, target, cfg, settings), target


def received(data: Path) -> list[tuple[int, str, str]]:
    conn = sqlite3.connect(f"{(data / 'receiver.db').as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT seq, priority, received_ts FROM records ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()


@pytest.mark.timeout(300)
async def test_exactly_once_through_fifty_fault_cycles(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    rng = random.Random(7)
    blobs = await fill(journal, payload_store, rng)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    rdata = tmp_path / "receiver"
    faults: dict[str, int] = {}
    errors = ServerErrors()
    async with receiver(rdata, errors=errors) as port, FaultProxy("127.0.0.1", port) as proxy:
        engine, target = engine_for(journal, payload_store, proxy.url_for(), token_file)
        async with target:
            for cycle in range(FAULT_CYCLES):
                # New work every cycle, so every fault meets batches and uploads in flight.
                for i in range(12):
                    refs: tuple[PayloadRef, ...] = ()
                    if i == 0:
                        data = rng.randbytes(rng.randint(10_000, 200_000))
                        ref = await payload_store.put(data)
                        blobs[ref.sha256] = data
                        refs = (ref,)
                    await journal.append(
                        NewRecord(
                            "cam",
                            "reading",
                            Priority(1 + (cycle + i) % 4),
                            {"c": cycle, "i": i},
                            payloads=refs,
                        )
                    )
                fault = rng.choice(
                    ["cut_up", "cut_down", "refuse", "stall", "trickle", "5xx", "5xx_acked", "none"]
                )
                faults[fault] = faults.get(fault, 0) + 1
                if fault == "cut_up":
                    proxy.cut_after(rng.randint(100, 200_000), "upstream")
                elif fault == "cut_down":
                    proxy.cut_after(rng.randint(50, 2_000), "downstream")
                elif fault == "refuse":
                    proxy.refuse(True)
                    proxy.cut_all()
                elif fault == "stall":
                    proxy.stall(True)
                elif fault == "trickle":
                    proxy.rate_limit(64 * 1024)
                elif fault == "5xx":
                    errors.set("before", every=rng.randint(1, 4))
                elif fault == "5xx_acked":
                    errors.set("after", every=rng.randint(1, 4))
                try:
                    # Each cycle is cut short too: an engine stopped mid-drain is a fault of
                    # its own (the appliance killed mid-sync).
                    async with asyncio.timeout(rng.uniform(0.3, 1.2)):
                        await engine.drain()
                except DestinationError as exc:
                    assert exc.retryable, exc
                except TimeoutError:
                    pass
                proxy.cut_all()
                proxy.clear()
                errors.set(None)
            assert await engine.drain() is True
        # The receiver got every record exactly once, and every payload byte for byte.
    total = 400 + FAULT_CYCLES * 12
    seqs = [seq for seq, _, _ in received(rdata)]
    assert seqs == list(range(1, total + 1))
    for sha, data in blobs.items():
        copy = rdata / "payloads" / APPLIANCE_ID / sha
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha and copy.read_bytes() == data
    cursors = await journal.read(lambda r: {p: r.cursor("shore", p) for p in Priority})
    newest = await journal.read(
        lambda r: {
            p: r.records_after(p, 0, limit=10_000, max_bytes=1 << 30)[-1].seq for p in Priority
        }
    )
    assert cursors == newest
    assert len(faults) >= 7 and errors.injected > 0
    # Acknowledgements lost to injected 500s were resent, and the receiver ignored the copies.
    conn = sqlite3.connect(f"{(rdata / 'receiver.db').as_uri()}?mode=ro", uri=True)
    with contextlib.closing(conn):
        (duplicates,) = conn.execute("SELECT duplicates_ignored FROM appliances").fetchone()
    assert duplicates > 0


async def test_receiver_restart_mid_sync(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    blobs = await fill(journal, payload_store, random.Random(3))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    rdata = tmp_path / "receiver"
    async with receiver(rdata) as port:
        engine, target = engine_for(journal, payload_store, f"http://127.0.0.1:{port}", token_file)
        async with target:
            await engine._drain_records(Priority.ALERT, None)  # part of the backlog only
    async with receiver(rdata) as port:  # a new process on the same data: a restart
        engine, target = engine_for(journal, payload_store, f"http://127.0.0.1:{port}", token_file)
        async with target:
            assert await engine.drain() is True
    assert [s for s, _, _ in received(rdata)] == list(range(1, 401))
    assert all(
        (rdata / "payloads" / APPLIANCE_ID / sha).read_bytes() == b for sha, b in blobs.items()
    )


async def test_alerts_arrive_before_any_telemetry_under_a_tight_cap(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    for i in range(200):
        await journal.append(
            NewRecord("s", "reading", Priority(1 + i % 4), {"i": i, "pad": "y" * 200})
        )
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    rdata = tmp_path / "receiver"
    async with receiver(rdata) as port:
        engine, target = engine_for(
            journal, payload_store, f"http://127.0.0.1:{port}", token_file, bandwidth="16KiB/s"
        )
        async with target:
            assert await engine.drain() is True
    rows = received(rdata)
    last_alert = max(ts for _, p, ts in rows if p == "alert")
    first_telemetry = min(ts for _, p, ts in rows if p == "telemetry")
    assert last_alert <= first_telemetry


async def test_wrong_token_is_a_clear_permanent_error(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    await journal.append(NewRecord("s", "reading", Priority.EVENT, {"i": 1}))
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token")
    async with receiver(tmp_path / "receiver") as port:
        engine, target = engine_for(journal, payload_store, f"http://127.0.0.1:{port}", token_file)
        async with target:
            with pytest.raises(DestinationError, match=r"401.*token_file") as caught:
                await engine.drain()
    assert not caught.value.retryable
    assert await journal.read(lambda r: r.cursor("shore", Priority.EVENT)) == 0
