"""Benchmark: does the journal stay flat as it grows? Append rate and cursor-read time at a
journal of N records against an empty one, in the same run.

The big journal is filled fast, not through the API: Journal.open creates the file (schema,
migrations, meta), the Journal is closed, then one plain sqlite3 connection inserts rows
generated inside SQLite (a recursive CTE, so no Python per row) in transactions of
FILL_CHUNK rows with synchronous=OFF, upserting `counts` from each chunk in the same
transaction and setting `meta.seq_hw` at the end, so the file is exactly what the journal
would have written (same schema, columns, types, 200-byte JSON bodies, priority mix, sizes;
seq ascending from 1). Then the data is fsync'd, and Journal.open reopens it normally (its
start-up quick_check is timed as `open_s`). A consistency check at the end compares
`counts` and `seq_hw` with the records table.

Then, for the empty journal, the big one, and the empty one again (a drift check):
  append   producers calling append_many() for a fixed duration (records/s);
  read     10,000 records of priority `event` read by cursor with `records_after` in batches
           of 500 (as the sync engine does), at the oldest record and, for the big journal, in
           the middle and at the tail; each cold (journal.db evicted from the OS page cache
           with posix_fadvise DONTNEED) and then warm (median of WARM_READS).

Prints one JSON object on stdout; progress on stderr.
`python -m bench.journal_growth [--quick] [--records N]`."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    BODY_BYTES,
    PAD,
    Phase,
    base_parser,
    count_records,
    drive,
    emit,
    journal_bytes_per_record,
    machine,
    make_data_root,
    peak_rss_mib,
    progress,
    source_fingerprint,
)
from config import JournalSection
from sync.journal import Journal
from sync.reader import JOURNAL_FILE, JournalReader
from sync.records import RECORD_OVERHEAD_BYTES, Priority, StoredRecord

TARGET_APPEND_RATIO = 0.8
READ_RECORDS = 10_000
READ_BATCH = 500
READ_MAX_BYTES = 4 * 1024 * 1024
READ_PRIORITY = Priority.EVENT
WARM_READS = 5
FILL_CHUNK = 500_000
# The empty journal is topped up to this many records before its read, so that it holds
# READ_RECORDS records of READ_PRIORITY (20% of the mix) whatever the append phase wrote.
SMALL_READ_FLOOR = 60_000

# One row per x: the same values bench.common.new_record(x) gives the journal (body, priority
# mix 5/20/5/70 by x % 20, kinds), with ts and mono_ns advancing 100 µs per record.
_FILL_SQL = f"""
WITH RECURSIVE n(x) AS (SELECT :lo UNION ALL SELECT x + 1 FROM n WHERE x < :hi)
INSERT INTO records (seq, appliance_id, boot_id, ts, mono_ns, source, kind, priority, model,
                     body, payloads, size)
SELECT x, :appliance_id, :boot_id,
       strftime('%Y-%m-%dT%H:%M:%S', :epoch + x / 10000, 'unixepoch')
           || printf('.%06dZ', (x % 10000) * 100),
       x * 100000, 'bench',
       CASE WHEN x % 20 = 5 THEN 'sample' WHEN x % 20 <= 4 THEN 'detection' ELSE 'reading' END,
       CASE WHEN x % 20 = 0 THEN 1 WHEN x % 20 <= 4 THEN 2 WHEN x % 20 = 5 THEN 3 ELSE 4 END,
       NULL,
       printf('{{"label":"person","score_pm":%d,"bbox":[%d,%d,64,128],"track":"%012d","pad":"%s"}}',
              500 + x % 500, 100 + x % 540, 100 + x % 380, x % 1000000000000, :pad),
       NULL, {BODY_BYTES + RECORD_OVERHEAD_BYTES}
FROM n
"""
_FILL_COUNTS = """
INSERT INTO counts (priority, kind, records, bytes)
SELECT priority, kind, COUNT(*), SUM(size) FROM records WHERE seq BETWEEN :lo AND :hi
GROUP BY priority, kind
ON CONFLICT(priority, kind) DO UPDATE SET records = records + excluded.records,
    bytes = bytes + excluded.bytes
