"""The journal: journal.db in WAL mode behind one writer thread with group commit.

A record is reported written (its seq returned) only after the transaction holding it is
committed with synchronous=FULL, i.e. fsync'd. Producers on the event loop never touch SQLite:
they queue rows, the writer batches them (N records or T ms), and results come back to the loop
with call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from config import JournalSection
from sync.errors import JournalClosed, JournalLocked, PayloadError, StorageFull, SyncError
from sync.identity import (
    JournalIdentity,
    ensure_identity,
    new_journal_id,
    read_identity,
    write_identity,
)
from sync.migrations import migrate
from sync.payloads import PayloadStore, fsync_dir
from sync.reader import JOURNAL_FILE, JournalReader, connect
from sync.records import RECORD_OVERHEAD_BYTES, NewRecord, PayloadRef, Priority, format_ts
from sync.recovery import RecoveryReport, open_checked, reconcile_payloads

log = logging.getLogger(__name__)
T = TypeVar("T")

SEQ_RESERVATION_FILE = "journal.seq"
# seq values are reserved in blocks in a sidecar file, fsync'd before use, so that a journal
# salvaged after corruption never hands out a seq that may already have shipped upstream.
SEQ_RESERVATION_BLOCK = 100_000
# How long an alert waits for retention to make room before it is counted as dropped.
ALERT_SPACE_WAIT_S = 30.0
# SQLite result codes (low byte of the extended code).
_SQLITE_IOERR, _SQLITE_FULL = 10, 13

# One encoder for every record: json.dumps with options builds a new one on each call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

_INSERT_RECORD = (
    "INSERT INTO records (seq, appliance_id, boot_id, ts, mono_ns, source, kind, priority, model, "
    "body, payloads, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_COUNT = (
    "INSERT INTO counts (priority, kind, records, bytes) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(priority, kind) DO UPDATE SET records = records + excluded.records, "
    "bytes = bytes + excluded.bytes"
)
_UPSERT_PAYLOAD = (
    "INSERT INTO payloads (sha256, size, media_type, refs, state, created_ts) "
    "VALUES (?, ?, ?, 1, 'present', ?) ON CONFLICT(sha256) DO UPDATE SET refs = refs + 1, "
    "state = 'present'"
)
_UPSERT_DROP = (
    "INSERT INTO drops (priority, reason, records) VALUES (?, ?, ?) "
    "ON CONFLICT(priority, reason) DO UPDATE SET records = records + excluded.records"
)
_UPSERT_QUALITY = (
    "INSERT INTO quality (source, reason, count) VALUES (?, ?, ?) "
    "ON CONFLICT(source, reason) DO UPDATE SET count = count + excluded.count"
)


@dataclass(slots=True)
class _Row:
    ts: str
    mono_ns: int
    source: str
    kind: str
    priority: int
    model: str | None
    body: str
    payloads: tuple[PayloadRef, ...]
    size: int
    quality: Mapping[str, int] | None


@dataclass(slots=True)
class _Append:
    rows: list[_Row]
    future: asyncio.Future[list[int]]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    transaction: bool


@dataclass(slots=True)
class WriterStats:
    """Counters of the writer thread, read by health and benchmarks."""

    commits: int = 0
    records: int = 0
    largest_batch: int = 0
    failed_commits: int = 0
    disk_full_events: int = 0
    last_error: str | None = None
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)


def is_disk_full(exc: BaseException, data_dir: Path) -> bool:
    """SQLITE_FULL, or an I/O error while the file system has (almost) no space left."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == _SQLITE_FULL:
        return True
    if "disk is full" in str(exc) or "No space left" in str(exc):
        return True
    if code is not None and code & 0xFF == _SQLITE_IOERR:
        try:
            return shutil.disk_usage(data_dir).free < 1024 * 1024
        except OSError:
            return False
    return False


