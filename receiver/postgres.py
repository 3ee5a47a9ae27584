"""Owns the fleet store: the receiver's rows in PostgreSQL (schema `receiver`, documented in
docs/fleet.md for the tools that query it), its named migrations, and a `RecordStore` on an
asyncpg pool that any number of receiver replicas share.

Idempotency lives in the database: `record_keys` holds every (appliance, journal, seq) once (its
primary key), so a resend, an overlapping batch or the same batch arriving through two replicas
at once stores each record once (the second insert waits for the first to commit, then finds
the key). `records` is partitioned by month of arrival (`received_at`) so an old month can be
dropped whole (docs/fleet.md); the keys outlive their rows, so a record resent after its month
was dropped is still a duplicate, not a new record. Time is the database's (`now()`), not the
replica's: replicas with wrong clocks agree on first/last seen and on partitions.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg

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
    same_record,
)
from receiver.batches import IncomingBatch
from receiver.fleet_store import (
    postgres_fleet,
    postgres_payload_size,
    postgres_recent,
)
from receiver.postgres_schema import (
    MIGRATIONS,
    PARTITION_LOCK,
    SCHEMA,
    migrate,
    month_bounds,
    partition_name,
)
from receiver.protocol import Refusal
from receiver.reads_store import postgres_records_after
from sync.identity import LEGACY_JOURNAL

if TYPE_CHECKING:
    from receiver.postgres_schema import Conn

log = logging.getLogger(__name__)


def _ts(moment: datetime) -> str:
    return format_ts(moment.timestamp())


def record_time(ts: str) -> datetime | None:
    """A record's `ts` as a time, for `records.at` (None when it is not ISO-8601)."""
    try:
        moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def storable_json(line: str) -> bool:
    """Whether jsonb can hold the line's record: it cannot hold a NUL character (`\\u0000`);
    such a record keeps its exact line in `records.line` instead."""
    return "\\u0000" not in line


_INSERT_RECORDS = f"""
WITH incoming AS (
    SELECT * FROM unnest($3::bigint[], $4::text[], $5::text[], $6::timestamptz[], $7::jsonb[],
                         $8::text[]) AS t(seq, kind, ts, at, record, line)
), fresh AS (
    INSERT INTO {SCHEMA}.record_keys (appliance_id, journal_id, seq, received_at)
    SELECT $1, $2, seq, $11 FROM incoming
    ON CONFLICT DO NOTHING
    RETURNING seq
)
INSERT INTO {SCHEMA}.records
    (appliance_id, journal_id, seq, priority, kind, ts, at, batch_id, received_at, record, line)
SELECT $1, $2, i.seq, $9, i.kind, i.ts, i.at, $10, $11, i.record, i.line
FROM incoming i JOIN fresh f USING (seq)
RETURNING seq
"""

_STORED_LINES = f"""
SELECT r.seq, COALESCE(r.line, r.record::text) AS line
FROM {SCHEMA}.record_keys k
JOIN {SCHEMA}.records r ON r.appliance_id = k.appliance_id AND r.journal_id = k.journal_id
    AND r.seq = k.seq AND r.received_at = k.received_at
WHERE k.appliance_id = $1 AND k.journal_id = $2 AND k.seq = ANY($3::bigint[])
"""

_PACKAGE_COLUMNS = "name, version, sha256, size, appliances, groups, published_at"


def _package(row: asyncpg.Record) -> PublishedPackage:
    return PublishedPackage(
        row["name"],
        row["version"],
        row["sha256"],
        int(row["size"]),
        tuple(json.loads(row["appliances"])),
        tuple(json.loads(row["groups"])),
        row["published_at"],
    )


class StoreUnavailable(RuntimeError):
    """The database cannot be reached when the receiver starts (exit 1, the message says where)."""