"""


# ------------------------------------------------------------------------------------ fill


def fill(data_dir: Path, records: int) -> dict[str, Any]:
    """Append `records` rows (seq 1..records) to the Journal-made journal.db in data_dir."""
    conn = sqlite3.connect(data_dir / JOURNAL_FILE, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")  # the fill is set-up, not what is measured
    conn.execute("PRAGMA cache_size = -16000")  # as the journal; keeps peak RSS honest
    start = time.perf_counter()
    params: dict[str, Any] = {
        "appliance_id": "bench",
        "boot_id": uuid.uuid4().hex,
        "epoch": int(time.time()) - records // 10000 - 3600,
        "pad": PAD,
    }
    try:
        done = 0
        while done < records:
            lo, hi = done + 1, min(done + FILL_CHUNK, records)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_FILL_SQL, {**params, "lo": lo, "hi": hi})
            conn.execute(_FILL_COUNTS, {"lo": lo, "hi": hi})
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq_hw', ?)", (str(hi),)
            )
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            done = hi
            elapsed = time.perf_counter() - start
            progress(f"  filled {done:,} / {records:,} ({done / elapsed:,.0f} records/s)")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    # synchronous=OFF left dirty pages to the kernel: write them out now so their flushing does
    # not land inside a measured phase.
    fd = os.open(data_dir / JOURNAL_FILE, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    return {
        "records": records,
        "seconds": round(seconds, 1),
        "records_per_s": round(records / seconds),
        "method": "recursive CTE INSERT..SELECT in SQLite, "
        f"{FILL_CHUNK:,} rows per transaction, synchronous=OFF, then fsync",
    }


# ----------------------------------------------------------------------------------- reads


def evict(path: Path) -> None:
    """Drop a file's pages from the OS page cache (clean pages only; ours are, after fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def cursor_read(journal: Journal, after_seq: int) -> tuple[float, int]:
    """Seconds to read READ_RECORDS records of READ_PRIORITY after `after_seq` through the
    public API, READ_BATCH at a time, moving the cursor like the engine does."""
    cursor = after_seq
    got = 0
    start = time.perf_counter()
    while got < READ_RECORDS:
        want = min(READ_BATCH, READ_RECORDS - got)

        def batch(reader: JournalReader, after: int = cursor, n: int = want) -> list[StoredRecord]:
            return reader.records_after(READ_PRIORITY, after, limit=n, max_bytes=READ_MAX_BYTES)

        records = await journal.read(batch)
        if not records:
            break
        got += len(records)
        cursor = records[-1].seq
    return time.perf_counter() - start, got


async def read_at(journal: Journal, after_seq: int) -> dict[str, Any]:
    await journal.checkpoint()
    evict(journal.path)
    cold, got = await cursor_read(journal, after_seq)
    warm = [(await cursor_read(journal, after_seq))[0] for _ in range(WARM_READS)]
    return {
        "after_seq": after_seq,
        "records": got,
        "cold_ms": round(cold * 1000, 1),
        "warm_ms": round(statistics.median(warm) * 1000, 1),
    }


# ------------------------------------------------------------------------------- measuring


async def measure(
    data_dir: Path,
    settings: JournalSection,
    *,
    duration: float,
    warmup: float,
    tasks: int,
    chunk: int,
    read_positions: dict[str, float],
) -> dict[str, Any]:
    """Open the journal in data_dir, append for `duration`, then read at each position (a
    fraction of the records present before the append phase)."""
    start = time.perf_counter()
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    open_s = time.perf_counter() - start
    try:
        before = await count_records(journal)
        first_n = 10**15  # producers' n values never collide with the fill's
        phase: Phase = await drive(
            journal, tasks=tasks, chunk=chunk, duration=duration, warmup=warmup, first_n=first_n
        )
        progress(f"  append: {phase.rate:,.0f} records/s")
        present = await count_records(journal)
        if present < SMALL_READ_FLOOR:
            await drive(
                journal,
                tasks=tasks,
                chunk=chunk,
                duration=(SMALL_READ_FLOOR - present) / max(phase.rate, 1.0) + 0.2,
                warmup=0.0,
                first_n=2 * first_n,
            )
        reads: dict[str, Any] = {}
        for name, fraction in read_positions.items():
            after = int(before * fraction)
            reads[name] = await read_at(journal, after)
            progress(f"  read 10k @{name}: {reads[name]}")
        size, per_record = await journal_bytes_per_record(journal)
        total = await count_records(journal)
        consistent = await journal.read(_consistency)
    finally:
        await journal.close()
    return {
        "records_at_start": before,
        "records_at_end": total,
        "open_s": round(open_s, 2),
        "check_at_open": journal.recovery.check,
        "append": phase.to_dict(),
        "read_10k": reads,
        "file_bytes": size,
        "bytes_per_record": per_record,
        "consistent": consistent,
    }


def _consistency(reader: JournalReader) -> dict[str, bool]:
    """counts and seq_hw agree with the records table (the fill kept the journal's invariants)."""
    conn = reader.conn
    total, max_seq = conn.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM records").fetchone()
    counted = sum(row[2] for row in reader.counts())
    hw = int(reader.meta("seq_hw") or 0)
    return {"counts_match": counted == total, "seq_hw_match": hw == max_seq}


