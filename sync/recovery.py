"""Start-up recovery: integrity check, quarantine and salvage of a corrupt journal, and
reconciliation of payload files against payload rows after a crash."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sync.identity import JournalIdentity, new_journal_id, read_identity, write_identity
from sync.migrations import migrate
from sync.payloads import PayloadStore

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
_PROBE_CHUNK = 4096
_RECORD_COLUMNS = (
    "seq, appliance_id, boot_id, ts, mono_ns, source, kind, priority, model, body, payloads, size"
)


@dataclass
class SalvageReport:
    quarantined_to: str
    problem: str
    records_salvaged: int = 0
    seq_ranges_unreadable: int = 0
    old_high_water: int = 0
    next_seq: int = 0
    tables_lost: list[str] = field(default_factory=list)
    # The salvaged journal keeps its identity when the damaged one's is readable; otherwise it
    # is a new journal upstream (its records so far ship under the new id) and this says why.
    journal_id: str = ""
    journal_continued: bool = False
    journal_note: str = ""


@dataclass
class PayloadReport:
    temp_files_removed: int = 0
    orphan_files_removed: int = 0
    orphan_bytes_removed: int = 0
    missing_files: int = 0
    missing_examples: list[str] = field(default_factory=list)
    size_mismatches: int = 0


@dataclass
class RecoveryReport:
    """What start-up found and did; journalled as a `recovery` record when anything was found."""

    check: str = "none"
    salvaged: SalvageReport | None = None
    payloads: PayloadReport | None = None

    @property
    def anything_found(self) -> bool:
        p = self.payloads
        return self.salvaged is not None or (
            p is not None
            and (
                p.temp_files_removed
                or p.orphan_files_removed
                or p.missing_files
                or p.size_mismatches
            )
            > 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_checked(
    path: Path, full_check_limit: int, connect: Callable[[Path], sqlite3.Connection]
) -> tuple[sqlite3.Connection, RecoveryReport]:
    """Open journal.db after an integrity check; on corruption quarantine it and salvage what is
    readable into a fresh journal. Never deletes the damaged file."""
    report = RecoveryReport()
    if not path.exists():
        return connect(path), report
    problem: str | None = None
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path)
        pragma = "integrity_check" if path.stat().st_size <= full_check_limit else "quick_check"
        report.check = pragma
        rows = conn.execute(f"PRAGMA {pragma}").fetchall()
        if rows != [("ok",)]:
            problem = "; ".join(str(r[0]) for r in rows[:5])
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem is None and conn is not None:
        return conn, report
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
    log.error(
        "journal failed its integrity check; salvaging", extra={"fields": {"problem": problem}}
    )
    quarantined = quarantine(path)
    fresh = connect(path)
    migrate(fresh)
    report.salvaged = salvage(quarantined, fresh, problem or "unknown")
    return fresh, report


def quarantine(path: Path) -> Path:
    """Move journal.db and its -wal/-shm into quarantine/<time>/; return the moved db path."""
    target = path.parent / QUARANTINE_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for extra in ("", "-wal", "-shm"):
        source = Path(f"{path}{extra}")
        if source.exists():
            shutil.move(source, target / f"{path.name}{extra}")
    return target / path.name


def salvage(source_path: Path, dest: sqlite3.Connection, problem: str) -> SalvageReport:
    """Copy every readable record (and the small tables) of a damaged journal into `dest`."""
    report = SalvageReport(quarantined_to=str(source_path.parent), problem=problem)
    try:
        src = sqlite3.connect(source_path, isolation_level=None)
    except sqlite3.Error as exc:
        report.tables_lost.append(f"all ({exc})")
        return report
    with contextlib.closing(src):
        lo, hi = _seq_bounds(src)
        meta_hw = _safe_scalar(src, "SELECT value FROM meta WHERE key = 'seq_hw'")
        report.old_high_water = max(hi, int(meta_hw) if meta_hw else 0)
        dest.execute("BEGIN IMMEDIATE")
        try:
            if hi >= lo:
                _copy_records(src, dest, lo, report.old_high_water, report)
            for table in ("cursors", "acks", "evictions", "drops", "quality", "meta"):
                try:
                    rows = src.execute(f"SELECT * FROM {table}").fetchall()
                except sqlite3.DatabaseError:
                    report.tables_lost.append(table)
                    continue
                if rows:
                    marks = ", ".join("?" * len(rows[0]))
                    dest.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", rows)
            _rebuild_derived(src, dest)
            _carry_identity(src, dest, report)
            dest.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq_hw', ?)",
                (str(report.old_high_water),),
            )
            dest.execute("COMMIT")
        except BaseException:
            dest.execute("ROLLBACK")
            raise
    return report


def _carry_identity(
    src: sqlite3.Connection, dest: sqlite3.Connection, report: SalvageReport
) -> None:
    """Keep the damaged journal's identity when it can be read, so upstream sees one journal."""
    try:
        old = read_identity(src)
        meta_readable = True
    except sqlite3.DatabaseError:
        old, meta_readable = None, False
    if old is not None:
        write_identity(dest, old)
        report.journal_continued = True
        report.journal_note = "identity kept"
    elif meta_readable and _safe_scalar(src, "SELECT value FROM meta WHERE key = 'boots'"):
        # A journal from before identities: what it held so far ships as it always did.
        write_identity(dest, JournalIdentity(new_journal_id(), report.old_high_water))
        report.journal_continued = True
        report.journal_note = "journal predates identities; its records so far stay legacy"
    else:
        write_identity(dest, JournalIdentity(new_journal_id()))
        report.journal_note = (
            "the damaged journal's identity could not be read: this is a new journal upstream"
        )
        log.warning(
            "salvaged journal starts a new identity", extra={"fields": {"why": "meta lost"}}
        )
    identity = read_identity(dest)
    report.journal_id = identity.journal_id if identity else ""


