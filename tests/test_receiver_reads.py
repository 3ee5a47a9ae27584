"""Tests of the consumers' read API, `GET /v1/records` (docs/fleet.md, "Reading what arrived"),
on both stores: pages in commit order that neither skip nor repeat a record, filters, a cursor
that moves past what a filter leaves out, refusals; and on PostgreSQL, a record whose
transaction is still open when a page is read is waited for, not passed over."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from receiver import build_receiver_app, serve_receiver
from tests.postgres import PostgresServer, create_database
from tests.test_receiver import TOKENS, Client, ndjson, record

ADMIN = "reader-admin-token"


@contextlib.asynccontextmanager
async def reading(
    data_dir: Path, database: str | None, admin_tokens: tuple[str, ...] = (ADMIN,)
) -> AsyncIterator[Client]:
    app = build_receiver_app(data_dir, TOKENS, admin_tokens=admin_tokens, database=database)
    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        aiohttp.ClientSession() as session,
    ):
        host, port = addresses[0]
        yield Client(f"http://{host}:{port}", session, data_dir, database)


async def read(
    client: Client, token: str | None = ADMIN, **query: str
) -> tuple[int, dict[str, Any]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with client.session.get(
        f"{client.base}/v1/records", params=query, headers=headers
    ) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def read_all(
    client: Client, after: str | None = None, **query: str
) -> tuple[list[dict[str, Any]], str]:
    """Follow the cursor until the receiver says there is no more now."""
    records: list[dict[str, Any]] = []
    while True:
        params = dict(query) if after is None else {**query, "after": after}
        status, page = await read(client, **params)
        assert status == 200, page
        records.extend(page["records"])
        after = page["next"]
        if not page["more"]:
            assert after is not None
            return records, after


async def ship(
    client: Client, appliance_id: str, seqs: range, priority: str = "event", **extra: Any
) -> None:
    lines = [record(seq, priority, appliance_id, **extra) for seq in seqs]
    batch_id = f"{priority}-{seqs[0]}-{seqs[-1]}"
    status, answer = await client.put_batch(batch_id, ndjson(lines), appliance_id=appliance_id)
    assert status == 200, answer


def keys(records: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(r["appliance_id"], r["seq"]) for r in records]


async def test_pages_follow_commit_order_and_resume_from_the_cursor(
    data_dir: Path, database: str | None
) -> None:
    async with reading(data_dir, database) as client:
        await ship(client, "ship-1", range(1, 6))
        await ship(client, "ship-2", range(1, 4))
        await ship(client, "ship-1", range(6, 9))
        # Three records a page: every record once, in the order the batches were committed.
        seen: list[dict[str, Any]] = []
        after: str | None = None
        pages = 0
        while True:
            params = {"limit": "3"} if after is None else {"limit": "3", "after": after}
            status, page = await read(client, **params)
            assert status == 200, page
            assert len(page["records"]) <= 3
            seen.extend(page["records"])
            after, pages = page["next"], pages + 1
            if not page["more"]:
                break
        assert pages >= 4
        expected = [("ship-1", s) for s in range(1, 6)] + [("ship-2", s) for s in range(1, 4)]
        expected += [("ship-1", s) for s in range(6, 9)]
        assert keys(seen) == expected
        first = seen[0]
        assert first["journal_id"] == "legacy" and first["received_at"].endswith("Z")
        assert first["record"] == record(1, "event", "ship-1")
        # Nothing new: the cursor stays, the page is empty.
        status, page = await read(client, after=after)
        assert (status, page["records"], page["next"], page["more"]) == (200, [], after, False)
        # A resend stores nothing, so a consumer reads nothing again.
        await ship(client, "ship-1", range(6, 9))
        assert (await read_all(client, after))[0] == []
        # New records come after the cursor, and only they.
        await ship(client, "ship-2", range(4, 6))
        fresh, _ = await read_all(client, after)
        assert keys(fresh) == [("ship-2", 4), ("ship-2", 5)]


async def test_filters_and_a_cursor_past_what_they_leave_out(
    data_dir: Path, database: str | None
) -> None:
    async with reading(data_dir, database) as client:
        await ship(client, "ship-1", range(1, 4), kind="reading")
        await ship(client, "ship-1", range(4, 6), "alert", kind="anomaly")
        await ship(client, "ship-2", range(1, 3), "alert", kind="zone_entry")
        await ship(client, "ship-2", range(3, 5), kind="health")
        alerts, after = await read_all(client, priority="alert")
        assert keys(alerts) == [("ship-1", 4), ("ship-1", 5), ("ship-2", 1), ("ship-2", 2)]
        one, _ = await read_all(client, appliance="ship-2", kind="health,zone_entry")
        assert keys(one) == [("ship-2", s) for s in range(1, 5)]
        both, _ = await read_all(client, kind="anomaly", priority="alert,event")
        assert keys(both) == [("ship-1", 4), ("ship-1", 5)]
        # The alerts' cursor moved past the event records after them: the next alert is the
        # only thing the next read returns.
        await ship(client, "ship-1", range(6, 8), kind="reading")
        await ship(client, "ship-2", range(5, 6), "alert", kind="zone_entry")
        later, _ = await read_all(client, after, priority="alert")
        assert keys(later) == [("ship-2", 5)]


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"after": "not-a-cursor"}, "bad cursor"),
        ({"after": "1" * 40}, "bad cursor"),
        ({"limit": "0"}, "bad limit"),
        ({"limit": "5001"}, "bad limit"),
        ({"limit": "ten"}, "bad limit"),
        ({"priority": "urgent"}, "bad priority"),
        ({"appliance": "../etc"}, "bad appliance id"),
        ({"kind": "a kind"}, "bad kind"),
    ],
)
async def test_bad_queries_are_400(
    data_dir: Path, database: str | None, query: dict[str, str], error: str
) -> None:
    async with reading(data_dir, database) as client:
        status, answer = await read(client, **query)
        assert (status, answer["error"]) == (400, error), answer
        assert answer["detail"]


async def test_only_admin_tokens_read(data_dir: Path) -> None:
    async with reading(data_dir, None) as client:
        await ship(client, "ship-1", range(1, 3))
        status, answer = await read(client, token=None)
        assert (status, answer["error"]) == (401, "missing token")
        status, answer = await read(client, token=TOKENS["ship-1"])
        assert (status, answer["error"]) == (401, "unknown admin token")
    async with reading(data_dir / "closed", None, admin_tokens=()) as client:
        status, answer = await read(client)
        assert (status, answer["error"]) == (403, "reading records disabled")
        assert "tokens add --admin" in answer["detail"]


async def test_an_open_transaction_holds_the_cursor_back(tmp_path: Path, postgres_dsn: str) -> None:
    """Two replicas: one's transaction is still open while the other's commits after it. A
    page read then must not hand out the later record, or the consumer's cursor would pass
    the earlier one for good."""
    async with reading(tmp_path / "a", postgres_dsn) as client:
        await ship(client, "ship-1", range(1, 3))
        _, after = await read_all(client)
        slow = await asyncpg.connect(postgres_dsn)
        try:
            transaction = slow.transaction()
            await transaction.start()
            # What a replica's batch transaction writes first, then stalls.
            await slow.execute(
                "INSERT INTO receiver.records (appliance_id, journal_id, seq, priority, kind, "
                "ts, batch_id, received_at, record) VALUES ('ship-2', 'legacy', 1, 'event', "
                "'reading', '2026-11-01T06:00:01.000000Z', 'event-1-1', now(), $1::jsonb)",
                '{"seq": 1, "kind": "reading", "priority": "event", "appliance_id": "ship-2"}',
            )
            await ship(client, "ship-1", range(3, 5))  # commits through the other replica
            held, cursor = await read_all(client, after)
            assert held == [] and cursor == after
            await transaction.commit()
        finally:
            await slow.close()
        both, _ = await read_all(client, after)
        assert keys(both) == [("ship-2", 1), ("ship-1", 3), ("ship-1", 4)]


@pytest.fixture
def new_cluster() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own: a new one is a few hundred transactions short of 1000,
    where the session's may be tens of thousands short of its next power of ten."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-postgres-"))
    folder.chmod(0o755)
    server = PostgresServer(folder / "cluster")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def test_pages_keep_commit_order_where_transaction_ids_gain_a_digit(
    tmp_path: Path, new_cluster: PostgresServer
) -> None:
    """Transaction 1000 comes after 999: the cursor's order is the ids', not their text's
    (ordering by the text once put 10000 before 9999, so a consumer read records twice and
    passed others over)."""
    dsn = await asyncio.to_thread(create_database, new_cluster, "digits")
    async with reading(tmp_path / "a", dsn) as client:
        await ship(client, "ship-1", range(1, 2))
        _, after = await read_all(client)
        burner = await asyncpg.connect(dsn)
        try:
            current = int(await burner.fetchval("SELECT pg_current_xact_id()::text"))
            boundary = 10 ** len(str(current))
            # Each committed loop step takes a transaction id: burn them up to just below
            # the boundary, so the next batches' transactions straddle it.
            await burner.execute("SET synchronous_commit = off")
            await burner.execute(
                "DO $$ BEGIN FOR i IN 1.."
                f"{boundary - 4 - current}"
                " LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
            )
        finally:
            await burner.close()
        for seq in range(2, 10):  # one transaction each, across the boundary
            await ship(client, "ship-1", range(seq, seq + 1))
        seen: list[tuple[str, int]] = []
        cursor = after
        while True:
            status, page = await read(client, after=cursor, limit="1")
            assert status == 200, page
            seen.extend(keys(page["records"]))
            cursor = page["next"]
            if not page["more"]:
                break
    assert [seq for _, seq in seen] == list(range(2, 10))
    assert int(cursor.split(".")[0]) >= boundary
