"""Named schema migrations of journal.db, applied in order, each once, each in its own transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import sqlite_utils

from sync.errors import JournalTooNew
from sync.identity import ensure_identity


@dataclass(frozen=True)
class Migration:
    name: str
    apply: Callable[[sqlite_utils.Database], None]


def _initial(db: sqlite_utils.Database) -> None:
    db["records"].create(  # type: ignore[union-attr]
        {
            "seq": int,
            "appliance_id": str,
            "boot_id": str,
            "ts": str,
            "mono_ns": int,
            "source": str,
            "kind": str,
            "priority": int,
            "model": str,
            "body": str,
            "payloads": str,
            "size": int,
        },
        pk="seq",
        not_null={
            "appliance_id",
            "boot_id",
            "ts",
            "mono_ns",
            "source",
            "kind",
            "priority",
            "body",
            "size",
        },
    )
    # Cursor reads and eviction both walk one priority in seq order.
    db["records"].create_index(["priority", "seq"], index_name="records_priority_seq")  # type: ignore[union-attr]
    db["payloads"].create(  # type: ignore[union-attr]
        {
            "sha256": str,
            "size": int,
            "media_type": str,
            "refs": int,
            "state": str,
            "created_ts": str,
        },
        pk="sha256",
        not_null={"size", "refs", "state"},
    )
    db["cursors"].create(  # type: ignore[union-attr]
        {"destination": str, "priority": int, "acked_seq": int, "updated_ts": str},
        pk=("destination", "priority"),
    )
    db["acks"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "destination": str,
            "priority": int,
            "first_seq": int,
            "last_seq": int,
            "batch_id": str,
            "ts": str,
        },
        pk="id",
    )
    db["counts"].create(  # type: ignore[union-attr]
        {"priority": int, "kind": str, "records": int, "bytes": int}, pk=("priority", "kind")
    )
    db["evictions"].create(  # type: ignore[union-attr]
        {"priority": int, "reason": str, "records": int, "bytes": int}, pk=("priority", "reason")
    )
    db["drops"].create(  # type: ignore[union-attr]
        {"priority": int, "reason": str, "records": int}, pk=("priority", "reason")
    )
    db["quality"].create(  # type: ignore[union-attr]
        {"source": str, "reason": str, "count": int}, pk=("source", "reason")
    )
    db["meta"].create({"key": str, "value": str}, pk="key")  # type: ignore[union-attr]


def _payload_outbox(db: sqlite_utils.Database) -> None:
    # Payloads of records a destination acknowledged, still to upload there. Filled in the
    # transaction that moves the cursor, emptied as uploads complete.
    db["payload_outbox"].create(  # type: ignore[union-attr]
        {"destination": str, "sha256": str, "priority": int, "seq": int},
        pk=("destination", "sha256"),
        not_null={"priority", "seq"},
    )
    db["payload_outbox"].create_index(  # type: ignore[union-attr]
        ["destination", "priority", "seq"], index_name="payload_outbox_order"
    )


def _journal_identity(db: sqlite_utils.Database) -> None:
    # The journal's random id (sync/identity.py); an existing journal's records so far become
    # its legacy range, which keeps shipping as it did before.
    ensure_identity(db.conn)


def _rollups(db: sqlite_utils.Database) -> None:
    # Tiered telemetry (sync/rollup.py): per resolution and kind of record rolled up, how many
    # records the rollups replaced and what they took on disk before and after; kept in the
    # transactions that roll up, as evictions are.
    db["rollups"].create(  # type: ignore[union-attr]
        {
            "resolution_s": int,
            "of_kind": str,
            "records": int,
            "rollups": int,
            "bytes_before": int,
            "bytes_after": int,
        },
        pk=("resolution_s", "of_kind"),
        not_null={"records", "rollups", "bytes_before", "bytes_after"},
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_initial", _initial),
    Migration("0002_payload_outbox", _payload_outbox),
    Migration("0003_journal_identity", _journal_identity),
    Migration("0004_rollups", _rollups),
)


def applied(conn: sqlite3.Connection) -> list[str]:
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_ts TEXT)")
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations; return the names applied now. The connection must be idle."""
    done = set(applied(conn))
    known = {m.name for m in MIGRATIONS}
    unknown = done - known
    if unknown:
        raise JournalTooNew(
            f"journal.db was written by a newer version of the appliance (migrations "
            f"{sorted(unknown)} unknown here); run that version, or restore a backup made by "
            "this one"
        )
    newly: list[str] = []
    db = sqlite_utils.Database(conn)
    for migration in MIGRATIONS:
        if migration.name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            migration.apply(db)
            conn.execute(
                "INSERT INTO _migrations (name, applied_ts) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ'))",
                (migration.name,),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        newly.append(migration.name)
    return newly
