"""The receiver's fleet store on a real PostgreSQL server (receiver/postgres.py): what only a
shared database has to get right. Replicas that share nothing but the database store a batch
once however it reaches them; migrations run once when replicas start together; a month of
records drops whole and its keys still catch a resend; the database down is a retryable 503 with
nothing half-stored. (Everything the receiver does on either store: tests/test_receiver.py, run
against both.)"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from appliance.cli import main as cli_main
from receiver.batches import BatchRecord, IncomingBatch
from receiver.postgres import MIGRATIONS, PostgresStore, month_bounds, partition_name
from tests.helpers import log_events, receiver_process
from tests.mosquitto import free_port
from tests.postgres import PostgresServer
from tests.test_receiver import (
    Client,
    bearer,
    ndjson,
    record,
    running,
    sha,
    stored_records,
)

PAYLOAD = b"snapshot bytes " * 100


async def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, dsn: str, count: int) -> AsyncIterator[list[Client]]:
    """`count` receivers on one database, each with a data folder of its own."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(running(tmp_path / f"replica-{n}", database=dsn))
            for n in range(count)
        ]
        yield clients


def batch_of(seqs: range, *, batch_id: str | None = None, **extra: Any) -> IncomingBatch:
    lines = [json.dumps(record(seq, **extra), separators=(",", ":")) for seq in seqs]
    return IncomingBatch(
        appliance_id="ship-1",
        journal_id="legacy",
        batch_id=batch_id or f"event-{seqs[0]}-{seqs[-1]}",
        priority="event",
        first_seq=seqs[0],
        last_seq=seqs[-1],
        records=[
            BatchRecord(seq=seq, kind="reading", ts=record(seq)["ts"], line=line)
            for seq, line in zip(seqs, lines, strict=True)
        ],
    )


async def test_replicas_starting_together_migrate_once(postgres_dsn: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_dsn) for _ in range(4)))
    try:
        rows = await query(postgres_dsn, "SELECT name FROM receiver.migrations ORDER BY name")
        assert [row["name"] for row in rows] == [name for name, _ in MIGRATIONS]
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_one_batch_through_three_replicas_at_once_is_stored_once(
    tmp_path: Path, postgres_dsn: str
) -> None:
    records = [record(seq) for seq in range(1, 201)]
    body = ndjson(records)
    async with replicas(tmp_path, postgres_dsn, 3) as clients:
        answers = await asyncio.gather(
            *(c.put_batch("event-1-200", body) for c in clients for _ in range(3))
        )
        assert {status for status, _ in answers} == {200}
        assert sum(answer["stored"] for _, answer in answers) == 200
        assert sum(answer["duplicates"] for _, answer in answers) == 8 * 200
        # An overlapping batch through another replica stores only what is new.
        more = ndjson([record(seq) for seq in range(150, 301)])
        status, answer = await clients[1].put_batch("event-150-300", more)
        assert (status, answer["stored"], answer["duplicates"]) == (200, 100, 51)
        summaries = [await c.summary() for c in clients]
    assert summaries[0] == summaries[1] == summaries[2]
    assert (summaries[0]["records"], summaries[0]["max_seq"], summaries[0]["batches"]) == (
        300,
        300,
        2,
    )
    assert summaries[0]["duplicates_ignored"] == 8 * 200 + 51
    rows = await query(postgres_dsn, "SELECT seq FROM receiver.records ORDER BY seq")
    assert [row["seq"] for row in rows] == list(range(1, 301))


async def test_a_record_lands_in_its_month_and_a_dropped_month_still_knows_its_keys(
    postgres_dsn: str,
) -> None:
    store = await PostgresStore.open(postgres_dsn)
    try:
        result = await store.store_batch(batch_of(range(1, 11)))
        assert (result.stored, result.duplicates) == (10, 0)
        (now,) = await query(postgres_dsn, "SELECT now() AS now")
        month = partition_name(month_bounds(now["now"])[0])
        rows = await query(
            postgres_dsn, "SELECT tableoid::regclass::text AS part FROM receiver.records"
        )
        assert {row["part"] for row in rows} == {f"receiver.{month}"}
        # The records are queryable as they were sent: jsonb, and `at` as a time.
        (first,) = await query(
            postgres_dsn,
            "SELECT record->'body'->>'v' AS v, at, kind FROM receiver.records WHERE seq = 1",
        )
        assert (first["v"], first["kind"], first["at"].year) == ("0.5", "reading", 2026)
        # The operator drops the month (docs/fleet.md): its records go, its keys stay, so the
        # appliance resending them (a restore from an old backup) stores nothing twice.
        await query(postgres_dsn, f"DROP TABLE receiver.{month}")
        store._partitions.clear()  # this replica learns of the drop at its next start
        again = await store.store_batch(batch_of(range(1, 11)))
        assert (again.stored, again.duplicates) == (0, 10)
        summary = await store.summary("ship-1")
        assert (summary["records"], summary["duplicates_ignored"]) == (10, 10)
    finally:
        await store.close()


