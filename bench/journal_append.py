"""Benchmark: durable appends through the Journal's public API against a bare sqlite3 loop.

Phases, each a fixed duration, each on a fresh data dir under one temporary root:
  baseline      bare sqlite3 in the main thread: build `commit_records` rows (the same body
                JSON encoding and ts formatting the journal does), one executemany, one
                BEGIN IMMEDIATE..COMMIT per batch; the pragmas of sync.journal (WAL,
                synchronous=FULL, ...) and the CREATE statements of a Journal-made journal.db.
                Run before and after the journal phases; the mean of the two is the reference.
  append        many producer tasks, each awaiting `append()` of one record at a time.
  append_many   fewer producer tasks, each awaiting `append_many()` of a small chunk.
  latency       one `append()` per record at a fixed offered rate (open loop, far below
                saturation); latency is from the append call to its durable return.
  sqlite_only   context, not a target: the baseline with every row built before the clock
                starts, i.e. what SQLite itself costs per record on this disk.

Prints one JSON object on stdout; progress on stderr. `python -m bench.journal_append [--quick]`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    BODY_BYTES,
    KIND_OF,
    Phase,
    base_parser,
    body,
    dir_bytes,
    drive,
    emit,
    journal_bytes_per_record,
    journal_schema,
    machine,
    make_data_root,
    new_record,
    peak_rss_mib,
    percentile,
    priority_of,
    progress,
    source_fingerprint,
)
from config import JournalSection
from sync.journal import Journal
from sync.reader import JOURNAL_FILE
from sync.records import RECORD_OVERHEAD_BYTES, format_ts

TARGET_RATIO = 0.6
TARGET_P99_MS = 50.0
_INSERT = (
    "INSERT INTO records (seq, appliance_id, boot_id, ts, mono_ns, source, kind, priority, model, "
    "body, payloads, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
Row = tuple[int, str, str, str, int, str, str, int, None, str, None, int]


# ------------------------------------------------------------------------------- baseline


def open_baseline(data_dir: Path, schema: list[str]) -> sqlite3.Connection:
    """The pragmas of sync.journal_open.writer_connection, then the Journal's own schema."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / JOURNAL_FILE, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA journal_size_limit = 67108864")
    conn.execute("PRAGMA cache_size = -16000")
    for statement in schema:
        conn.execute(statement)
    return conn


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def build_row(seq: int, appliance_id: str, boot_id: str) -> Row:
    """One records row with the values the journal would store for new_record(seq)."""
    priority = priority_of(seq)
    encoded = _dumps(body(seq))
    return (
        seq,
        appliance_id,
        boot_id,
        format_ts(datetime.now(UTC)),
        time.monotonic_ns(),
        "bench",
        KIND_OF[priority],
        int(priority),
        None,
        encoded,
        None,
        len(encoded.encode()) + RECORD_OVERHEAD_BYTES,
    )


def run_baseline(
    data_dir: Path, schema: list[str], batch: int, duration: float, *, prebuilt: bool = False
) -> Phase:
    """Bare loop: `batch` rows, one executemany, commit; repeat for `duration` seconds. With
    `prebuilt`, the row values are made before the clock starts and only seq is renumbered."""
    conn = open_baseline(data_dir, schema)
    appliance_id, boot_id = "bench", uuid.uuid4().hex
    templates = (
        [build_row(i + 1, appliance_id, boot_id)[1:] for i in range(batch)] if prebuilt else []
    )
    seq = 0
    commits = 0
    cpu0, start = time.process_time(), time.perf_counter()
    end = start + duration
    while time.perf_counter() < end:
        if prebuilt:
            rows: list[Any] = [(seq + i + 1, *t) for i, t in enumerate(templates)]
            seq += batch
        else:
            rows = [build_row(seq + i + 1, appliance_id, boot_id) for i in range(batch)]
            seq += batch
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
        commits += 1
    cpu, seconds = time.process_time() - cpu0, time.perf_counter() - start
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    name = "sqlite_only" if prebuilt else "baseline"
    return Phase(name, seq, seconds, commits=commits, largest_batch=batch, cpu_seconds=cpu)


# -------------------------------------------------------------------------------- journal


