"""A journal's identity: the random id made when a journal is created, and which of its records
were journalled before journals had identities (those still ship as they always did).

A replaced disk, a reflashed box, a factory reset or a second box given the same config all
start a new journal, so a seq number alone never says which records are which upstream: every
batch, payload and object key carries (appliance, journal, seq). See docs/sync-protocol.md."""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from sync.payloads import fsync_dir

JOURNAL_ID_KEY = "journal_id"
# Records up to this seq were journalled by a version without journal identities; upstream holds
# them under the appliance alone, so they keep shipping that way (a resent batch is recognised).
LEGACY_HIGH_WATER_KEY = "journal_legacy_high_water"
# 32 lowercase hex digits (a uuid4 without dashes).
JOURNAL_ID_RE = re.compile(r"[0-9a-f]{32}")


def new_journal_id() -> str:
    return uuid.uuid4().hex


def valid_journal_id(value: str) -> bool:
    return JOURNAL_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class JournalIdentity:
    journal_id: str
    legacy_high_water: int = 0

    def shipped_as(self, seq: int) -> str | None:
        """The journal id a record ships under: None for a record journalled before identities."""
        return None if seq <= self.legacy_high_water else self.journal_id


def ensure_identity(conn: sqlite3.Connection) -> JournalIdentity:
    """Give a journal its identity if it has none (inside the caller's transaction). A journal
    that already holds records, or remembers handing out seqs, predates identities: its records
    so far are marked legacy."""
    found = read_identity(conn)
    if found is not None:
        return found
    row = conn.execute("SELECT value FROM meta WHERE key = 'seq_hw'").fetchone()
    (max_seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
    legacy = max(int(row[0]) if row else 0, int(max_seq))
    identity = JournalIdentity(new_journal_id(), legacy)
    write_identity(conn, identity)
    return identity


def write_identity(conn: sqlite3.Connection, identity: JournalIdentity) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [
            (JOURNAL_ID_KEY, identity.journal_id),
            (LEGACY_HIGH_WATER_KEY, str(identity.legacy_high_water)),
        ],
    )


def read_identity(conn: sqlite3.Connection) -> JournalIdentity | None:
    """The identity in a journal's meta table, or None when it has none (or a damaged one)."""
    rows = dict(
        conn.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?)",
            (JOURNAL_ID_KEY, LEGACY_HIGH_WATER_KEY),
        ).fetchall()
    )
    journal_id = rows.get(JOURNAL_ID_KEY)
    if not isinstance(journal_id, str) or not valid_journal_id(journal_id):
        return None
    legacy = str(rows.get(LEGACY_HIGH_WATER_KEY) or "0")
    return JournalIdentity(journal_id, int(legacy) if legacy.isdigit() else 0)


# ------------------------------------------------------------------ the appliance id by default

APPLIANCE_ID_FILE = "appliance-id"


def data_dir_appliance_id(data_dir: Path, *, create: bool) -> str | None:
    """The appliance id made for a data directory whose config names none: `appliance-` and 8
    random hex digits, kept in DATA_DIR/appliance-id so it survives restarts and upgrades. Two
    fresh installs shipping to one receiver never share it. None when it does not exist yet and
    `create` is False (a read-only command on a directory the appliance has not run in)."""
    path = data_dir / APPLIANCE_ID_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        text = ""
    if text:
        return text
    if not create:
        return None
    made = f"appliance-{uuid.uuid4().hex[:8]}"
    data_dir.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{APPLIANCE_ID_FILE}.tmp")
    with temp.open("w", encoding="utf-8") as handle:
        handle.write(made + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(path)
    fsync_dir(data_dir)
    return made
