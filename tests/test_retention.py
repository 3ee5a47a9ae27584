"""Tests of sync.retention: eviction order under the disk budget, synced data first, keep_synced,
accounting of every eviction, payload clean-up and real shrinking of journal.db."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from config import StorageSection
from sync import (
    Journal,
    JournalReader,
    NewRecord,
    PayloadRef,
    PayloadStore,
    Priority,
    StorageGuard,
    StoredRecord,
)

PAD = "p" * 400


def storage(**overrides: Any) -> StorageSection:
    """Settings where only the budget matters: the real disk's free space plays no part."""
    values: dict[str, Any] = {
        "disk_budget": 10**12,
        "keep_synced": 0,
        "min_free": 0,
        "reserve": 0,
    }
    values.update(overrides)
    return StorageSection(**values)


def reading(priority: Priority, i: int, **extra: Any) -> NewRecord:
    return NewRecord(
        source="gearbox", kind="reading", priority=priority, body={"i": i, "pad": PAD}, **extra
    )


async def fill(journal: Journal, per_priority: int) -> list[int]:
    """per_priority records of each priority, interleaved in seq order; WAL checkpointed."""
    seqs = await journal.append_many(
        [reading(Priority(1 + i % 4), i) for i in range(4 * per_priority)]
    )
    await journal.checkpoint()
    return seqs


async def used_bytes(journal: Journal, store: PayloadStore) -> int:
    async with StorageGuard(journal, store, storage()) as probe:
        return (await probe.usage()).used


async def budget_for(journal: Journal, store: PayloadStore, fraction: float) -> int:
    """A budget of `fraction` of what the records and payloads take now. The empty journal's
    own pages (a root page per table and index: 16 KiB each) stay whatever is evicted."""
    fixed = await journal.read(JournalReader.fixed_bytes)
    return fixed + int((await used_bytes(journal, store) - fixed) * fraction)


def remaining(data_dir: Path, kind: str = "reading") -> Counter[Priority]:
    with JournalReader.open(data_dir) as r:
        rows = r.conn.execute(
            "SELECT priority, COUNT(*) FROM records WHERE kind = ? GROUP BY priority", (kind,)
        ).fetchall()
    return Counter({Priority(p): n for p, n in rows})


def evicted(data_dir: Path) -> Counter[Priority]:
    with JournalReader.open(data_dir) as r:
        out: Counter[Priority] = Counter()
        for priority, _reason, records, _bytes in r.evictions():
            out[priority] += records
        return out


def eviction_records(data_dir: Path) -> list[StoredRecord]:
    with JournalReader.open(data_dir) as r:
        return list(r.iter_records(kind="eviction"))


def assert_accounts_agree(data_dir: Path) -> None:
    """counts matches the records table; journalled eviction bodies match the evictions table."""
    with JournalReader.open(data_dir) as r:
        counts = {(p, k): (n, b) for p, k, n, b in r.counts()}
        real = r.conn.execute(
            "SELECT priority, kind, COUNT(*), SUM(size) FROM records GROUP BY priority, kind"
        ).fetchall()
        assert counts == {(Priority(p), k): (n, b) for p, k, n, b in real}
        table = {(p.label, reason): (n, b) for p, reason, n, b in r.evictions()}
        journalled: Counter[tuple[str, str]] = Counter()
        journalled_bytes: Counter[tuple[str, str]] = Counter()
        for record in r.iter_records(kind="eviction"):
            assert record.priority is Priority.EVENT
            assert record.source == "retention"
            for label, tally in record.body["evicted"].items():
                journalled[(label, record.body["reason"])] += tally["records"]
                journalled_bytes[(label, record.body["reason"])] += tally["bytes"]
        assert {k: (journalled[k], journalled_bytes[k]) for k in journalled} == table


# --------------------------------------------------------------------------------- the order


@pytest.mark.parametrize(
    ("fraction", "gone", "partly", "untouched"),
    [
        (0.7, {Priority.TELEMETRY}, Priority.SAMPLE, {Priority.EVENT, Priority.ALERT}),
        (0.4, {Priority.TELEMETRY, Priority.SAMPLE}, Priority.EVENT, {Priority.ALERT}),
        (0.15, {Priority.TELEMETRY, Priority.SAMPLE, Priority.EVENT}, Priority.ALERT, set()),
    ],
)
async def test_over_budget_evicts_lowest_priority_first(
    journal: Journal,
    payload_store: PayloadStore,
    data_dir: Path,
    fraction: float,
    gone: set[Priority],
    partly: Priority,
    untouched: set[Priority],
) -> None:
    per = 300
    await fill(journal, per)
    budget = await budget_for(journal, payload_store, fraction)
    async with StorageGuard(journal, payload_store, storage(disk_budget=budget)) as guard:
        reports = await guard.run_once()
        assert [r.reason for r in reports] == ["disk_budget"]
    left = remaining(data_dir)
    out = evicted(data_dir)
    for priority in gone:
        assert left[priority] == 0
        assert out[priority] == per
    assert 0 < left[partly] < per
    assert out[partly] == per - left[partly]
    for priority in untouched:
        assert left[priority] == per
        assert out[priority] == 0
    assert_accounts_agree(data_dir)