async def saturate(
    data_dir: Path,
    settings: JournalSection,
    *,
    tasks: int,
    chunk: int,
    duration: float,
    warmup: float,
) -> tuple[Phase, int]:
    """A fresh journal driven at saturation; returns the phase and bytes on disk per record."""
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    try:
        phase = await drive(journal, tasks=tasks, chunk=chunk, duration=duration, warmup=warmup)
        _, per_record = await journal_bytes_per_record(journal)
    finally:
        await journal.close()
    return phase, per_record


class FsyncProbe:
    """A thread that writes and fsyncs a small file beside the journal every 10 ms, so that
    a latency spike can be told apart: a slow disk shows here too, a starved loop does not."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "fsync-probe"
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fsync-probe", daemon=True)

    def __enter__(self) -> FsyncProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while not self._stop.wait(0.01):
                os.pwrite(fd, b"x" * 512, 0)
                started = time.perf_counter()
                os.fsync(fd)
                self.samples.append(time.perf_counter() - started)
        finally:
            os.close(fd)


async def paced(
    data_dir: Path, settings: JournalSection, *, rate: float, duration: float
) -> dict[str, Any]:
    """Open loop at a fixed offered rate: a new `append()` task is started on schedule whether
    or not earlier ones returned, so a slow commit shows up as latency, not as a lower rate.
    Beside it, the event loop's own lag (how late a 5 ms sleep wakes) and an fsync probe say
    whether a spike came from a starved loop, from the disk, or from the journal."""
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    latencies: list[float] = []
    lags: list[float] = []
    stop = asyncio.Event()

    async def one(n: int) -> None:
        record = new_record(n)
        started = time.perf_counter()
        await journal.append(record)
        latencies.append(time.perf_counter() - started)

    async def lag_monitor() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - started - 0.005)

    try:
        commits0 = journal.stats.commits
        issued = 0
        with FsyncProbe(data_dir) as probe:
            async with asyncio.TaskGroup() as group:
                group.create_task(lag_monitor())
                start = time.perf_counter()
                while True:
                    elapsed = time.perf_counter() - start
                    if elapsed >= duration:
                        break
                    due = int(elapsed * rate)
                    while issued < due:
                        group.create_task(one(issued))
                        issued += 1
                    await asyncio.sleep(0.001)
                stop.set()
        wall = time.perf_counter() - start
        commits = journal.stats.commits - commits0
    finally:
        await journal.close()
    ms = [x * 1000 for x in latencies]
    lag_ms = [x * 1000 for x in lags]
    fsync_ms = [x * 1000 for x in probe.samples]
    return {
        "offered_records_per_s": rate,
        "achieved_records_per_s": round(len(ms) / wall),
        "records": len(ms),
        "commits": commits,
        "mean_batch": round(len(ms) / max(commits, 1), 1),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3) if ms else None,
        "loop_lag_ms": {
            "p99": round(percentile(lag_ms, 99), 3),
            "max": round(max(lag_ms), 3) if lag_ms else None,
        },
        "fsync_probe_ms": {
            "p50": round(percentile(fsync_ms, 50), 3),
            "p99": round(percentile(fsync_ms, 99), 3),
            "max": round(max(fsync_ms), 3) if fsync_ms else None,
        },
    }


async def journal_phases(
    root: Path,
    settings: JournalSection,
    *,
    duration: float,
    warmup: float,
    producers: int,
    chunk_tasks: int,
    chunk_size: int,
    rate: float,
) -> dict[str, Any]:
    progress(f"journal: {producers} tasks x append() for {duration}s")
    single, single_bpr = await saturate(
        root / "append", settings, tasks=producers, chunk=1, duration=duration, warmup=warmup
    )
    progress(f"  {single.rate:,.0f} records/s")
    progress(f"journal: {chunk_tasks} tasks x append_many({chunk_size}) for {duration}s")
    chunked, chunked_bpr = await saturate(
        root / "append_many",
        settings,
        tasks=chunk_tasks,
        chunk=chunk_size,
        duration=duration,
        warmup=warmup,
    )
    progress(f"  {chunked.rate:,.0f} records/s")
    progress(f"journal: latency at {rate:,.0f} records/s offered for {duration}s")
    latency = await paced(root / "latency", settings, rate=rate, duration=duration)
    progress(f"  p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
    return {
        "single": single,
        "chunked": chunked,
        "latency": latency,
        "single_bpr": single_bpr,
        "chunked_bpr": chunked_bpr,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 5, quick 1.5)")
    parser.add_argument("--producers", type=int, default=1000, help="tasks calling append()")
    parser.add_argument("--chunk-tasks", type=int, default=64, help="tasks calling append_many()")
    parser.add_argument("--chunk-size", type=int, default=32, help="records per append_many()")
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="offered records/s of the latency phase"
    )
    args = parser.parse_args()
    duration: float = args.duration or (1.5 if args.quick else 5.0)
    warmup = min(0.5, duration / 5)
    settings = JournalSection()
    batch = settings.commit_records
    root = make_data_root(args.tmp_dir, "bench-journal-append-")
    try:
        box = machine(root)
        schema = journal_schema(root)
        progress(f"data dir {root} on {box['data_dir_filesystem']['type']}")
        progress(f"baseline: bare sqlite3, {batch} rows per commit, {duration}s")
        before = run_baseline(root / "baseline-1", schema, batch, duration)
        progress(f"  {before.rate:,.0f} records/s")
        results = asyncio.run(
            journal_phases(
                root,
                settings,
                duration=duration,
                warmup=warmup,
                producers=args.producers,
                chunk_tasks=args.chunk_tasks,
                chunk_size=args.chunk_size,
                rate=args.rate,
            )
        )
        journal_rss = peak_rss_mib()
        progress("baseline again (drift check)")
        after = run_baseline(root / "baseline-2", schema, batch, duration)
        progress(f"  {after.rate:,.0f} records/s")
        baseline_bpr = round(
            dir_bytes(root / "baseline-2", [JOURNAL_FILE, f"{JOURNAL_FILE}-wal"])
            / max(after.records, 1)
        )
        progress("sqlite only: prebuilt rows (context)")
        sqlite_only = run_baseline(root / "sqlite-only", schema, batch, duration, prebuilt=True)
        progress(f"  {sqlite_only.rate:,.0f} records/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    baseline = (before.rate + after.rate) / 2
    single: Phase = results["single"]
    chunked: Phase = results["chunked"]
    latency: dict[str, Any] = results["latency"]
    single_ratio = single.rate / baseline
    chunked_ratio = chunked.rate / baseline
    passed = {
        "append_ratio": single_ratio >= TARGET_RATIO,
        "append_many_ratio": chunked_ratio >= TARGET_RATIO,
        "p99_latency": latency["p99_ms"] <= TARGET_P99_MS,
    }
    emit(
        {
            "benchmark": "journal_append",
            "quick": args.quick,
            "machine": box,
            "source": source_fingerprint(),
            "settings": {
                "body_bytes": BODY_BYTES,
                "phase_seconds": duration,
                "warmup_seconds": warmup,
                "commit_records": batch,
                "commit_delay_s": settings.commit_delay,
                "max_pending": settings.max_pending,
                "journal_mode": "WAL",
                "synchronous": "FULL",
                "append_tasks": args.producers,
                "append_many_tasks": args.chunk_tasks,
                "append_many_chunk": args.chunk_size,
            },
            "baseline_records_per_s": round(baseline),
            "journal_records_per_s": {
                "append": round(single.rate),
                "append_many": round(chunked.rate),
            },
            "ratio_to_baseline": {
                "append": round(single_ratio, 3),
                "append_many": round(chunked_ratio, 3),
            },
            "latency": latency,
            "bytes_per_record": {
                "journal_append": results["single_bpr"],
                "journal_append_many": results["chunked_bpr"],
                "baseline": baseline_bpr,
            },
            "peak_rss_mib": journal_rss,
            "peak_rss_mib_whole_run": peak_rss_mib(),
            "phases": {
                "baseline_before": before.to_dict(),
                "baseline_after": after.to_dict(),
                "append": single.to_dict(),
                "append_many": chunked.to_dict(),
                "sqlite_only": sqlite_only.to_dict(),
            },
            "targets": {
                "ratio_to_baseline_min": TARGET_RATIO,
                "p99_latency_ms_max": TARGET_P99_MS,
            },
            "pass": {**passed, "all": all(passed.values())},
        }
    )


if __name__ == "__main__":
    main()
