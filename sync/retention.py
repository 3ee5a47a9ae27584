"""Retention: keeps journal + payloads inside the disk budget and the real disk's free space.

Order of eviction (DESIGN.md): synced data past keep_synced always goes; under pressure synced
data goes first, then unsynced data from the lowest priority up, so unsynced alerts are the very
last thing to go. Every eviction is counted by priority and reason and journalled as a record.
A real full disk (ENOSPC) sheds the lowest priorities, releases a ballast file so eviction has
room to run, reports the appliance degraded, and recovers by itself when space returns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from config import StorageSection
from sync.errors import StorageFull, SyncError
from sync.journal import Journal
from sync.payloads import PayloadStore
from sync.reader import JournalReader
from sync.records import NewRecord, Priority, format_ts
from sync.rollup import TelemetryRollup

log = logging.getLogger(__name__)

BALLAST_FILE = "reserve.ballast"
_CHUNK_ROWS = 2000
# Under disk pressure eviction aims above min_free, and the alarm clears only higher still,
# so the appliance does not flap between degraded and healthy.
_EVICT_TO_FREE = 1.25
_RECOVER_AT_FREE = 1.5
EVICTION_ORDER = (Priority.TELEMETRY, Priority.SAMPLE, Priority.EVENT, Priority.ALERT)


@dataclass(frozen=True)
class Usage:
    journal_bytes: int
    payload_bytes: int
    fs_free: int
    fs_total: int

    @property
    def used(self) -> int:
        return self.journal_bytes + self.payload_bytes


@dataclass
class _Tally:
    records: int = 0
    bytes: int = 0
    first_seq: int = 0
    last_seq: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "records": self.records,
            "bytes": self.bytes,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
        }


@dataclass
class EvictionReport:
    reason: str
    by_priority: dict[Priority, _Tally] = field(default_factory=dict)
    payload_files: int = 0
    payload_bytes: int = 0

    @property
    def records(self) -> int:
        return sum(t.records for t in self.by_priority.values())

    def body(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "evicted": {p.label: t.to_dict() for p, t in sorted(self.by_priority.items())},
            "payload_files": self.payload_files,
            "payload_bytes": self.payload_bytes,
        }


@dataclass(frozen=True)
class _Chunk:
    records: int
    bytes: int
    first_seq: int
    last_seq: int
    payload_shas: tuple[str, ...]
    payload_bytes: int
    exhausted: bool


def _evict_chunk(
    conn: sqlite3.Connection,
    priority: Priority,
    max_seq: int | None,
    byte_target: float,
    factor: float,
    reason: str,
    before_ts: str | None,
) -> _Chunk:
    """Delete the oldest records of one priority (at most up to max_seq) worth ~byte_target
    bytes, in one transaction on the writer thread; return what went."""
    sql = "SELECT seq, kind, size, payloads, ts FROM records WHERE priority = ?"
    args: list[Any] = [int(priority)]
    if max_seq is not None:
        sql += " AND seq <= ?"
        args.append(max_seq)
    rows = conn.execute(f"{sql} ORDER BY seq LIMIT ?", (*args, _CHUNK_ROWS)).fetchall()
    taken: list[tuple[int, str, int, str | None]] = []
    freed = 0.0
    exhausted = len(rows) < _CHUNK_ROWS
    for seq, kind, size, payloads, ts in rows:
        if before_ts is not None and ts >= before_ts:
            exhausted = True
            break
        taken.append((seq, kind, size, payloads))
        freed += size * factor
        for sha in json.loads(payloads) if payloads else ():
            # A payload frees its bytes only when this is its last reference.
            found = conn.execute(
                "SELECT size FROM payloads WHERE sha256 = ? AND refs <= 1", (sha,)
            ).fetchone()
            freed += found[0] if found else 0
        if freed >= byte_target:
            break
    if not taken:
        return _Chunk(0, 0, 0, 0, (), 0, True)
    first, last = taken[0][0], taken[-1][0]
    by_kind: dict[str, list[int]] = {}
    refs: dict[str, int] = {}
    for _seq, kind, size, payloads in taken:
        tally = by_kind.setdefault(kind, [0, 0])
        tally[0] += 1
        tally[1] += size
        for sha in json.loads(payloads) if payloads else ():
            refs[sha] = refs.get(sha, 0) + 1
    record_bytes = sum(t[1] for t in by_kind.values())
    conn.execute(
        "DELETE FROM records WHERE priority = ? AND seq BETWEEN ? AND ?",
        (int(priority), first, last),
    )
    conn.executemany(
        "UPDATE counts SET records = records - ?, bytes = bytes - ? WHERE priority = ? AND kind = ?",
        [(n, b, int(priority), kind) for kind, (n, b) in by_kind.items()],
    )
    conn.executemany(
        "UPDATE payloads SET refs = refs - ? WHERE sha256 = ?", [(n, s) for s, n in refs.items()]
    )
    gone = (
        conn.execute(
            f"SELECT sha256, size FROM payloads WHERE refs <= 0 AND sha256 IN ({', '.join('?' * len(refs))})",
            list(refs),
        ).fetchall()
        if refs
        else []
    )
    if gone:
        conn.executemany("DELETE FROM payloads WHERE sha256 = ?", [(sha,) for sha, _ in gone])
    payload_bytes = sum(int(size) for _, size in gone)
    conn.execute(
        "INSERT INTO evictions (priority, reason, records, bytes) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(priority, reason) DO UPDATE SET records = records + excluded.records, "
        "bytes = bytes + excluded.bytes",
        (int(priority), reason, len(taken), record_bytes + payload_bytes),
    )
    return _Chunk(
        records=len(taken),
        bytes=record_bytes + payload_bytes,
        first_seq=first,
        last_seq=last,
        payload_shas=tuple(sha for sha, _ in gone),
        payload_bytes=payload_bytes,
        exhausted=exhausted and len(taken) == len(rows),
    )


class StorageGuard:
    """Owns the disk budget: measures usage, evicts, sheds load on a full disk, recovers."""

    def __init__(
        self,
        journal: Journal,
        payloads: PayloadStore,
        settings: StorageSection,
        rollup: TelemetryRollup | None = None,
    ) -> None:
        self.journal = journal
        self.payloads = payloads
        self.settings = settings
        # Tiered telemetry (storage.tiers): rolled up once an hour, and before evicting for the
        # budget, so that old readings become aggregates before anything is evicted whole.
        self.rollup = rollup
        self.ballast = journal.data_dir / BALLAST_FILE
        self.degraded_reason: str | None = None
        self.last_usage: Usage | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[list[EvictionReport]]] = set()
        self._unjournalled: list[EvictionReport] = []
        self._full_events = 0

    async def __aenter__(self) -> StorageGuard:
        self.journal.on_disk_full(self._on_disk_full)
        await asyncio.to_thread(self._ensure_ballast)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------------------------- state

    @property
    def shed_level(self) -> int:
        return self.journal.shed_level

    def _set_level(self, level: int) -> None:
        level = max(0, min(3, level))
        if level != self.journal.shed_level:
            shed = [p.label for p in Priority if level and p >= 5 - level]
            if level:
                log.warning(
                    "disk full: shedding load",
                    extra={"fields": {"shed_level": level, "shedding": shed}},
                )
            else:
                log.info("disk space recovered: accepting every priority again")
        self.journal.shed_level = level
        self.degraded_reason = "disk_full" if level else None

    def _on_disk_full(self) -> None:
        """A write hit ENOSPC: release the ballast, shed one more priority, evict at once."""
        self._full_events += 1
        with contextlib.suppress(OSError):
            self.ballast.unlink(missing_ok=True)
        self._set_level(self.journal.shed_level + 1)
        if not self._lock.locked():
            task = asyncio.get_running_loop().create_task(
                self.run_once(), name="retention-emergency"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _ensure_ballast(self) -> None:
        size = self.settings.reserve
        if size <= 0 or (self.ballast.exists() and self.ballast.stat().st_size >= size):
            return
        try:
            if shutil.disk_usage(self.journal.data_dir).free < size + self.settings.min_free:
                return
            with self.ballast.open("wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, size)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            self.ballast.unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EOPNOTSUPP, errno.EINVAL):
                raise

    # ----------------------------------------------------------------------------- usage

    async def usage(self) -> Usage:
        payload_bytes = (await self.journal.read(JournalReader.payload_totals))[1]
        journal_bytes = await self.journal.read(JournalReader.live_bytes)
        disk = shutil.disk_usage(self.journal.data_dir)
        usage = Usage(journal_bytes, payload_bytes, disk.free, disk.total)
        self.last_usage = usage
        return usage

    async def _bytes_factor(self) -> float:
        """Journal page bytes per estimated record byte (page slack, index entries), measured
        now, for sizing evictions. The empty journal's fixed pages are left out: on a small
        journal they would make every record look several times its size."""

        def measure(reader: JournalReader) -> tuple[int, int]:
            counted = sum(b for *_, b in reader.counts())
            return reader.live_bytes() - reader.fixed_bytes(), counted

        live, counted = await self.journal.read(measure)
        return max(1.0, min(10.0, live / counted)) if counted > 0 and live > 0 else 1.0

    # -------------------------------------------------------------------------- the pass

    async def run_once(self) -> list[EvictionReport]:
        """One retention pass (the scheduled job, and at once after a write hit ENOSPC)."""
        async with self._lock:
            full_events_before = self._full_events
            reports: list[EvictionReport] = []
            await self._retry_unjournalled()
            usage = await self.usage()
            if self.rollup is not None and (
                self.rollup.due()
                or (self.rollup.enabled and usage.used > self.settings.disk_budget)
            ):
                rolled = await self.rollup.run_once()
                if rolled.records:
                    await self._compact()
                    usage = await self.usage()
            if self.journal.shed_level or usage.fs_free < _RECOVER_AT_FREE * self.settings.min_free:
                # Near the edge the WAL's size swings free space by megabytes; measure without it.
                with contextlib.suppress(SyncError, sqlite3.Error):
                    await self.journal.checkpoint()
                usage = await self.usage()
            free_at_start = usage.fs_free
            if free_at_start < self.settings.min_free:
                # The real disk, not the budget, is the limit now: shed and say so.
                self._set_level(max(1, self.journal.shed_level))
            under_pressure = self.journal.shed_level > 0
            if self.settings.keep_synced > 0:
                cutoff = format_ts(datetime.now(UTC) - timedelta(seconds=self.settings.keep_synced))
                reports.append(
                    await self._evict(
                        float("inf"), "synced_expired", synced_only=True, before_ts=cutoff
                    )
                )
            usage = await self.usage()
            over_budget = usage.used - self.settings.disk_budget
            if over_budget > 0:
                # Evict a little more than needed so the next few records don't trigger it again.
                target = over_budget + 0.05 * self.settings.disk_budget
                reports.append(await self._evict(target, "disk_budget", synced_only=False))
            usage = await self.usage()
            if usage.fs_free < self.settings.min_free or under_pressure:
                reports.extend(await self._make_room(usage))
            done = [r for r in reports if r.records]
            if done:
                await self._compact()
                self.journal.space_freed()
                for report in done:
                    await self._journal_report(report)
            usage = await self.usage()
            if usage.fs_free < self.settings.min_free:
                self._set_level(max(1, self.journal.shed_level))
            elif (
                self.journal.shed_level
                and free_at_start >= _RECOVER_AT_FREE * self.settings.min_free
                and self._full_events == full_events_before
            ):
                # Only a pass that *starts* with room to spare clears the alarm: room that our
                # own eviction just made does not mean the disk stopped being full.
                self._set_level(0)
            if not self.journal.shed_level:
                await asyncio.to_thread(self._ensure_ballast)
            return done

    async def _make_room(self, usage: Usage) -> list[EvictionReport]:
        """The real disk is full: evict only what is being shed, escalating one priority at a
        time while that is not enough. Data we still take is never evicted to make room for
        more of itself, and alerts never go for a full disk (only for the configured budget),
        so another process filling the disk cannot make the appliance delete its alerts."""
        reports: list[EvictionReport] = []
        level = max(1, self.journal.shed_level)
        while True:
            self._set_level(level)
            need = _EVICT_TO_FREE * self.settings.min_free - usage.fs_free
            if need <= 0:
                break
            shed = tuple(p for p in EVICTION_ORDER if p >= 5 - level)
            report = await self._evict(need, "disk_full", synced_only=False, unsynced=shed)
            reports.append(report)
            if report.records:
                await self._compact()
                usage = await self.usage()
            if usage.fs_free >= self.settings.min_free or level >= 3:
                break
            level += 1
        return reports

    async def _evict(
        self,
        byte_target: float,
        reason: str,
        *,
        synced_only: bool,
        before_ts: str | None = None,
        unsynced: tuple[Priority, ...] = EVICTION_ORDER,
    ) -> EvictionReport:
        report = EvictionReport(reason)
        synced = await self.journal.read(JournalReader.synced_through)
        factor = await self._bytes_factor()
        remaining = byte_target
        phases: list[tuple[Priority, int | None]] = [
            (p, synced[p]) for p in EVICTION_ORDER if synced[p] > 0
        ]
        if not synced_only:
            phases += [(p, None) for p in EVICTION_ORDER if p in unsynced]
        for priority, max_seq in phases:
            while remaining > 0:
                evict = functools.partial(
                    _evict_chunk,
                    priority=priority,
                    max_seq=max_seq,
                    byte_target=remaining,
                    factor=factor,
                    reason=reason,
                    before_ts=before_ts,
                )
                chunk = await self.journal.execute_write(
                    functools.partial(self._evict_then_unlink, evict), transaction=False
                )
                if chunk.records:
                    tally = report.by_priority.setdefault(
                        priority, _Tally(first_seq=chunk.first_seq)
                    )
                    tally.records += chunk.records
                    tally.bytes += chunk.bytes
                    tally.last_seq = chunk.last_seq
                    remaining -= (chunk.bytes - chunk.payload_bytes) * factor + chunk.payload_bytes
                    report.payload_files += len(chunk.payload_shas)
                    report.payload_bytes += chunk.payload_bytes
                if chunk.exhausted or not chunk.records:
                    break
            if remaining <= 0:
                break
        if report.records:
            log.warning(
                "evicted records",
                extra={
                    "fields": {
                        "reason": reason,
                        **{p.label: t.records for p, t in report.by_priority.items()},
                    }
                },
            )
        return report

    def _evict_then_unlink(
        self, evict: Callable[[sqlite3.Connection], _Chunk], conn: sqlite3.Connection
    ) -> _Chunk:
        """On the writer thread: commit an eviction, then delete its payload files before any
        later append is written, so an append cannot commit a reference to a file being deleted."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            chunk = evict(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for sha in chunk.payload_shas:
            self.payloads.delete(sha)
        return chunk

    async def _compact(self) -> None:
        """Hand freed pages back to the file system (incremental vacuum, then a WAL truncate)."""
        try:
            # executescript, not execute: the sqlite3 module steps this pragma only once, and
            # each step frees a single page, so execute() would hand back one page per pass.
            await self.journal.execute_write(
                lambda conn: conn.executescript("PRAGMA incremental_vacuum;"), transaction=False
            )
            await self.journal.checkpoint()
        except (SyncError, sqlite3.Error) as exc:
            log.warning("compaction after eviction failed", extra={"fields": {"error": str(exc)}})

    async def _journal_report(self, report: EvictionReport) -> None:
        try:
            await self.journal.append(
                NewRecord(
                    source="retention", kind="eviction", priority=Priority.EVENT, body=report.body()
                ),
                wait_for_space=False,
                force=True,
            )
        except StorageFull:
            self._unjournalled.append(report)

    async def _retry_unjournalled(self) -> None:
        pending, self._unjournalled = self._unjournalled, []
        for report in pending:
            await self._journal_report(report)
