"""Benchmark: start-up of a full-size journal. A clean restart to its first new record, against
the old start-up's whole-file `quick_check` (the baseline, measured in the same run), an unclean
restart (a writer SIGKILLed) with its background check, and every step of opening timed.

The journal is filled to N GiB with SQL as `bench.journal_growth` does (its `fill`: the file the
journal itself writes, 200-byte bodies), plus `--payload-files` payload files with their rows
(tiny files: their number, not their bytes, is what reconciling them at start costs). Then:

  baseline   the old start-up's check: `PRAGMA quick_check` on the writer's connection (16 MB
             page cache), cold (journal.db evicted from the page cache with posix_fadvise
             DONTNEED) and warm (run again at once)
  clean      a clean restart, cold, `--restarts` times, and once warm: Journal.open (check,
             migrations, identity, seqs, payload reconciliation; timed per step) + the first
             append, until its seq is durable. Target: <= 2 s, cold, at 20 GiB
  limit      the same at a journal of exactly `journal.full_check_limit` (the largest that is
             still checked in full at every start), cold
  daemon     the daemon (in this process, imports done first; status page on, no sources or
             destinations) from `run()` to its first record (`lifecycle started`), cold
  unclean    a child process opens the journal, journals a record and is SIGKILLed; then a cold
             Journal.open + first append, and the background check (integrity_check in a niced
             child process) while a record is appended every 20 ms: the check's duration, the
             appends' latency before and during it, the WAL's size at its end
  reads      what the status page and `appliance status` read (JournalReader, cold), with a
             destination registered that has acknowledged nothing, then half: each capped at
             READ_CAP_S (interrupted past it)

Prints one JSON object on stdout; progress on stderr. Deletes its data unless `--keep`.
`python -m bench.journal_startup [--quick] [--gib N] [--restarts N] [--payload-files N]`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    base_parser,
    emit,
    machine,
    make_data_root,
    peak_rss_mib,
    percentile,
    progress,
    source_fingerprint,
)
from bench.journal_growth import create_empty, evict, fill
from config import ApplianceConfig, JournalSection
from sync.journal import Journal
from sync.journal_open import writer_connection
from sync.payloads import PayloadStore
from sync.reader import JOURNAL_FILE, JournalReader
from sync.records import NewRecord, Priority

TARGET_CLEAN_S = 2.0
# Bytes of journal.db per filled record (bench.journal_growth: 332-333 at 10M records).
BYTES_PER_RECORD = 333
APPEND_EVERY_S = 0.02
BEFORE_CHECK_S = 3.0
READ_CAP_S = 60.0
DESTINATION = "shore"
FIRST = NewRecord(source="bench", kind="reading", priority=Priority.EVENT, body={"first": True})


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# ------------------------------------------------------------------------------- set-up


def add_payloads(data_dir: Path, files: int) -> dict[str, Any]:
    """`files` payload files of 64 bytes, each with its row (refs 1, present), as the journal
    keeps them: what reconciliation at start walks and reads."""
    store = PayloadStore(data_dir / "payloads")
    start = time.perf_counter()
    rows = []
    for n in range(files):
        data = n.to_bytes(8, "big") * 8
        ref = store.put_bytes(data, "application/octet-stream")
        rows.append((ref.sha256, ref.size, ref.media_type, "2024-01-01T00:00:00.000000Z"))
    with contextlib.closing(sqlite3.connect(data_dir / JOURNAL_FILE, isolation_level=None)) as c:
        c.execute("BEGIN IMMEDIATE")
        c.executemany(
            "INSERT INTO payloads (sha256, size, media_type, refs, state, created_ts) "
            "VALUES (?, ?, ?, 1, 'present', ?)",
            rows,
        )
        c.execute("COMMIT")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {"files": files, "seconds": round(time.perf_counter() - start, 1)}


def kill_a_writer(data_dir: Path, settings: JournalSection) -> None:
    """An unclean stop: a child process opens the journal, journals a record, and is
    SIGKILLed while it holds it open."""
    code = (
        "import asyncio\n"
        "from pathlib import Path\n"
        "from config import JournalSection\n"
        "from sync.journal import Journal\n"
        "from sync.records import NewRecord, Priority\n"
        "async def main():\n"
        f"    j = await Journal.open(Path({str(data_dir)!r}), appliance_id='bench', settings="
        f"JournalSection(full_check_limit={settings.full_check_limit}))\n"
        "    await j.append(NewRecord(source='bench', kind='reading', priority=Priority.EVENT,"
        " body={}))\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("the writer to be killed did not start")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)


# ----------------------------------------------------------------------------- measuring


def old_check(path: Path) -> dict[str, Any]:
    """The old start-up's check over the whole file: quick_check on the writer's connection."""
    out: dict[str, Any] = {}
    for label in ("cold", "warm"):
        if label == "cold":
            evict(path)
        conn = writer_connection(path)
        try:
            start = time.perf_counter()
            rows = conn.execute("PRAGMA quick_check").fetchall()
            out[f"{label}_s"] = round(time.perf_counter() - start, 2)
            out["result"] = rows[0][0] if len(rows) == 1 else f"{len(rows)} problems"
        finally:
            conn.close()
        progress(f"  quick_check {label}: {out[f'{label}_s']} s")
    return out


async def restart(
    data_dir: Path, settings: JournalSection, *, cold: bool, payloads: bool = True
) -> dict[str, Any]:
    """Open the journal and append one record: seconds until its seq is durable."""
    if cold:
        evict(data_dir / JOURNAL_FILE)
    store = PayloadStore(data_dir / "payloads") if payloads else None
    start = time.perf_counter()
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings, payloads=store)
    opened = time.perf_counter()
    await journal.append(FIRST)
    first = time.perf_counter()
    await journal.close()
    closed = time.perf_counter()
    return {
        "cold": cold,
        "first_record_s": round(first - start, 3),
        "open_s": round(opened - start, 3),
        "first_append_ms": ms(first - opened),
        "close_s": round(closed - first, 3),
        "check": journal.recovery.check,
        "last_stop": journal.integrity.last_stop,
        "integrity": journal.integrity.state,
        "steps_s": journal.recovery.seconds,
    }


async def daemon_first_record(data_dir: Path, settings: JournalSection) -> dict[str, Any]:
    """The daemon from run() to its first record, in this process (imports done before)."""
    from appliance.daemon import Daemon  # the whole appliance: imported before the clock starts

    cfg = ApplianceConfig.model_validate(
        {
            "appliance": {"id": "bench", "data_dir": str(data_dir)},
            "sensors": [],
            "journal": {"full_check_limit": settings.full_check_limit},
            "status": {"listen": "127.0.0.1:0"},
            # Room for the whole fill: retention must not evict it at start.
            "storage": {"disk_budget": "1TiB", "min_free": "1GiB"},
        }
    )
    reader = JournalReader.open(data_dir)
    before = reader.max_seq()
    evict(data_dir / JOURNAL_FILE)
    stop = asyncio.Event()
    daemon = Daemon(cfg, stop=stop)
    start = time.perf_counter()
    run = asyncio.create_task(daemon.run())
    first: dict[str, float] = {}
    seq = before + 1  # the writer hands out seqs one after another
    try:
        while "lifecycle" not in first:
            if run.done():
                raise SystemExit(f"the daemon stopped before its first record: {run.result()}")
            while (record := reader.get(seq)) is not None:
                first.setdefault(record.kind, round(time.perf_counter() - start, 3))
                seq += 1
            await asyncio.sleep(0.005)
    finally:
        reader.close()
        stop.set()
        code = await run
    return {
        "first_record_s": min(first.values()),
        "lifecycle_started_s": first["lifecycle"],
        "first_records_s": first,
        "exit_code": code,
    }


async def unclean(data_dir: Path, settings: JournalSection) -> dict[str, Any]:
    """A cold open after a SIGKILL, then the background check while records flow."""
    kill_a_writer(data_dir, settings)
    evict(data_dir / JOURNAL_FILE)
    store = PayloadStore(data_dir / "payloads")
    start = time.perf_counter()
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings, payloads=store)
    opened = time.perf_counter()
    await journal.append(FIRST)
    first = time.perf_counter() - start
    try:
        integrity = journal.integrity
        found = {"last_stop": integrity.last_stop, "state": integrity.state}
        before = await appends_while(journal, lambda: time.perf_counter() - start < BEFORE_CHECK_S)
        task = journal.start_integrity_check()
        if task is None:
            raise SystemExit(f"no background check was owed after a SIGKILL: {found}")
        check_start = time.perf_counter()
        during = await appends_while(journal, lambda: not task.done())
        await task
        check_wall = time.perf_counter() - check_start
        wal = data_dir / f"{JOURNAL_FILE}-wal"
        wal_bytes = wal.stat().st_size if wal.exists() else 0
    finally:
        await journal.close()
    return {
        "found_at_open": found,
        "first_record_s": round(first, 3),
        "open_s": round(opened - start, 3),
        "check": journal.recovery.check,
        "steps_s": journal.recovery.seconds,
        "background_check": {
            "check": integrity.check,
            "state": integrity.state,
            "detail": integrity.detail,
            "seconds_in_child": integrity.seconds,
            "wall_s": round(check_wall, 1),
            "wal_bytes_at_end": wal_bytes,
        },
        "append_ms_before_check": before,
        "append_ms_during_check": during,
    }


async def appends_while(journal: Journal, going: Callable[[], bool]) -> dict[str, Any]:
    """One record every APPEND_EVERY_S while `going()`: append-to-durable latency."""
    latencies: list[float] = []
    while going():
        start = time.perf_counter()
        await journal.append(FIRST)
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(APPEND_EVERY_S)
    if not latencies:
        return {"appends": 0}
    return {
        "appends": len(latencies),
        "p50": ms(percentile(latencies, 50)),
        "p99": ms(percentile(latencies, 99)),
        "max": ms(max(latencies)),
    }


def capped(conn: sqlite3.Connection, fn: Callable[[], object]) -> dict[str, Any]:
    """Seconds `fn()` took; interrupted past READ_CAP_S (then the seconds are the cap)."""
    timer = threading.Timer(READ_CAP_S, conn.interrupt)
    timer.start()
    start = time.perf_counter()
    try:
        fn()
    except sqlite3.OperationalError as exc:
        if "interrupted" not in str(exc):
            raise
        return {"s": round(time.perf_counter() - start, 1), "interrupted": True}
    finally:
        timer.cancel()
    return {"s": round(time.perf_counter() - start, 3), "interrupted": False}


async def status_reads(data_dir: Path, settings: JournalSection) -> dict[str, Any]:
    """What `appliance status` and the status page read, cold, with a destination that has
    acknowledged nothing and then half of the journal."""
    out: dict[str, Any] = {}
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    try:
        await journal.register_destination(DESTINATION)
        await journal.checkpoint()
    finally:
        await journal.close()

    def measure(label: str) -> None:
        evict(data_dir / JOURNAL_FILE)
        with JournalReader.open(data_dir) as reader:
            reads: dict[str, Callable[[], object]] = {
                "counts": reader.counts,
                "unsynced": reader.unsynced,
                "live_bytes": reader.live_bytes,
                "payload_totals": reader.payload_totals,
                "max_seq": reader.max_seq,
                "backlog": lambda: reader.backlog(DESTINATION),
                "payloads_waiting": lambda: reader.payloads_waiting(DESTINATION),
            }
            figures: dict[str, Any] = {}
            for name, read in reads.items():
                figures[name] = capped(reader.conn, read)
                progress(f"  {label} {name}: {figures[name]}")
        out[label] = figures

    measure("nothing_acknowledged")
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    try:
        half = await journal.read(JournalReader.max_seq) // 2
        for priority in Priority:
            await journal.acknowledge(DESTINATION, priority, 1, half, f"bench-{priority.label}")
        await journal.checkpoint()
    finally:
        await journal.close()
    measure("half_acknowledged")
    return out


# ---------------------------------------------------------------------------------- main


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--gib", type=float, help="journal size in GiB (default 20; quick 1)")
    parser.add_argument("--restarts", type=int, default=3, help="cold clean restarts measured")
    parser.add_argument(
        "--payload-files", type=int, help="payload files beside it (default 100,000; quick 2,000)"
    )
    parser.add_argument(
        "--full-check-limit-mib",
        type=float,
        help="journal.full_check_limit for the run (default: the setting's default); a tiny "
        "run needs one below its size",
    )
    parser.add_argument("--skip-daemon", action="store_true", help="leave out the daemon run")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (prints its path)")
    args = parser.parse_args()
    gib: float = args.gib or (1.0 if args.quick else 20.0)
    payload_files: int = (
        args.payload_files if args.payload_files is not None else (2_000 if args.quick else 100_000)
    )
    settings = (
        JournalSection()
        if args.full_check_limit_mib is None
        else JournalSection(full_check_limit=int(args.full_check_limit_mib * 2**20))
    )
    records = max(1000, int(gib * 2**30 / BYTES_PER_RECORD))
    # Just under the limit (the schema and a small journal's emptier pages take room too).
    limit_records = max(1000, int(settings.full_check_limit * 0.9 / BYTES_PER_RECORD))
    # A short name: the daemon's control socket lives in the data dir (AF_UNIX paths are short).
    root = make_data_root(args.tmp_dir, "bench-startup-")
    free = shutil.disk_usage(root).free
    # The fill, its WAL (one chunk), the small journal, payloads, and headroom for the run.
    need = int((records + limit_records) * BYTES_PER_RECORD * 1.1) + payload_files * 4096 + 2**30
    if free < need:
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(
            f"not enough space in {root.parent}: {free / 2**30:.1f} GiB free, "
            f"{need / 2**30:.1f} GiB needed for a {gib:g} GiB journal; free some space or pass "
            "--tmp-dir on a larger file system"
        )
    box = machine(root)
    progress(
        f"data dir {root} on {box['data_dir_filesystem']['type']}, {free / 2**30:.1f} GiB free"
    )
    result: dict[str, Any] = {}
    try:
        big, small = root / "big", root / "at-limit"
        asyncio.run(create_empty(big, settings))
        progress(f"fill: {records:,} records (~{gib:g} GiB)")
        filled = fill(big, records)
        filled["file_bytes"] = (big / JOURNAL_FILE).stat().st_size
        progress(f"payloads: {payload_files:,} files")
        filled["payloads"] = add_payloads(big, payload_files)
        asyncio.run(create_empty(small, settings))
        fill(small, limit_records)
        small_bytes = (small / JOURNAL_FILE).stat().st_size

        progress("baseline: the old start-up's quick_check")
        baseline = old_check(big / JOURNAL_FILE)
        progress("clean restarts")
        clean = [asyncio.run(restart(big, settings, cold=True)) for _ in range(args.restarts)]
        for run in clean:
            progress(f"  cold: {run['first_record_s']} s {run['steps_s']}")
        warm = asyncio.run(restart(big, settings, cold=False))
        progress(f"  warm: {warm['first_record_s']} s")
        progress(f"journal at full_check_limit ({small_bytes / 2**20:.0f} MiB)")
        at_limit = asyncio.run(restart(small, settings, cold=True, payloads=False))
        progress(f"  cold: {at_limit['first_record_s']} s ({at_limit['check']})")
        daemon = None
        if not args.skip_daemon:
            progress("daemon to its first record")
            daemon = asyncio.run(daemon_first_record(big, settings))
            progress(f"  {daemon}")
        progress("unclean restart (SIGKILL) and the background check")
        dirty = asyncio.run(unclean(big, settings))
        progress(f"  first record {dirty['first_record_s']} s; check {dirty['background_check']}")
        progress("status reads")
        reads = asyncio.run(status_reads(big, settings))
        peak = peak_rss_mib()
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    cold_firsts = [run["first_record_s"] for run in clean]
    passed = {
        "clean_restart": max(cold_firsts) <= TARGET_CLEAN_S,
        "clean_restart_scans_nothing": all(run["check"] == "sanity" for run in clean),
        "at_limit": at_limit["first_record_s"] <= TARGET_CLEAN_S
        and at_limit["check"] == "integrity_check",
        "unclean_opens_at_once": dirty["first_record_s"] <= TARGET_CLEAN_S,
        "background_check_ok": dirty["background_check"]["state"] == "ok",
    }
    if daemon is not None:
        passed["daemon_lifecycle_started"] = daemon["lifecycle_started_s"] <= TARGET_CLEAN_S
    result = {
        "benchmark": "journal_startup",
        "quick": args.quick,
        "machine": box,
        "source": source_fingerprint("sync/recovery.py"),
        "settings": {
            "gib": gib,
            "records": records,
            "payload_files": payload_files,
            "full_check_limit": settings.full_check_limit,
            "restarts": args.restarts,
            "cache": "cold = journal.db evicted with posix_fadvise DONTNEED (payload files and "
            "inodes stay cached)",
        },
        "fill": filled,
        "baseline_old_quick_check": baseline,
        "clean_restart_first_record_s": {
            "cold_median": round(statistics.median(cold_firsts), 3),
            "cold_max": max(cold_firsts),
            "warm": warm["first_record_s"],
        },
        "speedup_cold": round(baseline["cold_s"] / statistics.median(cold_firsts), 1),
        "clean_restarts": [*clean, warm],
        "at_full_check_limit": {"file_bytes": small_bytes, **at_limit},
        "daemon": daemon,
        "unclean_restart": dirty,
        "status_reads_cold_s": reads,
        "peak_rss_mib": peak,
        "targets": {"clean_restart_first_record_s_max": TARGET_CLEAN_S},
        "pass": {**passed, "all": all(passed.values())},
    }
    emit(result)


if __name__ == "__main__":
    main()