async def test_synced_records_go_before_any_unsynced_record(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    per = 300
    seqs = await fill(journal, per)
    await journal.register_destination("shore")
    alerts = [s for i, s in enumerate(seqs) if i % 4 == 0]
    # Half the alerts (the most precious priority) are acknowledged: they go first.
    await journal.acknowledge("shore", Priority.ALERT, alerts[0], alerts[149], "b-1")
    budget = await budget_for(journal, payload_store, 0.95)
    async with StorageGuard(journal, payload_store, storage(disk_budget=budget)) as guard:
        await guard.run_once()
    left = remaining(data_dir)
    assert left[Priority.TELEMETRY] == left[Priority.SAMPLE] == left[Priority.EVENT] == per
    assert 150 <= left[Priority.ALERT] < per
    with JournalReader.open(data_dir) as r:
        kept_alerts = [
            s.seq for s in r.iter_records(kind="reading") if s.priority is Priority.ALERT
        ]
        assert kept_alerts == alerts[per - left[Priority.ALERT] :]  # the oldest synced ones went
        assert [(p, reason) for p, reason, _, _ in r.evictions()] == [
            (Priority.ALERT, "disk_budget")
        ]
    assert_accounts_agree(data_dir)


async def test_synced_records_of_every_priority_before_unsynced_telemetry(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    per = 200
    seqs = await fill(journal, per)
    await journal.register_destination("shore")
    for priority in (Priority.ALERT, Priority.EVENT, Priority.SAMPLE):
        mine = [s for i, s in enumerate(seqs) if Priority(1 + i % 4) is priority]
        await journal.acknowledge("shore", priority, mine[0], mine[49], "b")
    budget = await budget_for(journal, payload_store, 0.9)
    async with StorageGuard(journal, payload_store, storage(disk_budget=budget)) as guard:
        await guard.run_once()
    left = remaining(data_dir)
    # 150 synced records are worth more than 15% of the file: unsynced data is all still here.
    assert left[Priority.TELEMETRY] == per
    for priority in (Priority.ALERT, Priority.EVENT, Priority.SAMPLE):
        assert per - 50 <= left[priority] <= per
    assert sum(evicted(data_dir).values()) > 0


async def test_under_budget_nothing_is_evicted_or_journalled(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    await fill(journal, 50)
    async with StorageGuard(journal, payload_store, storage()) as guard:
        assert await guard.run_once() == []
    assert evicted(data_dir) == Counter()
    assert eviction_records(data_dir) == []
    assert sum(remaining(data_dir).values()) == 200


# ------------------------------------------------------------------------------- keep_synced


async def test_keep_synced_expires_old_synced_records_only(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    old = datetime.now(UTC) - timedelta(days=2)
    old_synced = await journal.append_many(
        [reading(Priority.TELEMETRY, i, ts=old) for i in range(20)]
    )
    recent_synced = await journal.append_many([reading(Priority.TELEMETRY, i) for i in range(5)])
    old_events = await journal.append_many([reading(Priority.EVENT, i, ts=old) for i in range(7)])
    await journal.register_destination("shore")
    await journal.acknowledge("shore", Priority.TELEMETRY, 1, recent_synced[-1], "b-1")
    # Old too, but written after the acknowledgement: not synced, so kept.
    old_unsynced = await journal.append_many(
        [reading(Priority.TELEMETRY, i, ts=old) for i in range(3)]
    )
    settings = storage(keep_synced=3600.0)  # far under budget: only age matters here
    async with StorageGuard(journal, payload_store, settings) as guard:
        reports = await guard.run_once()
        assert [r.reason for r in reports] == ["synced_expired"]
        assert await guard.run_once() == []  # nothing left to expire
    with JournalReader.open(data_dir) as r:
        kept = {s.seq for s in r.iter_records(kind="reading")}
        assert r.evictions() == [
            (
                Priority.TELEMETRY,
                "synced_expired",
                20,
                reports[0].by_priority[Priority.TELEMETRY].bytes,
            )
        ]
    assert kept == set(recent_synced) | set(old_events) | set(old_unsynced)
    assert kept.isdisjoint(old_synced)
    [record] = eviction_records(data_dir)
    assert record.body["reason"] == "synced_expired"
    assert record.body["evicted"]["telemetry"]["records"] == 20
    assert record.body["evicted"]["telemetry"]["first_seq"] == old_synced[0]
    assert record.body["evicted"]["telemetry"]["last_seq"] == old_synced[-1]
    assert_accounts_agree(data_dir)


# ------------------------------------------------------------------------ accounting, payloads


async def test_every_pass_journals_its_evictions_and_counts_stay_right(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    await fill(journal, 200)
    for fraction in (0.8, 0.6):
        budget = await budget_for(journal, payload_store, fraction)
        async with StorageGuard(journal, payload_store, storage(disk_budget=budget)) as guard:
            [report] = await guard.run_once()
        assert report.records > 0
        assert_accounts_agree(data_dir)
    records = eviction_records(data_dir)
    assert len(records) == 2
    assert all(r.body["reason"] == "disk_budget" for r in records)
    assert (
        sum(r.body["evicted"].get("telemetry", {}).get("records", 0) for r in records)
        == evicted(data_dir)[Priority.TELEMETRY]
    )
    with JournalReader.open(data_dir) as r:
        per_kind = {(p, k): n for p, k, n, _ in r.counts()}
    assert per_kind[(Priority.EVENT, "eviction")] == 2
    assert (
        per_kind.get((Priority.TELEMETRY, "reading"), 0) == remaining(data_dir)[Priority.TELEMETRY]
    )


async def test_payloads_of_evicted_records_are_deleted_shared_ones_kept(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    shared = await payload_store.put(b"S" * 3000)
    only_evicted = await payload_store.put(b"E" * 3000)
    only_kept = await payload_store.put(b"K" * 3000)
    await journal.append(reading(Priority.TELEMETRY, 0, payloads=(shared, only_evicted)))
    await journal.append(reading(Priority.TELEMETRY, 1, payloads=(only_evicted,)))
    await journal.append_many([reading(Priority.TELEMETRY, i) for i in range(2, 100)])
    await journal.append(reading(Priority.ALERT, 100, payloads=(shared, only_kept)))
    await journal.append_many([reading(Priority.ALERT, i) for i in range(101, 200)])
    await journal.checkpoint()
    budget = await budget_for(journal, payload_store, 0.8)
    async with StorageGuard(journal, payload_store, storage(disk_budget=budget)) as guard:
        [report] = await guard.run_once()
    assert report.payload_files == 1
    assert report.payload_bytes == only_evicted.size
    assert not payload_store.path_for(only_evicted.sha256).exists()
    assert payload_store.read(shared.sha256) == b"S" * 3000
    assert payload_store.read(only_kept.sha256) == b"K" * 3000
    with JournalReader.open(data_dir) as r:
        rows = r.payload_rows()
        assert only_evicted.sha256 not in rows
        assert rows[shared.sha256] == (shared.size, 1, "present")
        assert rows[only_kept.sha256] == (only_kept.size, 1, "present")
    left = remaining(data_dir)
    assert 0 < left[Priority.TELEMETRY] < 100
    assert left[Priority.ALERT] == 100
    [record] = eviction_records(data_dir)
    assert record.body["payload_files"] == 1
    assert record.body["payload_bytes"] == only_evicted.size
    assert_accounts_agree(data_dir)


async def test_payload_bytes_count_towards_the_eviction_target(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    refs: list[PayloadRef] = []
    for i in range(60):
        refs.append(await payload_store.put(i.to_bytes(2, "big") * 10_000))
    await journal.append_many(
        [reading(Priority.SAMPLE, i, payloads=(ref,)) for i, ref in enumerate(refs)]
    )
    await journal.checkpoint()
    used = await used_bytes(journal, payload_store)
    # About 15 of the 60 samples' payloads (plus the 5% margin: ~3 more) must go, not every
    # sample: a payload's bytes count towards the target as soon as its last record goes.
    budget = used - 15 * 20_000
    async with StorageGuard(journal, payload_store, storage(disk_budget=budget)) as guard:
        [report] = await guard.run_once()
    left = remaining(data_dir)[Priority.SAMPLE]
    assert 40 <= left <= 46
    assert report.payload_files == 60 - left
    assert sum(1 for _ in payload_store.files()) == left


async def test_eviction_and_compaction_shrink_the_journal_file(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    for start in range(0, 3000, 500):
        await journal.append_many(
            [
                NewRecord(
                    source="s",
                    kind="reading",
                    priority=Priority.TELEMETRY,
                    body={"i": i, "pad": "q" * 1000},
                )
                for i in range(start, start + 500)
            ]
        )
    await journal.checkpoint()
    db = data_dir / "journal.db"
    before = db.stat().st_size
    assert before > 3_000_000
    async with StorageGuard(journal, payload_store, storage(disk_budget=before // 4)) as guard:
        await guard.run_once()
        usage = await guard.usage()
    after = db.stat().st_size
    assert after < before / 2
    assert usage.journal_bytes < before / 2
    with JournalReader.open(data_dir) as r:
        # Every page the eviction freed went back to the file system, not just one.
        assert r.conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert 0 < remaining(data_dir)[Priority.TELEMETRY] < 3000


# ---------------------------------------------------------------------------------- disk full


async def test_disk_full_signal_sheds_evicts_and_recovers(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    settings = storage(reserve=64 * 1024)
    async with StorageGuard(journal, payload_store, settings) as guard:
        assert guard.ballast.stat().st_size == 64 * 1024
        journal.notify_disk_full()  # what a failed write reports from the writer thread
        for _ in range(500):
            await asyncio.sleep(0.01)
            if journal.stats.disk_full_events and guard.shed_level == 0 and guard.ballast.exists():
                break
        assert journal.stats.disk_full_events == 1
        # Real free space is above min_free (0), so the emergency pass recovered at once.
        assert guard.shed_level == 0
        assert guard.degraded_reason is None
        assert guard.ballast.stat().st_size == 64 * 1024
