"""Read-only queries on journal.db, shared by the writer-side Journal, the CLI and the sync engine.

Reads never block the writer (WAL) and never hold more than one bounded batch in memory."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sync.errors import JournalMissing
from sync.identity import JournalIdentity, read_identity
from sync.records import Priority, StoredRecord

JOURNAL_FILE = "journal.db"
# Rows of one priority that one page of `events_page` reads at most (a few milliseconds).
EVENTS_SCAN_ROWS = 5000

_RECORD_COLUMNS = (
    "seq, appliance_id, boot_id, ts, mono_ns, source, kind, priority, model, body, payloads"
)


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open journal.db. Writers get WAL + synchronous=FULL; readers a read-only connection."""
    if readonly:
        if not path.exists():
            raise JournalMissing(str(path))
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _row_to_record(row: tuple[Any, ...]) -> StoredRecord:
    return StoredRecord(
        seq=row[0],
        appliance_id=row[1],
        boot_id=row[2],
        ts=row[3],
        mono_ns=row[4],
        source=row[5],
        kind=row[6],
        priority=Priority(row[7]),
        model=row[8],
        body_json=row[9],
        payloads=tuple(json.loads(row[10])) if row[10] else (),
    )


class JournalReader:
    """Queries over one read connection. Not thread-safe: one reader per thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, data_dir: Path) -> JournalReader:
        path = data_dir / JOURNAL_FILE
        conn = connect(path, readonly=True)
        # The writer creates the file before its tables: a reader in that instant (`appliance
        # status` right at start) is told the journal is not there yet, not "no such table".
        ready = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'records'").fetchone()
        if ready is None:
            conn.close()
            raise JournalMissing(
                str(path), f"the journal at {path} is being created; try again in a moment"
            )
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def records_after(
        self, priority: Priority, after_seq: int, *, limit: int, max_bytes: int
    ) -> list[StoredRecord]:
        """The next records of one priority after a cursor: at most `limit` records and about
        `max_bytes` of body (always at least one record, so a huge record cannot wedge a cursor)."""
        cursor = self.conn.execute(
            f"SELECT {_RECORD_COLUMNS}, size FROM records WHERE priority = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (int(priority), after_seq, limit),
        )
        out: list[StoredRecord] = []
        used = 0
        for row in cursor:
            if out and used + row[11] > max_bytes:
                break
            out.append(_row_to_record(row))
            used += row[11]
        cursor.close()
        return out

    def iter_records(
        self, *, kind: str | None = None, since: str | None = None, page: int = 1000
    ) -> Iterator[StoredRecord]:
        """Every record in seq order (optionally of a kind, at or after a ts), one page at a time."""
        last = 0
        while True:
            sql = f"SELECT {_RECORD_COLUMNS} FROM records WHERE seq > ?"
            args: list[Any] = [last]
            if kind is not None:
                sql += " AND kind = ?"
                args.append(kind)
            if since is not None:
                sql += " AND ts >= ?"
                args.append(since)
            rows = self.conn.execute(f"{sql} ORDER BY seq LIMIT ?", (*args, page)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _row_to_record(row)
            last = rows[-1][0]

    def recent(self, priorities: tuple[Priority, ...], limit: int) -> list[StoredRecord]:
        """The newest `limit` records of `priorities`, newest first (one indexed walk per
        priority, never a scan past the telemetry)."""
        rows: list[tuple[Any, ...]] = []
        for priority in priorities:
            rows += self.conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE priority = ? "
                "ORDER BY seq DESC LIMIT ?",
                (int(priority), limit),
            ).fetchall()
        rows.sort(key=lambda row: int(row[0]), reverse=True)
        return [_row_to_record(row) for row in rows[:limit]]

    def events_page(
        self,
        priorities: tuple[Priority, ...],
        *,
        limit: int,
        before: int | None = None,
        kinds: tuple[str, ...] = (),
        sources: tuple[str, ...] = (),
        since: str | None = None,
        scan: int = EVENTS_SCAN_ROWS,
    ) -> tuple[list[StoredRecord], int | None]:
        """Newest first, at most `limit` records of `priorities` with a seq under `before`, of
        `kinds` and `sources` (empty: any), with a ts at or after `since`; and the `before` of
        the next page (None: nothing older matches).

        Each priority is walked down its (priority, seq) index for at most `scan` rows a page,
        so a filter that matches rarely (one sensor's limits among a camera's thousands of
        events) costs a bounded read, never a walk through the whole journal on the reader
        thread the sync engines share. Such a page may hold fewer than `limit` records, even
        none, and still name a next page; only a None next says the end was reached."""
        top = before if before is not None else self.max_seq() + 1
        filters, args = "", []
        for column, values in (("kind", kinds), ("source", sources)):
            if values:
                filters += f" AND {column} IN ({', '.join('?' * len(values))})"
                args += list(values)
        if since is not None:
            filters += " AND ts >= ?"
            args.append(since)
        rows: list[tuple[Any, ...]] = []
        # Every priority was read from `top` down to `floor`: only records at or above it can be
        # shown without skipping one of another priority that lies below it, unread.
        floor = 0
        for priority in priorities:
            low = 0
            if filters:  # without one, the first `limit` rows all match: no bound needed
                edge = self.conn.execute(
                    "SELECT seq FROM records WHERE priority = ? AND seq < ? "
                    "ORDER BY seq DESC LIMIT 1 OFFSET ?",
                    (int(priority), top, scan - 1),
                ).fetchone()
                low = 0 if edge is None else int(edge[0])
            found = self.conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE priority = ? AND seq < ? "
                f"AND seq >= ?{filters} ORDER BY seq DESC LIMIT ?",
                (int(priority), top, low, *args, limit),
            ).fetchall()
            if len(found) == limit:  # enough from this priority: what lies below can wait
                low = max(low, int(found[-1][0]))
            floor = max(floor, low)
            rows += found
        rows = sorted((r for r in rows if int(r[0]) >= floor), key=lambda r: -int(r[0]))
        page = [_row_to_record(row) for row in rows[:limit]]
        if len(rows) > limit:
            return page, page[-1].seq
        return page, (floor if floor > 0 else None)

    def payload_info(self, sha256s: list[str]) -> dict[str, tuple[int, str, str]]:
        """Per known payload: (size, media type or "", state)."""
        known: dict[str, tuple[int, str, str]] = {}
        for start in range(0, len(sha256s), 500):  # under SQLite's bound-parameter limit
            chunk = sha256s[start : start + 500]
            found = self.conn.execute(
                "SELECT sha256, size, COALESCE(media_type, ''), state FROM payloads "
                f"WHERE sha256 IN ({', '.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            known.update({str(s): (int(n), str(m), str(st)) for s, n, m, st in found})
        return known

    def get(self, seq: int) -> StoredRecord | None:
        row = self.conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE seq = ?", (seq,)
        ).fetchone()
        return _row_to_record(row) if row else None

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def identity(self) -> JournalIdentity | None:
        """The journal's identity (None only for a journal written before identities existed
        that this version has not opened for writing yet)."""
        return read_identity(self.conn)

    def newest_ts(self, source: str, kind: str) -> str | None:
        """The time of the newest record of `kind` from `source` (None: there is none)."""
        row = self.conn.execute(
            "SELECT ts FROM records WHERE kind = ? AND source = ? ORDER BY seq DESC LIMIT 1",
            (kind, source),
        ).fetchone()
        return None if row is None else str(row[0])

    def max_seq(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0])

    def synced_through(self) -> dict[Priority, int]:
        """Per priority, the highest seq every registered destination has acknowledged
        (0 when no destination is registered: nothing counts as synced then)."""
        rows = self.conn.execute(
            "SELECT priority, MIN(acked_seq) FROM cursors GROUP BY priority"
        ).fetchall()
        found = {Priority(p): int(s) for p, s in rows}
        return {p: found.get(p, 0) for p in Priority}

    def counts(self) -> list[tuple[Priority, str, int, int]]:
        rows = self.conn.execute(
            "SELECT priority, kind, records, bytes FROM counts WHERE records > 0 ORDER BY priority, kind"
        ).fetchall()
        return [(Priority(p), k, int(r), int(b)) for p, k, r, b in rows]

    def unsynced(self) -> dict[Priority, tuple[int, str | None]]:
        """Per priority: unsynced record count and the ts of the oldest unsynced record."""
        synced = self.synced_through()
        out: dict[Priority, tuple[int, str | None]] = {}
        for priority in Priority:
            after = synced[priority]
            total = self.conn.execute(
                "SELECT COALESCE(SUM(records), 0) FROM counts WHERE priority = ?", (int(priority),)
            ).fetchone()[0]
            if after > 0:
                # Only the synced part needs counting; it is the prefix the engine has walked.
                done = self.conn.execute(
                    "SELECT COUNT(*) FROM records WHERE priority = ? AND seq <= ?",
                    (int(priority), after),
                ).fetchone()[0]
                total -= done
            oldest = self.conn.execute(
                "SELECT ts FROM records WHERE priority = ? AND seq > ? ORDER BY seq LIMIT 1",
                (int(priority), after),
            ).fetchone()
            out[priority] = (int(total), oldest[0] if oldest else None)
        return out

    def cursor(self, destination: str, priority: Priority) -> int:
        row = self.conn.execute(
            "SELECT acked_seq FROM cursors WHERE destination = ? AND priority = ?",
            (destination, int(priority)),
        ).fetchone()
        return int(row[0]) if row else 0

    def payload_outbox(
        self, destination: str, priority: Priority, limit: int
    ) -> list[tuple[str, int, str, str, int]]:
        """Payloads still to upload to a destination, oldest first: (sha256, size, media
        type, state, seq of the record that queued it); state `gone` when retention has
        deleted the payload meanwhile."""
        rows = self.conn.execute(
            "SELECT o.sha256, COALESCE(p.size, 0), COALESCE(p.media_type, ''), "
            "COALESCE(p.state, 'gone'), o.seq FROM payload_outbox o LEFT JOIN payloads p "
            "ON p.sha256 = o.sha256 WHERE o.destination = ? AND o.priority = ? "
            "ORDER BY o.seq LIMIT ?",
            (destination, int(priority), limit),
        ).fetchall()
        return [(str(s), int(n), str(m), str(st), int(q)) for s, n, m, st, q in rows]

    def backlog(self, destination: str) -> dict[Priority, tuple[int, int, str | None]]:
        """Per priority: records and estimated bytes not yet acknowledged by `destination`, and
        the ts of the oldest of them."""
        out: dict[Priority, tuple[int, int, str | None]] = {}
        for priority in Priority:
            after = self.cursor(destination, priority)
            row = self.conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE priority = ? AND seq > ?",
                (int(priority), after),
            ).fetchone()
            oldest = self.conn.execute(
                "SELECT ts FROM records WHERE priority = ? AND seq > ? ORDER BY seq LIMIT 1",
                (int(priority), after),
            ).fetchone()
            out[priority] = (int(row[0]), int(row[1]), oldest[0] if oldest else None)
        return out

    def payloads_waiting(self, destination: str) -> tuple[int, int]:
        """Payloads a destination has not received: count and bytes. Those in its outbox, and
        those of records it has not acknowledged yet (they join the outbox only with the
        acknowledgement, so counting the outbox alone shows no payloads waiting before a drain
        and made `sync --now` promise a fraction of what it ships). Each payload counts once,
        however many records carry it."""
        unsent = ["SELECT sha256 FROM payload_outbox WHERE destination = ?"]
        args: list[Any] = [destination]
        for priority in Priority:
            # Down the (priority, seq) index from the cursor: what a drain will read anyway.
            unsent.append(
                "SELECT j.value FROM records r, json_each(r.payloads) j "
                "WHERE r.priority = ? AND r.seq > ? AND r.payloads IS NOT NULL"
            )
            args += [int(priority), self.cursor(destination, priority)]
        row = self.conn.execute(
            f"WITH unsent(sha256) AS ({' UNION '.join(unsent)}) "
            "SELECT COUNT(*), COALESCE(SUM(p.size), 0) FROM unsent u "
            "LEFT JOIN payloads p ON p.sha256 = u.sha256",
            args,
        ).fetchone()
        return int(row[0]), int(row[1])

    def evictions(self) -> list[tuple[Priority, str, int, int]]:
        rows = self.conn.execute(
            "SELECT priority, reason, records, bytes FROM evictions ORDER BY priority, reason"
        ).fetchall()
        return [(Priority(p), r, int(n), int(b)) for p, r, n, b in rows]

    def rollups(self) -> list[tuple[int, str, int, int, int, int]]:
        """Tiered telemetry so far: (resolution in seconds, kind rolled up, records replaced,
        rollups written, bytes before, bytes after), finest resolution first."""
        rows = self.conn.execute(
            "SELECT resolution_s, of_kind, records, rollups, bytes_before, bytes_after "
            "FROM rollups ORDER BY resolution_s, of_kind"
        ).fetchall()
        return [(int(r), str(k), int(n), int(m), int(b), int(a)) for r, k, n, m, b, a in rows]

    def drops(self) -> list[tuple[Priority, str, int]]:
        rows = self.conn.execute(
            "SELECT priority, reason, records FROM drops ORDER BY priority"
        ).fetchall()
        return [(Priority(p), r, int(n)) for p, r, n in rows]

    def quality(self) -> list[tuple[str, str, int]]:
        rows = self.conn.execute(
            "SELECT source, reason, count FROM quality ORDER BY source, reason"
        )
        return [(s, r, int(c)) for s, r, c in rows.fetchall()]

    def live_bytes(self) -> int:
        """Bytes of journal pages in use (WAL included, free pages excluded): what the disk
        budget counts for the journal. Free pages are reused by SQLite before the file grows."""
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def fixed_bytes(self) -> int:
        """Bytes an empty journal takes (one root page per table and index, page 1)."""
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        trees = self.conn.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type IN ('table', 'index')"
        ).fetchone()[0]
        return int((trees + 1) * page_size)

    def payload_totals(self) -> tuple[int, int, int]:
        """(payload files present, their bytes, payloads recorded as missing)."""
        present = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM payloads WHERE state = 'present'"
        ).fetchone()
        missing = self.conn.execute(
            "SELECT COUNT(*) FROM payloads WHERE state = 'missing'"
        ).fetchone()
        return int(present[0]), int(present[1]), int(missing[0])

    def payload_rows(self) -> dict[str, tuple[int, int, str]]:
        """sha256 -> (size, refs, state), for reconciliation and tests."""
        rows = self.conn.execute("SELECT sha256, size, refs, state FROM payloads").fetchall()
        return {sha: (int(size), int(refs), state) for sha, size, refs, state in rows}
