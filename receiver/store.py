"""Owns receiver.db, the embedded store (the default; a fleet's is PostgreSQL, postgres.py): its
named migrations and the store behind one worker thread (records by appliance, journal and seq;
batches; payload rows; per-appliance and per-journal counters; published model packages)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from receiver.backend import (
    DEFAULT_CONCURRENT_QUIET_S,
    BatchResult,
    FleetFigures,
    JournalSpan,
    PublishedPackage,
    RecentRecords,
    RecordFilter,
    RecordPage,
    TokenEntry,
    concurrent_journals,
    conflict_refusal,
    format_ts,
    now_ts,
    parse_ts,
    same_record,
)
from receiver.batches import IncomingBatch
from receiver.fleet_store import sqlite_fleet, sqlite_payload_size, sqlite_recent
from receiver.protocol import (
    PARTIAL_DIR,
    PAYLOADS_DIR,
    RECEIVER_DB,
    SHA256_RE,
    Refusal,
    valid_appliance_id,
)
from receiver.reads_store import sqlite_records_after
from receiver.store_schema import migrate
from receiver.uploads import ensure_dir

# LEGACY_JOURNAL: the journal of records shipped without a Journal-Id: by appliances of a version
# before journal identities, and by upgraded ones for what they journalled before the upgrade.

log = logging.getLogger(__name__)
T = TypeVar("T")


def _journal_spans(conn: sqlite3.Connection, appliance_id: str) -> list[JournalSpan]:
    return [
        JournalSpan(journal_id, parse_ts(first), parse_ts(last), follows)
        for journal_id, first, last, follows in conn.execute(
            "SELECT journal_id, first_seen_ts, last_seen_ts, follows FROM journals "
            "WHERE appliance_id = ?",
            (appliance_id,),
        )
    ]


def _ensure_journal(
    conn: sqlite3.Connection,
    appliance_id: str,
    journal_id: str,
    now: str,
    follows: str | None = None,
) -> None:
    conn.execute(
        "INSERT INTO journals (appliance_id, journal_id, first_seen_ts, last_seen_ts, follows) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(appliance_id, journal_id) "
        "DO UPDATE SET last_seen_ts = excluded.last_seen_ts, "
        "follows = COALESCE(follows, excluded.follows)",
        (appliance_id, journal_id, now, now, follows),
    )


def _ensure_appliance(conn: sqlite3.Connection, appliance_id: str, now: str) -> None:
    conn.execute(
        "INSERT INTO appliances (appliance_id, first_seen_ts, last_seen_ts) VALUES (?, ?, ?) "
        "ON CONFLICT(appliance_id) DO UPDATE SET last_seen_ts = excluded.last_seen_ts",
        (appliance_id, now, now),
    )


class ReceiverStore:
    """receiver.db behind one worker thread (a `RecordStore`). `close()` is idempotent and runs
    after queued work."""

    def __init__(
        self,
        data_dir: Path,
        *,
        concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = data_dir
        self.concurrent_quiet = concurrent_quiet
        # Wall-clock seconds for first/last seen; injectable so tests can age a journal.
        self.clock = clock
        self.path = data_dir / RECEIVER_DB
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receiver-db")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
        clock: Callable[[], float] = time.time,
    ) -> ReceiverStore:
        store = cls(data_dir, concurrent_quiet=concurrent_quiet, clock=clock)
        try:
            await store._run(store._open)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
        finally:
            await asyncio.to_thread(self._executor.shutdown, True)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError("receiver store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # Everything below runs on the store's thread.

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "receiver store is not open"
        return self._conn

    def _open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in (PAYLOADS_DIR, PARTIAL_DIR):
            ensure_dir(self.data_dir / name)
        conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        migrate(conn)
        self._reconcile_payloads()

    def _reconcile_payloads(self) -> None:
        """Count verified payload files a crash left between their rename and their row."""
        root = self.data_dir / PAYLOADS_DIR
        conn = self._db()
        for app_dir in root.iterdir():
            if not app_dir.is_dir() or not valid_appliance_id(app_dir.name):
                continue
            known = {
                row[0]
                for row in conn.execute(
                    "SELECT sha256 FROM payloads WHERE appliance_id = ?", (app_dir.name,)
                )
            }
            for file in app_dir.iterdir():
                if SHA256_RE.fullmatch(file.name) and file.name not in known:
                    # Which journal uploaded it was in the row the crash lost.
                    self._record_payload(app_dir.name, file.name, file.stat().st_size, None)
                    log.info(
                        "payload counted after restart",
                        extra={"fields": {"appliance_id": app_dir.name, "sha256": file.name}},
                    )

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    def _store_batch(self, batch: IncomingBatch, now_s: float) -> BatchResult:
        """Store a batch whole or not at all: a record already held under the same (appliance,
        journal, seq) with other content refuses the batch with 409 (after a rollback)."""
        conn = self._db()
        now = format_ts(now_s)
        appliance_id, journal_id = batch.appliance_id, batch.journal_id
        stored = duplicates = 0
        conflicts: list[int] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            _ensure_appliance(conn, appliance_id, now)
            _ensure_journal(conn, appliance_id, journal_id, now, batch.follows)
            (arrival,) = conn.execute("SELECT COALESCE(MAX(arrival), 0) FROM records").fetchone()
            for record in batch.records:
                cursor = conn.execute(
                    "INSERT INTO records (appliance_id, journal_id, seq, priority, kind, ts, "
                    "batch_id, received_ts, line, arrival) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(appliance_id, journal_id, seq) DO NOTHING",
                    (
                        appliance_id,
                        journal_id,
                        record.seq,
                        batch.priority,
                        record.kind,
                        record.ts,
                        batch.batch_id,
                        now,
                        record.line,
                        arrival + 1,
                    ),
                )
                if cursor.rowcount == 1:
                    stored += 1
                    arrival += 1
                    continue
                duplicates += 1
                (stored_line,) = conn.execute(
                    "SELECT line FROM records WHERE appliance_id = ? AND journal_id = ? "
                    "AND seq = ?",
                    (appliance_id, journal_id, record.seq),
                ).fetchone()
                if not same_record(stored_line, record.line):
                    conflicts.append(record.seq)
            if conflicts:
                conn.execute("ROLLBACK")
                self._count_conflicts(appliance_id, journal_id, len(conflicts), now)
                raise conflict_refusal(batch, conflicts)
            new_batch = (
                conn.execute(
                    "SELECT 1 FROM batches WHERE appliance_id = ? AND journal_id = ? "
                    "AND batch_id = ?",
                    (appliance_id, journal_id, batch.batch_id),
                ).fetchone()
                is None
            )
            conn.execute(
                "INSERT INTO batches (appliance_id, journal_id, batch_id, priority, first_seq, "
                "last_seq, times_received, stored, duplicates, first_received_ts, "
                "last_received_ts) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?) "
                "ON CONFLICT(appliance_id, journal_id, batch_id) DO UPDATE SET "
                "times_received = times_received + 1, stored = stored + excluded.stored, "
                "duplicates = duplicates + excluded.duplicates, "
                "last_received_ts = excluded.last_received_ts",
                (
                    appliance_id,
                    journal_id,
                    batch.batch_id,
                    batch.priority,
                    batch.first_seq,
                    batch.last_seq,
                    stored,
                    duplicates,
                    now,
                    now,
                ),
            )
            conn.execute(
                "UPDATE appliances SET records = records + ?, "
                "duplicates_ignored = duplicates_ignored + ?, batches = batches + ? "
                "WHERE appliance_id = ?",
                (stored, duplicates, int(new_batch), appliance_id),
            )
            conn.execute(
                "UPDATE journals SET records = records + ?, "
                "duplicates_ignored = duplicates_ignored + ?, batches = batches + ?, "
                "max_seq = MAX(COALESCE(max_seq, 0), ?) "
                "WHERE appliance_id = ? AND journal_id = ?",
                (stored, duplicates, int(new_batch), batch.last_seq, appliance_id, journal_id),
            )
            concurrent, changed = self._judge_concurrency(appliance_id, now_s)
            # synchronous=FULL: COMMIT returns after the WAL is fsync'd.
            conn.execute("COMMIT")
        except Refusal:
            raise
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return BatchResult(
            stored=stored,
            duplicates=duplicates,
            concurrent_journals=concurrent,
            concurrency_changed=changed,
        )

    def _count_conflicts(self, appliance_id: str, journal_id: str, count: int, now: str) -> None:
        """A refused batch stores nothing, but the refusal is counted for the summary."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            _ensure_appliance(conn, appliance_id, now)
            _ensure_journal(conn, appliance_id, journal_id, now)
            conn.execute(
                "UPDATE journals SET conflicts_refused = conflicts_refused + ? "
                "WHERE appliance_id = ? AND journal_id = ?",
                (count, appliance_id, journal_id),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _judge_concurrency(self, appliance_id: str, now_s: float) -> tuple[list[str], bool]:
        """(journals of this appliance id live at once, whether that set changed), kept in the
        appliances row so a change is logged once. Runs inside the caller's transaction."""
        conn = self._db()
        concurrent = concurrent_journals(
            _journal_spans(conn, appliance_id), now_s, self.concurrent_quiet
        )
        (before,) = conn.execute(
            "SELECT concurrent_journals FROM appliances WHERE appliance_id = ?", (appliance_id,)
        ).fetchone()
        after = json.dumps(concurrent) if concurrent else None
        if before != after:
            conn.execute(
                "UPDATE appliances SET concurrent_journals = ? WHERE appliance_id = ?",
                (after, appliance_id),
            )
        return concurrent, before != after

    def _record_payload(
        self, appliance_id: str, sha256: str, size: int, journal_id: str | None
    ) -> None:
        conn = self._db()
        now = now_ts()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                "INSERT INTO payloads (appliance_id, sha256, size, completed_ts, journal_id) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(appliance_id, sha256) DO NOTHING",
                (appliance_id, sha256, size, now, journal_id or ""),
            )
            if cursor.rowcount == 1:
                _ensure_appliance(conn, appliance_id, now)
                conn.execute(
                    "UPDATE appliances SET payloads = payloads + 1, "
                    "payload_bytes = payload_bytes + ? WHERE appliance_id = ?",
                    (size, appliance_id),
                )
                if journal_id is not None:
                    _ensure_journal(conn, appliance_id, journal_id, now)
                    conn.execute(
                        "UPDATE journals SET payloads = payloads + 1, "
                        "payload_bytes = payload_bytes + ? "
                        "WHERE appliance_id = ? AND journal_id = ?",
                        (size, appliance_id, journal_id),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _summary(self, appliance_id: str, now_s: float) -> dict[str, Any]:
        conn = self._db()
        row = conn.execute(
            "SELECT records, duplicates_ignored, payloads, payload_bytes, batches "
            "FROM appliances WHERE appliance_id = ?",
            (appliance_id,),
        ).fetchone()
        records, duplicates, payloads, payload_bytes, batches = row or (0, 0, 0, 0, 0)
        journals = [
            {
                "journal_id": journal_id,
                "first_seen": first_seen,
                "last_seen": last_seen,
                "follows": follows,
                "records": count,
                "max_seq": max_seq,
                "batches": journal_batches,
                "duplicates_ignored": journal_duplicates,
                "conflicts_refused": conflicts,
                "payloads": journal_payloads,
                "payload_bytes": journal_payload_bytes,
            }
            for (
                journal_id,
                first_seen,
                last_seen,
                follows,
                count,
                max_seq,
                journal_batches,
                journal_duplicates,
                conflicts,
                journal_payloads,
                journal_payload_bytes,
            ) in conn.execute(
                "SELECT journal_id, first_seen_ts, last_seen_ts, follows, records, max_seq, "
                "batches, duplicates_ignored, conflicts_refused, payloads, payload_bytes "
                "FROM journals "
                "WHERE appliance_id = ? ORDER BY first_seen_ts, journal_id",
                (appliance_id,),
            )
        ]
        seqs = [j["max_seq"] for j in journals if j["max_seq"] is not None]
        return {
            "records": records,
            "max_seq": max(seqs) if seqs else None,
            "duplicates_ignored": duplicates,
            "payloads": payloads,
            "payload_bytes": payload_bytes,
            "batches": batches,
            "journals": journals,
            "concurrent_journals": concurrent_journals(
                _journal_spans(conn, appliance_id), now_s, self.concurrent_quiet
            ),
        }

    # Loop-side API.

    async def store_batch(self, batch: IncomingBatch) -> BatchResult:
        """Store new records, count the rest as duplicates; durable when this returns. Raises
        Refusal (409) when a record conflicts with one already stored: nothing is stored then."""
        now_s = self.clock()
        return await self._run(lambda: self._store_batch(batch, now_s))

    async def record_payload(
        self, appliance_id: str, sha256: str, size: int, journal_id: str | None
    ) -> None:
        await self._run(lambda: self._record_payload(appliance_id, sha256, size, journal_id))

    async def summary(self, appliance_id: str) -> dict[str, Any]:
        now_s = self.clock()
        return await self._run(lambda: self._summary(appliance_id, now_s))

    async def packages(self) -> list[PublishedPackage]:
        return await self._run(lambda: _all_packages(self._db()))

    async def package_by_sha256(self, sha256: str) -> PublishedPackage | None:
        return await self._run(lambda: _package_by_sha256(self._db(), sha256))

    async def package_by_version(self, name: str, version: str) -> PublishedPackage | None:
        return await self._run(lambda: _package_by_version(self._db(), name, version))

    async def save_package(self, package: PublishedPackage) -> PublishedPackage:
        return await self._run(lambda: _save_package(self._db(), package))

    async def ping(self) -> None:
        await self._run(lambda: self._db().execute("SELECT 1").fetchone())

    async def records_after(
        self, cursor: str | None, wanted: RecordFilter, limit: int
    ) -> RecordPage:
        return await self._run(lambda: sqlite_records_after(self._db(), cursor, wanted, limit))

    async def tokens(self) -> list[TokenEntry]:
        return await self._run(lambda: _tokens(self._db()))

    async def add_token(self, entry: TokenEntry) -> None:
        await self._run(lambda: _add_token(self._db(), entry))

    async def revoke_tokens(
        self, *, appliance_id: str | None = None, token_id: str | None = None
    ) -> int:
        return await self._run(lambda: _revoke_tokens(self._db(), appliance_id, token_id))

    async def fleet(self, appliance_id: str | None = None) -> FleetFigures:
        now_s = self.clock()
        return await self._run(lambda: sqlite_fleet(self._db(), now_s, appliance_id))

    async def recent_records(self, appliance_id: str, limit: int) -> RecentRecords:
        return await self._run(lambda: sqlite_recent(self._db(), appliance_id, limit))

    async def payload_size(self, appliance_id: str, sha256: str) -> int | None:
        return await self._run(lambda: sqlite_payload_size(self._db(), appliance_id, sha256))


_PACKAGE_COLUMNS = "name, version, sha256, size, appliances, groups, published_ts"


def _package(row: tuple[Any, ...]) -> PublishedPackage:
    name, version, sha256, size, appliances, groups, published = row
    return PublishedPackage(
        name,
        version,
        sha256,
        int(size),
        tuple(json.loads(appliances)),
        tuple(json.loads(groups)),
        published,
    )


def _all_packages(conn: sqlite3.Connection) -> list[PublishedPackage]:
    rows = conn.execute(
        f"SELECT {_PACKAGE_COLUMNS} FROM model_packages ORDER BY published_ts, name, version"
    ).fetchall()
    return [_package(row) for row in rows]


def _package_by_sha256(conn: sqlite3.Connection, sha256: str) -> PublishedPackage | None:
    row = conn.execute(
        f"SELECT {_PACKAGE_COLUMNS} FROM model_packages WHERE sha256 = ?", (sha256,)
    ).fetchone()
    return None if row is None else _package(row)


def _package_by_version(
    conn: sqlite3.Connection, name: str, version: str
) -> PublishedPackage | None:
    row = conn.execute(
        f"SELECT {_PACKAGE_COLUMNS} FROM model_packages WHERE name = ? AND version = ?",
        (name, version),
    ).fetchone()
    return None if row is None else _package(row)


def _save_package(conn: sqlite3.Connection, package: PublishedPackage) -> PublishedPackage:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            f"INSERT INTO model_packages ({_PACKAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name, version) DO UPDATE SET appliances = excluded.appliances, "
            "groups = excluded.groups",
            (
                package.name,
                package.version,
                package.sha256,
                package.size,
                json.dumps(list(package.appliances)),
                json.dumps(list(package.groups)),
                package.published_at,
            ),
        )
        stored = _package_by_version(conn, package.name, package.version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    assert stored is not None
    return stored


def _tokens(conn: sqlite3.Connection) -> list[TokenEntry]:
    rows = conn.execute(
        "SELECT token_id, digest, role, appliance_id, label, created_ts, revoked_ts FROM tokens "
        "ORDER BY created_ts, token_id"
    ).fetchall()
    return [
        TokenEntry(token_id, bytes(digest), role, appliance_id, label, created, revoked)
        for token_id, digest, role, appliance_id, label, created, revoked in rows
    ]


def _add_token(conn: sqlite3.Connection, entry: TokenEntry) -> None:
    try:
        conn.execute(
            "INSERT INTO tokens (token_id, digest, role, appliance_id, label, created_ts) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                entry.token_id,
                entry.digest,
                entry.role,
                entry.appliance_id,
                entry.label,
                entry.created_at,
            ),
        )
    except sqlite3.IntegrityError:
        raise ValueError("that token is already kept; make another one") from None


def _revoke_tokens(conn: sqlite3.Connection, appliance_id: str | None, token_id: str | None) -> int:
    cursor = conn.execute(
        "UPDATE tokens SET revoked_ts = ? WHERE revoked_ts IS NULL "
        "AND (? IS NULL OR appliance_id = ?) AND (? IS NULL OR token_id = ?)",
        (now_ts(), appliance_id, appliance_id, token_id, token_id),
    )
    return cursor.rowcount
