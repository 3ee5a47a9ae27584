"""Start-up recovery: which integrity check a start needs (none after a clean stop of a large
journal, a background one after an unclean stop), the checks themselves (at start, or in a niced
child process while sources journal), the clean-stop mark and the damage flag, quarantine and
salvage of a corrupt journal, and reconciliation of payload files against payload rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sync.identity import JournalIdentity, new_journal_id, read_identity, write_identity
from sync.migrations import migrate
from sync.payloads import PayloadStore, fsync_dir
from sync.records import format_ts

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
# meta key written by Journal.close() after its last commit, and deleted by the next start
# before it writes anything: present at start means the previous run stopped cleanly (and its
# journal was known to be sound), so a large journal opens without reading all of its pages.
CLEAN_STOP_KEY = "stopped_cleanly"
# A sidecar file, not a meta row: it is written when a background check finds the journal
# damaged, and a damaged database is the last place to write that down. The next start reads
# it and runs the full check before anything else (and quarantine + salvage if it fails again).
DAMAGE_FILE = "journal.damaged"
# What runs in the background after an unclean stop of a journal above full_check_limit:
# integrity_check also holds every index against its table (a torn index would make the sync
# engine's cursor reads skip records), and in a niced child process its extra time costs
# nobody a wait (docs/benchmarks.md, bench.journal_startup).
BACKGROUND_CHECK = "integrity_check"
# The background check's nice value: below the sources, the writer and the status page.
CHECK_NICE = 10
# Its page cache (KiB, negative as SQLite wants it): it reads every page once, a bigger cache
# would only take memory from the rest of the appliance.
_CHECK_CACHE_KIB = 2048
# Memory-mapped reads let the kernel read ahead (about ten times faster than SQLite's page by
# page reads on a cold cache, measured); SQLite caps the mapping (2 GiB in common builds). A
# read error on a mapped page kills the process with SIGBUS: only ever in the child process.
_CHECK_MMAP_BYTES = 1 << 40
_CHECKS = ("integrity_check", "quick_check")
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
class IntegrityState:
    """The journal's integrity as this run knows it: how the last run stopped and what checked
    (or checks, or will check) the file since. Shown in the status report (`journal.last_stop`,
    `journal.integrity`) and the heartbeat; `Journal` keeps it current."""

    last_stop: str = "new"
    """clean | unclean (a crash, a power cut, a SIGKILL, or a version without the mark) | new"""
    state: str = "skipped"
    """skipped: no check needed (a clean stop of a large journal, a new journal);
    pending: owed after an unclean stop, not started yet (it starts with the daemon);
    running: in the background now; ok: a check passed; salvaged: a check at start failed and
    the journal was quarantined and salvaged; failed: the background check found damage
    (the next start salvages); error: the check could not run (the next start runs it again)"""
    check: str | None = None
    """the check that ran, runs or will run: integrity_check | quick_check"""
    started_at: str | None = None
    checked_at: str | None = None
    seconds: float | None = None
    detail: str = ""

    @property
    def vouched(self) -> bool:
        """Whether the file is known sound, so that a clean stop may say so with its mark."""
        return self.state in ("skipped", "ok", "salvaged")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoveryReport:
    """What start-up found and did; journalled as a `recovery` record when anything was found."""

    check: str = "none"
    """what ran before the first record: none (a new journal), sanity (a few reads: schema,
    meta, the first and last record), integrity_check or quick_check (every page)"""
    salvaged: SalvageReport | None = None
    payloads: PayloadReport | None = None
    integrity: IntegrityState = field(default_factory=IntegrityState)
    seconds: dict[str, float] = field(default_factory=dict)
    """How long each step of opening took (check, migrate, identity, seqs, payloads)."""

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


def _now() -> str:
    return format_ts(datetime.now(UTC))


def clean_stop_mark(conn: sqlite3.Connection) -> tuple[str, str]:
    """The meta row Journal.close() writes after its last commit. It names the run (`boots`)
    that wrote it, so a mark left by a version that did not delete it at start (a downgrade
    and back) is not taken for this run's."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'boots'").fetchone()
    boots = int(row[0]) if row else 0
    return CLEAN_STOP_KEY, json.dumps({"at": _now(), "boots": boots})


