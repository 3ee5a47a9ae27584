"""The reference upstream receiver of docs/sync-protocol.md: authenticated, idempotent batch and
resumable payload endpoints (aiohttp), backed by its own receiver.db and payload directory.

Layout under the data directory:

    receiver.db                               records, batches, payloads, per-appliance counters
    payloads/<appliance_id>/<sha256>          verified payloads (renamed into place, dir fsync'd)
    partial/<appliance_id>/<sha256>.part      uploads in progress (every chunk fsync'd); one
                                              untouched for `partial_ttl` is abandoned: deleted
    models/<sha256>                           published model packages (sync/model_feed.py)

Every path is built only from identifiers that passed the protocol's strict patterns. SQLite is
touched by one thread only (a single-worker executor: the queue in front of it serialises
writes); file work runs in worker threads; the event loop never blocks on disk."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import signal
import sqlite3
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

from aiohttp import ClientPayloadError, web

# LEGACY_JOURNAL: the journal of records shipped without a Journal-Id: by appliances of a version
# before journal identities, and by upgraded ones for what they journalled before the upgrade.
from sync.identity import LEGACY_JOURNAL, valid_journal_id
from sync.payloads import fsync_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_MAX_BATCH_BYTES = 16 * MiB
DEFAULT_MAX_CHUNK_BYTES = 8 * MiB
# A batch may inflate to this many times the compressed limit; past it the body is a bomb or a bug.
DECOMPRESSED_FACTOR = 4
RECEIVER_DB = "receiver.db"
# Two journals of one appliance id both shipping within this long of each other are two boxes
# sharing an id, not a replaced disk; the flag clears once all but one have been quiet this long.
DEFAULT_CONCURRENT_QUIET_S = 86400.0
# Most conflicting seqs named in a 409 (the count is always given).
_CONFLICTS_NAMED = 20
PAYLOADS_DIR = "payloads"
PARTIAL_DIR = "partial"
PRIORITIES = ("alert", "event", "sample", "telemetry")
# An appliance may stay offline for weeks and still resume; only far older partials are dropped.
DEFAULT_PARTIAL_TTL_S = 30 * 86400.0
_EXPIRY_INTERVAL_S = 3600.0

# fullmatch, not `$`: `$` also matches before a trailing newline ("a\n" from `a%0A`).
APPLIANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Decimal seqs without leading zeros: the batch id is an identity, so one range has one spelling.
_SEQ = r"(?:0|[1-9][0-9]{0,18})"
BATCH_ID_RE = re.compile(
    rf"(?P<priority>{'|'.join(PRIORITIES)})-(?P<first>{_SEQ})-(?P<last>{_SEQ})"
)
SHA256_RE = re.compile(r"[0-9a-f]{64}")
_UINT_RE = re.compile(r"[0-9]{1,19}")
_SQLITE_MAX_INT = 2**63 - 1
_READ_CHUNK = 64 * 1024
_HASH_CHUNK = 1 * MiB
_UPLOAD_LOCK_STRIPES = 64


def valid_appliance_id(value: str) -> bool:
    """APPLIANCE_ID of the protocol; the pattern alone already excludes `.` and `..`."""
    return APPLIANCE_ID_RE.fullmatch(value) is not None


def parse_batch_id(value: str) -> tuple[str, int, int] | None:
    """(priority, first_seq, last_seq) of a BATCH_ID, or None when it is not one."""
    match = BATCH_ID_RE.fullmatch(value)
    if match is None:
        return None
    first, last = int(match["first"]), int(match["last"])
    if first > last or last > _SQLITE_MAX_INT:
        return None
    return match["priority"], first, last


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`; port 0 picks a free one) -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"--listen must be HOST:PORT (e.g. 0.0.0.0:8443), not {listen!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"--listen port must be 0-65535, not {port}")
    return host, port


def parse_tokens_file(path: Path) -> dict[str, str]:
    """`APPLIANCE_ID TOKEN` a line; blank lines and lines starting with `#` are skipped.

    A line that is not exactly two fields, a bad appliance id, or an id or token given twice
    raises ValueError naming the file and line (tokens are never echoed)."""
    tokens: dict[str, str] = {}
    owners: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(
                f"{where}: expected 'APPLIANCE_ID TOKEN' (two fields), found {len(fields)}"
            )
        appliance_id, token = fields
        if not valid_appliance_id(appliance_id):
            raise ValueError(f"{where}: {appliance_id!r} is not a valid appliance id")
        if not token.isascii() or not token.isprintable():
            raise ValueError(f"{where}: the token must be printable ASCII")
        if appliance_id in tokens:
            raise ValueError(f"{where}: appliance {appliance_id!r} is listed twice")
        if token in owners:
            raise ValueError(
                f"{where}: appliance {appliance_id!r} reuses the token of {owners[token]!r}"
            )
        tokens[appliance_id] = token
        owners[token] = appliance_id
    return tokens


def parse_admin_tokens_file(path: Path) -> list[str]:
    """One admin token a line (they may publish model packages); blank lines and lines starting
    with `#` are skipped. A token with spaces or unprintable characters, or one given twice,
    raises ValueError naming the file and line (tokens are never echoed)."""
    tokens: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        token = raw.strip()
        if not token or token.startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(token.split()) != 1 or not token.isascii() or not token.isprintable():
            raise ValueError(f"{where}: an admin token is one word of printable ASCII")
        if token in tokens:
            raise ValueError(f"{where}: this token is listed twice")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"{path}: no admin token in it (one a line)")
    return tokens


# ----------------------------------------------------------------------------------- errors


class Refusal(Exception):
    """A request the receiver refuses: rendered as `{"error", "detail"}` with a 4xx status."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more JSON fields of the answer


