"""An in-memory `RecordStore` (receiver/backend.py) for unit tests of the receiver's handlers:
the same contract as receiver.db and PostgreSQL (tests/test_store_contract.py runs the same
tests on all three), no files, no server, a clock of its own, and a switch that makes it
unreachable (`available = False`: every call answers `503 database unavailable`, as PostgreSQL's
store does when the database is down)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from receiver.backend import (
    ALERT_WINDOW_S,
    DEFAULT_CONCURRENT_QUIET_S,
    HEALTH_FIELDS,
    BatchResult,
    FleetFigures,
    FleetRow,
    JournalSpan,
    PublishedPackage,
    RecentRecords,
    RecordFilter,
    RecordPage,
    ShoreRecord,
    StoredRecord,
    TokenEntry,
    bad_cursor,
    concurrent_journals,
    conflict_refusal,
    format_ts,
    payload_refs,
    same_record,
)
from receiver.batches import IncomingBatch
from receiver.fleet_store import day_start
from receiver.protocol import Refusal


@dataclass
class _Row:
    appliance_id: str
    journal_id: str
    seq: int
    priority: str
    kind: str
    ts: str
    received_s: float
    line: str
    arrival: int


@dataclass
class _Counts:
    first_seen_s: float
    last_seen_s: float
    records: int = 0
    duplicates: int = 0
    batches: int = 0
    payloads: int = 0
    payload_bytes: int = 0
    conflicts: int = 0
    max_seq: int | None = None
    follows: str | None = None


@dataclass
class MemoryStore:
    """Everything in dicts; `clock` gives the store's time (seconds since the epoch)."""

    clock: Callable[[], float] = time.time
    concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S
    available: bool = True
    closed: bool = False
    rows: dict[tuple[str, str, int], _Row] = field(default_factory=dict)
    appliances: dict[str, _Counts] = field(default_factory=dict)
    journals: dict[tuple[str, str], _Counts] = field(default_factory=dict)
    batches: dict[tuple[str, str, str], tuple[int, float]] = field(default_factory=dict)
    payloads: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    published: dict[tuple[str, str], PublishedPackage] = field(default_factory=dict)
    kept_tokens: list[TokenEntry] = field(default_factory=list)
    flagged: dict[str, list[str]] = field(default_factory=dict)  # concurrent journals, last seen

    def _check(self) -> None:
        if not self.available:
            raise Refusal(
                503,
                "database unavailable",
                "the receiver's database cannot be reached; nothing was stored, send again later",
                {"Retry-After": "5"},
            )

    def _touch(self, appliance_id: str, journal_id: str | None, now: float) -> None:
        counts = self.appliances.setdefault(appliance_id, _Counts(now, now))
        counts.last_seen_s = now
        if journal_id is not None:
            journal = self.journals.setdefault((appliance_id, journal_id), _Counts(now, now))
            journal.last_seen_s = now

    def _spans(self, appliance_id: str) -> list[JournalSpan]:
        return [
            JournalSpan(journal_id, c.first_seen_s, c.last_seen_s, c.follows)
            for (one, journal_id), c in self.journals.items()
            if one == appliance_id
        ]

    # -- batches and payloads ------------------------------------------------------------

    async def store_batch(self, batch: IncomingBatch) -> BatchResult:
        self._check()
        now = self.clock()
        key = (batch.appliance_id, batch.journal_id)
        fresh = [r for r in batch.records if (*key, r.seq) not in self.rows]
        conflicts = sorted(
            r.seq
            for r in batch.records
            if (*key, r.seq) in self.rows and not same_record(self.rows[(*key, r.seq)].line, r.line)
        )
        self._touch(batch.appliance_id, batch.journal_id, now)
        journal = self.journals[key]
        if journal.follows is None:
            journal.follows = batch.follows
        if conflicts:
            journal.conflicts += len(conflicts)
            raise conflict_refusal(batch, conflicts)
        newest = max((row.arrival for row in self.rows.values()), default=0)
        for arrival, record in enumerate(fresh, start=newest + 1):
            self.rows[(*key, record.seq)] = _Row(
                *key, record.seq, batch.priority, record.kind, record.ts, now, record.line, arrival
            )
        duplicates = len(batch.records) - len(fresh)
        batch_key = (*key, batch.batch_id)
        new_batch = batch_key not in self.batches
        stored_before = self.batches[batch_key][0] if not new_batch else 0
        first_received = now if new_batch else self.batches[batch_key][1]
        self.batches[batch_key] = (stored_before + len(fresh), first_received)
        for counts in (self.appliances[batch.appliance_id], journal):
            counts.records += len(fresh)
            counts.duplicates += duplicates
            counts.batches += int(new_batch)
        journal.max_seq = max(journal.max_seq or 0, batch.last_seq)
        spans = self._spans(batch.appliance_id)
        concurrent = concurrent_journals(spans, now, self.concurrent_quiet)
        changed = self.flagged.get(batch.appliance_id, []) != concurrent
        self.flagged[batch.appliance_id] = concurrent
        return BatchResult(len(fresh), duplicates, concurrent, changed)

    async def record_payload(
        self, appliance_id: str, sha256: str, size: int, journal_id: str | None
    ) -> None:
        self._check()
        if (appliance_id, sha256) in self.payloads:
            return
        now = self.clock()
        self.payloads[(appliance_id, sha256)] = (size, now)
        self._touch(appliance_id, journal_id, now)
        counted = [self.appliances[appliance_id]]
        if journal_id is not None:
            counted.append(self.journals[(appliance_id, journal_id)])
        for counts in counted:
            counts.payloads += 1
            counts.payload_bytes += size

    async def summary(self, appliance_id: str) -> dict[str, Any]:
        self._check()
        counts = self.appliances.get(appliance_id, _Counts(0.0, 0.0))
        journals = sorted(
            ((j, c) for (a, j), c in self.journals.items() if a == appliance_id),
            key=lambda item: (item[1].first_seen_s, item[0]),
        )
        seqs = [c.max_seq for _, c in journals if c.max_seq is not None]
        return {
            "records": counts.records,
            "max_seq": max(seqs) if seqs else None,
            "duplicates_ignored": counts.duplicates,
            "payloads": counts.payloads,
            "payload_bytes": counts.payload_bytes,
            "batches": counts.batches,
            "journals": [
                {
                    "journal_id": journal_id,
                    "first_seen": format_ts(c.first_seen_s),
                    "last_seen": format_ts(c.last_seen_s),
                    "follows": c.follows,
                    "records": c.records,
                    "max_seq": c.max_seq,
                    "batches": c.batches,
                    "duplicates_ignored": c.duplicates,
                    "conflicts_refused": c.conflicts,
                    "payloads": c.payloads,
                    "payload_bytes": c.payload_bytes,
                }
                for journal_id, c in journals
            ],
            "concurrent_journals": concurrent_journals(
                self._spans(appliance_id), self.clock(), self.concurrent_quiet
            ),
        }

    # -- model packages and tokens -----------------------------------------------------------

    async def packages(self) -> list[PublishedPackage]:
        self._check()
        return sorted(self.published.values(), key=lambda p: (p.published_at, p.name, p.version))

    async def package_by_sha256(self, sha256: str) -> PublishedPackage | None:
        self._check()
        return next((p for p in self.published.values() if p.sha256 == sha256), None)

    async def package_by_version(self, name: str, version: str) -> PublishedPackage | None:
        self._check()
        return self.published.get((name, version))

    async def save_package(self, package: PublishedPackage) -> PublishedPackage:
        self._check()
        held = self.published.get((package.name, package.version))
        kept = (
            package
            if held is None
            else replace(held, appliances=package.appliances, groups=package.groups)
        )
        self.published[(package.name, package.version)] = kept
        return kept

    async def tokens(self) -> list[TokenEntry]:
        self._check()
        return list(self.kept_tokens)

    async def add_token(self, entry: TokenEntry) -> None:
        self._check()
        if any(kept.digest == entry.digest for kept in self.kept_tokens):
            raise ValueError("that token is already kept; make another one")
        self.kept_tokens.append(entry)

    async def revoke_tokens(
        self, *, appliance_id: str | None = None, token_id: str | None = None
    ) -> int:
        self._check()
        revoked = 0
        for index, entry in enumerate(self.kept_tokens):
            if entry.revoked_at is not None:
                continue
            if appliance_id is not None and entry.appliance_id != appliance_id:
                continue
            if token_id is not None and entry.token_id != token_id:
                continue
            self.kept_tokens[index] = replace(entry, revoked_at=format_ts(self.clock()))
            revoked += 1
        return revoked

    # -- reads -------------------------------------------------------------------------------

    async def records_after(
        self, cursor: str | None, wanted: RecordFilter, limit: int
    ) -> RecordPage:
        self._check()
        if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
            raise bad_cursor(cursor)
        after = int(cursor or 0)
        matching = sorted(
            (
                row
                for row in self.rows.values()
                if row.arrival > after
                and wanted.appliance_id in (None, row.appliance_id)
                and (not wanted.kinds or row.kind in wanted.kinds)
                and (not wanted.priorities or row.priority in wanted.priorities)
            ),
            key=lambda row: row.arrival,
        )
        more = len(matching) > limit
        page = matching[:limit]
        newest = max((row.arrival for row in self.rows.values()), default=0)
        last = page[-1].arrival if more else max(after, newest)
        records = [
            StoredRecord(r.appliance_id, r.journal_id, r.seq, format_ts(r.received_s), r.line)
            for r in page
        ]
        return RecordPage(records, str(last), more)

    async def fleet(self, appliance_id: str | None = None) -> FleetFigures:
        self._check()
        now = self.clock()
        today = day_start(now)
        since = format_ts(now - ALERT_WINDOW_S)
        rows = []
        for one in sorted(self.appliances):
            if appliance_id not in (None, one):
                continue
            counts = self.appliances[one]
            mine = [row for row in self.rows.values() if row.appliance_id == one]
            health = max((r for r in mine if r.kind == "health"), key=lambda r: r.ts, default=None)
            body = json.loads(health.line).get("body") if health is not None else None
            payloads_today = [
                size for (a, _), (size, at) in self.payloads.items() if a == one and at >= today
            ]
            rows.append(
                FleetRow(
                    appliance_id=one,
                    first_seen=format_ts(counts.first_seen_s),
                    last_seen=format_ts(counts.last_seen_s),
                    records=counts.records,
                    payloads=counts.payloads,
                    payload_bytes=counts.payload_bytes,
                    records_today=sum(
                        stored
                        for (a, _, _), (stored, first) in self.batches.items()
                        if a == one and first >= today
                    ),
                    payloads_today=len(payloads_today),
                    payload_bytes_today=sum(payloads_today),
                    alerts_24h=sum(r.priority == "alert" and r.ts >= since for r in mine),
                    health_ts=None if health is None else health.ts,
                    health=None
                    if not isinstance(body, dict)
                    else {name: body.get(name) for name in HEALTH_FIELDS},
                )
            )
        return FleetFigures(now, rows)

    async def recent_records(self, appliance_id: str, limit: int) -> RecentRecords:
        self._check()
        mine = sorted(
            (row for row in self.rows.values() if row.appliance_id == appliance_id),
            key=lambda row: row.ts,
            reverse=True,
        )

        def shore(row: _Row) -> ShoreRecord:
            return ShoreRecord(row.journal_id, row.seq, format_ts(row.received_s), row.line)

        alerts = [shore(r) for r in mine if r.priority == "alert"][:limit]
        media = [shore(r) for r in mine if payload_refs(r.line)][:limit]
        wanted = {sha for record in [*alerts, *media] for sha in payload_refs(record.line)}
        held = {
            sha: size
            for (one, sha), (size, _) in self.payloads.items()
            if one == appliance_id and sha in wanted
        }
        return RecentRecords(alerts, media, held)

    async def payload_size(self, appliance_id: str, sha256: str) -> int | None:
        self._check()
        held = self.payloads.get((appliance_id, sha256))
        return None if held is None else held[0]

    async def ping(self) -> None:
        if not self.available:
            raise ConnectionRefusedError("the in-memory database is switched off")

    async def close(self) -> None:
        self.closed = True