def _safe_scalar(conn: sqlite3.Connection, sql: str) -> Any:
    try:
        row = conn.execute(sql).fetchone()
    except sqlite3.DatabaseError:
        return None
    return None if row is None else row[0]


def _seq_bounds(src: sqlite3.Connection) -> tuple[int, int]:
    lo = _safe_scalar(src, "SELECT MIN(seq) FROM records")
    hi = _safe_scalar(src, "SELECT MAX(seq) FROM records")
    if hi is None:
        # The rowid tree's edges are damaged; fall back to what the meta table remembers.
        hw = _safe_scalar(src, "SELECT value FROM meta WHERE key = 'seq_hw'")
        hi = int(hw) if hw else 0
    return int(lo) if lo is not None else 1, int(hi)


def _copy_records(
    src: sqlite3.Connection, dest: sqlite3.Connection, lo: int, hi: int, report: SalvageReport
) -> None:
    """Read seq ranges; a range that fails is split in halves down to single rows, so one bad
    page costs only the rows on it."""
    insert = f"INSERT OR IGNORE INTO records ({_RECORD_COLUMNS}) VALUES ({', '.join('?' * 12)})"
    start = lo
    while start <= hi:
        stack = [(start, min(hi, start + _PROBE_CHUNK - 1))]
        while stack:
            a, b = stack.pop()
            try:
                rows = src.execute(
                    f"SELECT {_RECORD_COLUMNS} FROM records WHERE seq BETWEEN ? AND ?", (a, b)
                ).fetchall()
            except sqlite3.DatabaseError:
                if a == b:
                    report.seq_ranges_unreadable += 1
                    continue
                mid = (a + b) // 2
                stack.extend([(mid + 1, b), (a, mid)])
                continue
            dest.executemany(insert, rows)
            report.records_salvaged += len(rows)
        start += _PROBE_CHUNK


def _rebuild_derived(src: sqlite3.Connection, dest: sqlite3.Connection) -> None:
    """Recompute the counts and payload reference counts from the salvaged records."""
    dest.execute("DELETE FROM counts")
    dest.execute(
        "INSERT INTO counts (priority, kind, records, bytes) "
        "SELECT priority, kind, COUNT(*), SUM(size) FROM records GROUP BY priority, kind"
    )
    refs: Counter[str] = Counter()
    for (payloads,) in dest.execute("SELECT payloads FROM records WHERE payloads IS NOT NULL"):
        refs.update(json.loads(payloads))
    old: dict[str, tuple[int, str, str]] = {}
    with contextlib.suppress(sqlite3.DatabaseError):
        for sha, size, media_type, created in src.execute(
            "SELECT sha256, size, media_type, created_ts FROM payloads"
        ):
            old[sha] = (size, media_type, created)
    dest.execute("DELETE FROM payloads")
    dest.executemany(
        "INSERT INTO payloads (sha256, size, media_type, refs, state, created_ts) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            (
                sha,
                old[sha][0] if sha in old else 0,
                old[sha][1] if sha in old else None,
                n,
                "present" if sha in old else "unknown",
                old[sha][2] if sha in old else None,
            )
            for sha, n in refs.items()
        ],
    )


def reconcile_payloads(conn: sqlite3.Connection, store: PayloadStore) -> PayloadReport:
    """Make payload files and payload rows agree after a crash.

    A file without a row was written but its record never committed: it was never reported
    durable, so it is removed. A row whose file is gone is marked `missing` (and reported), so
    the sync engine ships the record without it rather than failing forever."""
    report = PayloadReport()
    for stray in store.stray_files():
        stray.unlink(missing_ok=True)
        report.temp_files_removed += 1
    rows = {
        sha: (size, state)
        for sha, size, state in conn.execute("SELECT sha256, size, state FROM payloads")
    }
    on_disk = dict(store.files())
    for sha in on_disk:
        if sha not in rows:
            report.orphan_bytes_removed += store.delete(sha)
            report.orphan_files_removed += 1
    missing = []
    fixes = []
    for sha, (size, state) in rows.items():
        if sha not in on_disk:
            if state != "missing":
                missing.append(sha)
        elif state == "unknown" or (state == "missing"):
            fixes.append(("present", on_disk[sha], sha))
        elif size != on_disk[sha]:
            report.size_mismatches += 1
            fixes.append(("corrupt", size, sha))
    if missing or fixes:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE payloads SET state = 'missing' WHERE sha256 = ?", [(s,) for s in missing]
        )
        conn.executemany("UPDATE payloads SET state = ?, size = ? WHERE sha256 = ?", fixes)
        conn.execute("COMMIT")
    report.missing_files = len(missing)
    report.missing_examples = missing[:10]
    return report