async def test_a_record_jsonb_cannot_hold_keeps_its_exact_line(postgres_dsn: str) -> None:
    store = await PostgresStore.open(postgres_dsn)
    try:
        batch = batch_of(range(1, 3), body={"text": "nul\u0000inside"})
        assert (await store.store_batch(batch)).stored == 2
        again = await store.store_batch(batch)
        assert (again.stored, again.duplicates) == (0, 2)
        rows = await query(postgres_dsn, "SELECT record, line FROM receiver.records ORDER BY seq")
        assert [(row["record"], row["line"]) for row in rows] == [
            (None, r.line) for r in batch.records
        ]
    finally:
        await store.close()


async def test_the_database_down_is_a_retryable_503_and_nothing_half_stored(
    tmp_path: Path, postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    async with running(tmp_path / "replica", database=postgres_dsn) as client:
        status, _ = await client.put_batch("event-1-5", ndjson([record(s) for s in range(1, 6)]))
        assert status == 200
        postgres_server.kill()
        try:
            status, body = await client.put_batch(
                "event-6-10", ndjson([record(s) for s in range(6, 11)])
            )
            assert status == 503, body
            assert body["error"] == "database unavailable"
            async with client.session.get(
                client.url("/v1/appliances/ship-1/summary"), headers=bearer()
            ) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "5"
            # A payload whose bytes arrive while the index is unreachable: verified and kept,
            # answered 503 so the appliance asks again, and counted when it does.
            status, _, body = await client.patch(sha(PAYLOAD), PAYLOAD, 0, len(PAYLOAD))
            assert status == 503, body
            async with client.session.get(client.url("/healthz")) as response:
                health = await response.json()
                assert response.status == 503 and health["status"] == "degraded"
                assert [r.split(":")[0] for r in health["reasons"]] == ["database"]
        finally:
            postgres_server.start()
        status, headers, _ = await client.patch(sha(PAYLOAD), PAYLOAD, 0, len(PAYLOAD))
        assert (status, headers["Upload-Complete"]) == (204, "1")
        # Back up: the pool reconnects, the resend stores what the refused one did not.
        status, body = await client.put_batch(
            "event-6-10", ndjson([record(s) for s in range(6, 11)])
        )
        assert (status, body["stored"]) == (200, 5)
        assert [row[0] for row in await stored_records(client)] == list(range(1, 11))
        summary = await client.summary()
        assert (summary["records"], summary["batches"]) == (10, 2)
        assert (summary["payloads"], summary["payload_bytes"]) == (1, len(PAYLOAD))


async def test_a_payload_counts_once_whichever_replica_completes_it(
    tmp_path: Path, postgres_dsn: str
) -> None:
    data = b"x" * 3000
    digest = sha(data)
    async with replicas(tmp_path, postgres_dsn, 2) as clients:
        for client in clients:
            status, _, _ = await client.patch(digest, data, 0, len(data))
            assert status == 204
        summary = await clients[0].summary()
    assert (summary["payloads"], summary["payload_bytes"]) == (1, len(data))


def test_cli_receiver_on_postgres_serves_and_refuses_bad_database_files(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    serve = ["receiver", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")]
    # The URL is a secret: a file, never echoed back when it is wrong.
    bad = tmp_path / "bad-database"
    bad.write_text("host=db password=hunter2\n")
    assert cli_main([*serve, "--database-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--database-file" in err and "postgresql://" in err and "hunter2" not in err
    assert cli_main([*serve, "--database-file", str(tmp_path / "missing")]) == 2
    # Nothing listens there: exit 1 naming where, without the password.
    unreachable = tmp_path / "unreachable"
    unreachable.write_text(f"postgresql://shore:hunter2@127.0.0.1:{free_port()}/fleet\n")
    assert cli_main([*serve, "--database-file", str(unreachable)]) == 1
    err = capsys.readouterr().err
    assert "cannot open the receiver's database at 127.0.0.1:" in err and "hunter2" not in err

    database = tmp_path / "database"
    database.write_text(postgres_dsn + "\n")
    with receiver_process([*serve[1:], "--database-file", str(database)], tmp_path) as (url, log):
        request = urllib.request.Request(
            f"{url}/v1/appliances/ship-1/batches/event-1-3",
            data=gzip.compress(ndjson([record(seq) for seq in (1, 2, 3)])),
            method="PUT",
            headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["stored"] == 3
    listening = next(e for e in log_events(log) if e["msg"] == "receiver listening")
    assert listening["database"].startswith("postgresql 127.0.0.1:")
    rows = asyncio.run(query(postgres_dsn, "SELECT count(*) AS n FROM receiver.records"))
    assert rows[0]["n"] == 3