def _error_response(
    status: int,
    error: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": error, "detail": detail, **(extra or {})}, status=status, headers=headers
    )


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and "disk is full" in str(exc)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error leaves as JSON; unknown paths under /v1/appliances/ are 400 (bad identifiers)."""
    try:
        return await handler(request)
    except Refusal as refusal:
        return _error_response(
            refusal.status, refusal.error, refusal.detail, refusal.headers, refusal.extra
        )
    except web.HTTPException as exc:
        if exc.status == 404 and request.path.startswith("/v1/appliances/"):
            return _error_response(
                400,
                "bad path",
                "expected /v1/appliances/APPLIANCE_ID/(batches/BATCH_ID|payloads/SHA256|summary"
                "|models|models/SHA256)",
            )
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return _error_response(exc.status, exc.reason.lower(), exc.text or exc.reason, headers)
    except (ConnectionError, ClientPayloadError) as exc:
        # The client went away mid-body; nothing was stored, and nobody is left to answer.
        log.info(
            "request body incomplete", extra={"fields": {"path": request.path, "error": str(exc)}}
        )
        return _error_response(400, "incomplete body", "the request body was cut off; send again")
    except Exception as exc:
        if _is_disk_full(exc):
            log.error("receiver disk full", extra={"fields": {"path": request.path}})
            return _error_response(507, "receiver disk full", "try again later")
        log.exception("request failed", extra={"fields": {"path": request.path}})
        return _error_response(500, "internal error", "try again later")


@web.middleware
async def _client_certificate_required(
    request: web.Request, handler: _Handler
) -> web.StreamResponse:
    """With --client-ca the TLS layer verifies any certificate a client presents; one that
    presents none gets a clear 403 here (a handshake failure would reach the client as a bare
    disconnect, indistinguishable from a cut link)."""
    transport = request.transport
    if not (transport is not None and transport.get_extra_info("peercert")):
        raise Refusal(
            403,
            "client certificate required",
            "this receiver only accepts clients with a certificate signed by its client CA",
        )
    return await handler(request)


# ---------------------------------------------------------------------------------- storage


_MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "0001_initial",
        """
        CREATE TABLE records (
            appliance_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            priority TEXT NOT NULL,
            kind TEXT NOT NULL,
            ts TEXT NOT NULL,
            batch_id TEXT NOT NULL,
            received_ts TEXT NOT NULL,
            line TEXT NOT NULL,
            PRIMARY KEY (appliance_id, seq)
        ) WITHOUT ROWID;
        CREATE TABLE batches (
            appliance_id TEXT NOT NULL,
            batch_id TEXT NOT NULL,
            priority TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            times_received INTEGER NOT NULL,
            stored INTEGER NOT NULL,
            duplicates INTEGER NOT NULL,
            first_received_ts TEXT NOT NULL,
            last_received_ts TEXT NOT NULL,
            PRIMARY KEY (appliance_id, batch_id)
        ) WITHOUT ROWID;
        CREATE TABLE payloads (
            appliance_id TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            completed_ts TEXT NOT NULL,
            PRIMARY KEY (appliance_id, sha256)
        ) WITHOUT ROWID;
        CREATE TABLE appliances (
            appliance_id TEXT PRIMARY KEY,
            records INTEGER NOT NULL DEFAULT 0,
            duplicates_ignored INTEGER NOT NULL DEFAULT 0,
            batches INTEGER NOT NULL DEFAULT 0,
            payloads INTEGER NOT NULL DEFAULT 0,
            payload_bytes INTEGER NOT NULL DEFAULT 0,
            first_seen_ts TEXT NOT NULL,
            last_seen_ts TEXT NOT NULL
        );
        """,
    ),
    (
        # Published model packages (sync/model_feed.py); `appliances` and `groups` are JSON lists,
        # both empty: addressed to every appliance.
        "0002_model_packages",
        """
        CREATE TABLE model_packages (
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            appliances TEXT NOT NULL,
            groups TEXT NOT NULL,
            published_ts TEXT NOT NULL,
            PRIMARY KEY (name, version)
        ) WITHOUT ROWID;
        """,
    ),
    (
        # Journal identities (docs/sync-protocol.md, "Journals"): records and batches are keyed
        # by (appliance, journal, seq). Everything stored before belongs to the appliance's
        # legacy journal, which is where its appliances keep shipping their older records.
        "0003_journals",
        f"""
        CREATE TABLE records_by_journal (
            appliance_id TEXT NOT NULL,
            journal_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            priority TEXT NOT NULL,
            kind TEXT NOT NULL,
            ts TEXT NOT NULL,
            batch_id TEXT NOT NULL,
            received_ts TEXT NOT NULL,
            line TEXT NOT NULL,
            PRIMARY KEY (appliance_id, journal_id, seq)
        ) WITHOUT ROWID;
        INSERT INTO records_by_journal SELECT appliance_id, '{LEGACY_JOURNAL}', seq, priority, kind,
            ts, batch_id, received_ts, line FROM records;
        DROP TABLE records;
        ALTER TABLE records_by_journal RENAME TO records;
        CREATE TABLE batches_by_journal (
            appliance_id TEXT NOT NULL,
            journal_id TEXT NOT NULL,
            batch_id TEXT NOT NULL,
            priority TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            times_received INTEGER NOT NULL,
            stored INTEGER NOT NULL,
            duplicates INTEGER NOT NULL,
            first_received_ts TEXT NOT NULL,
            last_received_ts TEXT NOT NULL,
            PRIMARY KEY (appliance_id, journal_id, batch_id)
        ) WITHOUT ROWID;
        INSERT INTO batches_by_journal SELECT appliance_id, '{LEGACY_JOURNAL}', batch_id, priority,
            first_seq, last_seq, times_received, stored, duplicates, first_received_ts,
            last_received_ts FROM batches;
        DROP TABLE batches;
        ALTER TABLE batches_by_journal RENAME TO batches;
        ALTER TABLE payloads ADD COLUMN journal_id TEXT NOT NULL DEFAULT '{LEGACY_JOURNAL}';
        ALTER TABLE appliances ADD COLUMN concurrent_journals TEXT;
        CREATE TABLE journals (
            appliance_id TEXT NOT NULL,
            journal_id TEXT NOT NULL,
            records INTEGER NOT NULL DEFAULT 0,
            max_seq INTEGER,
            duplicates_ignored INTEGER NOT NULL DEFAULT 0,
            conflicts_refused INTEGER NOT NULL DEFAULT 0,
            batches INTEGER NOT NULL DEFAULT 0,
            payloads INTEGER NOT NULL DEFAULT 0,
            payload_bytes INTEGER NOT NULL DEFAULT 0,
            first_seen_ts TEXT NOT NULL,
            last_seen_ts TEXT NOT NULL,
            follows TEXT,
            PRIMARY KEY (appliance_id, journal_id)
        ) WITHOUT ROWID;
        INSERT INTO journals (appliance_id, journal_id, records, max_seq, duplicates_ignored,
            batches, payloads, payload_bytes, first_seen_ts, last_seen_ts)
            SELECT a.appliance_id, '{LEGACY_JOURNAL}', a.records,
                (SELECT MAX(seq) FROM records r WHERE r.appliance_id = a.appliance_id),
                a.duplicates_ignored, a.batches, a.payloads, a.payload_bytes, a.first_seen_ts,
                a.last_seen_ts
            FROM appliances a;
        """,
    ),
)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One validated NDJSON line of a batch; `line` is kept verbatim."""

    seq: int
    kind: str
    ts: str
    line: str