def read_database_file(path: Path, what: str = "--database-file") -> str:
    """The PostgreSQL DSN kept in `path` (a secret: it may hold a password, so it never comes
    from the command line and is never echoed back). `what` names the setting in errors."""
    try:
        dsn = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path}: {exc}") from None
    if not dsn.startswith(("postgresql://", "postgres://")) or len(dsn.split()) != 1:
        raise ValueError(
            f"{what} {path} must hold one PostgreSQL URL, "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    return dsn


def describe_dsn(dsn: str) -> str:
    """Where `dsn` points, without its user or password: HOST:PORT/DATABASE, for logs."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


class _Conflict(Exception):
    def __init__(self, seqs: list[int]) -> None:
        super().__init__(f"{len(seqs)} conflicting records")
        self.seqs = seqs


class PostgresStore:
    """A `RecordStore` on PostgreSQL, shared by every replica. `clock` (seconds since the
    epoch) replaces the database's time in tests that age a journal."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.pool = pool
        self.concurrent_quiet = concurrent_quiet
        self.clock = clock
        self._partitions: set[str] = set()
        self._closed = False

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
        clock: Callable[[], float] | None = None,
        max_connections: int = 10,
    ) -> PostgresStore:
        """Connect (a pool of at most `max_connections`), migrate, and return the store."""
        try:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_connections)
        except Exception as exc:
            if not is_retryable(exc) and not isinstance(exc, asyncpg.PostgresError):
                raise
            raise StoreUnavailable(
                f"cannot open the receiver's database at {describe_dsn(dsn)}: {exc}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except asyncpg.PostgresError as exc:
            await pool.close()
            raise StoreUnavailable(
                f"cannot prepare the receiver's tables in {describe_dsn(dsn)}: {exc}"
            ) from exc
        except BaseException:
            await pool.close()
            raise
        return cls(pool, concurrent_quiet=concurrent_quiet, clock=clock)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.pool.close()

    @contextlib.asynccontextmanager
    async def _available(self) -> AsyncIterator[None]:
        """The database down, restarting or cut off answers a retryable 503 (the appliance
        sends again later), never a permanent error: nothing was committed."""
        try:
            yield
        except Refusal:
            raise
        except Exception as exc:
            if not is_retryable(exc):
                raise
            log.warning("receiver database unavailable", extra={"fields": {"error": repr(exc)}})
            raise Refusal(
                503,
                "database unavailable",
                "the receiver's database cannot be reached; nothing was stored, send again later",
                {"Retry-After": "5"},
            ) from exc

    # -- time and partitions ---------------------------------------------------------------

    async def _now(self, conn: Conn) -> datetime:
        if self.clock is not None:
            return datetime.fromtimestamp(self.clock(), UTC)
        moment: datetime = await conn.fetchval("SELECT now()")
        return moment.astimezone(UTC)

    async def _ensure_partition(self, conn: Conn, moment: datetime) -> None:
        """The month partition of `records` that rows received at `moment` go to."""
        start, end = month_bounds(moment)
        name = partition_name(start)
        if name in self._partitions:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{name} PARTITION OF {SCHEMA}.records "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
        self._partitions.add(name)

    # -- batches ---------------------------------------------------------------------------

    async def store_batch(self, batch: IncomingBatch) -> BatchResult:
        async with self._available(), self.pool.acquire() as conn:
            now = await self._now(conn)
            await self._ensure_partition(conn, now)
            try:
                return await self._store_batch(conn, batch, now)
            except _Conflict as conflict:
                await self._count_conflicts(conn, batch, len(conflict.seqs), now)
                raise conflict_refusal(batch, conflict.seqs) from None

    async def _store_batch(self, conn: Conn, batch: IncomingBatch, now: datetime) -> BatchResult:
        appliance_id, journal_id = batch.appliance_id, batch.journal_id
        records = batch.records
        storable = [storable_json(r.line) for r in records]
        async with conn.transaction():
            await self._ensure_rows(conn, appliance_id, journal_id, now, batch.follows)
            inserted = await conn.fetch(
                _INSERT_RECORDS,
                appliance_id,
                journal_id,
                [r.seq for r in records],
                [r.kind for r in records],
                [r.ts for r in records],
                [record_time(r.ts) for r in records],
                [r.line if ok else None for r, ok in zip(records, storable, strict=True)],
                [None if ok else r.line for r, ok in zip(records, storable, strict=True)],
                batch.priority,
                batch.batch_id,
                now,
            )
            fresh = {row["seq"] for row in inserted}
            repeated = [r for r in records if r.seq not in fresh]
            if repeated:
                held = {
                    row["seq"]: row["line"]
                    for row in await conn.fetch(
                        _STORED_LINES, appliance_id, journal_id, [r.seq for r in repeated]
                    )
                }
                # A key whose month was dropped has no line left to compare: a duplicate.
                conflicts = sorted(
                    r.seq
                    for r in repeated
                    if r.seq in held and not same_record(held[r.seq], r.line)
                )
                if conflicts:
                    raise _Conflict(conflicts)
            stored, duplicates = len(fresh), len(repeated)
            new_batch = await conn.fetchval(
                f"INSERT INTO {SCHEMA}.batches (appliance_id, journal_id, batch_id, priority, "
                "first_seq, last_seq, times_received, stored, duplicates, first_received, "
                "last_received) VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8, $9, $9) "
                "ON CONFLICT (appliance_id, journal_id, batch_id) DO UPDATE SET "
                "times_received = batches.times_received + 1, "
                "stored = batches.stored + excluded.stored, "
                "duplicates = batches.duplicates + excluded.duplicates, "
                "last_received = excluded.last_received "
                "RETURNING (xmax = 0)",
                appliance_id,
                journal_id,
                batch.batch_id,
                batch.priority,
                batch.first_seq,
                batch.last_seq,
                stored,
                duplicates,
                now,
            )
            await conn.execute(
                f"UPDATE {SCHEMA}.appliances SET records = records + $2, "
                "duplicates_ignored = duplicates_ignored + $3, batches = batches + $4 "
                "WHERE appliance_id = $1",
                appliance_id,
                stored,
                duplicates,
                int(bool(new_batch)),
            )
            await conn.execute(
                f"UPDATE {SCHEMA}.journals SET records = records + $3, "
                "duplicates_ignored = duplicates_ignored + $4, batches = batches + $5, "
                "max_seq = GREATEST(COALESCE(max_seq, 0), $6) "
                "WHERE appliance_id = $1 AND journal_id = $2",
                appliance_id,
                journal_id,
                stored,
                duplicates,
                int(bool(new_batch)),
                batch.last_seq,
            )
            concurrent, changed = await self._judge_concurrency(conn, appliance_id, now)
        return BatchResult(
            stored=stored,
            duplicates=duplicates,
            concurrent_journals=concurrent,
            concurrency_changed=changed,
        )

    async def _ensure_rows(
        self,
        conn: Conn,
        appliance_id: str,
        journal_id: str,
        now: datetime,
        follows: str | None = None,
    ) -> None:
        await conn.execute(
            f"INSERT INTO {SCHEMA}.appliances (appliance_id, first_seen, last_seen) "
            "VALUES ($1, $2, $2) ON CONFLICT (appliance_id) DO UPDATE SET "
            "last_seen = GREATEST(appliances.last_seen, excluded.last_seen)",
            appliance_id,
            now,
        )
        await conn.execute(
            f"INSERT INTO {SCHEMA}.journals (appliance_id, journal_id, first_seen, last_seen, "
            "follows) VALUES ($1, $2, $3, $3, $4) ON CONFLICT (appliance_id, journal_id) "
            "DO UPDATE SET last_seen = GREATEST(journals.last_seen, excluded.last_seen), "
            "follows = COALESCE(journals.follows, excluded.follows)",
            appliance_id,
            journal_id,
            now,
            follows,
        )

    async def _count_conflicts(
        self, conn: Conn, batch: IncomingBatch, count: int, now: datetime
    ) -> None:
        """A refused batch stores nothing, but the refusal is counted for the summary."""
        async with conn.transaction():
            await self._ensure_rows(conn, batch.appliance_id, batch.journal_id, now)
            await conn.execute(
                f"UPDATE {SCHEMA}.journals SET conflicts_refused = conflicts_refused + $3 "
                "WHERE appliance_id = $1 AND journal_id = $2",
                batch.appliance_id,
                batch.journal_id,
                count,
            )

    async def _spans(self, conn: Conn, appliance_id: str) -> list[JournalSpan]:
        rows = await conn.fetch(
            f"SELECT journal_id, first_seen, last_seen, follows FROM {SCHEMA}.journals "
            "WHERE appliance_id = $1",
            appliance_id,
        )
        return [
            JournalSpan(
                row["journal_id"],
                row["first_seen"].timestamp(),
                row["last_seen"].timestamp(),
                row["follows"],
            )
            for row in rows
        ]

    async def _judge_concurrency(
        self, conn: Conn, appliance_id: str, now: datetime
    ) -> tuple[list[str], bool]:
        """(journals of this appliance id live at once, whether that set changed), kept in the
        appliances row so a change is logged once. Runs inside the caller's transaction."""
        concurrent = concurrent_journals(
            await self._spans(conn, appliance_id), now.timestamp(), self.concurrent_quiet
        )
        before = await conn.fetchval(
            f"SELECT concurrent_journals FROM {SCHEMA}.appliances WHERE appliance_id = $1 "
            "FOR UPDATE",
            appliance_id,
        )
        after = json.dumps(concurrent) if concurrent else None
        changed = (json.loads(before) if before else None) != (concurrent or None)
        if changed:
            await conn.execute(
                f"UPDATE {SCHEMA}.appliances SET concurrent_journals = $2 WHERE appliance_id = $1",
                appliance_id,
                after,
            )
        return concurrent, changed

    # -- payloads --------------------------------------------------------------------------

    async def record_payload(
        self, appliance_id: str, sha256: str, size: int, journal_id: str | None
    ) -> None:
        async with self._available(), self.pool.acquire() as conn, conn.transaction():
            now = await self._now(conn)
            counted = await conn.fetchval(
                f"INSERT INTO {SCHEMA}.payloads (appliance_id, sha256, size, journal_id, "
                "completed_at) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (appliance_id, sha256) DO NOTHING RETURNING true",
                appliance_id,
                sha256,
                size,
                journal_id or "",
                now,
            )
            if not counted:
                return
            await self._ensure_rows(conn, appliance_id, journal_id or LEGACY_JOURNAL, now)
            await conn.execute(
                f"UPDATE {SCHEMA}.appliances SET payloads = payloads + 1, "
                "payload_bytes = payload_bytes + $2 WHERE appliance_id = $1",
                appliance_id,
                size,
            )
            if journal_id is not None:
                await conn.execute(
                    f"UPDATE {SCHEMA}.journals SET payloads = payloads + 1, "
                    "payload_bytes = payload_bytes + $3 "
                    "WHERE appliance_id = $1 AND journal_id = $2",
                    appliance_id,
                    journal_id,
                    size,
                )

    # -- the summary -----------------------------------------------------------------------

    async def summary(self, appliance_id: str) -> dict[str, Any]:
        async with self._available():
            async with self.pool.acquire() as conn:
                now = await self._now(conn)
                row = await conn.fetchrow(
                    "SELECT records, duplicates_ignored, payloads, payload_bytes, batches "
                    f"FROM {SCHEMA}.appliances WHERE appliance_id = $1",
                    appliance_id,
                )
                rows = await conn.fetch(
                    "SELECT journal_id, first_seen, last_seen, follows, records, max_seq, batches, "
                    "duplicates_ignored, conflicts_refused, payloads, payload_bytes "
                    f"FROM {SCHEMA}.journals WHERE appliance_id = $1 "
                    "ORDER BY first_seen, journal_id",
                    appliance_id,
                )
                spans = await self._spans(conn, appliance_id)
            journals = [
                {
                    "journal_id": j["journal_id"],
                    "first_seen": _ts(j["first_seen"]),
                    "last_seen": _ts(j["last_seen"]),
                    "follows": j["follows"],
                    "records": j["records"],
                    "max_seq": j["max_seq"],
                    "batches": j["batches"],
                    "duplicates_ignored": j["duplicates_ignored"],
                    "conflicts_refused": j["conflicts_refused"],
                    "payloads": j["payloads"],
                    "payload_bytes": j["payload_bytes"],
                }
                for j in rows
            ]
            seqs = [j["max_seq"] for j in journals if j["max_seq"] is not None]
            return {
                "records": row["records"] if row else 0,
                "max_seq": max(seqs) if seqs else None,
                "duplicates_ignored": row["duplicates_ignored"] if row else 0,
                "payloads": row["payloads"] if row else 0,
                "payload_bytes": row["payload_bytes"] if row else 0,
                "batches": row["batches"] if row else 0,
                "journals": journals,
                "concurrent_journals": concurrent_journals(
                    spans, now.timestamp(), self.concurrent_quiet
                ),
            }

    # -- model packages --------------------------------------------------------------------

    async def packages(self) -> list[PublishedPackage]:
        async with self._available():
            rows = await self.pool.fetch(
                f"SELECT {_PACKAGE_COLUMNS} FROM {SCHEMA}.model_packages "
                "ORDER BY published_at, name, version"
            )
            return [_package(row) for row in rows]

    async def package_by_sha256(self, sha256: str) -> PublishedPackage | None:
        async with self._available():
            row = await self.pool.fetchrow(
                f"SELECT {_PACKAGE_COLUMNS} FROM {SCHEMA}.model_packages WHERE sha256 = $1", sha256
            )
            return None if row is None else _package(row)

    async def package_by_version(self, name: str, version: str) -> PublishedPackage | None:
        async with self._available():
            row = await self.pool.fetchrow(
                f"SELECT {_PACKAGE_COLUMNS} FROM {SCHEMA}.model_packages "
                "WHERE name = $1 AND version = $2",
                name,
                version,
            )
            return None if row is None else _package(row)

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1", timeout=2.0)

    async def records_after(
        self, cursor: str | None, wanted: RecordFilter, limit: int
    ) -> RecordPage:
        async with self._available(), self.pool.acquire() as conn:
            return await postgres_records_after(conn, cursor, wanted, limit)

    async def tokens(self) -> list[TokenEntry]:
        async with self._available():
            rows = await self.pool.fetch(
                "SELECT token_id, digest, role, appliance_id, label, created_at, revoked_at "
                f"FROM {SCHEMA}.tokens ORDER BY created_at, token_id"
            )
            return [_token(row) for row in rows]

    async def add_token(self, entry: TokenEntry) -> None:
        async with self._available():
            try:
                await self.pool.execute(
                    f"INSERT INTO {SCHEMA}.tokens (token_id, digest, role, appliance_id, label, "
                    "created_at) VALUES ($1, $2, $3, $4, $5, now())",
                    entry.token_id,
                    entry.digest,
                    entry.role,
                    entry.appliance_id,
                    entry.label,
                )
            except asyncpg.UniqueViolationError:
                raise ValueError("that token is already kept; make another one") from None

    async def revoke_tokens(
        self, *, appliance_id: str | None = None, token_id: str | None = None
    ) -> int:
        async with self._available():
            status = await self.pool.execute(
                f"UPDATE {SCHEMA}.tokens SET revoked_at = now() WHERE revoked_at IS NULL "
                "AND ($1::text IS NULL OR appliance_id = $1) "
                "AND ($2::text IS NULL OR token_id = $2)",
                appliance_id,
                token_id,
            )
            return int(status.split()[-1])

    async def save_package(self, package: PublishedPackage) -> PublishedPackage:
        async with self._available():
            row = await self.pool.fetchrow(
                f"INSERT INTO {SCHEMA}.model_packages ({_PACKAGE_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name, version) DO UPDATE SET "
                "appliances = excluded.appliances, groups = excluded.groups "
                f"RETURNING {_PACKAGE_COLUMNS}",
                package.name,
                package.version,
                package.sha256,
                package.size,
                json.dumps(list(package.appliances)),
                json.dumps(list(package.groups)),
                package.published_at,
            )
            assert row is not None
            return _package(row)

    async def fleet(self, appliance_id: str | None = None) -> FleetFigures:
        async with self._available(), self.pool.acquire() as conn:
            return await postgres_fleet(conn, SCHEMA, await self._now(conn), appliance_id)

    async def recent_records(self, appliance_id: str, limit: int) -> RecentRecords:
        async with self._available(), self.pool.acquire() as conn:
            return await postgres_recent(conn, SCHEMA, appliance_id, limit)

    async def payload_size(self, appliance_id: str, sha256: str) -> int | None:
        async with self._available(), self.pool.acquire() as conn:
            return await postgres_payload_size(conn, SCHEMA, appliance_id, sha256)


def _token(row: asyncpg.Record) -> TokenEntry:
    revoked = row["revoked_at"]
    return TokenEntry(
        row["token_id"],
        bytes(row["digest"]),
        row["role"],
        row["appliance_id"],
        row["label"],
        _ts(row["created_at"]),
        None if revoked is None else _ts(revoked),
    )


def is_retryable(exc: BaseException) -> bool:
    """Whether a database error is one a client may retry (the server is down, restarting, or
    the connection broke): the receiver answers 503 for these, never a permanent refusal."""
    return isinstance(
        exc,
        (
            OSError,
            ConnectionError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.InterfaceError,
            # A connection the server dropped mid-operation can be left in a state asyncpg
            # refuses to use ("another operation is in progress"): the pool replaces it.
            asyncpg.exceptions.InternalClientError,
            asyncpg.exceptions.SerializationError,
            asyncpg.exceptions.DeadlockDetectedError,
        ),
    )


__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "PostgresStore",
    "StoreUnavailable",
    "describe_dsn",
    "is_retryable",
    "migrate",
    "month_bounds",
    "partition_name",
    "read_database_file",
    "record_time",
    "storable_json",
]