async def create_empty(data_dir: Path, settings: JournalSection) -> None:
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    await journal.close()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--records", type=int, help="records in the big journal (default 10,000,000; quick 200,000)"
    )
    parser.add_argument("--duration", type=float, help="seconds of appends (default 5, quick 1.5)")
    parser.add_argument("--tasks", type=int, default=64, help="tasks calling append_many()")
    parser.add_argument("--chunk-size", type=int, default=32, help="records per append_many()")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (prints its path)")
    args = parser.parse_args()
    records: int = args.records or (200_000 if args.quick else 10_000_000)
    duration: float = args.duration or (1.5 if args.quick else 5.0)
    warmup = min(0.5, duration / 5)
    settings = JournalSection()
    root = make_data_root(args.tmp_dir, "bench-journal-growth-")
    free = shutil.disk_usage(root).free
    need = records * 420  # ~335 B/record on disk, plus WAL and headroom
    if free < need:
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"not enough space in {root.parent}: {free:,} B free, {need:,} B needed")
    kwargs: dict[str, Any] = {
        "duration": duration,
        "warmup": warmup,
        "tasks": args.tasks,
        "chunk": args.chunk_size,
    }
    try:
        box = machine(root)
        progress(
            f"data dir {root} on {box['data_dir_filesystem']['type']}, {free / 2**30:.1f} GiB free"
        )
        big_dir, small_dirs = root / "big", [root / "empty-1", root / "empty-2"]
        asyncio.run(create_empty(big_dir, settings))
        progress(f"fill: {records:,} records")
        filled = fill(big_dir, records)
        progress("empty journal")
        small_1 = asyncio.run(
            measure(small_dirs[0], settings, read_positions={"head": 0.0}, **kwargs)
        )
        progress(f"journal of {records:,} records")
        big = asyncio.run(
            measure(
                big_dir,
                settings,
                read_positions={
                    "head": 0.0,
                    "middle": 0.5,
                    "tail": max(0.0, 1 - SMALL_READ_FLOOR / records),
                },
                **kwargs,
            )
        )
        progress("empty journal again (drift check)")
        small_2 = asyncio.run(
            measure(small_dirs[1], settings, read_positions={"head": 0.0}, **kwargs)
        )
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    small_rate = (small_1["append"]["records_per_s"] + small_2["append"]["records_per_s"]) / 2
    append_ratio = big["append"]["records_per_s"] / small_rate
    small_cold = (
        small_1["read_10k"]["head"]["cold_ms"] + small_2["read_10k"]["head"]["cold_ms"]
    ) / 2
    small_warm = (
        small_1["read_10k"]["head"]["warm_ms"] + small_2["read_10k"]["head"]["warm_ms"]
    ) / 2
    read_ratio = {
        f"{name}_{kind}": round(read[f"{kind}_ms"] / max(small, 0.001), 2)
        for name, read in big["read_10k"].items()
        for kind, small in (("warm", small_warm), ("cold", small_cold))
    }
    passed = {"append_ratio": append_ratio >= TARGET_APPEND_RATIO}
    emit(
        {
            "benchmark": "journal_growth",
            "quick": args.quick,
            "machine": box,
            "source": source_fingerprint(),
            "settings": {
                "records": records,
                "body_bytes": BODY_BYTES,
                "append_seconds": duration,
                "append_tasks": args.tasks,
                "append_many_chunk": args.chunk_size,
                "read_records": READ_RECORDS,
                "read_batch": READ_BATCH,
                "read_priority": READ_PRIORITY.label,
                "commit_records": settings.commit_records,
                "synchronous": "FULL",
            },
            "fill": filled,
            "empty_append_records_per_s": round(small_rate),
            "big_append_records_per_s": big["append"]["records_per_s"],
            "append_ratio": round(append_ratio, 3),
            "empty_read_10k_ms": {"warm": round(small_warm, 1), "cold": round(small_cold, 1)},
            "big_read_10k_ms": big["read_10k"],
            "read_time_ratio": read_ratio,
            "big_file_bytes": big["file_bytes"],
            "big_bytes_per_record": big["bytes_per_record"],
            "big_open_s": big["open_s"],
            "peak_rss_mib": peak_rss_mib(),
            "journals": {"empty_1": small_1, "big": big, "empty_2": small_2},
            "targets": {"append_ratio_min": TARGET_APPEND_RATIO, "read_time_ratio": "close to 1"},
            "pass": {**passed, "all": all(passed.values())},
        }
    )


if __name__ == "__main__":
    main()