@dataclass(frozen=True, slots=True)
class IncomingBatch:
    """A decoded batch with its identity: (appliance, journal, priority, seq range)."""

    appliance_id: str
    journal_id: str
    batch_id: str
    priority: str
    first_seq: int
    last_seq: int
    records: list[BatchRecord]
    follows: str | None = None  # the journal whose history this one continues (Journal-Follows)


@dataclass(frozen=True, slots=True)
class BatchResult:
    stored: int
    duplicates: int
    # The journals of this appliance id that are live at once (two boxes, one id), if any.
    concurrent_journals: list[str]
    concurrency_changed: bool


@dataclass(frozen=True, slots=True)
class JournalSpan:
    journal_id: str
    first_seen_s: float
    last_seen_s: float
    follows: str | None = None


def concurrent_journals(spans: Sequence[JournalSpan], now_s: float, quiet_s: float) -> list[str]:
    """The journals of one appliance id that shipped interleaved with another within `quiet_s`.

    A replaced disk is a new journal that starts after the old one stopped: their spans (first
    to last batch) do not overlap, so they are epochs, not a collision. Two boxes under one id
    keep shipping, so their spans overlap. A journal and the one it follows (an upgraded journal
    and `legacy`, a fork and its origin) are one box's history, which ships both in one drain."""
    live = [span for span in spans if span.last_seen_s >= now_s - quiet_s]
    flagged: set[str] = set()
    for index, one in enumerate(live):
        for other in live[index + 1 :]:
            lineage = one.follows == other.journal_id or other.follows == one.journal_id
            overlap = (
                one.last_seen_s >= other.first_seen_s and other.last_seen_s >= one.first_seen_s
            )
            if overlap and not lineage:
                flagged.update((one.journal_id, other.journal_id))
    return sorted(flagged)


def _journal_spans(conn: sqlite3.Connection, appliance_id: str) -> list[JournalSpan]:
    return [
        JournalSpan(journal_id, _parse_ts(first), _parse_ts(last), follows)
        for journal_id, first, last, follows in conn.execute(
            "SELECT journal_id, first_seen_ts, last_seen_ts, follows FROM journals "
            "WHERE appliance_id = ?",
            (appliance_id,),
        )
    ]


