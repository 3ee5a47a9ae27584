"""The `RecordStore` contract (receiver/backend.py), the same tests on every store the receiver
has: receiver.db, PostgreSQL (a real server), and the in-memory fake the handlers' unit tests
use (tests/fake_store.py), so the fake cannot drift from the real ones. Then unit tests of the
handlers on the fake: a store that stops answering is a retryable 503 on every route that needs
it, and nothing is acknowledged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from receiver import build_receiver_app, serve_receiver
from receiver.backend import (
    PublishedPackage,
    RecordFilter,
    RecordStore,
    format_ts,
    new_token_entry,
)
from receiver.batches import BatchRecord, IncomingBatch
from receiver.postgres import PostgresStore
from receiver.protocol import Refusal
from receiver.store import ReceiverStore
from tests.fake_store import MemoryStore
from tests.test_receiver import TOKENS, ndjson, record

NOW = 1_796_000_000.0  # 2026-11-29T...Z: every store's clock in these tests
JOURNAL = "0123456789abcdef0123456789abcdef"
OTHER_JOURNAL = "fedcba9876543210fedcba9876543210"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RecordStore]:
    opened: RecordStore
    if request.param == "memory":
        opened = MemoryStore(clock=lambda: NOW)
    elif request.param == "sqlite":
        opened = await ReceiverStore.open(tmp_path / "receiver", clock=lambda: NOW)
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        opened = await PostgresStore.open(dsn, clock=lambda: NOW)
    try:
        yield opened
    finally:
        await opened.close()


def line_of(seq: int, appliance_id: str = "ship-1", **fields: Any) -> dict[str, Any]:
    value = record(seq, appliance_id=appliance_id, ts=format_ts(NOW - 3600 + seq))
    value.update(fields)
    return value


def batch(
    seqs: range,
    *,
    appliance_id: str = "ship-1",
    journal_id: str = JOURNAL,
    priority: str = "event",
    batch_id: str | None = None,
    **fields: Any,
) -> IncomingBatch:
    values = [
        line_of(seq, appliance_id, priority=priority, journal_id=journal_id, **fields)
        for seq in seqs
    ]
    return IncomingBatch(
        appliance_id=appliance_id,
        journal_id=journal_id,
        batch_id=batch_id or f"{priority}-{seqs[0]}-{seqs[-1]}",
        priority=priority,
        first_seq=seqs[0],
        last_seq=seqs[-1],
        records=[
            BatchRecord(v["seq"], v["kind"], v["ts"], json.dumps(v, separators=(",", ":")))
            for v in values
        ],
    )


async def test_records_once_duplicates_counted(store: RecordStore) -> None:
    first = await store.store_batch(batch(range(1, 6)))
    assert (first.stored, first.duplicates) == (5, 0)
    again = await store.store_batch(batch(range(1, 6)))
    assert (again.stored, again.duplicates) == (0, 5)
    overlap = await store.store_batch(batch(range(4, 9)))
    assert (overlap.stored, overlap.duplicates) == (3, 2)
    summary = await store.summary("ship-1")
    assert (summary["records"], summary["max_seq"], summary["duplicates_ignored"]) == (8, 8, 7)
    assert summary["batches"] == 2
    (journal,) = summary["journals"]
    assert journal["journal_id"] == JOURNAL and journal["records"] == 8
    assert journal["first_seen"] == journal["last_seen"] == format_ts(NOW)
    assert (await store.summary("nobody"))["records"] == 0


async def test_a_conflict_stores_nothing_and_is_counted(store: RecordStore) -> None:
    await store.store_batch(batch(range(1, 4)))
    with pytest.raises(Refusal) as refused:
        await store.store_batch(batch(range(2, 6), body={"other": True}))
    assert refused.value.status == 409
    assert refused.value.extra["conflicting_seqs"] == [2, 3]
    summary = await store.summary("ship-1")
    assert summary["records"] == 3  # 4 and 5 were not stored either
    assert summary["journals"][0]["conflicts_refused"] == 2


async def test_two_journals_shipping_at_once_are_flagged(store: RecordStore) -> None:
    await store.store_batch(batch(range(1, 3)))
    result = await store.store_batch(batch(range(1, 3), journal_id=OTHER_JOURNAL))
    assert result.concurrent_journals == sorted([JOURNAL, OTHER_JOURNAL])
    assert result.concurrency_changed
    again = await store.store_batch(batch(range(3, 4), journal_id=OTHER_JOURNAL))
    assert again.concurrent_journals == result.concurrent_journals
    assert not again.concurrency_changed
    assert (await store.summary("ship-1"))["concurrent_journals"] == result.concurrent_journals


async def test_payloads_are_counted_once(store: RecordStore) -> None:
    digest = "ab" * 32
    await store.record_payload("ship-1", digest, 1234, JOURNAL)
    await store.record_payload("ship-1", digest, 1234, JOURNAL)
    summary = await store.summary("ship-1")
    assert (summary["payloads"], summary["payload_bytes"]) == (1, 1234)
    assert await store.payload_size("ship-1", digest) == 1234
    assert await store.payload_size("ship-2", digest) is None


async def test_tokens_kept_listed_and_revoked(store: RecordStore) -> None:
    one = new_token_entry("token-one", "appliance", "ship-1", "bridge PC")
    admin = new_token_entry("token-admin", "admin", None)
    await store.add_token(one)
    await store.add_token(admin)
    with pytest.raises(ValueError, match="already kept"):
        await store.add_token(new_token_entry("token-one", "appliance", "ship-2"))
    assert await store.revoke_tokens(appliance_id="ship-1") == 1
    assert await store.revoke_tokens(appliance_id="ship-1") == 0
    assert await store.revoke_tokens(token_id=admin.token_id) == 1
    kept = {entry.token_id: entry for entry in await store.tokens()}
    assert set(kept) == {one.token_id, admin.token_id}
    assert all(entry.revoked_at is not None for entry in kept.values())
    assert kept[one.token_id].digest == one.digest and kept[one.token_id].label == "bridge PC"


async def test_packages_saved_and_retargeted(store: RecordStore) -> None:
    package = PublishedPackage("cars", "1.0.0", "cd" * 32, 99, ("ship-1",), (), format_ts(NOW))
    assert await store.save_package(package) == package
    moved = await store.save_package(
        PublishedPackage("cars", "1.0.0", "cd" * 32, 99, (), ("north",), format_ts(NOW + 5))
    )
    assert (moved.appliances, moved.groups, moved.published_at) == ((), ("north",), format_ts(NOW))
    assert await store.package_by_sha256("cd" * 32) == moved
    assert await store.package_by_version("cars", "1.0.0") == moved
    assert await store.package_by_version("cars", "2.0.0") is None
    assert await store.packages() == [moved]


async def test_records_after_in_commit_order(store: RecordStore) -> None:
    await store.store_batch(batch(range(1, 4)))
    await store.store_batch(batch(range(1, 3), appliance_id="ship-2", priority="alert"))
    await store.store_batch(batch(range(4, 6)))
    seen, cursor = [], None
    while True:
        page = await store.records_after(cursor, RecordFilter(), 2)
        seen += [(r.appliance_id, r.seq) for r in page.records]
        cursor = page.cursor
        if not page.more:
            break
    ship_1, ship_2 = [("ship-1", s) for s in range(1, 6)], [("ship-2", 1), ("ship-2", 2)]
    assert seen == [*ship_1[:3], *ship_2, *ship_1[3:]]
    first = (await store.records_after(None, RecordFilter(), 1)).records[0]
    assert json.loads(first.line) == line_of(1, priority="event", journal_id=JOURNAL)
    assert first.journal_id == JOURNAL and first.received_at == format_ts(NOW)
    alerts = await store.records_after(None, RecordFilter(priorities=("alert",)), 10)
    assert [(r.appliance_id, r.seq) for r in alerts.records] == [("ship-2", 1), ("ship-2", 2)]
    assert (await store.records_after(alerts.cursor, RecordFilter(), 10)).records == []
    with pytest.raises(Refusal) as refused:
        await store.records_after("no such cursor", RecordFilter(), 10)
    assert refused.value.status == 400


async def test_fleet_figures(store: RecordStore) -> None:
    await store.store_batch(batch(range(1, 4)))
    await store.store_batch(batch(range(4, 6), priority="alert", kind="anomaly"))
    old_alert = line_of(6, priority="alert", journal_id=JOURNAL, ts=format_ts(NOW - 3 * 86400))
    health = {"state": "degraded", "reasons": ["disk"], "version": "1.2.3", "backlog": {}}
    old_health = {**health, "state": "ok", "version": "1.2.2"}
    lines = [
        old_alert,
        line_of(7, kind="health", priority="telemetry", journal_id=JOURNAL, body=old_health),
        line_of(8, kind="health", priority="telemetry", journal_id=JOURNAL, body=health),
    ]
    for value in lines:
        one = IncomingBatch(
            "ship-1",
            JOURNAL,
            f"{value['priority']}-{value['seq']}-{value['seq']}",
            value["priority"],
            value["seq"],
            value["seq"],
            [BatchRecord(value["seq"], value["kind"], value["ts"], json.dumps(value))],
        )
        await store.store_batch(one)
    await store.record_payload("ship-1", "ef" * 32, 500, JOURNAL)
    await store.store_batch(batch(range(1, 2), appliance_id="ship-2"))
    figures = await store.fleet()
    assert figures.now_s == NOW
    assert [row.appliance_id for row in figures.rows] == ["ship-1", "ship-2"]
    ship = figures.rows[0]
    assert (ship.records, ship.records_today, ship.alerts_24h) == (8, 8, 2)
    assert (ship.payloads_today, ship.payload_bytes_today) == (1, 500)
    assert ship.health_ts == lines[2]["ts"] and ship.health is not None
    assert (ship.health["state"], ship.health["version"]) == ("degraded", "1.2.3")
    assert figures.rows[1].health is None and figures.rows[1].alerts_24h == 0
    (only,) = (await store.fleet("ship-2")).rows
    assert only.appliance_id == "ship-2"
    assert (await store.fleet("nobody")).rows == []
    recent = await store.recent_records("ship-1", 2)
    assert [r.seq for r in recent.alerts] == [5, 4]


async def test_recent_media_with_the_payloads_held(store: RecordStore) -> None:
    held, missing = "aa" * 32, "bb" * 32
    await store.store_batch(batch(range(1, 2), kind="object", payloads=[held]))
    await store.store_batch(batch(range(2, 3), kind="clip", payloads=[missing]))
    await store.store_batch(batch(range(3, 4)))
    await store.record_payload("ship-1", held, 77, JOURNAL)
    recent = await store.recent_records("ship-1", 10)
    assert [r.seq for r in recent.media] == [2, 1]
    assert recent.payloads == {held: 77}


# ------------------------------------------------------------- the handlers, on the fake


async def test_a_store_that_stops_answering_is_a_retryable_503_everywhere(
    tmp_path: Path,
) -> None:
    fake = MemoryStore()
    app = build_receiver_app(tmp_path, TOKENS, admin_tokens=("admin-token",), store=fake)
    headers = {
        "Authorization": f"Bearer {TOKENS['ship-1']}",
        "Content-Type": "application/x-ndjson",
    }
    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        aiohttp.ClientSession() as session,
    ):
        base = f"http://127.0.0.1:{addresses[0][1]}"
        put = f"{base}/v1/appliances/ship-1/batches/event-1-2"
        body = ndjson([record(1), record(2)])
        fake.available = False
        async with session.put(put, data=body, headers=headers) as answer:
            assert answer.status == 503 and answer.headers["Retry-After"] == "5"
            assert (await answer.json())["error"] == "database unavailable"
        async with session.get(f"{base}/healthz") as answer:
            assert answer.status == 503
            assert [r.split(":")[0] for r in (await answer.json())["reasons"]] == ["database"]
        async with session.get(
            f"{base}/v1/records", headers={"Authorization": "Bearer admin-token"}
        ) as answer:
            assert answer.status == 503
        assert fake.rows == {}  # nothing half-stored, nothing acknowledged
        fake.available = True
        async with session.put(put, data=body, headers=headers) as answer:
            assert answer.status == 200 and (await answer.json())["stored"] == 2
        async with session.get(f"{base}/healthz") as answer:
            assert answer.status == 200
    assert fake.closed  # the app closes the store it was given
