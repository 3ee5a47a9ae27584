"""Owns the fleet store's schema in PostgreSQL: schema `receiver`, its named migrations (applied
once, in order, under an advisory lock, however many replicas start together) and the monthly
partitions of `records`. The tables are a contract for the tools that query them
(docs/fleet.md, "The schema"): migrations add, never rename or repurpose."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from receiver.fleet_store import POSTGRES_MEDIA

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection of the pool or one of its own (migrations run on either).
    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger(__name__)

SCHEMA = "receiver"
# Migrations run under this advisory lock: replicas starting together apply each one once.
MIGRATION_LOCK = 0x72656376  # "recv"
PARTITION_LOCK = 0x70617274  # "part"

MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "0001_initial",
        f"""
        CREATE TABLE {SCHEMA}.appliances (
            appliance_id text PRIMARY KEY,
            records bigint NOT NULL DEFAULT 0,
            duplicates_ignored bigint NOT NULL DEFAULT 0,
            batches bigint NOT NULL DEFAULT 0,
            payloads bigint NOT NULL DEFAULT 0,
            payload_bytes bigint NOT NULL DEFAULT 0,
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL,
            concurrent_journals jsonb
        );
        CREATE TABLE {SCHEMA}.journals (
            appliance_id text NOT NULL REFERENCES {SCHEMA}.appliances,
            journal_id text NOT NULL,
            records bigint NOT NULL DEFAULT 0,
            max_seq bigint,
            duplicates_ignored bigint NOT NULL DEFAULT 0,
            conflicts_refused bigint NOT NULL DEFAULT 0,
            batches bigint NOT NULL DEFAULT 0,
            payloads bigint NOT NULL DEFAULT 0,
            payload_bytes bigint NOT NULL DEFAULT 0,
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL,
            follows text,
            PRIMARY KEY (appliance_id, journal_id)
        );
        CREATE TABLE {SCHEMA}.record_keys (
            appliance_id text NOT NULL,
            journal_id text NOT NULL,
            seq bigint NOT NULL,
            received_at timestamptz NOT NULL,
            PRIMARY KEY (appliance_id, journal_id, seq)
        );
        CREATE TABLE {SCHEMA}.records (
            appliance_id text NOT NULL,
            journal_id text NOT NULL,
            seq bigint NOT NULL,
            priority text NOT NULL,
            kind text NOT NULL,
            ts text NOT NULL,
            at timestamptz,
            batch_id text NOT NULL,
            received_at timestamptz NOT NULL,
            record jsonb,
            line text,
            PRIMARY KEY (appliance_id, journal_id, seq, received_at)
        ) PARTITION BY RANGE (received_at);
        CREATE INDEX records_kind_at ON {SCHEMA}.records (appliance_id, kind, at);
        CREATE TABLE {SCHEMA}.batches (
            appliance_id text NOT NULL,
            journal_id text NOT NULL,
            batch_id text NOT NULL,
            priority text NOT NULL,
            first_seq bigint NOT NULL,
            last_seq bigint NOT NULL,
            times_received integer NOT NULL,
            stored integer NOT NULL,
            duplicates integer NOT NULL,
            first_received timestamptz NOT NULL,
            last_received timestamptz NOT NULL,
            PRIMARY KEY (appliance_id, journal_id, batch_id)
        );
        CREATE TABLE {SCHEMA}.payloads (
            appliance_id text NOT NULL,
            sha256 text NOT NULL,
            size bigint NOT NULL,
            journal_id text NOT NULL,
            completed_at timestamptz NOT NULL,
            PRIMARY KEY (appliance_id, sha256)
        );
        CREATE TABLE {SCHEMA}.model_packages (
            name text NOT NULL,
            version text NOT NULL,
            sha256 text NOT NULL UNIQUE,
            size bigint NOT NULL,
            appliances jsonb NOT NULL,
            groups jsonb NOT NULL,
            published_at text NOT NULL,
            PRIMARY KEY (name, version)
        );
        """,
    ),
    (
        "0002_tokens",
        f"""
        CREATE TABLE {SCHEMA}.tokens (
            token_id text PRIMARY KEY,
            digest bytea NOT NULL UNIQUE,
            role text NOT NULL CHECK (role IN ('appliance', 'admin')),
            appliance_id text,
            label text NOT NULL,
            created_at timestamptz NOT NULL,
            revoked_at timestamptz
        );
        """,
    ),
    (
        # The consumers' cursor (`GET /v1/records`): the transaction that stored a record
        # (`txid`) and its place in the order of inserts (`arrival`). A consumer reads only
        # below the oldest transaction still open, so a record committed late through another
        # replica is never passed over. Rows stored before keep txid 0.
        "0003_read_cursor",
        f"""
        CREATE SEQUENCE {SCHEMA}.records_arrival;
        ALTER TABLE {SCHEMA}.records ADD COLUMN txid xid8 NOT NULL DEFAULT '0',
            ADD COLUMN arrival bigint NOT NULL DEFAULT 0;
        UPDATE {SCHEMA}.records SET arrival = nextval('{SCHEMA}.records_arrival');
        ALTER TABLE {SCHEMA}.records ALTER COLUMN txid SET DEFAULT pg_current_xact_id(),
            ALTER COLUMN arrival SET DEFAULT nextval('{SCHEMA}.records_arrival');
        CREATE INDEX records_cursor ON {SCHEMA}.records (txid, arrival);
        """,
    ),
    (
        # The fleet view (receiver/fleet_store.py): small partial indexes on alerts and records
        # with payloads (`health` records use records_kind_at), and arrival indexes on batches
        # and payloads for what arrived today.
        "0004_fleet_view",
        f"""
        CREATE INDEX records_alerts ON {SCHEMA}.records (appliance_id, at)
            WHERE priority = 'alert';
        CREATE INDEX records_media ON {SCHEMA}.records (appliance_id, at) WHERE {POSTGRES_MEDIA};
        CREATE INDEX batches_arrival ON {SCHEMA}.batches (first_received);
        CREATE INDEX payloads_arrival ON {SCHEMA}.payloads (completed_at);
        """,
    ),
)


def month_bounds(moment: datetime) -> tuple[datetime, datetime]:
    start = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def partition_name(start: datetime) -> str:
    return f"records_{start:%Y_%m}"


async def migrate(conn: Conn) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction, under an
    advisory lock; the names applied now."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["name"] for row in await conn.fetch(f"SELECT name FROM {SCHEMA}.migrations")}
        for name, script in MIGRATIONS:
            if name in done:
                continue
            await conn.execute(script)
            await conn.execute(f"INSERT INTO {SCHEMA}.migrations (name) VALUES ($1)", name)
            applied_now.append(name)
            log.info("receiver migration applied", extra={"fields": {"name": name}})
    return applied_now


__all__ = [
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "PARTITION_LOCK",
    "SCHEMA",
    "migrate",
    "month_bounds",
    "partition_name",
]