def _format_ts(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


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


def _conflict_refusal(batch: IncomingBatch, seqs: list[int]) -> Refusal:
    named = ", ".join(str(seq) for seq in seqs[:_CONFLICTS_NAMED])
    more = f" and {len(seqs) - _CONFLICTS_NAMED} more" if len(seqs) > _CONFLICTS_NAMED else ""
    journal = (
        "the legacy journal (records shipped without a journal id)"
        if batch.journal_id == LEGACY_JOURNAL
        else f"journal {batch.journal_id}"
    )
    return Refusal(
        409,
        "conflicting records",
        f"batch {batch.batch_id} of appliance {batch.appliance_id}: seqs {named}{more} of "
        f"{journal} are already stored with other content ({len(seqs)} in all); nothing of "
        "this batch was stored. A journal restored from an old backup, or one tampered with, "
        "reuses seqs it already shipped: see docs/operations.md, 'Journal conflicts'",
        extra={"conflicting_seqs": seqs[:_CONFLICTS_NAMED], "conflicts": len(seqs)},
    )


def _ensure_appliance(conn: sqlite3.Connection, appliance_id: str, now: str) -> None:
    conn.execute(
        "INSERT INTO appliances (appliance_id, first_seen_ts, last_seen_ts) VALUES (?, ?, ?) "
        "ON CONFLICT(appliance_id) DO UPDATE SET last_seen_ts = excluded.last_seen_ts",
        (appliance_id, now, now),
    )


def _same_record(stored_line: str, line: str) -> bool:
    if stored_line == line:
        return True
    try:
        return bool(json.loads(stored_line) == json.loads(line))
    except ValueError:
        return False


class ReceiverStore:
    """receiver.db behind one worker thread. `close()` is idempotent and runs after queued work."""

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

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the store's thread, after the work queued before it (for
        handlers kept in other modules: sync/model_feed.py)."""
        return await self._run(lambda: fn(self._db()))

    # Everything below runs on the store's thread.

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "receiver store is not open"
        return self._conn

    def _open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in (PAYLOADS_DIR, PARTIAL_DIR):
            _ensure_dir(self.data_dir / name)
        conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_ts TEXT NOT NULL)"
        )
        applied = {row[0] for row in conn.execute("SELECT name FROM migrations")}
        for name, script in _MIGRATIONS:
            if name in applied:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, _now()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("receiver migration applied", extra={"fields": {"name": name}})
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
        now = _format_ts(now_s)
        appliance_id, journal_id = batch.appliance_id, batch.journal_id
        stored = duplicates = 0
        conflicts: list[int] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            _ensure_appliance(conn, appliance_id, now)
            _ensure_journal(conn, appliance_id, journal_id, now, batch.follows)
            for record in batch.records:
                cursor = conn.execute(
                    "INSERT INTO records (appliance_id, journal_id, seq, priority, kind, ts, "
                    "batch_id, received_ts, line) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
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
                    ),
                )
                if cursor.rowcount == 1:
                    stored += 1
                    continue
                duplicates += 1
                (stored_line,) = conn.execute(
                    "SELECT line FROM records WHERE appliance_id = ? AND journal_id = ? "
                    "AND seq = ?",
                    (appliance_id, journal_id, record.seq),
                ).fetchone()
                if not _same_record(stored_line, record.line):
                    conflicts.append(record.seq)
            if conflicts:
                conn.execute("ROLLBACK")
                self._count_conflicts(appliance_id, journal_id, len(conflicts), now)
                raise _conflict_refusal(batch, conflicts)
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
        now = _now()
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


# ------------------------------------------------------------------------------ payload files


def _ensure_dir(path: Path) -> None:
    """mkdir, durable: a new directory's entry is fsync'd in its parent."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    fsync_dir(path.parent)


def _upload_state(final: Path, partial: Path) -> tuple[int, bool]:
    """(bytes held, complete?): a file in payloads/ is complete, since only verified ones get there."""
    try:
        return final.stat().st_size, True
    except FileNotFoundError:
        pass
    try:
        return partial.stat().st_size, False
    except FileNotFoundError:
        return 0, False


def _append_chunk(partial: Path, data: bytes | bytearray) -> int:
    """Append, flush and fsync `data`; the new size of the partial file."""
    _ensure_dir(partial.parent)
    created = not partial.exists()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if created:
        fsync_dir(partial.parent)
    return size


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def abandoned_partials(data_dir: Path, ttl_s: float, now: float) -> list[tuple[str, str]]:
    """(appliance_id, sha256) of partial uploads last written more than `ttl_s` before `now`."""
    found: list[tuple[str, str]] = []
    root = data_dir / PARTIAL_DIR
    if not root.is_dir():
        return found
    for appliance_dir in root.iterdir():
        if not (appliance_dir.is_dir() and valid_appliance_id(appliance_dir.name)):
            continue
        for part in appliance_dir.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if SHA256_RE.fullmatch(part.stem) and now - part.stat().st_mtime > ttl_s:
                    found.append((appliance_dir.name, part.stem))
    return found


def _remove_if_stale(partial: Path, ttl_s: float, now: float) -> int:
    """Delete `partial` if it is still stale (re-checked under the upload lock); its size, or 0."""
    try:
        stat = partial.stat()
    except FileNotFoundError:
        return 0
    if now - stat.st_mtime <= ttl_s:
        return 0  # an upload resumed since the scan
    partial.unlink()
    fsync_dir(partial.parent)
    return stat.st_size


def _complete_upload(partial: Path, final: Path, sha256: str) -> bool:
    """Verify the partial file; move it into place (True) or discard it (False)."""
    if _file_sha256(partial) != sha256:
        partial.unlink()
        fsync_dir(partial.parent)
        return False
    _ensure_dir(final.parent)
    partial.replace(final)
    fsync_dir(final.parent)
    fsync_dir(partial.parent)
    return True