def stopped_cleanly(conn: sqlite3.Connection) -> bool:
    """Whether the journal holds a clean-stop mark from its last run."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta is None:  # created and never migrated: killed during its very first start
        return False
    mark = conn.execute("SELECT value FROM meta WHERE key = ?", (CLEAN_STOP_KEY,)).fetchone()
    boots = conn.execute("SELECT value FROM meta WHERE key = 'boots'").fetchone()
    if mark is None or boots is None:
        return False
    try:
        return int(json.loads(mark[0])["boots"]) == int(boots[0])
    except (ValueError, KeyError, TypeError):
        return False


def sanity_check(conn: sqlite3.Connection, path: Path) -> None:
    """What a clean start of a large journal reads instead of every page: the schema, meta, the
    first and the last record (the edges of the records tree), and the file's length against
    the pages SQLite says it has. Raises sqlite3.DatabaseError when any of it is wrong."""
    conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    conn.execute("SELECT key, value FROM meta").fetchall()
    for order in ("ASC", "DESC"):
        conn.execute(f"SELECT * FROM records ORDER BY seq {order} LIMIT 1").fetchall()
    wal = Path(f"{path}-wal")
    if not wal.exists() or wal.stat().st_size == 0:
        # With an empty WAL every page is in the file: a shorter file lost its tail.
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        size = path.stat().st_size
        if size < pages * page_size:
            raise sqlite3.DatabaseError(
                f"journal.db is {size} bytes, shorter than its {pages} pages of {page_size}"
            )


def read_damage_flag(data_dir: Path) -> dict[str, str] | None:
    """What the last background check found, when it found the journal damaged."""
    try:
        found = json.loads((data_dir / DAMAGE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Unreadable, it still says the journal was found damaged.
        return {"check": "integrity_check", "detail": "unreadable damage flag", "at": ""}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None


def write_damage_flag(data_dir: Path, check: str, detail: str) -> None:
    target = data_dir / DAMAGE_FILE
    temp = data_dir / f"{DAMAGE_FILE}.tmp"
    with temp.open("w") as handle:
        json.dump({"check": check, "detail": detail, "at": _now()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(target)
    fsync_dir(data_dir)


def clear_damage_flag(data_dir: Path) -> None:
    if (data_dir / DAMAGE_FILE).exists():
        (data_dir / DAMAGE_FILE).unlink()
        fsync_dir(data_dir)


def _prefetch(path: Path) -> None:
    """Read the file once, in order: SQLite's checks read pages in tree order, one at a time,
    which a cold disk serves several times slower than one sequential pass that fills the page
    cache first (bounded by full_check_limit, so it never reads a large journal)."""
    with contextlib.suppress(OSError), path.open("rb", buffering=0) as handle:
        while handle.read(1 << 20):
            pass


def _problems(rows: list[Any]) -> str | None:
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows[:5])


def open_checked(
    path: Path, full_check_limit: int, connect: Callable[[Path], sqlite3.Connection]
) -> tuple[sqlite3.Connection, RecoveryReport]:
    """Open journal.db after the check this start needs; on corruption quarantine it and
    salvage what is readable into a fresh journal. Never deletes the damaged file.

    A journal up to `full_check_limit` bytes gets PRAGMA integrity_check at every start. A
    larger one gets it only when the last run's background check found damage, or when a few
    sanity reads fail; otherwise it opens after those reads alone, and after an unclean stop
    the report's `integrity` says `pending`: the full check is owed, to run in the background
    (`run_check_process`) while sources journal."""
    report = RecoveryReport()
    integrity = report.integrity
    data_dir = path.parent
    flag = read_damage_flag(data_dir)
    if not path.exists():
        if flag is not None:  # the file it was about is gone (moved away by hand)
            clear_damage_flag(data_dir)
        integrity.detail = "a new journal"
        return connect(path), report
    problem: str | None = None
    conn: sqlite3.Connection | None = None
    started = time.perf_counter()
    try:
        report.check = "sanity"  # opening reads the schema: the first read to meet damage
        conn = connect(path)
        size = path.stat().st_size
        integrity.last_stop = "clean" if stopped_cleanly(conn) else "unclean"
        pragma = "integrity_check" if size <= full_check_limit else "quick_check"
        why = "the journal is under journal.full_check_limit"
        if flag is not None:
            if size > full_check_limit and flag.get("check") == "quick_check":
                pragma = "quick_check"  # what found the damage; integrity_check finds more
            else:
                pragma = "integrity_check"
            why = f"the last check found it damaged ({flag.get('detail', '')})"
        elif size > full_check_limit:
            try:
                sanity_check(conn, path)
            except sqlite3.DatabaseError as exc:
                why = f"reading it at start failed ({exc})"
            else:
                if integrity.last_stop == "clean":
                    integrity.detail = "the last stop was clean: no check needed"
                else:
                    integrity.state, integrity.check = "pending", BACKGROUND_CHECK
                    integrity.detail = "the last stop was not clean: checking in the background"
                return conn, report
        if size <= full_check_limit:
            _prefetch(path)
        report.check = integrity.check = pragma
        problem = _problems(conn.execute(f"PRAGMA {pragma}").fetchall())
        integrity.checked_at = _now()
        integrity.seconds = round(time.perf_counter() - started, 3)
        integrity.state, integrity.detail = "ok", f"checked at start: {why}"
        if flag is not None and problem is None:
            integrity.detail = "the damage the last check found was not found again"
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem is None and conn is not None:
        if flag is not None:
            clear_damage_flag(data_dir)
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
    clear_damage_flag(data_dir)
    integrity.state, integrity.checked_at = "salvaged", _now()
    integrity.seconds = round(time.perf_counter() - started, 3)
    integrity.detail = f"damaged ({problem}): quarantined and salvaged"
    return fresh, report


# ------------------------------------------------------------------- the background check


@dataclass
class CheckOutcome:
    """How a check in the child process ended: `state` ok, failed (the journal is damaged) or
    error (the check itself could not finish; nothing is known of the journal)."""

    state: str
    detail: str
    seconds: float | None


def check_child() -> None:
    """The child process's body: `python -c "...check_child()" PATH PRAGMA`. Niced, on its own
    read-only connection; prints one JSON line. Ends by itself when its parent goes (its stdin
    closes), so a SIGKILLed daemon leaves no check reading the disk behind it."""
    path, pragma = sys.argv[1], sys.argv[2]
    if pragma not in _CHECKS:
        raise SystemExit(f"unknown check {pragma!r}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the daemon's to handle
    with contextlib.suppress(OSError):
        os.nice(CHECK_NICE)

    def orphaned() -> None:
        sys.stdin.buffer.read()
        os._exit(3)

    threading.Thread(target=orphaned, daemon=True).start()
    started = time.perf_counter()
    result: dict[str, Any]
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        conn.execute(f"PRAGMA cache_size = -{_CHECK_CACHE_KIB}")
        conn.execute(f"PRAGMA mmap_size = {_CHECK_MMAP_BYTES}")
        conn.execute("PRAGMA busy_timeout = 30000")
        problem = _problems(conn.execute(f"PRAGMA {pragma}").fetchall())
        result = {"ok": problem is None, "detail": problem or "ok"}
    except sqlite3.DatabaseError as exc:
        result = {"ok": False, "detail": str(exc)}
    result["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(result), flush=True)
    os._exit(0)  # not through the interpreter's exit: the orphan watch's read never returns


async def run_check_process(path: Path, pragma: str) -> CheckOutcome:
    """Run `pragma` over journal.db in a niced child process while the journal stays open for
    writing; cancelling kills the child. A child killed by SIGBUS met a read error on the
    file (memory-mapped reads): the journal counts as damaged."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from sync.recovery import check_child; check_child()",
        str(path),
        pragma,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
        code = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
    seconds = round(time.perf_counter() - started, 3)
    if code == -signal.SIGBUS:
        return CheckOutcome("failed", "a read error on journal.db (SIGBUS in the check)", seconds)
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
        return CheckOutcome(
            "ok" if result["ok"] else "failed", str(result["detail"]), float(result["seconds"])
        )
    except (ValueError, IndexError, KeyError, TypeError):
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {code}"]
        return CheckOutcome("error", f"the check did not finish: {why[0]}", seconds)


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