class Journal:
    """journal.db: append records durably, read them back by priority and cursor, acknowledge.

    Use `async with await Journal.open(...) as journal:`; `close()` is idempotent and commits
    everything queued before it."""

    def __init__(
        self,
        data_dir: Path,
        conn: sqlite3.Connection,
        *,
        appliance_id: str,
        settings: JournalSection,
        next_seq: int,
        reserved_seq: int,
        recovery: RecoveryReport,
        identity: JournalIdentity,
        payloads: PayloadStore | None = None,
    ) -> None:
        self.data_dir = data_dir
        # Made when the journal was created and kept for its life (sync/identity.py).
        self.identity = identity
        self.path = data_dir / JOURNAL_FILE
        self.appliance_id = appliance_id
        self.boot_id = uuid.uuid4().hex
        self.settings = settings
        self.recovery = recovery
        self.payloads = payloads
        self.stats = WriterStats()
        self.shed_level = 0  # 0 accept all; 1 shed telemetry; 2 also samples; 3 also events
        # Where the appliance is, stamped as `position` into every record's body (ships: the
        # last NMEA fix); None, or a provider answering None, stamps nothing.
        self.position_source: Callable[[], Mapping[str, Any] | None] | None = None
        self._conn = conn
        self._next_seq = next_seq
        self._reserved_seq = reserved_seq
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Append | _Call | None] = queue.SimpleQueue()
        # Appends handed to the writer and not yet committed (or failed): when every one is
        # already in the open batch, waiting longer cannot grow it (their producers are awaiting
        # this very commit), so it closes at once. Raised on the loop before the put, lowered by
        # the writer as soon as a batch is done -- not when the loop gets round to resolving it,
        # or a burst's next batch would wait out commit_delay for records already committed.
        # Two counters, each written by one thread only (no lock on the hot path):
        # outstanding = handed over - settled by the writer.
        self._handed_over = 0  # loop thread
        self._settled = 0  # writer thread
        # Loop side: appends queued and not yet resolved. Bounded by max_pending; producers wait
        # on _queue_space when it is reached (a plain counter: asyncio.Semaphore costs more per
        # call than everything else on this path).
        self._queued = 0
        self._queue_space = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._disk_full_listeners: list[Callable[[], None]] = []
        self._drop_lock = threading.Lock()
        self._unflushed_drops: Counter[tuple[int, str]] = Counter()
        self._lock_fd: int | None = None
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._reader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        self._reader_local = threading.local()
        self._readers: list[JournalReader] = []
        self._thread = threading.Thread(
            target=self._writer_main, name="journal-writer", daemon=True
        )
        self._thread.start()

    # ----------------------------------------------------------------------------- lifecycle

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        appliance_id: str,
        settings: JournalSection | None = None,
        payloads: PayloadStore | None = None,
    ) -> Journal:
        """Open (creating, checking, salvaging and migrating as needed) the journal in data_dir.

        With a payload store, payload files and rows are reconciled before anything is written."""
        settings = settings or JournalSection()
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        lock_fd = await asyncio.to_thread(acquire_writer_lock, data_dir)
        try:
            opened = await asyncio.to_thread(
                _open_sync, data_dir, settings.full_check_limit, payloads
            )
        except BaseException:
            os.close(lock_fd)
            raise
        conn, next_seq, reserved, recovery, identity = opened
        journal = cls(
            data_dir,
            conn,
            appliance_id=appliance_id,
            settings=settings,
            next_seq=next_seq,
            reserved_seq=reserved,
            recovery=recovery,
            identity=identity,
            payloads=payloads,
        )
        journal._lock_fd = lock_fd
        try:
            await journal.execute_write(journal._record_boot)
            if recovery.anything_found:
                log.warning("journal recovery at start", extra={"fields": recovery.to_dict()})
                await journal.append(
                    NewRecord(
                        source="journal",
                        kind="recovery",
                        priority=Priority.EVENT,
                        body=recovery.to_dict(),
                    ),
                    force=True,
                )
        except BaseException:
            await journal.close()  # never leave the writer thread running behind a failure
            raise
        return journal

    def _record_boot(self, conn: sqlite3.Connection) -> None:
        boots = conn.execute("SELECT value FROM meta WHERE key = 'boots'").fetchone()
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [
                ("boots", str(int(boots[0]) + 1 if boots else 1)),
                ("boot_id", self.boot_id),
                ("appliance_id", self.appliance_id),
            ],
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit everything queued, stop the writer, close connections. Safe to call twice."""
        if self._close_task is None:
            self._closed = True
            self._queue.put(None)
            self._close_task = asyncio.ensure_future(self._finish_close())
        await asyncio.shield(self._close_task)

    async def _finish_close(self) -> None:
        await asyncio.to_thread(self._thread.join)
        await self._loop.run_in_executor(self._reader_pool, self._close_reader)
        self._reader_pool.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the writer lock
            self._lock_fd = None

    @property
    def journal_id(self) -> str:
        return self.identity.journal_id

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------------------- appends

    async def append(
        self, record: NewRecord, *, wait_for_space: bool | None = None, force: bool = False
    ) -> int:
        """Append one record; return its seq once it is durable."""
        if (
            self.shed_level
            or wait_for_space
            or (wait_for_space is None and record.priority == Priority.ALERT)
        ):
            seqs = await self.append_many([record], wait_for_space=wait_for_space, force=force)
            return seqs[0]
        # The common case (nothing shed, no waiting for space) skips append_many's bookkeeping.
        if self._closed:
            raise JournalClosed("the journal is closed")
        try:
            return (await self._submit([self._encode(record)]))[0]
        except StorageFull:
            self._count_drops([self._encode(record)], "disk_full")
            raise

    async def append_many(
        self,
        records: Sequence[NewRecord],
        *,
        wait_for_space: bool | None = None,
        force: bool = False,
    ) -> list[int]:
        """Append records in one queue entry; return their seqs once durable.

        Raises StorageFull when the disk is full for their priority; the records are counted as
        dropped. A call is accepted or shed as one, by its most important record. Alerts (by
        default) wait up to ALERT_SPACE_WAIT_S for retention to make room first. `force` skips
        shedding, for the journal's own bookkeeping records (evictions, recovery)."""
        if self._closed:
            raise JournalClosed("the journal is closed")
        if not records:
            return []
        rows = [self._encode(record) for record in records]
        best = min(row.priority for row in rows)
        wait = best == Priority.ALERT if wait_for_space is None else wait_for_space
        deadline = time.monotonic() + ALERT_SPACE_WAIT_S
        while True:
            try:
                if self.shed_level and not force and best >= 5 - self.shed_level:
                    raise StorageFull(Priority(best).label)
                return await self._submit(rows)
            except StorageFull:
                remaining = deadline - time.monotonic()
                if not wait or remaining <= 0 or self._closed:
                    self._count_drops(rows, "disk_full")
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space_freed.wait(), min(remaining, 1.0))

    def _encode(self, record: NewRecord) -> _Row:
        content = record.body
        if self.position_source is not None and "position" not in content:
            position = self.position_source()
            if position is not None:
                content = {**content, "position": position}
        try:
            body = _encode_json(content)
        except (TypeError, ValueError) as exc:  # TypeError: a value JSON has no form for
            raise ValueError(f"record body is not JSON-serialisable: {exc}") from exc
        ts = format_ts(record.ts) if record.ts else format_ts_now()
        quality = _quality_counts(record) if record.kind == "data_quality" else None
        # Positional: keyword construction costs more than the rest of this function.
        return _Row(
            ts,
            record.mono_ns if record.mono_ns is not None else time.monotonic_ns(),
            record.source,
            record.kind,
            int(record.priority),
            record.model,
            body,
            record.payloads,
            # Characters, not bytes: an estimate for the budget, calibrated by retention.
            len(body) + RECORD_OVERHEAD_BYTES + 70 * len(record.payloads),
            quality,
        )

    async def _submit(self, rows: list[_Row]) -> list[int]:
        while self._queued >= self.settings.max_pending:
            self._queue_space.clear()
            await self._queue_space.wait()
        if self._closed:
            raise JournalClosed("the journal is closed")
        self._queued += 1
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._handed_over += 1
        self._queue.put(_Append(rows, future))
        return await future

    def _count_drops(self, rows: Sequence[_Row], reason: str) -> None:
        with self._drop_lock:
            for row in rows:
                self._unflushed_drops[(row.priority, reason)] += 1
        for row in rows:
            self.stats.dropped[(Priority(row.priority).label, reason)] += 1

    def count_drop(self, priority: Priority, reason: str, records: int = 1) -> None:
        """Count records a producer could not journal (e.g. its payload did not fit on disk)."""
        with self._drop_lock:
            self._unflushed_drops[(int(priority), reason)] += records
        self.stats.dropped[(priority.label, reason)] += records

    # ------------------------------------------------------------------- disk-full signalling

    def on_disk_full(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the event loop whenever a write fails for lack of disk space."""
        self._disk_full_listeners.append(listener)

    def notify_disk_full(self) -> None:
        """Thread-safe: report that some write (journal or payload) hit a full disk."""
        self._loop.call_soon_threadsafe(self._fire_disk_full)

    def _fire_disk_full(self) -> None:
        self.stats.disk_full_events += 1
        for listener in self._disk_full_listeners:
            listener()

    def space_freed(self) -> None:
        """Retention made room: wake alerts waiting for space."""
        self._space_freed.set()
        self._space_freed = asyncio.Event()

    # ------------------------------------------------------------------- writer-side calls

    async def execute_write(
        self, fn: Callable[[sqlite3.Connection], T], *, transaction: bool = True
    ) -> T:
        """Run `fn(conn)` on the writer thread (inside BEGIN IMMEDIATE..COMMIT by default)."""
        # Not only once the writer has stopped: a call queued behind close()'s sentinel after
        # the writer's final drain would never run, and its caller would wait forever.
        if self._closed:
            raise JournalClosed("the journal is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Call(fn, future, transaction))
        return await future

    async def fork(self, after: int | None = None) -> tuple[JournalIdentity, JournalIdentity]:
        """Give this journal a new identity for its records after seq `after` (default: the
        last seq handed out); the records up to it keep shipping under the id they had. For a
        journal restored from a backup older than what it shipped, or copied onto a second box
        (docs/operations.md, "Journal conflicts"). Returns (before, after) and journals a
        `journal_fork` record. Raises ValueError for an `after` outside the journal's history."""

        def apply(conn: sqlite3.Connection) -> tuple[JournalIdentity, JournalIdentity]:
            high = self._next_seq - 1
            point = high if after is None else after
            if point > high:
                raise ValueError(f"seq {point} is past the last seq of this journal ({high})")
            before = read_identity(conn) or self.identity
            forked = before.forked(point, new_journal_id())
            write_identity(conn, forked)
            return before, forked

        before, forked = await self.execute_write(apply)
        self.identity = forked
        last = forked.earlier[-1][0] if forked.earlier else forked.legacy_high_water
        log.warning(
            "journal forked",
            extra={"fields": {"from": before.journal_id, "to": forked.journal_id, "after": last}},
        )
        await self.append(
            NewRecord(
                source="journal",
                kind="journal_fork",
                priority=Priority.EVENT,
                body={
                    "previous_journal_id": before.journal_id,
                    "journal_id": forked.journal_id,
                    "after_seq": last,
                },
            ),
            force=True,
        )
        return before, forked

    async def acknowledge(
        self,
        destination: str,
        priority: Priority,
        first_seq: int,
        last_seq: int,
        batch_id: str,
        payloads: Sequence[str] = (),
    ) -> None:
        """Record a destination's acknowledgement and move its cursor in the same transaction;
        the acknowledged records' payloads join that destination's upload outbox."""

        def apply(conn: sqlite3.Connection) -> None:
            now = format_ts_now()
            conn.executemany(
                "INSERT OR IGNORE INTO payload_outbox (destination, sha256, priority, seq) "
                "VALUES (?, ?, ?, ?)",
                [(destination, sha, int(priority), last_seq) for sha in payloads],
            )
            conn.execute(
                "INSERT INTO acks (destination, priority, first_seq, last_seq, batch_id, ts) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (destination, int(priority), first_seq, last_seq, batch_id, now),
            )
            conn.execute(
                "INSERT INTO cursors (destination, priority, acked_seq, updated_ts) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(destination, priority) DO UPDATE SET "
                "acked_seq = MAX(acked_seq, excluded.acked_seq), updated_ts = excluded.updated_ts",
                (destination, int(priority), last_seq, now),
            )

        await self.execute_write(apply)

    async def payload_done(self, destination: str, sha256: str) -> None:
        """A payload reached the destination (or can never reach it): leave the outbox."""

        def apply(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM payload_outbox WHERE destination = ? AND sha256 = ?",
                (destination, sha256),
            )

        await self.execute_write(apply)

    async def register_destination(self, destination: str) -> None:
        """Make a destination count for `synced`: its cursors start at 0 for every priority."""

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO cursors (destination, priority, acked_seq, updated_ts) "
                "VALUES (?, ?, 0, ?)",
                [(destination, int(p), format_ts_now()) for p in Priority],
            )

        await self.execute_write(apply)

    async def set_meta(self, values: Mapping[str, str]) -> None:
        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items())
            )

        await self.execute_write(apply)

    async def checkpoint(self) -> tuple[int, int, int]:
        """Checkpoint and truncate the WAL; returns SQLite's (busy, wal frames, checkpointed)."""

        def run(conn: sqlite3.Connection) -> tuple[int, int, int]:
            row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return int(row[0]), int(row[1]), int(row[2])

        return await self.execute_write(run, transaction=False)

    # --------------------------------------------------------------------------------- reads

    async def read(self, fn: Callable[[JournalReader], T]) -> T:
        """Run a query on the journal's reader thread (never blocks the writer or the loop)."""
        if self._closed:
            raise JournalClosed("the journal is closed")
        return await self._loop.run_in_executor(self._reader_pool, self._with_reader, fn)

    def _with_reader(self, fn: Callable[[JournalReader], T]) -> T:
        reader: JournalReader | None = getattr(self._reader_local, "reader", None)
        if reader is None:
            reader = JournalReader(connect(self.path, readonly=True))
            self._reader_local.reader = reader
            self._readers.append(reader)
        return fn(reader)

    def _close_reader(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers.clear()

    @property
    def pending(self) -> int:
        """Queue entries waiting for the writer."""
        return self._queued

    # ------------------------------------------------------------------------ writer thread

    def _writer_main(self) -> None:
        max_records = self.settings.commit_records
        delay = self.settings.commit_delay
        stopping = False
        # An append that would push the open batch past max_records starts the next one.
        carry: _Append | None = None
        while not stopping:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is None:
                break
            if isinstance(item, _Call):
                self._run_call(item)
                continue
            batch = [item]
            count = len(item.rows)
            deadline = time.monotonic() + delay
            deferred: _Call | None = None
            while count < max_records and len(batch) < self._handed_over - self._settled:
                remaining = deadline - time.monotonic()
                try:
                    nxt = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if isinstance(nxt, _Call):
                    deferred = nxt
                    break
                if count + len(nxt.rows) > max_records:
                    carry = nxt
                    break
                batch.append(nxt)
                count += len(nxt.rows)
            self._commit(batch, count)
            if deferred is not None:
                self._run_call(deferred)
        # Drain what was queued before close(), in queue order: a record handed over is a
        # record kept, and a call queued after some appends still runs after them.
        batch = []
        count = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            if isinstance(item, _Call):
                if batch:
                    self._commit(batch, count)
                    batch, count = [], 0
                self._run_call(item)
                continue
            if batch and count + len(item.rows) > max_records:
                self._commit(batch, count)
                batch, count = [], 0
            batch.append(item)
            count += len(item.rows)
        if batch:
            self._commit(batch, count)
        with contextlib.suppress(sqlite3.Error):
            self._commit_drops_only()
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _reserve(self, upto: int) -> None:
        if upto <= self._reserved_seq:
            return
        ceiling = upto + SEQ_RESERVATION_BLOCK
        write_seq_reservation(self.data_dir, ceiling)
        self._reserved_seq = ceiling

    def _take_drops(self) -> Counter[tuple[int, str]]:
        with self._drop_lock:
            drops, self._unflushed_drops = self._unflushed_drops, Counter()
        return drops

    def _give_back_drops(self, drops: Counter[tuple[int, str]]) -> None:
        with self._drop_lock:
            self._unflushed_drops.update(drops)

    def _commit_drops_only(self) -> None:
        drops = self._take_drops()
        if not drops:
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(_UPSERT_DROP, [(p, r, n) for (p, r), n in drops.items()])
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            self._give_back_drops(drops)
            raise

    def _commit(self, batch: list[_Append], count: int) -> None:
        try:
            if self.payloads is not None and any(r.payloads for a in batch for r in a.rows):
                batch, count = self._drop_vanished_payloads(batch, count)
            if batch:
                self._commit_batch(batch, count)
        finally:
            self._settled += len(batch)

    def _drop_vanished_payloads(
        self, batch: list[_Append], count: int
    ) -> tuple[list[_Append], int]:
        """Fail appends whose payload file is gone: `put` may have found an existing file that
        retention deleted (on this same thread, after its commit) before the record arrived."""
        assert self.payloads is not None
        kept: list[_Append] = []
        for item in batch:
            gone = [
                ref.sha256
                for row in item.rows
                for ref in row.payloads
                if not self.payloads.path_for(ref.sha256).exists()
            ]
            if gone:
                count -= len(item.rows)
                error = PayloadError(
                    f"payload {gone[0][:12]} vanished before its record was written; store it again"
                )
                self._settled += 1
                self._loop.call_soon_threadsafe(self._fail_items, [item], error)
            else:
                kept.append(item)
        return kept, count

    def _commit_batch(self, batch: list[_Append], count: int) -> None:
        first_seq = self._next_seq
        conn = self._conn
        drops = self._take_drops()
        try:
            self._reserve(first_seq + count)
            now = format_ts_now()
            params = []
            counts: dict[tuple[int, str], list[int]] = {}
            payload_params = []
            quality: Counter[tuple[str, str]] = Counter()
            seq = first_seq
            for item in batch:
                for row in item.rows:
                    refs = json.dumps([p.sha256 for p in row.payloads]) if row.payloads else None
                    params.append(
                        (
                            seq,
                            self.appliance_id,
                            self.boot_id,
                            row.ts,
                            row.mono_ns,
                            row.source,
                            row.kind,
                            row.priority,
                            row.model,
                            row.body,
                            refs,
                            row.size,
                        )
                    )
                    total = counts.setdefault((row.priority, row.kind), [0, 0])
                    total[0] += 1
                    total[1] += row.size
                    for ref in row.payloads:
                        payload_params.append((ref.sha256, ref.size, ref.media_type, now))
                    if row.quality:
                        for reason, n in row.quality.items():
                            quality[(row.source, reason)] += n
                    seq += 1
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT_RECORD, params)
            conn.executemany(_UPSERT_COUNT, [(p, k, n, b) for (p, k), (n, b) in counts.items()])
            if payload_params:
                conn.executemany(_UPSERT_PAYLOAD, payload_params)
            if drops:
                conn.executemany(_UPSERT_DROP, [(p, r, n) for (p, r), n in drops.items()])
            if quality:
                conn.executemany(_UPSERT_QUALITY, [(s, r, n) for (s, r), n in quality.items()])
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq_hw', ?)", (str(seq - 1),)
            )
            conn.execute("COMMIT")
        except Exception as exc:  # any failure fails the batch; a dead writer would hang all
            self._rollback()
            self._give_back_drops(drops)
            self.stats.failed_commits += 1
            self.stats.last_error = str(exc)
            full = is_disk_full(exc, self.data_dir) or (
                isinstance(exc, OSError) and exc.errno in (28, 122)
            )
            if full:
                self.notify_disk_full()
            log.error(
                "journal commit failed",
                extra={"fields": {"records": count, "error": str(exc), "disk_full": full}},
            )
            self._loop.call_soon_threadsafe(self._fail_batch, batch, full, str(exc))
            return
        self._next_seq = seq
        self.stats.commits += 1
        self.stats.records += count
        self.stats.largest_batch = max(self.stats.largest_batch, count)
        self._loop.call_soon_threadsafe(self._resolve_batch, batch, first_seq)

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            # A connection that cannot even roll back is replaced; SQLite's own journal makes
            # the file consistent again when the next connection opens it.
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = _writer_connection(self.path)

    def _run_call(self, call: _Call) -> None:
        conn = self._conn
        try:
            if call.transaction:
                conn.execute("BEGIN IMMEDIATE")
            result = call.fn(conn)
            if call.transaction:
                conn.execute("COMMIT")
        except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
            self._rollback()
            if isinstance(exc, sqlite3.Error | OSError) and is_disk_full(exc, self.data_dir):
                self.notify_disk_full()
                exc = StorageFull(None)
            self._loop.call_soon_threadsafe(_set_exception, call.future, exc)
            return
        self._loop.call_soon_threadsafe(_set_result, call.future, result)

    # ---------------------------------------------------------- loop-side result delivery

    def _resolve_batch(self, batch: list[_Append], first_seq: int) -> None:
        seq = first_seq
        for item in batch:
            n = len(item.rows)
            _set_result(item.future, list(range(seq, seq + n)))
            seq += n
            self._queued -= 1
        self._queue_space.set()

    def _fail_items(self, items: list[_Append], error: SyncError) -> None:
        for item in items:
            _set_exception(item.future, error)
            self._queued -= 1
        self._queue_space.set()

    def _fail_batch(self, batch: list[_Append], full: bool, error: str) -> None:
        for item in batch:
            exc: SyncError = (
                StorageFull(Priority(min(r.priority for r in item.rows)).label)
                if full
                else SyncError(f"journal write failed: {error}")
            )
            _set_exception(item.future, exc)
            self._queued -= 1
        self._queue_space.set()