# --------------------------------------------------------------------------------- batches


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def decode_batch(
    body: bytes | bytearray,
    appliance_id: str,
    priority: str,
    first_seq: int,
    last_seq: int,
    journal_id: str = LEGACY_JOURNAL,
) -> list[BatchRecord]:
    """Parse and check an NDJSON batch (CPU work: run it off the loop). Raises Refusal.

    A record may carry `journal_id` (as `appliance export` writes it): then it must be the
    header's, and none for a legacy batch (no Journal-Id)."""
    expected_journal = None if journal_id == LEGACY_JOURNAL else journal_id
    records: list[BatchRecord] = []
    # bytearray lines behave as bytes here; the cast spares a copy of up to 64 MiB.
    for number, raw in enumerate(cast("list[bytes]", body.split(b"\n")), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r")
            value = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise Refusal(400, "bad json", f"line {number}: {exc}") from None
        except RecursionError:
            raise Refusal(400, "bad json", f"line {number}: nested too deeply") from None
        if not isinstance(value, dict):
            raise Refusal(422, "bad record", f"line {number}: a record is a JSON object")
        seq = value.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise Refusal(422, "bad record", f"line {number}: seq must be an integer")
        if value.get("appliance_id") != appliance_id:
            raise Refusal(
                422,
                "wrong appliance_id",
                f"line {number} (seq {seq}): appliance_id {value.get('appliance_id')!r} "
                f"is not the path's {appliance_id!r}",
            )
        if "journal_id" in value and value["journal_id"] != expected_journal:
            raise Refusal(
                422,
                "wrong journal_id",
                f"line {number} (seq {seq}): journal_id {value.get('journal_id')!r} is not the "
                f"Journal-Id header's {expected_journal!r}",
            )
        if value.get("priority") != priority:
            raise Refusal(
                422,
                "wrong priority",
                f"line {number} (seq {seq}): priority {value.get('priority')!r} "
                f"is not the batch's {priority!r}",
            )
        if not first_seq <= seq <= last_seq:
            raise Refusal(
                422,
                "seq outside batch",
                f"line {number}: seq {seq} is outside the batch's range {first_seq}-{last_seq}",
            )
        kind, ts = value.get("kind"), value.get("ts")
        if not isinstance(kind, str) or not isinstance(ts, str):
            raise Refusal(
                422, "bad record", f"line {number} (seq {seq}): kind and ts must be strings"
            )
        records.append(BatchRecord(seq=seq, kind=kind, ts=ts, line=line))
    if not records:
        raise Refusal(422, "empty batch", "a batch holds at least one NDJSON record")
    return records


def _gunzip() -> Any:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)


def _too_large(what: str, limit: int) -> Refusal:
    return Refusal(413, "body too large", f"the {what} body is over the limit of {limit} bytes")


