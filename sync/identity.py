"""A journal's identity: the random id made when a journal is created, and which of its records
were journalled before journals had identities (those still ship as they always did).

A replaced disk, a reflashed box, a factory reset or a second box given the same config all
start a new journal, so a seq number alone never says which records are which upstream: every
batch, payload and object key carries (appliance, journal, seq). See docs/sync-protocol.md."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from sync.payloads import fsync_dir

JOURNAL_ID_KEY = "journal_id"
# The ids this journal's history shipped under before a fork (`appliance journal fork`): JSON
# [[LAST_SEQ, JOURNAL_ID], ...], oldest first.
EARLIER_KEY = "journal_earlier"
# What upstream calls the records shipped without a journal id.
LEGACY_JOURNAL = "legacy"
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
    """The id records ship under, by seq: legacy (none) up to `legacy_high_water`, then each id
    of `earlier` up to its last seq, then `journal_id`."""

    journal_id: str
    legacy_high_water: int = 0
    earlier: tuple[tuple[int, str], ...] = ()

    def shipped_as(self, seq: int) -> str | None:
        """The journal id a record ships under: None for a record journalled before identities."""
        if seq <= self.legacy_high_water:
            return None
        for last, journal_id in self.earlier:
            if seq <= last:
                return journal_id
        return self.journal_id

    def epoch_end(self, seq: int) -> int | None:
        """The last seq shipped under the same id as `seq`; None for the current id (no end).
        A batch never crosses it."""
        if seq <= self.legacy_high_water:
            return self.legacy_high_water
        for last, _ in self.earlier:
            if seq <= last:
                return last
        return None

    def follows(self, journal_id: str | None) -> str | None:
        """The id whose history `journal_id` continues (LEGACY_JOURNAL for the records from
        before identities), sent upstream so the two are never taken for two boxes."""
        chain = ([LEGACY_JOURNAL] if self.legacy_high_water else []) + [
            earlier for _, earlier in self.earlier
        ]
        chain.append(self.journal_id)
        if journal_id is None or journal_id not in chain:
            return None
        index = chain.index(journal_id)
        return chain[index - 1] if index > 0 else None

    @property
    def boundary(self) -> int:
        """The last seq of the history before the current id."""
        return max([self.legacy_high_water, *(last for last, _ in self.earlier)])

    def forked(self, after: int, new_id: str) -> JournalIdentity:
        """This identity with records after `after` shipping under `new_id` from now on (a
        journal restored from a backup, or copied onto a second box). Raises ValueError when
        `after` lies inside the history before the current id."""
        if after < self.boundary:
            raise ValueError(
                f"seq {after} is before {self.boundary}, where this journal's current identity "
                "starts; fork after it"
            )
        earlier = self.earlier
        if after > self.boundary:  # the current id owns records: they keep it
            earlier = (*earlier, (after, self.journal_id))
        return JournalIdentity(new_id, self.legacy_high_water, earlier)


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
            (EARLIER_KEY, json.dumps([list(pair) for pair in identity.earlier])),
        ],
    )


def read_identity(conn: sqlite3.Connection) -> JournalIdentity | None:
    """The identity in a journal's meta table, or None when it has none (or a damaged one)."""
    rows = dict(
        conn.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?, ?)",
            (JOURNAL_ID_KEY, LEGACY_HIGH_WATER_KEY, EARLIER_KEY),
        ).fetchall()
    )
    journal_id = rows.get(JOURNAL_ID_KEY)
    if not isinstance(journal_id, str) or not valid_journal_id(journal_id):
        return None
    legacy = str(rows.get(LEGACY_HIGH_WATER_KEY) or "0")
    try:
        earlier = tuple(
            (int(last), str(earlier_id))
            for last, earlier_id in json.loads(rows.get(EARLIER_KEY) or "[]")
        )
    except (ValueError, TypeError):
        earlier = ()
    return JournalIdentity(journal_id, int(legacy) if legacy.isdigit() else 0, earlier)


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
