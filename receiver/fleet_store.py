"""Owns the fleet view's reads in both stores (receiver.db and PostgreSQL): every appliance with
its totals, what arrived today, its alerts of the last 24 h and its newest `health` record; one
appliance's newest alerts and records with payloads; a payload's size. The stores call these
with their own connection and clock; the indexes they lean on are the stores' `fleet_view`
migrations (partial indexes on alerts, `health` records and records with payloads, and arrival
indexes on batches and payloads), so a page for 2,000 appliances reads rows, not the archive.

"Today" is the store's UTC day by arrival: records are counted from the batches first received
today (a batch is stored whole or not at all, so its `stored` count is what arrived with it),
payload bytes from the payloads completed today."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from receiver.backend import (
    ALERT_WINDOW_S,
    HEALTH_FIELDS,
    FleetFigures,
    FleetRow,
    RecentRecords,
    ShoreRecord,
    format_ts,
    payload_refs,
)

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# receiver.db keeps each record's line as shipped; a record with payloads is found by this
# predicate, the one its partial index (`records_media`) is built on. Appliances write their
# lines compact (`"payloads":["`; Python's default separators add a space): that is how a
# non-empty list starts, which a string inside the body cannot hold unescaped. A line it matches
# by accident (a body with a key of that name) is dropped after parsing.
SQLITE_MEDIA = """(line LIKE '%"payloads":["%' OR line LIKE '%"payloads": ["%')"""
# PostgreSQL keeps the record as jsonb: the predicate of its `records_media` index.
POSTGRES_MEDIA = "jsonb_typeof(record->'payloads') = 'array' AND record->'payloads' <> '[]'::jsonb"


def day_start(now_s: float) -> float:
    """Midnight UTC of the day `now_s` falls in."""
    moment = datetime.fromtimestamp(now_s, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _health(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------- receiver.db


def sqlite_fleet(conn: sqlite3.Connection, now_s: float, appliance_id: str | None) -> FleetFigures:
    """`RecordStore.fleet` on receiver.db (run on the store's thread)."""
    today = format_ts(day_start(now_s))
    since = format_ts(now_s - ALERT_WINDOW_S)
    only = "" if appliance_id is None else " AND appliance_id = :one"
    params = {"today": today, "since": since, "one": appliance_id}
    appliances = conn.execute(
        "SELECT appliance_id, first_seen_ts, last_seen_ts, records, payloads, payload_bytes "
        f"FROM appliances WHERE 1{only} ORDER BY appliance_id",
        params,
    ).fetchall()
    records_today = dict(
        conn.execute(
            "SELECT appliance_id, SUM(stored) FROM batches "
            f"WHERE first_received_ts >= :today{only} GROUP BY appliance_id",
            params,
        ).fetchall()
    )
    payloads_today = {
        row[0]: (int(row[1]), int(row[2]))
        for row in conn.execute(
            "SELECT appliance_id, COUNT(*), SUM(size) FROM payloads "
            f"WHERE completed_ts >= :today{only} GROUP BY appliance_id",
            params,
        )
    }
    alerts = dict(
        conn.execute(
            "SELECT appliance_id, COUNT(*) FROM records "
            f"WHERE priority = 'alert' AND ts >= :since{only} GROUP BY appliance_id",
            params,
        ).fetchall()
    )
    selected = ", ".join(f"'{name}', line -> '$.body.{name}'" for name in HEALTH_FIELDS)
    rows = []
    for one, first_seen, last_seen, records, payloads, payload_bytes in appliances:
        # One indexed look-up per appliance (`records_health`): the newest by record time.
        newest = conn.execute(
            f"SELECT ts, json_object({selected}) FROM records "
            "WHERE appliance_id = ? AND kind = 'health' ORDER BY ts DESC LIMIT 1",
            (one,),
        ).fetchone()
        count_today, bytes_today = payloads_today.get(one, (0, 0))
        rows.append(
            FleetRow(
                appliance_id=one,
                first_seen=first_seen,
                last_seen=last_seen,
                records=int(records),
                payloads=int(payloads),
                payload_bytes=int(payload_bytes),
                records_today=int(records_today.get(one) or 0),
                payloads_today=count_today,
                payload_bytes_today=bytes_today,
                alerts_24h=int(alerts.get(one, 0)),
                health_ts=None if newest is None else newest[0],
                health=None if newest is None else _health(newest[1]),
            )
        )
    return FleetFigures(now_s, rows)


def sqlite_recent(conn: sqlite3.Connection, appliance_id: str, limit: int) -> RecentRecords:
    """`RecordStore.recent_records` on receiver.db (run on the store's thread)."""
    columns = "SELECT journal_id, seq, received_ts, line FROM records WHERE appliance_id = ?"
    alerts = [
        ShoreRecord(*row)
        for row in conn.execute(
            f"{columns} AND priority = 'alert' ORDER BY ts DESC LIMIT ?", (appliance_id, limit)
        )
    ]
    media = [
        ShoreRecord(*row)
        for row in conn.execute(
            f"{columns} AND {SQLITE_MEDIA} ORDER BY ts DESC LIMIT ?", (appliance_id, limit)
        )
    ]
    media = [record for record in media if payload_refs(record.line)]
    wanted = sorted({sha for r in [*alerts, *media] for sha in payload_refs(r.line)})
    held: dict[str, int] = {}
    for start in range(0, len(wanted), 500):  # SQLite's limit on bound parameters
        part = wanted[start : start + 500]
        marks = ", ".join("?" * len(part))
        held.update(
            conn.execute(
                f"SELECT sha256, size FROM payloads WHERE appliance_id = ? AND sha256 IN ({marks})",
                (appliance_id, *part),
            ).fetchall()
        )
    return RecentRecords(alerts, media, held)


def sqlite_payload_size(conn: sqlite3.Connection, appliance_id: str, sha256: str) -> int | None:
    row = conn.execute(
        "SELECT size FROM payloads WHERE appliance_id = ? AND sha256 = ?", (appliance_id, sha256)
    ).fetchone()
    return None if row is None else int(row[0])


# ----------------------------------------------------------------------------------- PostgreSQL


async def postgres_fleet(
    conn: Conn, schema: str, now: datetime, appliance_id: str | None
) -> FleetFigures:
    """`RecordStore.fleet` on PostgreSQL: one statement, at the database's time `now`."""
    today = datetime.fromtimestamp(day_start(now.timestamp()), UTC)
    since = now - timedelta(seconds=ALERT_WINDOW_S)
    selected = ", ".join(f"'{name}', r.record->'body'->'{name}'" for name in HEALTH_FIELDS)
    rows = await conn.fetch(
        f"""
        SELECT a.appliance_id, a.first_seen, a.last_seen, a.records, a.payloads, a.payload_bytes,
            COALESCE(b.stored, 0) AS records_today, COALESCE(p.count, 0) AS payloads_today,
            COALESCE(p.bytes, 0) AS payload_bytes_today, COALESCE(al.count, 0) AS alerts,
            h.ts AS health_ts, h.health::text AS health
        FROM {schema}.appliances a
        LEFT JOIN (
            SELECT appliance_id, SUM(stored) AS stored FROM {schema}.batches
            WHERE first_received >= $1 GROUP BY appliance_id
        ) b USING (appliance_id)
        LEFT JOIN (
            SELECT appliance_id, COUNT(*) AS count, SUM(size) AS bytes FROM {schema}.payloads
            WHERE completed_at >= $1 GROUP BY appliance_id
        ) p USING (appliance_id)
        LEFT JOIN (
            SELECT appliance_id, COUNT(*) AS count FROM {schema}.records
            WHERE priority = 'alert' AND at >= $2 GROUP BY appliance_id
        ) al USING (appliance_id)
        LEFT JOIN LATERAL (
            SELECT r.ts, jsonb_build_object({selected}) AS health FROM {schema}.records r
            WHERE r.appliance_id = a.appliance_id AND r.kind = 'health' AND r.at IS NOT NULL
                AND r.record IS NOT NULL
            ORDER BY r.at DESC LIMIT 1
        ) h ON true
        WHERE $3::text IS NULL OR a.appliance_id = $3
        ORDER BY a.appliance_id
        """,
        today,
        since,
        appliance_id,
    )
    return FleetFigures(
        now.timestamp(),
        [
            FleetRow(
                appliance_id=row["appliance_id"],
                first_seen=format_ts(row["first_seen"].timestamp()),
                last_seen=format_ts(row["last_seen"].timestamp()),
                records=int(row["records"]),
                payloads=int(row["payloads"]),
                payload_bytes=int(row["payload_bytes"]),
                records_today=int(row["records_today"]),
                payloads_today=int(row["payloads_today"]),
                payload_bytes_today=int(row["payload_bytes_today"]),
                alerts_24h=int(row["alerts"]),
                health_ts=row["health_ts"],
                health=_health(row["health"]),
            )
            for row in rows
        ],
    )


async def postgres_recent(conn: Conn, schema: str, appliance_id: str, limit: int) -> RecentRecords:
    """`RecordStore.recent_records` on PostgreSQL."""
    columns = (
        "SELECT journal_id, seq, received_at, COALESCE(line, record::text) AS line "
        f"FROM {schema}.records WHERE appliance_id = $1"
    )

    def shore(rows: list[Any]) -> list[ShoreRecord]:
        return [
            ShoreRecord(
                row["journal_id"],
                int(row["seq"]),
                format_ts(row["received_at"].timestamp()),
                row["line"],
            )
            for row in rows
        ]

    alerts = shore(
        await conn.fetch(
            f"{columns} AND priority = 'alert' AND at IS NOT NULL ORDER BY at DESC LIMIT $2",
            appliance_id,
            limit,
        )
    )
    media = shore(
        await conn.fetch(
            f"{columns} AND {POSTGRES_MEDIA} AND at IS NOT NULL ORDER BY at DESC LIMIT $2",
            appliance_id,
            limit,
        )
    )
    wanted = sorted({sha for r in [*alerts, *media] for sha in payload_refs(r.line)})
    held = {
        row["sha256"]: int(row["size"])
        for row in await conn.fetch(
            f"SELECT sha256, size FROM {schema}.payloads "
            "WHERE appliance_id = $1 AND sha256 = ANY($2::text[])",
            appliance_id,
            wanted,
        )
    }
    return RecentRecords(alerts, media, held)


async def postgres_payload_size(
    conn: Conn, schema: str, appliance_id: str, sha256: str
) -> int | None:
    size = await conn.fetchval(
        f"SELECT size FROM {schema}.payloads WHERE appliance_id = $1 AND sha256 = $2",
        appliance_id,
        sha256,
    )
    return None if size is None else int(size)


__all__ = [
    "POSTGRES_MEDIA",
    "SQLITE_MEDIA",
    "day_start",
    "postgres_fleet",
    "postgres_payload_size",
    "postgres_recent",
    "sqlite_fleet",
    "sqlite_payload_size",
    "sqlite_recent",
]