async def _read_batch_body(request: web.Request, max_bytes: int) -> bytearray:
    """The decompressed body, streamed: at most `max_bytes` on the wire and 4x that inflated."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise Refusal(
            415, "unsupported content-encoding", f"use gzip or identity, not {encoding!r}"
        )
    if getattr(request.content, "total_compressed_bytes", None) is not None:
        # aiohttp already inflated the body, with no limit of ours: serve with serve_receiver().
        raise RuntimeError("receiver served with auto_decompress=True; use serve_receiver()")
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large("compressed", max_bytes)
    limit = max_bytes * DECOMPRESSED_FACTOR
    gzip = encoding != "identity"
    inflater = _gunzip() if gzip else None
    out = bytearray()
    received = 0
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        received += len(chunk)
        if received > max_bytes:
            raise _too_large("compressed", max_bytes)
        if inflater is None:
            out += chunk
            continue
        data = chunk
        while data:
            if inflater.eof:  # the next member of a multi-member gzip stream
                inflater = _gunzip()
            try:
                # max_length caps what one call may inflate: a bomb stops at limit + 1 bytes.
                piece = inflater.decompress(data, limit - len(out) + 1)
            except zlib.error as exc:
                raise Refusal(400, "bad gzip", f"the body is not valid gzip: {exc}") from None
            out += piece
            if len(out) > limit:
                raise _too_large("decompressed", limit)
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    if gzip and (inflater is None or not inflater.eof):
        raise Refusal(400, "bad gzip", "the gzip stream is empty or truncated")
    return out


# -------------------------------------------------------------------------------- the app


def _token_digest(token: str) -> bytes:
    # Look tokens up by digest: the dict lookup then leaks nothing about a token's prefix.
    return hashlib.sha256(token.encode()).digest()


def _parse_uint_header(request: web.Request, name: str) -> int:
    value = request.headers.get(name)
    if value is None:
        raise Refusal(400, f"missing {name}", f"send {name}: a non-negative integer")
    value = value.strip()
    if not _UINT_RE.fullmatch(value) or int(value) > _SQLITE_MAX_INT:
        raise Refusal(400, f"bad {name}", f"{name} must be a non-negative integer")
    return int(value)


def journal_of(request: web.Request) -> str:
    """The request's Journal-Id (400 when it is not 32 lowercase hex digits); LEGACY_JOURNAL
    when there is none (an appliance of a version before journal identities)."""
    value = request.headers.get("Journal-Id")
    if value is None:
        return LEGACY_JOURNAL
    value = value.strip()
    if not valid_journal_id(value):
        raise Refusal(400, "bad journal id", "Journal-Id must be 32 lowercase hex digits")
    return value


def _follows_of(request: web.Request, journal_id: str) -> str | None:
    """Journal-Follows: the journal (or `legacy`) this one continues; only beside a Journal-Id."""
    value = request.headers.get("Journal-Follows")
    if value is None:
        return None
    value = value.strip()
    if journal_id == LEGACY_JOURNAL or value == journal_id:
        raise Refusal(
            400, "bad journal follows", "Journal-Follows needs a Journal-Id of another journal"
        )
    if value != LEGACY_JOURNAL and not valid_journal_id(value):
        raise Refusal(
            400, "bad journal follows", "Journal-Follows is 32 lowercase hex digits or legacy"
        )
    return value


def concurrent_warning(appliance_id: str, journals: Sequence[str]) -> dict[str, Any]:
    """The warning every batch answer of an appliance id with concurrent journals carries."""
    return {
        "code": "concurrent_journals",
        "journals": list(journals),
        "detail": (
            f"appliance id {appliance_id} has {len(journals)} journals shipping at once "
            f"({', '.join(journals)}): two boxes share one id. Every record of each is kept; "
            "give each box its own appliance.id. The warning clears once only one of them "
            "has shipped under this id for the receiver's --concurrent-quiet"
        ),
    }


class _Receiver:
    """The handlers, with the state they share (store, tokens, limits, upload locks)."""

    def __init__(
        self,
        data_dir: Path,
        tokens: Mapping[str, str] | None,
        *,
        max_batch_bytes: int,
        max_chunk_bytes: int,
        partial_ttl: float = DEFAULT_PARTIAL_TTL_S,
        concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = data_dir
        self.partial_ttl = partial_ttl
        self.concurrent_quiet = concurrent_quiet
        self.clock = clock
        self.max_batch_bytes = max_batch_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.open_access = tokens is None
        self._owners: dict[bytes, str] = {}
        for appliance_id, token in (tokens or {}).items():
            if not valid_appliance_id(appliance_id):
                raise ValueError(f"tokens: {appliance_id!r} is not a valid appliance id")
            digest = _token_digest(token)
            if not token or digest in self._owners:
                raise ValueError(f"tokens: the token of {appliance_id!r} is empty or reused")
            self._owners[digest] = appliance_id
        # Striped: uploads of the same payload serialise, memory stays fixed however many there are.
        self._upload_locks = [asyncio.Lock() for _ in range(_UPLOAD_LOCK_STRIPES)]
        self._store: ReceiverStore | None = None

    @property
    def store(self) -> ReceiverStore:
        if self._store is None:
            raise RuntimeError("receiver store is not open (the app has not started)")
        return self._store

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self._store = await ReceiverStore.open(
            self.data_dir, concurrent_quiet=self.concurrent_quiet, clock=self.clock
        )
        if self.open_access:
            log.warning(
                "no tokens file: accepting every appliance without a token (local tests only)"
            )
        expiry = asyncio.create_task(self._expire_partials_forever(), name="partial-expiry")
        try:
            yield
        finally:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            await self._store.close()

    async def _expire_partials_forever(self) -> None:
        while True:
            try:
                await self.expire_partials()
            except OSError as exc:  # a full or read-only disk must not stop the receiver
                log.error("partial upload expiry failed", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(min(_EXPIRY_INTERVAL_S, self.partial_ttl / 4))

    async def expire_partials(self, now: float | None = None) -> int:
        """Delete partial uploads nobody has resumed within `partial_ttl`; how many went."""
        now = time.time() if now is None else now
        stale = await asyncio.to_thread(abandoned_partials, self.data_dir, self.partial_ttl, now)
        removed = freed = 0
        for appliance_id, sha256 in stale:
            async with self._lock(appliance_id, sha256):
                size = await asyncio.to_thread(
                    _remove_if_stale,
                    self._partial_path(appliance_id, sha256),
                    self.partial_ttl,
                    now,
                )
            if size:
                removed, freed = removed + 1, freed + size
                log.info(
                    "abandoned partial upload deleted",
                    extra={
                        "fields": {"appliance_id": appliance_id, "sha256": sha256, "bytes": size}
                    },
                )
        return removed

    # ------------------------------------------------------------------------- helpers

    def authorize(self, request: web.Request) -> str:
        """The path's appliance id: 401 before 400 before 403, so strangers learn nothing."""
        owner: str | None = None
        if not self.open_access:
            scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Refusal(
                    401,
                    "missing token",
                    "send Authorization: Bearer TOKEN",
                    {"WWW-Authenticate": "Bearer"},
                )
            owner = self._owners.get(_token_digest(token))
            if owner is None:
                raise Refusal(
                    401,
                    "unknown token",
                    "the token is not in the receiver's tokens file",
                    {"WWW-Authenticate": "Bearer"},
                )
        appliance_id = request.match_info["appliance_id"]
        if not valid_appliance_id(appliance_id):
            raise Refusal(
                400, "bad appliance id", "APPLIANCE_ID must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
            )
        if owner is not None and owner != appliance_id:
            raise Refusal(403, "wrong appliance", "the token belongs to another appliance")
        return appliance_id

    def appliance_of_token(self, token: str) -> str | None:
        """The appliance a bearer token belongs to, if any."""
        return self._owners.get(_token_digest(token))

    @staticmethod
    def sha256_of(request: web.Request) -> str:
        """The path's SHA256, checked (400 when it is not 64 lowercase hex digits)."""
        sha256 = request.match_info["sha256"]
        if not SHA256_RE.fullmatch(sha256):
            raise Refusal(400, "bad sha256", "SHA256 must be 64 lowercase hex digits")
        return sha256

    def _final_path(self, appliance_id: str, sha256: str) -> Path:
        return self.data_dir / PAYLOADS_DIR / appliance_id / sha256

    def _partial_path(self, appliance_id: str, sha256: str) -> Path:
        return self.data_dir / PARTIAL_DIR / appliance_id / f"{sha256}.part"

    def _lock(self, appliance_id: str, sha256: str) -> asyncio.Lock:
        return self._upload_locks[hash((appliance_id, sha256)) % _UPLOAD_LOCK_STRIPES]

    async def _held(self, appliance_id: str, sha256: str) -> tuple[int, bool]:
        """(bytes held, complete?) of one payload."""
        return await asyncio.to_thread(
            _upload_state,
            self._final_path(appliance_id, sha256),
            self._partial_path(appliance_id, sha256),
        )

    @staticmethod
    def _complete_response(size: int) -> web.Response:
        return web.Response(
            status=204,
            headers={
                "Upload-Offset": str(size),
                "Upload-Complete": "1",
                "Cache-Control": "no-store",
            },
        )

    # ------------------------------------------------------------------------ handlers

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def put_batch(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        journal_id = journal_of(request)
        follows = _follows_of(request, journal_id)
        batch_id = request.match_info["batch_id"]
        parsed = parse_batch_id(batch_id)
        if parsed is None:
            raise Refusal(
                400,
                "bad batch id",
                "BATCH_ID is PRIORITY-FIRST_SEQ-LAST_SEQ (alert|event|sample|telemetry, "
                "decimal seqs without leading zeros, FIRST_SEQ <= LAST_SEQ)",
            )
        priority, first_seq, last_seq = parsed
        body = await _read_batch_body(request, self.max_batch_bytes)
        records = await asyncio.to_thread(
            decode_batch, body, appliance_id, priority, first_seq, last_seq, journal_id
        )
        del body
        batch = IncomingBatch(
            appliance_id, journal_id, batch_id, priority, first_seq, last_seq, records, follows
        )
        fields: dict[str, Any] = {
            "appliance_id": appliance_id,
            "journal_id": journal_id,
            "batch_id": batch_id,
        }
        try:
            result = await self.store.store_batch(batch)
        except Refusal as refusal:
            log.warning(
                "batch refused: conflicting records",
                extra={"fields": {**fields, **refusal.extra}},
            )
            raise
        fields.update(stored=result.stored, duplicates=result.duplicates)
        log.info("batch stored", extra={"fields": fields})
        answer: dict[str, Any] = {
            "batch_id": batch_id,
            "journal_id": journal_id,
            "stored": result.stored,
            "duplicates": result.duplicates,
        }
        if result.concurrency_changed:
            if result.concurrent_journals:
                log.warning(
                    "concurrent journals under one appliance id",
                    extra={
                        "fields": {
                            "appliance_id": appliance_id,
                            "journals": result.concurrent_journals,
                        }
                    },
                )
            else:
                log.info(
                    "concurrent journals resolved", extra={"fields": {"appliance_id": appliance_id}}
                )
        if result.concurrent_journals:
            answer["warnings"] = [concurrent_warning(appliance_id, result.concurrent_journals)]
        return web.json_response(answer)

    async def head_payload(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        sha256 = self.sha256_of(request)
        journal_of(request)  # checked like on every route, though a HEAD stores nothing
        held, complete = await self._held(appliance_id, sha256)
        # Content-Length: 0 so clients keep the connection: without it aiohttp cannot tell where
        # this bodiless answer ends and opens a new connection for every payload (a TLS handshake
        # per payload on a satellite link).
        headers = {"Upload-Offset": str(held), "Cache-Control": "no-store", "Content-Length": "0"}
        if complete:
            headers["Upload-Complete"] = "1"
            headers["Upload-Length"] = str(held)
        elif held == 0:
            return web.Response(status=404, headers=headers)
        return web.Response(status=200, headers=headers)

    async def patch_payload(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        sha256 = self.sha256_of(request)
        journal_id = journal_of(request)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise Refusal(
                415, "unsupported content-encoding", "payload chunks are sent as identity"
            )
        offset = _parse_uint_header(request, "Upload-Offset")
        length = _parse_uint_header(request, "Upload-Length")
        if offset > length:
            raise Refusal(400, "bad Upload-Offset", "Upload-Offset is past Upload-Length")
        if request.content_length is not None and request.content_length > self.max_chunk_bytes:
            raise _too_large("chunk", self.max_chunk_bytes)

        # Cheap answers before reading up to a whole chunk; checked again under the lock.
        held, complete = await self._held(appliance_id, sha256)
        if complete:
            return self._complete_response(held)
        if offset != held:
            raise self._offset_conflict(offset, held)

        body = bytearray()
        async for piece in request.content.iter_chunked(_READ_CHUNK):
            body += piece
            if len(body) > self.max_chunk_bytes:
                raise _too_large("chunk", self.max_chunk_bytes)
        if offset + len(body) > length:
            raise Refusal(
                400, "chunk past Upload-Length", "Upload-Offset + body length > Upload-Length"
            )

        partial = self._partial_path(appliance_id, sha256)
        async with self._lock(appliance_id, sha256):
            held, complete = await self._held(appliance_id, sha256)
            if complete:
                return self._complete_response(held)
            if offset != held:
                raise self._offset_conflict(offset, held)
            new_offset = await asyncio.to_thread(_append_chunk, partial, body) if body else held
            if new_offset < length:
                return web.Response(
                    status=204,
                    headers={"Upload-Offset": str(new_offset), "Cache-Control": "no-store"},
                )
            final = self._final_path(appliance_id, sha256)
            if length == 0:
                await asyncio.to_thread(_append_chunk, partial, b"")
            verified = await asyncio.to_thread(_complete_upload, partial, final, sha256)
        fields = {"appliance_id": appliance_id, "sha256": sha256, "size": new_offset}
        if not verified:
            log.warning(
                "payload sha256 mismatch; partial upload discarded", extra={"fields": fields}
            )
            raise Refusal(
                422,
                "sha256 mismatch",
                f"the {new_offset} bytes received do not hash to {sha256}; upload again from 0",
            )
        await self.store.record_payload(appliance_id, sha256, new_offset, journal_id)
        log.info("payload complete", extra={"fields": fields})
        return self._complete_response(new_offset)

    @staticmethod
    def _offset_conflict(offset: int, held: int) -> Refusal:
        return Refusal(
            409,
            "offset mismatch",
            f"Upload-Offset {offset} is not the {held} bytes the receiver holds; resume from {held}",
            {"Upload-Offset": str(held)},
        )

    async def summary(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        return web.json_response(await self.store.summary(appliance_id))


RECEIVER_KEY = web.AppKey("receiver", _Receiver)


def build_receiver_app(
    data_dir: Path,
    tokens: dict[str, str] | None,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    partial_ttl: float = DEFAULT_PARTIAL_TTL_S,
    require_client_certificate: bool = False,
    admin_tokens: Sequence[str] = (),
    concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The receiver as an aiohttp app; receiver.db opens on startup and closes on cleanup.

    `tokens` maps appliance id -> bearer token; None accepts every appliance without a token.
    `admin_tokens` may publish model packages (none: publishing is refused; sync/model_feed.py).
    `require_client_certificate` answers 403 to a request whose TLS connection presented no
    client certificate (serve it with `server_tls_context(..., client_ca=...)`). Partial uploads
    untouched for `partial_ttl` seconds are deleted (checked at start, then hourly); the handlers'
    object is `app[RECEIVER_KEY]`. Journals of one appliance id shipping interleaved within
    `concurrent_quiet` seconds are flagged as concurrent (`clock` gives wall-clock seconds). Serve it with `serve_receiver()` (or an AppRunner with auto_decompress=False): the app
    inflates gzip bodies itself, under its own limits."""
    receiver = _Receiver(
        data_dir,
        tokens,
        max_batch_bytes=max_batch_bytes,
        max_chunk_bytes=max_chunk_bytes,
        partial_ttl=partial_ttl,
        concurrent_quiet=concurrent_quiet,
        clock=clock,
    )
    # Handlers stream bodies under their own limits; this caps anything that reads whole bodies.
    middlewares: list[Any] = [_json_errors]
    if require_client_certificate:
        middlewares.append(_client_certificate_required)
    app = web.Application(
        middlewares=middlewares, client_max_size=max(max_batch_bytes, max_chunk_bytes)
    )
    app[RECEIVER_KEY] = receiver
    app.cleanup_ctx.append(receiver.lifecycle)
    base = "/v1/appliances/{appliance_id}"
    app.router.add_get("/v1/health", receiver.health)
    app.router.add_put(f"{base}/batches/{{batch_id}}", receiver.put_batch)
    app.router.add_route("HEAD", f"{base}/payloads/{{sha256}}", receiver.head_payload)
    app.router.add_patch(f"{base}/payloads/{{sha256}}", receiver.patch_payload)
    app.router.add_get(f"{base}/summary", receiver.summary, allow_head=False)
    # Imported here: model_feed builds on this module's Refusal, store and authorisation.
    from sync.model_feed import add_model_routes

    add_model_routes(app, receiver, admin_tokens)
    return app


@contextlib.asynccontextmanager
async def serve_receiver(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[list[tuple[str, int]]]:
    """Serve `app` on host:port (0 picks a free port), over TLS when `ssl_context` is given;
    yields the bound (host, port) pairs."""
    runner = web.AppRunner(app, auto_decompress=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        yield [(str(address[0]), int(address[1])) for address in runner.addresses]
    finally:
        await runner.cleanup()


def server_tls_context(
    cert_file: Path, key_file: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """TLS for `appliance receiver`: its certificate chain (and key, unless in the same file);
    with `client_ca`, a certificate a client presents must be signed by it (CERT_OPTIONAL: the
    app's `require_client_certificate` answers a client without one with a clear 403). Raises
    OSError or ssl.SSLError naming what could not be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


async def run_receiver(
    listen: str,
    data_dir: Path,
    tokens_file: Path | None,
    *,
    partial_ttl: float = DEFAULT_PARTIAL_TTL_S,
    ssl_context: ssl.SSLContext | None = None,
    stop: asyncio.Event | None = None,
    admin_tokens_file: Path | None = None,
    concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
) -> None:
    """`appliance receiver`: serve until `stop` is set or SIGTERM/SIGINT arrives."""
    host, port = parse_listen(listen)
    tokens = await asyncio.to_thread(parse_tokens_file, tokens_file) if tokens_file else None
    admin_tokens = (
        await asyncio.to_thread(parse_admin_tokens_file, admin_tokens_file)
        if admin_tokens_file
        else []
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        client_certificates = ssl_context is not None and ssl_context.verify_mode != ssl.CERT_NONE
        app = build_receiver_app(
            data_dir,
            tokens,
            partial_ttl=partial_ttl,
            require_client_certificate=client_certificates,
            admin_tokens=admin_tokens,
            concurrent_quiet=concurrent_quiet,
        )
        async with serve_receiver(app, host, port, ssl_context) as addresses:
            scheme = "https" if ssl_context is not None else "http"
            for bound_host, bound_port in addresses:
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                url = f"{scheme}://{shown}:{bound_port}"
                log.info(
                    "receiver listening",
                    extra={
                        "fields": {
                            "url": url,
                            "host": bound_host,
                            "port": bound_port,
                            "data_dir": str(data_dir),
                            "appliances": None if tokens is None else len(tokens),
                            "publishing": bool(admin_tokens),
                            "client_certificates": client_certificates,
                        }
                    },
                )
                print(f"receiver listening on {url}", flush=True)
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("receiver stopped")
