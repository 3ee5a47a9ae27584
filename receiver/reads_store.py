"""Owns the read cursor's queries on both stores (`GET /v1/records`, receiver/reads.py): which
records come after a cursor, in commit order, and where the cursor goes next. On receiver.db the
cursor is a record's arrival number; on PostgreSQL the transaction that stored it and its insert
number, read only below the oldest transaction still open."""

from __future__ import annotations

import re
import sqlite3
from typing import TYPE_CHECKING, Any

from receiver.backend import RecordFilter, RecordPage, StoredRecord, bad_cursor, format_ts
from receiver.postgres_schema import SCHEMA

if TYPE_CHECKING:
    from receiver.postgres_schema import Conn

_POSTGRES_CURSOR = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})")


def sqlite_records_after(
    conn: sqlite3.Connection, cursor: str | None, wanted: RecordFilter, limit: int
) -> RecordPage:
    """The cursor is the last record's arrival number: one writer commits in that order."""
    if cursor is None:
        after = 0
    elif cursor.isascii() and cursor.isdigit() and len(cursor) <= 18:
        after = int(cursor)
    else:
        raise bad_cursor(cursor)
    where: list[str] = ["arrival > ?"]
    args: list[object] = [after]
    if wanted.appliance_id is not None:
        where.append("appliance_id = ?")
        args.append(wanted.appliance_id)
    for column, values in (("kind", wanted.kinds), ("priority", wanted.priorities)):
        if values:
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            args.extend(values)
    # One read transaction: the page and the newest arrival come from the same moment.
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            "SELECT appliance_id, journal_id, seq, received_ts, line, arrival FROM records "
            f"WHERE {' AND '.join(where)} ORDER BY arrival LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        (newest,) = conn.execute("SELECT COALESCE(MAX(arrival), 0) FROM records").fetchone()
    finally:
        conn.execute("COMMIT")
    more = len(rows) > limit
    rows = rows[:limit]
    page = [StoredRecord(a, j, int(seq), received, line) for a, j, seq, received, line, _ in rows]
    # A page that reached the end moves the cursor past the records the filter left out too.
    last = rows[-1][5] if more else max(after, newest)
    return RecordPage(page, str(last), more)


async def postgres_records_after(
    conn: Conn, cursor: str | None, wanted: RecordFilter, limit: int
) -> RecordPage:
    """The cursor is `TXID.ARRIVAL` of the last record read. Pages hold only records of
    transactions older than the oldest one still open (`pg_snapshot_xmin`): those are all
    committed or gone, so no record can later appear before the cursor."""
    if cursor is None:
        txid, arrival = "0", 0
    else:
        parsed = _POSTGRES_CURSOR.fullmatch(cursor)
        if parsed is None:
            raise bad_cursor(cursor)
        txid, arrival = parsed[1], int(parsed[2])
    where = ["(txid, arrival) > ($1::text::xid8, $2)", "txid < pg_snapshot_xmin(snap)"]
    args: list[Any] = [txid, arrival]
    if wanted.appliance_id is not None:
        args.append(wanted.appliance_id)
        where.append(f"appliance_id = ${len(args)}")
    for column, values in (("kind", wanted.kinds), ("priority", wanted.priorities)):
        if values:
            args.append(list(values))
            where.append(f"{column} = ANY(${len(args)}::text[])")
    args.append(limit + 1)
    # The position goes out as text (asyncpg has no codec for xid8) under another name than
    # the column: ORDER BY a bare name takes an output column first, and ordering by the text
    # would put transaction 1000 before 999.
    query = (
        "SELECT appliance_id, journal_id, seq, received_at, COALESCE(line, record::text) "
        f"AS line, records.txid::text AS position_txid, arrival FROM {SCHEMA}.records, "
        "pg_current_snapshot() AS snap "
        f"WHERE {' AND '.join(where)} ORDER BY records.txid, records.arrival "
        f"LIMIT ${len(args)}"
    )
    newest_query = (
        f"SELECT records.txid::text AS position_txid, arrival FROM {SCHEMA}.records, "
        "pg_current_snapshot() AS snap WHERE records.txid < pg_snapshot_xmin(snap) "
        "ORDER BY records.txid DESC, records.arrival DESC LIMIT 1"
    )
    # One snapshot for the page and the newest position: nothing commits between them.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(query, *args)
        newest = None if len(rows) > limit else await conn.fetchrow(newest_query)
    more = len(rows) > limit
    rows = rows[:limit]
    page = [
        StoredRecord(
            row["appliance_id"],
            row["journal_id"],
            int(row["seq"]),
            format_ts(row["received_at"].timestamp()),
            row["line"],
        )
        for row in rows
    ]
    position = (int(txid), arrival)
    if rows:
        position = (int(rows[-1]["position_txid"]), int(rows[-1]["arrival"]))
    if newest is not None:
        # The page reached the end: move past the records the filter left out too.
        position = max(position, (int(newest["position_txid"]), int(newest["arrival"])))
    return RecordPage(page, f"{position[0]}.{position[1]}", more)
