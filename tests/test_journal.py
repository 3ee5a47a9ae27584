"""Tests of sync.journal: durable appends, group commit, close, seq, cursors, acks, shedding."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from config import JournalSection
from sync import (
    Journal,
    JournalClosed,
    JournalLocked,
    JournalMissing,
    JournalReader,
    NewRecord,
    PayloadError,
    PayloadRef,
    PayloadStore,
    Priority,
    StorageFull,
)
from sync.journal_open import SEQ_RESERVATION_FILE, read_seq_reservation, writer_lock_holder
from sync.records import RECORD_OVERHEAD_BYTES
from tests.conftest import APPLIANCE_ID

DESIGN_FIELDS = {
    "seq",
    "appliance_id",
    "boot_id",
    "ts",
    "mono_ns",
    "source",
    "kind",
    "priority",
    "model",
    "body",
    "payloads",
}


def rec(
    priority: Priority = Priority.TELEMETRY,
    kind: str = "reading",
    body: dict[str, Any] | None = None,
    source: str = "gearbox",
    **extra: Any,
) -> NewRecord:
    return NewRecord(source=source, kind=kind, priority=priority, body=body or {"v": 1.5}, **extra)


async def open_journal(
    data_dir: Path, settings: JournalSection | None = None, payloads: PayloadStore | None = None
) -> Journal:
    return await Journal.open(
        data_dir, appliance_id=APPLIANCE_ID, settings=settings, payloads=payloads
    )


def table_rows(data_dir: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with JournalReader.open(data_dir) as r:
        return r.conn.execute(sql, args).fetchall()


# ------------------------------------------------------------------------- append, durability


async def test_append_is_readable_by_another_connection_with_every_field(
    journal: Journal, data_dir: Path, payload_store: PayloadStore
) -> None:
    sha = (await payload_store.put(b"0123456789", "image/jpeg")).sha256
    moment = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    records = [
        rec(),
        NewRecord(
            source="deck",
            kind="detection",
            priority=Priority.ALERT,
            body={"label": "person", "score": 0.91, "zone": "bow", "text": "ünïcode"},
            model="yolov3-tiny@1",
            payloads=(PayloadRef(sha, 10, "image/jpeg"),),
            ts=moment,
            mono_ns=123_456_789,
        ),
        rec(Priority.SAMPLE, kind="sample", body={"window": [1, 2, 3]}),
    ]
    last = 0
    for record in records:
        before_ns = time.monotonic_ns()
        seq = await journal.append(record)
        assert seq > last
        last = seq
        # No close, no checkpoint: the record must already be committed for a reader to see it.
        with JournalReader.open(data_dir) as r:
            stored = r.get(seq)
        assert stored is not None
        as_dict = stored.to_dict()
        assert set(as_dict) == DESIGN_FIELDS
        assert as_dict["seq"] == seq
        assert as_dict["appliance_id"] == APPLIANCE_ID
        assert as_dict["boot_id"] == journal.boot_id
        assert as_dict["source"] == record.source
        assert as_dict["kind"] == record.kind
        assert stored.priority is record.priority
        assert as_dict["priority"] == record.priority.label
        assert as_dict["model"] == record.model
        assert as_dict["body"] == dict(record.body)
        assert as_dict["payloads"] == [p.sha256 for p in record.payloads]
        if record.ts is not None:
            assert stored.ts == "2024-05-01T12:30:15.123456Z"
        else:
            stamped = datetime.fromisoformat(stored.ts.replace("Z", "+00:00"))
            assert abs(stamped - datetime.now(UTC)) < timedelta(seconds=30)
            assert stored.ts.endswith("Z")
        if record.mono_ns is not None:
            assert stored.mono_ns == record.mono_ns
        else:
            assert before_ns <= stored.mono_ns <= time.monotonic_ns()


async def test_append_many_returns_consecutive_increasing_seqs(
    journal: Journal, data_dir: Path
) -> None:
    first = await journal.append_many([rec(body={"i": i}) for i in range(10)])
    second = await journal.append_many([rec(body={"i": i}) for i in range(10, 15)])
    seqs = first + second
    assert seqs == sorted(set(seqs))
    assert first == list(range(first[0], first[0] + 10))
    assert await journal.append_many([]) == []
    with JournalReader.open(data_dir) as r:
        assert [s.body["i"] for s in r.iter_records()] == list(range(15))


async def test_journal_file_is_wal_with_incremental_auto_vacuum(
    journal: Journal, data_dir: Path
) -> None:
    await journal.append(rec())
    with JournalReader.open(data_dir) as r:
        assert r.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert r.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    # synchronous=FULL: a commit is fsync'd before the writer reports it.
    synchronous = await journal.execute_write(
        lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0], transaction=False
    )
    assert synchronous == 2


def test_reader_on_a_directory_without_journal_raises_journal_missing(tmp_path: Path) -> None:
    with pytest.raises(JournalMissing) as raised:
        JournalReader.open(tmp_path)
    assert raised.value.path == str(tmp_path / "journal.db")
    assert not (tmp_path / "journal.db").exists()


async def test_counts_table_tracks_records_and_bytes(journal: Journal, data_dir: Path) -> None:
    await journal.append_many([rec(body={"i": i}) for i in range(7)])
    await journal.append_many([rec(Priority.ALERT, kind="detection") for _ in range(3)])
    with JournalReader.open(data_dir) as r:
        counts = {(p, k): (n, b) for p, k, n, b in r.counts()}
        real = r.conn.execute(
            "SELECT priority, kind, COUNT(*), SUM(size) FROM records GROUP BY priority, kind"
        ).fetchall()
    assert counts == {(Priority(p), k): (n, b) for p, k, n, b in real}
    assert counts[(Priority.TELEMETRY, "reading")][0] == 7
    assert counts[(Priority.ALERT, "detection")][0] == 3
    body = json.dumps({"v": 1.5}, separators=(",", ":"))
    assert counts[(Priority.ALERT, "detection")][1] == 3 * (len(body) + RECORD_OVERHEAD_BYTES)


async def test_boots_and_boot_id_are_recorded_per_open(data_dir: Path) -> None:
    boot_ids = []
    for _ in range(2):
        journal = await open_journal(data_dir)
        async with journal:
            seq = await journal.append(rec())
            boot_ids.append(journal.boot_id)
        with JournalReader.open(data_dir) as r:
            stored = r.get(seq)
            assert stored is not None and stored.boot_id == journal.boot_id
            assert r.meta("boot_id") == journal.boot_id
    assert boot_ids[0] != boot_ids[1]
    with JournalReader.open(data_dir) as r:
        assert r.meta("boots") == "2"
        assert r.meta("appliance_id") == APPLIANCE_ID


# ------------------------------------------------------------------------------ group commit


@pytest.mark.parametrize("journal_settings", [JournalSection(commit_records=50, commit_delay=0.05)])
async def test_group_commit_batches_concurrent_producers(journal: Journal, data_dir: Path) -> None:
    commits_before = journal.stats.commits
    seqs = await asyncio.gather(*(journal.append(rec(body={"i": i})) for i in range(600)))
    assert len(set(seqs)) == 600
    commits = journal.stats.commits - commits_before
    # 600 records at most 50 a batch: at least 12 commits, and far fewer than one per record.
    assert 12 <= commits <= 60
    assert journal.stats.largest_batch <= 50
    assert journal.stats.records >= 600
    with JournalReader.open(data_dir) as r:
        assert r.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 600
        # Producers got the seq of their own record.
        for i, seq in enumerate(seqs):
            stored = r.get(seq)
            assert stored is not None and stored.body == {"i": i}


@pytest.mark.parametrize("journal_settings", [JournalSection(commit_records=10, commit_delay=0.05)])
async def test_group_commit_does_not_overfill_a_batch_with_multi_record_appends(
    journal: Journal,
) -> None:
    sizes = [3, 4, 5, 2, 6, 1, 3, 4] * 10
    results = await asyncio.gather(*(journal.append_many([rec(body={"n": n})] * n) for n in sizes))
    assert [len(r) for r in results] == sizes
    assert journal.stats.largest_batch <= 10


@pytest.mark.parametrize("journal_settings", [JournalSection(commit_delay=2.0)])
async def test_lone_append_does_not_wait_for_commit_delay(journal: Journal) -> None:
    started = time.monotonic()
    for _ in range(3):
        await journal.append(rec())
    # Nothing else is outstanding, so each commit closes at once instead of after 2 s.
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("journal_settings", [JournalSection(commit_records=64, commit_delay=2.0)])
async def test_burst_larger_than_a_batch_does_not_wait_for_commit_delay(
    journal: Journal,
) -> None:
    started = time.monotonic()
    seqs = await asyncio.gather(*(journal.append(rec()) for _ in range(300)))
    assert len(set(seqs)) == 300
    # Every record is queued at once: no batch needs to wait for more to arrive.
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("journal_settings", [JournalSection(max_pending=4)])
async def test_backpressure_bounds_pending_and_loses_nothing(
    journal: Journal, data_dir: Path
) -> None:
    peak = 0

    async def produce(i: int) -> int:
        nonlocal peak
        seq = await journal.append(rec(body={"i": i}))
        peak = max(peak, journal.pending)
        return seq

    seqs = await asyncio.gather(*(produce(i) for i in range(200)))
    assert len(set(seqs)) == 200
    assert peak <= 4
    assert journal.pending == 0
    with JournalReader.open(data_dir) as r:
        assert r.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 200


@pytest.mark.parametrize("journal_settings", [JournalSection(max_pending=1)])
async def test_cancelled_producer_keeps_record_and_releases_its_slot(
    journal: Journal, data_dir: Path
) -> None:
    task = asyncio.create_task(journal.append(rec(body={"cancelled": True})))
    await asyncio.sleep(0)  # the record is handed to the writer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # With one slot only, this would hang if the cancelled append had kept it.
    seq = await asyncio.wait_for(journal.append(rec(body={"after": True})), 5)
    with JournalReader.open(data_dir) as r:
        bodies = [s.body for s in r.iter_records()]
    assert bodies == [{"cancelled": True}, {"after": True}]
    assert seq == 2


# ------------------------------------------------------------------------------------ close


@pytest.mark.parametrize("journal_settings", [JournalSection(commit_records=16, commit_delay=0.5)])
async def test_close_commits_everything_queued_and_is_idempotent(
    journal: Journal, data_dir: Path
) -> None:
    tasks = [asyncio.create_task(journal.append(rec(body={"i": i}))) for i in range(500)]
    await asyncio.sleep(0)  # every task has handed its record to the writer
    await asyncio.gather(journal.close(), journal.close())
    await journal.close()
    assert journal.closed
    seqs = await asyncio.gather(*tasks)
    assert len(set(seqs)) == 500
    with JournalReader.open(data_dir) as r:
        assert r.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 500
        for i, seq in enumerate(seqs):
            stored = r.get(seq)
            assert stored is not None and stored.body == {"i": i}
    with pytest.raises(JournalClosed):
        await journal.append(rec())
    with pytest.raises(JournalClosed):
        await journal.append_many([rec()])


async def test_reads_and_writes_after_close_raise_journal_closed(journal: Journal) -> None:
    assert await journal.read(JournalReader.max_seq) == 0
    await journal.close()
    with pytest.raises(JournalClosed):
        await journal.read(JournalReader.max_seq)
    with pytest.raises(JournalClosed):
        await journal.execute_write(lambda conn: conn.execute("SELECT 1").fetchone())
    with pytest.raises(JournalClosed):
        await journal.acknowledge("shore", Priority.EVENT, 1, 1, "b")


async def test_close_leaves_no_wal_and_a_consistent_file(data_dir: Path) -> None:
    journal = await open_journal(data_dir)
    await journal.append_many([rec() for _ in range(50)])
    await journal.close()
    wal = data_dir / "journal.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    with JournalReader.open(data_dir) as r:
        assert r.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --------------------------------------------------------------------------------------- seq


async def test_seq_never_reused_after_eviction_of_the_highest_and_reopen(data_dir: Path) -> None:
    journal = await open_journal(data_dir)
    async with journal:
        seqs = await journal.append_many([rec(body={"i": i}) for i in range(20)])
        high = seqs[-1]
        # What retention does to the newest records: they are gone from the table.
        await journal.execute_write(
            lambda conn: conn.execute("DELETE FROM records WHERE seq > ?", (seqs[4],))
        )
        assert await journal.read(JournalReader.max_seq) == seqs[4]
        assert await journal.append(rec()) == high + 1
    for _ in range(2):
        journal = await open_journal(data_dir)
        async with journal:
            await journal.execute_write(
                lambda conn: conn.execute("DELETE FROM records WHERE seq > 5")
            )
        journal = await open_journal(data_dir)
        async with journal:
            nxt = await journal.append(rec())
        assert nxt > high
        high = nxt
    assert read_seq_reservation(data_dir) >= high


async def test_seq_reservation_sidecar_covers_every_seq(journal: Journal, data_dir: Path) -> None:
    sidecar = data_dir / SEQ_RESERVATION_FILE
    for _ in range(3):
        seqs = await journal.append_many([rec() for _ in range(100)])
        assert sidecar.exists()
        assert int(sidecar.read_text().strip()) >= seqs[-1]
    assert not (data_dir / f"{SEQ_RESERVATION_FILE}.tmp").exists()


async def test_lost_journal_file_does_not_restart_seq_below_the_reservation(
    data_dir: Path,
) -> None:
    journal = await open_journal(data_dir)
    async with journal:
        seqs = await journal.append_many([rec() for _ in range(30)])
    reserved = read_seq_reservation(data_dir)
    assert reserved >= seqs[-1]
    # journal.db is gone (deleted by hand, or a crash between quarantine and salvage) while
    # the sidecar survives: seqs up to the reservation may already have shipped.
    (data_dir / "journal.db").unlink()
    journal = await open_journal(data_dir)
    async with journal:
        assert await journal.append(rec()) > reserved


# -------------------------------------------------------------------------------- cursors


async def test_records_after_returns_one_priority_in_seq_order_bounded(
    journal: Journal,
) -> None:
    order = [Priority.TELEMETRY, Priority.EVENT, Priority.ALERT, Priority.EVENT, Priority.SAMPLE]
    records = [rec(order[i % len(order)], body={"i": i}) for i in range(100)]
    seqs = await journal.append_many(records)
    events = [s for s, r in zip(seqs, records, strict=True) if r.priority is Priority.EVENT]
    batch = await journal.read(
        lambda r: r.records_after(Priority.EVENT, 0, limit=10, max_bytes=1 << 30)
    )
    assert [s.seq for s in batch] == events[:10]
    assert all(s.priority is Priority.EVENT for s in batch)
    after = await journal.read(
        lambda r: r.records_after(Priority.EVENT, events[9], limit=1000, max_bytes=1 << 30)
    )
    assert [s.seq for s in after] == events[10:]
    # Byte bound: every record here costs the same, so exactly three fit.
    one = len(json.dumps({"i": 10}, separators=(",", ":"))) + RECORD_OVERHEAD_BYTES
    three = await journal.read(
        lambda r: r.records_after(Priority.EVENT, events[3], limit=100, max_bytes=3 * one + 1)
    )
    assert [s.seq for s in three] == events[4:7]
    assert (
        await journal.read(
            lambda r: r.records_after(Priority.EVENT, events[-1], limit=10, max_bytes=10**6)
        )
        == []
    )


async def test_records_after_returns_at_least_one_record_bigger_than_max_bytes(
    journal: Journal,
) -> None:
    big = await journal.append(rec(Priority.SAMPLE, body={"blob": "x" * 20_000}))
    small = await journal.append(rec(Priority.SAMPLE))
    first = await journal.read(
        lambda r: r.records_after(Priority.SAMPLE, 0, limit=10, max_bytes=100)
    )
    assert [s.seq for s in first] == [big]
    second = await journal.read(
        lambda r: r.records_after(Priority.SAMPLE, big, limit=10, max_bytes=100)
    )
    assert [s.seq for s in second] == [small]


async def test_cursor_walk_visits_every_record_exactly_once(
    journal: Journal, data_dir: Path
) -> None:
    sizes = [0, 10, 200, 3]
    records = [
        rec(Priority(1 + i % 4), body={"i": i, "pad": "p" * sizes[i % 4]}) for i in range(5000)
    ]
    seqs: list[int] = []
    for start in range(0, len(records), 1000):
        seqs += await journal.append_many(records[start : start + 1000])
    with JournalReader.open(data_dir) as r:
        for priority in Priority:
            expected = [s for s, x in zip(seqs, records, strict=True) if x.priority is priority]
            seen: list[int] = []
            cursor = 0
            while True:
                batch = r.records_after(priority, cursor, limit=37, max_bytes=2_000)
                if not batch:
                    break
                assert len(batch) <= 37
                assert sum(len(b.body_json) for b in batch) <= 2_000 or len(batch) == 1
                seen += [b.seq for b in batch]
                cursor = batch[-1].seq
            assert seen == expected


async def test_acknowledge_moves_cursor_forward_only_and_records_acks(
    journal: Journal, data_dir: Path
) -> None:
    await journal.append_many([rec(Priority.EVENT) for _ in range(30)])
    with JournalReader.open(data_dir) as r:
        assert r.synced_through() == dict.fromkeys(Priority, 0)
    await journal.register_destination("shore")
    with JournalReader.open(data_dir) as r:
        assert r.synced_through() == dict.fromkeys(Priority, 0)
    await journal.acknowledge("shore", Priority.EVENT, 1, 20, "batch-1")
    await journal.acknowledge("shore", Priority.EVENT, 1, 10, "batch-old")  # a late duplicate
    rows = table_rows(
        data_dir, "SELECT acked_seq FROM cursors WHERE destination = 'shore' AND priority = 2"
    )
    assert rows == [(20,)]
    acks = table_rows(
        data_dir, "SELECT destination, priority, first_seq, last_seq, batch_id FROM acks"
    )
    assert acks == [("shore", 2, 1, 20, "batch-1"), ("shore", 2, 1, 10, "batch-old")]
    with JournalReader.open(data_dir) as r:
        synced = r.synced_through()
        assert synced[Priority.EVENT] == 20
        assert synced[Priority.ALERT] == 0
        assert r.unsynced()[Priority.EVENT][0] == 10
    # A second destination holds synced back until it too has acknowledged.
    await journal.register_destination("usb")
    await journal.register_destination("usb")  # idempotent: keeps no duplicate rows
    with JournalReader.open(data_dir) as r:
        assert r.synced_through()[Priority.EVENT] == 0
    await journal.acknowledge("usb", Priority.EVENT, 1, 15, "usb-1")
    with JournalReader.open(data_dir) as r:
        assert r.synced_through()[Priority.EVENT] == 15


async def test_acknowledge_is_one_transaction(journal: Journal, data_dir: Path) -> None:
    await journal.register_destination("shore")

    def break_cursors(conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TRIGGER no_cursor BEFORE UPDATE ON cursors "
            "BEGIN SELECT RAISE(ABORT, 'cursor update refused'); END"
        )

    await journal.execute_write(break_cursors)
    with pytest.raises(sqlite3.IntegrityError, match="cursor update refused"):
        await journal.acknowledge("shore", Priority.ALERT, 1, 5, "b-1")
    # The cursor could not move, so the acknowledgement was not recorded either.
    assert table_rows(data_dir, "SELECT COUNT(*) FROM acks") == [(0,)]
    await journal.execute_write(lambda conn: conn.execute("DROP TRIGGER no_cursor"))
    await journal.acknowledge("shore", Priority.ALERT, 1, 5, "b-1")
    assert table_rows(data_dir, "SELECT COUNT(*) FROM acks") == [(1,)]


# ----------------------------------------------------------------------------- bad bodies


@pytest.mark.parametrize(
    "body",
    [
        {"v": float("nan")},
        {"v": [1.0, float("inf")]},
        {"v": {1, 2}},
        {"when": datetime(2024, 1, 1, tzinfo=UTC)},
        {"raw": b"bytes"},
    ],
    ids=["nan", "inf", "set", "datetime", "bytes"],
)
async def test_body_that_is_not_json_raises_value_error_and_writes_nothing(
    journal: Journal, data_dir: Path, body: dict[str, Any]
) -> None:
    await journal.append(rec())
    with pytest.raises(ValueError):
        await journal.append(rec(body=body))
    with pytest.raises(ValueError):
        await journal.append_many([rec(body={"fine": 1}), rec(body=body)])
    assert await journal.append(rec()) == 2
    with JournalReader.open(data_dir) as r:
        assert r.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 2


# ---------------------------------------------------------------------------------- shedding


async def test_shedding_drops_telemetry_counts_it_and_keeps_alerts(
    journal: Journal, data_dir: Path
) -> None:
    journal.shed_level = 1
    with pytest.raises(StorageFull) as raised:
        await journal.append(rec(Priority.TELEMETRY))
    assert raised.value.priority == "telemetry"
    assert raised.value.retryable
    assert journal.stats.dropped[("telemetry", "disk_full")] == 1
    alert = await journal.append(rec(Priority.ALERT, kind="detection"))
    forced = await journal.append(rec(Priority.TELEMETRY, kind="health"), force=True)
    assert forced > alert
    with JournalReader.open(data_dir) as r:
        assert r.drops() == [(Priority.TELEMETRY, "disk_full", 1)]
        assert [s.kind for s in r.iter_records()] == ["detection", "health"]


@pytest.mark.parametrize(
    ("level", "shed"),
    [
        (1, {Priority.TELEMETRY}),
        (2, {Priority.TELEMETRY, Priority.SAMPLE}),
        (3, {Priority.TELEMETRY, Priority.SAMPLE, Priority.EVENT}),
    ],
)
async def test_shed_levels_shed_the_lowest_priorities_only(
    journal: Journal, data_dir: Path, level: int, shed: set[Priority]
) -> None:
    journal.shed_level = level
    for priority in Priority:
        if priority in shed:
            with pytest.raises(StorageFull):
                await journal.append(rec(priority), wait_for_space=False)
        else:
            await journal.append(rec(priority), wait_for_space=False)
    # A batch is shed as one by its most important record.
    if Priority.EVENT not in shed:
        await journal.append_many([rec(Priority.EVENT), rec(Priority.TELEMETRY)])
    await journal.append(rec(Priority.ALERT))  # a later commit flushes the drop counts
    with JournalReader.open(data_dir) as r:
        assert {p for p, _, _ in r.drops()} == shed
        kept = {s.priority for s in r.iter_records()}
    assert kept.isdisjoint(shed - {Priority.TELEMETRY})
    assert sum(journal.stats.dropped.values()) == len(shed)


async def test_drops_are_flushed_at_close_without_a_later_commit(data_dir: Path) -> None:
    journal = await open_journal(data_dir)
    async with journal:
        journal.shed_level = 2
        for _ in range(3):
            with pytest.raises(StorageFull):
                await journal.append(rec(Priority.SAMPLE, kind="sample"))
        journal.count_drop(Priority.EVENT, "payload_disk_full", 2)
    with JournalReader.open(data_dir) as r:
        assert sorted(r.drops()) == [
            (Priority.EVENT, "payload_disk_full", 2),
            (Priority.SAMPLE, "disk_full", 3),
        ]
    assert journal.stats.dropped[("sample", "disk_full")] == 3
    assert journal.stats.dropped[("event", "payload_disk_full")] == 2


# ------------------------------------------------------------------------------ data quality


async def test_data_quality_records_add_to_quality_table(journal: Journal, data_dir: Path) -> None:
    await journal.append(
        rec(Priority.EVENT, kind="data_quality", source="csv-a", body={"counts": {"gap": 2}})
    )
    await asyncio.gather(
        journal.append(
            rec(
                Priority.EVENT,
                kind="data_quality",
                source="csv-a",
                body={"counts": {"gap": 3, "parse_error": 1}, "examples": []},
            )
        ),
        journal.append(
            rec(Priority.EVENT, kind="data_quality", source="csv-b", body={"counts": {"nan": 4}})
        ),
        # Not a data_quality record: its counts are just a body.
        journal.append(rec(Priority.EVENT, kind="reading", body={"counts": {"gap": 100}})),
    )
    with JournalReader.open(data_dir) as r:
        assert r.quality() == [
            ("csv-a", "gap", 5),
            ("csv-a", "parse_error", 1),
            ("csv-b", "nan", 4),
        ]


@pytest.mark.parametrize("counts", [{"gap": "many"}, {"gap": None}, {"gap": [1]}])
async def test_data_quality_with_bad_counts_is_refused_and_journal_keeps_working(
    journal: Journal, data_dir: Path, counts: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await asyncio.wait_for(
            journal.append(rec(Priority.EVENT, kind="data_quality", body={"counts": counts})), 5
        )
    seq = await asyncio.wait_for(journal.append(rec()), 5)
    with JournalReader.open(data_dir) as r:
        assert r.quality() == []
        assert r.max_seq() == seq


# -------------------------------------------------------------------------------- payload refs


async def test_payload_refs_are_counted_per_record(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    shared = await payload_store.put(b"shared snapshot", "image/jpeg")
    own = await payload_store.put(b"own clip")
    await journal.append(rec(Priority.SAMPLE, payloads=(shared,)))
    await journal.append(rec(Priority.ALERT, payloads=(shared, own)))
    with JournalReader.open(data_dir) as r:
        rows = r.payload_rows()
        assert rows[shared.sha256] == (shared.size, 2, "present")
        assert rows[own.sha256] == (own.size, 1, "present")
        assert r.payload_totals() == (2, shared.size + own.size, 0)


async def test_a_record_whose_payload_file_vanished_is_refused(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    ref = await payload_store.put(b"snapshot bytes")
    payload_store.delete(ref.sha256)  # as retention would, between put and append
    with pytest.raises(PayloadError, match="vanished"):
        await journal.append(rec(payloads=(ref,)))
    # The writer is unharmed and the next records go through.
    assert await journal.append(rec()) > 0


async def test_only_one_writer_per_data_directory(journal: Journal, data_dir: Path) -> None:
    with pytest.raises(JournalLocked, match=f"pid {os.getpid()}"):
        await Journal.open(data_dir, appliance_id="second")
    assert writer_lock_holder(data_dir) == f"pid {os.getpid()}"
    await journal.close()
    assert writer_lock_holder(data_dir) is None
    again = await Journal.open(data_dir, appliance_id="second")
    await again.close()


async def test_a_stored_record_as_one_json_line_is_the_json_of_its_dict(journal: Journal) -> None:
    bodies: list[dict[str, object]] = [
        {"v": 0.1, "n": -3, "big": 2**60, "f": 1e-300, "t": True, "none": None},
        {"text": 'quote " backslash \\ newline \n tab \t é ☃ \u2028 \x01', "list": [1, [2, {}]]},
        {},
    ]
    for index, body in enumerate(bodies):
        await journal.append(
            NewRecord("cam", "reading", Priority.EVENT, body, model="m@1" if index else None)
        )
    rows = await journal.read(
        lambda r: r.records_after(Priority.EVENT, 0, limit=10, max_bytes=1 << 20)
    )
    assert len(rows) == len(bodies)
    for row in rows:
        expected = json.dumps(row.to_dict(), separators=(",", ":"), ensure_ascii=False)
        assert row.to_json_line() == expected
        assert json.loads(row.to_json_line())["body"] == row.body


async def test_the_last_known_position_is_stamped_on_every_record(
    journal: Journal, data_dir: Path
) -> None:
    fix: dict[str, Any] | None = None
    journal.position_source = lambda: fix
    await journal.append(
        NewRecord(source="a", kind="reading", priority=Priority.TELEMETRY, body={})
    )
    fix = {"lat": 59.91, "lon": 10.75, "fix_ts": "2026-11-23T12:00:00.000Z"}
    await journal.append(
        NewRecord(source="a", kind="reading", priority=Priority.TELEMETRY, body={"x": 1})
    )
    # A record that knows better (a replay of old data with its own position) keeps its own.
    own = {"position": {"lat": 1.0, "lon": 2.0}}
    await journal.append(
        NewRecord(source="a", kind="reading", priority=Priority.TELEMETRY, body=own)
    )
    with JournalReader.open(data_dir) as reader:
        bodies = [r.body for r in reader.iter_records()]
    assert bodies == [{}, {"x": 1, "position": fix}, own]


def test_a_journal_file_without_its_tables_yet_reads_as_missing(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(data_dir / "journal.db").close()  # what the writer has in its first instant
    with pytest.raises(JournalMissing, match="being created"):
        JournalReader.open(data_dir)


async def test_slow_figures_do_not_hold_up_the_engines_reads(journal: Journal) -> None:
    """A backlog count over a full journal takes tens of seconds cold: it runs on a reader of
    its own (`read_figures`), and the engines' reads (`read`) go on meanwhile."""
    await journal.append(NewRecord("src", "reading", Priority.TELEMETRY, {"i": 1}))
    release = threading.Event()
    started = threading.Event()

    def slow_figures(reader: JournalReader) -> int:
        started.set()
        release.wait(30)
        return reader.max_seq()

    figures = asyncio.ensure_future(journal.read_figures(slow_figures))
    await asyncio.to_thread(started.wait, 30)
    assert await asyncio.wait_for(journal.read(JournalReader.max_seq), 10) == 1
    assert not figures.done()
    release.set()
    assert await figures == 1
