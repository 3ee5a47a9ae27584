"""The journal: journal.db in WAL mode behind one writer thread with group commit.

A record is reported written (its seq returned) only after the transaction holding it is
committed with synchronous=FULL, i.e. fsync'd. Producers on the event loop never touch SQLite:
they queue rows, the writer batches them (N records or T ms), and results come back to the loop
with call_soon_threadsafe.

The writer thread itself is sync/journal_writer.py (`JournalWriter`, this class's base); the
writer lock, the seq reservation and opening the file are sync/journal_open.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from config import JournalSection
from sync.errors import JournalClosed, StorageFull
from sync.identity import JournalIdentity, new_journal_id, read_identity, write_identity
from sync.journal_open import acquire_writer_lock, open_for_writing
from sync.journal_writer import AppendRow, EncodedRow, JournalWriter, WriterCall, format_ts_now
from sync.payloads import PayloadStore
from sync.reader import JournalReader, connect
from sync.records import RECORD_OVERHEAD_BYTES, NewRecord, Priority, format_ts
from sync.recovery import (
    CLEAN_STOP_KEY,
    CheckOutcome,
    IntegrityState,
    RecoveryReport,
    clean_stop_mark,
    run_check_process,
    write_damage_flag,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long an alert waits for retention to make room before it is counted as dropped.
ALERT_SPACE_WAIT_S = 30.0

# One encoder for every record: json.dumps with options builds a new one on each call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class Journal(JournalWriter):
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
        super().__init__(
            data_dir,
            conn,
            appliance_id=appliance_id,
            settings=settings,
            next_seq=next_seq,
            reserved_seq=reserved_seq,
            payloads=payloads,
        )
        # Made when the journal was created and kept for its life (sync/identity.py).
        self.identity = identity
        self.recovery = recovery
        # The file's integrity as this run knows it; the background check keeps it current.
        self.integrity: IntegrityState = recovery.integrity
        self._check_task: asyncio.Task[None] | None = None
        self.shed_level = 0  # 0 accept all; 1 shed telemetry; 2 also samples; 3 also events
        # Where the appliance is, stamped as `position` into every record's body (ships: the
        # last NMEA fix); None, or a provider answering None, stamps nothing.
        self.position_source: Callable[[], Mapping[str, Any] | None] | None = None
        self._space_freed = asyncio.Event()
        self._lock_fd: int | None = None
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._reader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        # Figures for people (the health record's backlog: a count over every record a
        # destination has not acknowledged) on a reader of their own: at a full 20 GiB journal
        # they take tens of seconds cold, and on the shared reader they held up every engine's
        # next batch for as long.
        self._figures_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-figures")
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
                open_for_writing, data_dir, settings.full_check_limit, payloads
            )
        except BaseException:
            os.close(lock_fd)
            raise
        conn, next_seq, reserved, recovery, identity = opened
        log.info(
            "journal opened",
            extra={
                "fields": {
                    "last_stop": recovery.integrity.last_stop,
                    "check": recovery.check,
                    "integrity": recovery.integrity.state,
                    "seconds": recovery.seconds,
                }
            },
        )
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
        # Before any record of this run: a crash from here on must find no clean-stop mark.
        conn.execute("DELETE FROM meta WHERE key = ?", (CLEAN_STOP_KEY,))
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
        """Stop a background check, commit everything queued, mark the stop clean (when the
        file is known sound), stop the writer, close connections. Safe to call twice."""
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.ensure_future(self._finish_close())
        await asyncio.shield(self._close_task)

    async def _finish_close(self) -> None:
        await self.stop_integrity_check()
        marked: asyncio.Future[None] | None = None
        if self.integrity.vouched:
            # Queued behind every append already handed over: the mark is the last write.
            marked = self._loop.create_future()
            self._queue.put(WriterCall(self._mark_clean_stop, marked, True))
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        if marked is not None:
            try:
                await marked
            except Exception as exc:  # the next start checks the file: slower, never unsafe
                log.warning("could not mark the stop clean", extra={"fields": {"error": str(exc)}})
        await asyncio.to_thread(self._figures_pool.shutdown, wait=True)
        await self._loop.run_in_executor(self._reader_pool, self._close_reader)
        self._reader_pool.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the writer lock
            self._lock_fd = None

    @staticmethod
    def _mark_clean_stop(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", clean_stop_mark(conn)
        )

    # ------------------------------------------------------------------- background check

    def start_integrity_check(self) -> asyncio.Task[None] | None:
        """Start the check an unclean stop left owed (`integrity.state == "pending"`) in a
        niced child process, while records keep flowing; None when none is owed. Its result is
        journalled (`integrity_check`); damage is flagged for the next start to salvage. A
        close stops it (the next start runs it again)."""
        state = self.integrity
        if state.state != "pending" or self._check_task is not None or self._closed:
            return None
        # Running from here, not from the task's first step: checkpoints go PASSIVE at once.
        state.state, state.started_at, state.detail = "running", format_ts_now(), ""
        self._check_task = asyncio.create_task(self._integrity_check(), name="journal:check")
        return self._check_task

    async def _integrity_check(self) -> None:
        state = self.integrity
        pragma = state.check or "integrity_check"
        log.info("journal check started", extra={"fields": {"check": pragma}})
        try:
            outcome = await run_check_process(self.path, pragma)
        except asyncio.CancelledError:
            state.state, state.started_at = "pending", None
            state.detail = "stopped before it finished; it runs again at the next start"
            raise
        except Exception as exc:  # no process could start (out of memory, no executable)
            log.error("journal check could not run", exc_info=exc)
            outcome = CheckOutcome("error", f"the check could not run: {exc}", None)
        outcome_state, detail = outcome.state, outcome.detail
        state.state, state.detail, state.seconds = outcome_state, detail, outcome.seconds
        state.checked_at = format_ts_now()
        if outcome_state == "failed":
            log.error("journal damaged: restart to salvage", extra={"fields": state.to_dict()})
            try:
                await asyncio.to_thread(write_damage_flag, self.data_dir, pragma, detail)
            except OSError as exc:  # no mark is written at close either: the next start checks
                log.error("could not flag the damage", extra={"fields": {"error": str(exc)}})
        else:
            log.info("journal check ended", extra={"fields": state.to_dict()})
        with contextlib.suppress(StorageFull, JournalClosed):
            await self.append(
                NewRecord(
                    source="journal",
                    kind="integrity_check",
                    priority=Priority.ALERT if outcome_state == "failed" else Priority.EVENT,
                    body=state.to_dict(),
                ),
                force=True,
            )

    async def stop_integrity_check(self) -> None:
        """Stop the background check (its child process is killed); it stays owed."""
        task = self._check_task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def checking(self) -> bool:
        """Whether the background check is reading the file now."""
        return self.integrity.state == "running"

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

    def _encode(self, record: NewRecord) -> EncodedRow:
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
        return EncodedRow(
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

    async def _submit(self, rows: list[EncodedRow]) -> list[int]:
        while self._queued >= self.settings.max_pending:
            self._queue_space.clear()
            await self._queue_space.wait()
        if self._closed:
            raise JournalClosed("the journal is closed")
        self._queued += 1
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._handed_over += 1
        self._queue.put(AppendRow(rows, future))
        return await future

    def _count_drops(self, rows: Sequence[EncodedRow], reason: str) -> None:
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
    # (on_disk_full and notify_disk_full are the writer's: sync/journal_writer.py)

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
        self._queue.put(WriterCall(fn, future, transaction))
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
        """Checkpoint and truncate the WAL; returns SQLite's (busy, wal frames, checkpointed).
        While the background check reads (one long read transaction), PASSIVE only: TRUNCATE
        would wait for it, holding the writer for the whole busy timeout (30 s)."""
        mode = "PASSIVE" if self.checking else "TRUNCATE"

        def run(conn: sqlite3.Connection) -> tuple[int, int, int]:
            row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            return int(row[0]), int(row[1]), int(row[2])

        return await self.execute_write(run, transaction=False)

    # --------------------------------------------------------------------------------- reads

    async def read(self, fn: Callable[[JournalReader], T]) -> T:
        """Run a query on the journal's reader thread (never blocks the writer or the loop)."""
        if self._closed:
            raise JournalClosed("the journal is closed")
        return await self._loop.run_in_executor(self._reader_pool, self._with_reader, fn)

    async def read_figures(self, fn: Callable[[JournalReader], T]) -> T:
        """`read` on a reader thread of its own, for slow figures (backlog counts) that must not
        delay the engines' reads."""
        if self._closed:
            raise JournalClosed("the journal is closed")
        return await self._loop.run_in_executor(self._figures_pool, self._with_reader, fn)

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
