"""Tests of sync.recovery through Journal.open: quarantine and salvage of a damaged journal.db,
and reconciliation of payload files with payload rows after a crash."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
from contextlib import closing
from pathlib import Path

from sync import Journal, JournalReader, NewRecord, PayloadStore, Priority, StoredRecord
from sync.journal_open import read_seq_reservation
from sync.recovery import QUARANTINE_DIR
from tests.conftest import APPLIANCE_ID
from tests.helpers import run_cli, write_config

RECORDS = 3000


async def open_journal(data_dir: Path, payloads: PayloadStore | None = None) -> Journal:
    return await Journal.open(data_dir, appliance_id=APPLIANCE_ID, payloads=payloads)


def body_for(i: int) -> dict[str, object]:
    return {"i": i, "value": i * 0.5, "pad": "x" * (i % 50)}


async def write_records(data_dir: Path, n: int = RECORDS) -> int:
    """A closed journal holding n records of mixed priorities; returns the highest seq."""
    journal = await open_journal(data_dir)
    async with journal:
        seqs: list[int] = []
        for start in range(0, n, 500):
            seqs += await journal.append_many(
                [
                    NewRecord(
                        source="gearbox",
                        kind="reading",
                        priority=Priority(1 + i % 4),
                        body=body_for(i),
                    )
                    for i in range(start, min(n, start + 500))
                ]
            )
        await journal.register_destination("shore")
        await journal.acknowledge("shore", Priority.ALERT, 1, 40, "b-1")
    assert seqs == list(range(1, n + 1))
    return seqs[-1]


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quarantined(data_dir: Path) -> list[Path]:
    return sorted((data_dir / QUARANTINE_DIR).glob("*/journal.db"))


def recovery_records(data_dir: Path) -> list[StoredRecord]:
    with JournalReader.open(data_dir) as r:
        return list(r.iter_records(kind="recovery"))


def integrity(data_dir: Path) -> str:
    with JournalReader.open(data_dir) as r:
        return str(r.conn.execute("PRAGMA integrity_check").fetchone()[0])


async def test_clean_reopen_finds_nothing_and_journals_no_recovery(data_dir: Path) -> None:
    await write_records(data_dir, 200)
    journal = await open_journal(data_dir)
    async with journal:
        assert journal.recovery.check == "integrity_check"
        assert not journal.recovery.anything_found
    assert recovery_records(data_dir) == []
    assert not (data_dir / QUARANTINE_DIR).exists()


async def test_corrupt_pages_are_quarantined_and_records_salvaged(data_dir: Path) -> None:
    high = await write_records(data_dir)
    reserved = read_seq_reservation(data_dir)
    assert reserved >= high
    with JournalReader.open(data_dir) as reader:
        identity = reader.identity()
    assert identity is not None
    db = data_dir / "journal.db"
    with closing(sqlite3.connect(db)) as conn:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    assert pages > 40
    # Garbage over three pages in the middle of the file, well past the header page.
    garbage = random.Random(7).randbytes(3 * page_size)
    with db.open("r+b") as handle:
        handle.seek((pages // 2) * page_size)
        handle.write(garbage)
    damaged = sha_of(db)

    journal = await open_journal(data_dir)
    async with journal:
        salvaged = journal.recovery.salvaged
        assert salvaged is not None
        # The meta table was readable: the salvaged journal is the same journal upstream.
        assert journal.journal_id == identity.journal_id == salvaged.journal_id
        assert salvaged.journal_continued
        nxt = await journal.append(
            NewRecord(source="gearbox", kind="reading", priority=Priority.EVENT, body={})
        )
    # The damaged file is kept, byte for byte, for a human to look at.
    [kept] = quarantined(data_dir)
    assert sha_of(kept) == damaged
    assert salvaged.quarantined_to == str(kept.parent)
    assert integrity(data_dir) == "ok"
    with JournalReader.open(data_dir) as r:
        records = [s for s in r.iter_records() if s.kind == "reading" and s.seq <= high]
        # Most records are back, each one exactly as written.
        assert len(records) >= 0.9 * RECORDS
        assert len(records) == salvaged.records_salvaged
        # Every seq is either salvaged or counted as unreadable.
        assert salvaged.records_salvaged + salvaged.seq_ranges_unreadable == RECORDS
        for stored in records:
            assert stored.body == body_for(stored.seq - 1)
            assert stored.priority is Priority(1 + (stored.seq - 1) % 4)
            assert stored.appliance_id == APPLIANCE_ID
        # Derived tables agree with what was salvaged.
        assert (
            sum(n for _, _, n, _ in r.counts())
            == r.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        )
        assert r.synced_through()[Priority.ALERT] == 40
    assert salvaged.old_high_water == high
    # No seq that might have shipped is ever handed out again.
    assert nxt > reserved
    assert salvaged.next_seq > reserved
    [recovery] = recovery_records(data_dir)
    assert recovery.priority is Priority.EVENT
    assert recovery.seq > reserved
    assert recovery.seq == salvaged.next_seq
    assert recovery.body["salvaged"]["records_salvaged"] == salvaged.records_salvaged
    assert recovery.body["salvaged"]["quarantined_to"] == str(kept.parent)
    # A second open finds a healthy journal.
    journal = await open_journal(data_dir)
    async with journal:
        assert not journal.recovery.anything_found
        assert (
            await journal.append(
                NewRecord(source="gearbox", kind="reading", priority=Priority.EVENT, body={})
            )
            > nxt
        )


async def test_file_of_garbage_is_quarantined_and_a_fresh_journal_opens(data_dir: Path) -> None:
    db = data_dir / "journal.db"
    db.write_bytes(os.urandom(64 * 1024))
    damaged = sha_of(db)
    journal = await open_journal(data_dir)
    async with journal:
        assert journal.recovery.salvaged is not None
        assert journal.recovery.salvaged.records_salvaged == 0
        # Nothing proves continuity: a new journal upstream, and the report says so.
        assert not journal.recovery.salvaged.journal_continued
        assert journal.recovery.salvaged.journal_id == journal.journal_id
        assert "new journal" in journal.recovery.salvaged.journal_note
        seq = await journal.append(
            NewRecord(source="gearbox", kind="reading", priority=Priority.ALERT, body={"ok": 1})
        )
    [kept] = quarantined(data_dir)
    assert sha_of(kept) == damaged
    assert integrity(data_dir) == "ok"
    [recovery] = recovery_records(data_dir)
    assert seq > recovery.seq
    assert "not a database" in recovery.body["salvaged"]["problem"]


async def test_garbage_journal_keeps_seq_above_the_reservation(data_dir: Path) -> None:
    high = await write_records(data_dir, 100)
    reserved = read_seq_reservation(data_dir)
    (data_dir / "journal.db").write_bytes(b"\x00garbage" * 1000)
    journal = await open_journal(data_dir)
    async with journal:
        seq = await journal.append(
            NewRecord(source="gearbox", kind="reading", priority=Priority.EVENT, body={})
        )
    assert seq > reserved >= high


async def test_two_recoveries_get_separate_quarantine_folders(data_dir: Path) -> None:
    for _ in range(2):
        (data_dir / "journal.db").write_bytes(os.urandom(8192))
        journal = await open_journal(data_dir)
        await journal.close()
    assert len(quarantined(data_dir)) == 2
    assert len(recovery_records(data_dir)) == 1  # the second salvage found nothing readable


# ----------------------------------------------------------------------------------- payloads


async def test_payloads_are_reconciled_at_open(data_dir: Path) -> None:
    store = PayloadStore(data_dir / "payloads")
    journal = await open_journal(data_dir, store)
    async with journal:
        kept = await store.put(b"kept snapshot")
        lost = await store.put(b"snapshot whose file goes missing")
        await journal.append(
            NewRecord(
                source="deck",
                kind="detection",
                priority=Priority.ALERT,
                body={},
                payloads=(kept, lost),
            )
        )
        # Stored, but the crash came before its record committed.
        orphan = await store.put(b"orphan clip, never journalled")
    assert not journal.recovery.anything_found
    store.path_for(lost.sha256).unlink()
    (store.tmp / "0123.part").write_bytes(b"half a payload")
    (store.path_for(kept.sha256).parent / "junk").write_bytes(b"?")

    journal = await open_journal(data_dir, store)
    async with journal:
        report = journal.recovery.payloads
        assert report is not None
    assert (report.orphan_files_removed, report.orphan_bytes_removed) == (1, orphan.size)
    assert report.missing_files == 1
    assert report.missing_examples == [lost.sha256]
    assert report.temp_files_removed == 2
    assert not store.path_for(orphan.sha256).exists()
    assert list(store.tmp.iterdir()) == []
    assert list(store.stray_files()) == []
    assert store.read(kept.sha256) == b"kept snapshot"
    with JournalReader.open(data_dir) as r:
        rows = r.payload_rows()
        assert rows[kept.sha256][2] == "present"
        assert rows[lost.sha256][2] == "missing"
        assert orphan.sha256 not in rows
        assert r.payload_totals() == (1, kept.size, 1)
    [recovery] = recovery_records(data_dir)
    assert recovery.body["payloads"]["orphan_files_removed"] == 1
    assert recovery.body["payloads"]["missing_files"] == 1
    assert recovery.body["payloads"]["temp_files_removed"] == 2
    assert recovery.body["salvaged"] is None

    # Already known to be missing: not found (nor journalled) again.
    journal = await open_journal(data_dir, store)
    async with journal:
        assert not journal.recovery.anything_found
    # The file comes back (e.g. restored by hand): the row is present again.
    await store.put(b"snapshot whose file goes missing")
    journal = await open_journal(data_dir, store)
    await journal.close()
    with JournalReader.open(data_dir) as r:
        assert r.payload_rows()[lost.sha256][2] == "present"
    assert len(recovery_records(data_dir)) == 1


async def test_payload_of_the_wrong_size_is_reported(data_dir: Path) -> None:
    store = PayloadStore(data_dir / "payloads")
    journal = await open_journal(data_dir, store)
    async with journal:
        ref = await store.put(b"twelve bytes")
        await journal.append(
            NewRecord(source="s", kind="sample", priority=Priority.SAMPLE, body={}, payloads=(ref,))
        )
    store.path_for(ref.sha256).write_bytes(b"short")
    journal = await open_journal(data_dir, store)
    async with journal:
        assert journal.recovery.payloads is not None
        assert journal.recovery.payloads.size_mismatches == 1
    with JournalReader.open(data_dir) as r:
        assert r.payload_rows()[ref.sha256][2] == "corrupt"


async def test_salvage_then_reconcile_payloads(data_dir: Path) -> None:
    store = PayloadStore(data_dir / "payloads")
    journal = await open_journal(data_dir, store)
    async with journal:
        ref = await store.put(b"payload of a record that survives")
        await journal.append(
            NewRecord(source="s", kind="sample", priority=Priority.SAMPLE, body={}, payloads=(ref,))
        )
    (data_dir / "journal.db").write_bytes(os.urandom(16384))
    journal = await open_journal(data_dir, store)
    async with journal:
        report = journal.recovery
    # Nothing was salvaged, so the payload file is an orphan now.
    assert report.salvaged is not None and report.payloads is not None
    assert report.payloads.orphan_files_removed == 1
    assert not store.path_for(ref.sha256).exists()


async def test_a_journal_from_a_newer_version_is_refused_in_one_line_and_left_alone(
    data_dir: Path, tmp_path: Path
) -> None:
    """A downgrade: the daemon refuses a journal whose schema it does not know, says so in one
    line with exit code 1 (no traceback), and changes nothing in it."""
    await write_records(data_dir, 20)
    with closing(sqlite3.connect(data_dir / "journal.db")) as conn, conn:
        conn.execute("INSERT INTO _migrations VALUES ('9999_from_the_future', '2030-01-01')")
    before = sha_of(data_dir / "journal.db")
    config = write_config(tmp_path / "c.yaml", data_dir, [])
    done = run_cli("run", "-c", str(config))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "newer version of the appliance" in line and "9999_from_the_future" in line
    assert sha_of(data_dir / "journal.db") == before
