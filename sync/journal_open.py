"""Opening journal.db for writing: the writer lock (journal.lock), the seq reservation sidecar
(journal.seq), the writer connection's pragmas, and the start-up sequence that checks, salvages,
migrates and reads the identity and next seq of the file before the writer thread starts."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

from sync.errors import JournalLocked
from sync.identity import JournalIdentity, ensure_identity, read_identity
from sync.migrations import migrate
from sync.payloads import PayloadStore, fsync_dir
from sync.reader import JOURNAL_FILE, JournalReader, connect
from sync.recovery import RecoveryReport, open_checked, reconcile_payloads

SEQ_RESERVATION_FILE = "journal.seq"
# seq values are reserved in blocks in a sidecar file, fsync'd before use, so that a journal
# salvaged after corruption never hands out a seq that may already have shipped upstream.
SEQ_RESERVATION_BLOCK = 100_000

LOCK_FILE = "journal.lock"
PAGE_SIZE = 8192  # of a new journal.db


def acquire_writer_lock(data_dir: Path) -> int:
    """Take the data directory's writer lock (flock: the kernel drops it when the process dies,
    so a SIGKILL never leaves a stale lock). Raises JournalLocked naming the holder."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise JournalLocked(str(data_dir), holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def writer_lock_holder(data_dir: Path) -> str | None:
    """Who holds the writer lock now, or None when nobody does (read-only check)."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def read_seq_reservation(data_dir: Path) -> int:
    try:
        return int((data_dir / SEQ_RESERVATION_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def write_seq_reservation(data_dir: Path, ceiling: int) -> None:
    target = data_dir / SEQ_RESERVATION_FILE
    temp = data_dir / f"{SEQ_RESERVATION_FILE}.tmp"
    with temp.open("w") as handle:
        handle.write(f"{ceiling}\n")
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(target)
    fsync_dir(data_dir)


def writer_connection(path: Path) -> sqlite3.Connection:
    conn = connect(path, readonly=False)
    try:
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            # Both must precede the first table. Incremental auto-vacuum lets retention hand
            # freed pages back to the file system. 8 KiB pages: a telemetry row is 500-1,100
            # bytes, and 4 KiB pages left about a seventh of the file as slack at the pages'
            # ends (bench.autonomy's record_bytes: 851 -> 772 bytes a turbine reading; 16 KiB
            # gave 740, but then no eviction could commit on a really full disk within its
            # 1 MiB ballast in tests/test_full_disk.py: the WAL takes each touched page whole).
            # A journal made earlier keeps its page size.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("PRAGMA cache_size = -16000")
    except BaseException:
        # A file that is not a database fails here; the caller quarantines it.
        conn.close()
        raise
    return conn


def open_for_writing(
    data_dir: Path, full_check_limit: int, payloads: PayloadStore | None
) -> tuple[sqlite3.Connection, int, int, RecoveryReport, JournalIdentity]:
    """The start-up sequence, each step timed into the report's `seconds`: none of them reads
    the whole file unless the check says so (sync/recovery.py, `open_checked`)."""
    path = data_dir / JOURNAL_FILE
    lap = time.perf_counter()
    seconds: dict[str, float] = {}

    def step(name: str) -> None:
        nonlocal lap
        now = time.perf_counter()
        seconds[name] = round(now - lap, 4)
        lap = now

    conn, report = open_checked(path, full_check_limit, writer_connection)
    step("check")
    migrate(conn)
    step("migrate")
    identity = read_identity(conn)
    if identity is None:  # the meta rows were removed by hand: a new journal from here on
        conn.execute("BEGIN IMMEDIATE")
        identity = ensure_identity(conn)
        conn.execute("COMMIT")
    step("identity")
    reserved = read_seq_reservation(data_dir)
    hw_row = conn.execute("SELECT value FROM meta WHERE key = 'seq_hw'").fetchone()
    high = max(int(hw_row[0]) if hw_row else 0, JournalReader(conn).max_seq())
    if hw_row is None and reserved > 0:
        # A journal that has never committed a record beside a reservation that says seqs were
        # handed out: journal.db was lost (deleted, or a crash between quarantine and salvage).
        # Those seqs may have shipped; reusing them would make upstream drop new records.
        high = max(high, reserved)
    if report.salvaged is not None:
        # The lost tail may have held seqs that already shipped: start above every seq that
        # could ever have been handed out.
        high = max(high, reserved, report.salvaged.old_high_water)
        report.salvaged.next_seq = high + 1
    step("seqs")
    clean_and_large = report.check == "sanity" and report.integrity.state == "skipped"
    if payloads is not None and not clean_and_large:
        # Walking every payload file costs about 10-20 us a file (1-2 s at 100,000, measured),
        # so a large journal after a clean stop skips it, like its page check: a clean stop
        # leaves no half-written file and no row without its file. What it can leave, a file
        # stored for a record its stopped source never journalled, waits for the next walk (a
        # start after an unclean stop), and the sync engine skips a file found gone anyway.
        report.payloads = reconcile_payloads(conn, payloads)
        step("payloads")
    report.seconds = seconds
    return conn, high + 1, max(reserved, high), report, identity