def _quality_counts(record: NewRecord) -> dict[str, int] | None:
    """The per-reason counts of a data_quality record, checked here on the loop: a bad value
    must fail its own append, not the writer thread that sums it."""
    counts = record.body.get("counts")
    if not isinstance(counts, Mapping):
        return None
    out: dict[str, int] = {}
    for reason, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"data_quality count for {reason!r} is not an integer: {n!r}")
        out[str(reason)] = n
    return out


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_ts_prefix: tuple[int, str] = (-1, "")


def format_ts_now() -> str:
    """format_ts(now), several times cheaper: the per-second prefix is cached."""
    global _ts_prefix
    micros = time.time_ns() // 1000
    second, fraction = divmod(micros, 1_000_000)
    cached_second, prefix = _ts_prefix
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _ts_prefix = (second, prefix)  # one tuple: safe to share between threads
    return f"{prefix}{fraction:06d}Z"


LOCK_FILE = "journal.lock"


def acquire_writer_lock(data_dir: Path) -> int:
    """Take the data directory's writer lock (flock: the kernel drops it when the process dies,
    so a SIGKILL never leaves a stale lock). Raises JournalLocked naming the holder."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise JournalLocked(str(data_dir), holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def writer_lock_holder(data_dir: Path) -> str | None:
    """Who holds the writer lock now, or None when nobody does (read-only check)."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def read_seq_reservation(data_dir: Path) -> int:
    try:
        return int((data_dir / SEQ_RESERVATION_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def write_seq_reservation(data_dir: Path, ceiling: int) -> None:
    target = data_dir / SEQ_RESERVATION_FILE
    temp = data_dir / f"{SEQ_RESERVATION_FILE}.tmp"
    with temp.open("w") as handle:
        handle.write(f"{ceiling}\n")
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(target)
    fsync_dir(data_dir)


def _writer_connection(path: Path) -> sqlite3.Connection:
    conn = connect(path, readonly=False)
    try:
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            # Must precede the first table: lets retention hand freed pages back to the file
            # system.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("PRAGMA cache_size = -16000")
    except BaseException:
        # A file that is not a database fails here; the caller quarantines it.
        conn.close()
        raise
    return conn


def _open_sync(
    data_dir: Path, full_check_limit: int, payloads: PayloadStore | None
) -> tuple[sqlite3.Connection, int, int, RecoveryReport, JournalIdentity]:
    path = data_dir / JOURNAL_FILE
    conn, report = open_checked(path, full_check_limit, _writer_connection)
    migrate(conn)
    identity = read_identity(conn)
    if identity is None:  # the meta rows were removed by hand: a new journal from here on
        conn.execute("BEGIN IMMEDIATE")
        identity = ensure_identity(conn)
        conn.execute("COMMIT")
    reserved = read_seq_reservation(data_dir)
    hw_row = conn.execute("SELECT value FROM meta WHERE key = 'seq_hw'").fetchone()
    high = max(int(hw_row[0]) if hw_row else 0, JournalReader(conn).max_seq())
    if hw_row is None and reserved > 0:
        # A journal that has never committed a record beside a reservation that says seqs were
        # handed out: journal.db was lost (deleted, or a crash between quarantine and salvage).
        # Those seqs may have shipped; reusing them would make upstream drop new records.
        high = max(high, reserved)
    if report.salvaged is not None:
        # The lost tail may have held seqs that already shipped: start above every seq that
        # could ever have been handed out.
        high = max(high, reserved, report.salvaged.old_high_water)
        report.salvaged.next_seq = high + 1
    if payloads is not None:
        report.payloads = reconcile_payloads(conn, payloads)
    return conn, high + 1, max(reserved, high), report, identity
