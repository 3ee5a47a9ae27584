"""The journal's writer thread: group commit of queued appends (N records or T ms), calls run on
the writer's connection, seq reservation, drop counts, disk-full detection and signalling, and
handing results back to the event loop with call_soon_threadsafe.

`JournalWriter` is the writer half of `Journal` (sync/journal.py), its only subclass: the state
the writer thread shares with the loop is set up here, the producers' side lives there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from config import JournalSection
from sync.errors import PayloadError, StorageFull, SyncError
from sync.journal_open import SEQ_RESERVATION_BLOCK, write_seq_reservation, writer_connection
from sync.payloads import PayloadStore
from sync.reader import JOURNAL_FILE
from sync.records import PayloadRef, Priority

# The journal's logger, whichever of its modules writes the line.
log = logging.getLogger("sync.journal")
T = TypeVar("T")

# SQLite result codes (low byte of the extended code).
_SQLITE_IOERR, _SQLITE_FULL = 10, 13

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
class EncodedRow:
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
class AppendRow:
    rows: list[EncodedRow]
    future: asyncio.Future[list[int]]


@dataclass(slots=True)
class WriterCall:
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


class JournalWriter:
    """The writer thread and the state it shares with the loop; `Journal` adds the producers'
    side (appends, writer-side calls, reads, open and close) and starts the thread."""

    def __init__(
        self,
        data_dir: Path,
        conn: sqlite3.Connection,
        *,
        appliance_id: str,
        settings: JournalSection,
        next_seq: int,
        reserved_seq: int,
        payloads: PayloadStore | None,
    ) -> None:
        self.data_dir = data_dir
        self.path = data_dir / JOURNAL_FILE
        self.appliance_id = appliance_id
        self.boot_id = uuid.uuid4().hex
        self.settings = settings
        self.payloads = payloads
        self.stats = WriterStats()
        self._conn = conn
        self._next_seq = next_seq
        self._reserved_seq = reserved_seq
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[AppendRow | WriterCall | None] = queue.SimpleQueue()
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
        self._disk_full_listeners: list[Callable[[], None]] = []
        self._drop_lock = threading.Lock()
        self._unflushed_drops: Counter[tuple[int, str]] = Counter()

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

    # ------------------------------------------------------------------------ writer thread

    def _writer_main(self) -> None:
        max_records = self.settings.commit_records
        delay = self.settings.commit_delay
        stopping = False
        # An append that would push the open batch past max_records starts the next one.
        carry: AppendRow | None = None
        while not stopping:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is None:
                break
            if isinstance(item, WriterCall):
                self._run_call(item)
                continue
            batch = [item]
            count = len(item.rows)
            deadline = time.monotonic() + delay
            deferred: WriterCall | None = None
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
                if isinstance(nxt, WriterCall):
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
            if isinstance(item, WriterCall):
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

    def _commit(self, batch: list[AppendRow], count: int) -> None:
        try:
            if self.payloads is not None and any(r.payloads for a in batch for r in a.rows):
                batch, count = self._drop_vanished_payloads(batch, count)
            if batch:
                self._commit_batch(batch, count)
        finally:
            self._settled += len(batch)

    def _drop_vanished_payloads(
        self, batch: list[AppendRow], count: int
    ) -> tuple[list[AppendRow], int]:
        """Fail appends whose payload file is gone: `put` may have found an existing file that
        retention deleted (on this same thread, after its commit) before the record arrived."""
        assert self.payloads is not None
        kept: list[AppendRow] = []
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

    def _commit_batch(self, batch: list[AppendRow], count: int) -> None:
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
            self._conn = writer_connection(self.path)

    def _run_call(self, call: WriterCall) -> None:
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

    def _resolve_batch(self, batch: list[AppendRow], first_seq: int) -> None:
        seq = first_seq
        for item in batch:
            n = len(item.rows)
            _set_result(item.future, list(range(seq, seq + n)))
            seq += n
            self._queued -= 1
        self._queue_space.set()

    def _fail_items(self, items: list[AppendRow], error: SyncError) -> None:
        for item in items:
            _set_exception(item.future, error)
            self._queued -= 1
        self._queue_space.set()

    def _fail_batch(self, batch: list[AppendRow], full: bool, error: str) -> None:
        for item in batch:
            exc: SyncError = (
                StorageFull(Priority(min(r.priority for r in item.rows)).label)
                if full
                else SyncError(f"journal write failed: {error}")
            )
            _set_exception(item.future, exc)
            self._queued -= 1
        self._queue_space.set()
