"""Owns receiver.db's schema: its named migrations, applied once each and in order when a
receiver opens the file, so a receiver.db made by any earlier version keeps working. Tables:
docs/sync-protocol.md ("Journals") and docs/fleet.md."""

from __future__ import annotations

import logging
import sqlite3

from receiver.backend import now_ts
from receiver.fleet_store import SQLITE_MEDIA

# LEGACY_JOURNAL: the journal of records shipped without a Journal-Id: by appliances of a version
# before journal identities, and by upgraded ones for what they journalled before the upgrade.
from sync.identity import LEGACY_JOURNAL

log = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[str, str], ...] = (
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
        # Published model packages (receiver/model_feed.py); `appliances` and `groups` are JSON lists,
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
    (
        # Tokens kept in the store (`appliance receiver tokens`), beside any tokens file: only
        # their sha256.
        "0004_tokens",
        """
        CREATE TABLE tokens (
            token_id TEXT PRIMARY KEY,
            digest BLOB NOT NULL UNIQUE,
            role TEXT NOT NULL,
            appliance_id TEXT,
            label TEXT NOT NULL,
            created_ts TEXT NOT NULL,
            revoked_ts TEXT
        );
        """,
    ),
    (
        # The consumers' cursor (`GET /v1/records`): every record numbered in the order it was
        # committed (one writer, so arrival order is commit order). Records stored before are
        # numbered by arrival time, then key.
        "0005_arrival",
        """
        ALTER TABLE records ADD COLUMN arrival INTEGER;
        UPDATE records SET arrival = o.n FROM (
            SELECT appliance_id AS a, journal_id AS j, seq AS s, ROW_NUMBER() OVER (
                ORDER BY received_ts, appliance_id, journal_id, seq) AS n
            FROM records) AS o
        WHERE records.appliance_id = o.a AND records.journal_id = o.j AND records.seq = o.s;
        CREATE UNIQUE INDEX records_arrival ON records (arrival);
        """,
    ),
    (
        # The fleet view (receiver/fleet_store.py): small partial indexes on alerts, `health`
        # records and records with payloads, and arrival indexes on batches and payloads for
        # what arrived today; records without payloads pay for none of them.
        "0006_fleet_view",
        f"""
        CREATE INDEX records_alerts ON records (appliance_id, ts) WHERE priority = 'alert';
        CREATE INDEX records_health ON records (appliance_id, ts) WHERE kind = 'health';
        CREATE INDEX records_media ON records (appliance_id, ts) WHERE {SQLITE_MEDIA};
        CREATE INDEX batches_arrival ON batches (first_received_ts);
        CREATE INDEX payloads_arrival ON payloads (completed_ts);
        """,
    ),
)


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations the file lacks, each in its own transaction; the names applied now."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_ts TEXT NOT NULL)"
    )
    applied = {row[0] for row in conn.execute("SELECT name FROM migrations")}
    applied_now: list[str] = []
    for name, script in MIGRATIONS:
        if name in applied:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, now_ts()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied_now.append(name)
        log.info("receiver migration applied", extra={"fields": {"name": name}})
    return applied_now
