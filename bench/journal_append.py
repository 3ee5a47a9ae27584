"""Benchmark: durable appends through the Journal's public API against a bare sqlite3 loop.

Phases, each a fixed duration, each on a fresh data dir:
  baseline      bare sqlite3: executemany of `commit_records` rows, one BEGIN IMMEDIATE..COMMIT per
                batch, same pragmas (WAL, synchronous=FULL, ...) and schema as a Journal-made file.
                Run before and after the journal phases; their mean is the reference.
  single        many producer tasks, each awaiting `append()` of one record at a time.
  chunked       fewer producer tasks, each awaiting `append_many()` of a small chunk.
  latency       one `append()` per record at a fixed offered rate (open loop, well below
                saturation); latency is from the append call to its durable return.

Prints one JSON object on stdout; progress on stderr. `python -m bench.journal_append [--quick]`."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    BODY_BYTES,
    KIND_OF,
    base_parser,
    body,
    dir_bytes,
    emit,
    journal_schema,
    machine,
    make_data_root,
    peak_rss_mib,
    percentile,
    priority_of,
    progress,
)
from config import JournalSection
from sync.journal import Journal
from sync.reader import JOURNAL_FILE
from sync.records import RECORD_OVERHEAD_BYTES, NewRecord, format_ts

TARGET_RATIO = 0.6
TARGET_P99_MS = 50.0
_INSERT = (
    "INSERT INTO records (seq, appliance_id, boot_id, ts, mono_ns, source, kind, priority, model, "
    "body, payloads, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass
class Phase:
    name: str
    records: int
    seconds: float
    commits: int = 0
    largest_batch: int = 0

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.rate),
        }
        if self.commits:
            out["commits"] = self.commits
            out["mean_batch"] = round(self.records / self.commits, 1)
            out["largest_batch"] = self.largest_batch
        return out


def new_record(n: int) -> NewRecord:
    priority = priority_of(n)
    return NewRecord(source="bench", kind=KIND_OF[priority], priority=priority, body=body(n))


# ------------------------------------------------------------------------------- baseline


def open_baseline(data_dir: Path, schema: list[str]) -> sqlite3.Connection:
    """The pragmas of sync.journal._writer_connection, then the Journal's own schema."""
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


def run_baseline(data_dir: Path, schema: list[str], batch: int, duration: float) -> Phase:
    """Bare loop: build `batch` rows (the same JSON encoding and timestamps the journal does),
    insert them with one executemany, commit; repeat for `duration` seconds."""
    conn = open_baseline(data_dir, schema)
    appliance_id, boot_id = "bench", uuid.uuid4().hex
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    seq = 0
    commits = 0
    start = time.perf_counter()
    end = start + duration
    while time.perf_counter() < end:
        rows = []
        for _ in range(batch):
            seq += 1
            priority = priority_of(seq)
            encoded = dumps(body(seq))
            rows.append(
                (
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
            )
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
        commits += 1
    seconds = time.perf_counter() - start
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return Phase("baseline", seq, seconds, commits=commits, largest_batch=batch)


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
    """`tasks` producers append as fast as the journal lets them, `chunk` records per call
    (`append()` when chunk is 1). Only records made durable inside the measured window count.
    Returns the phase and the journal's bytes on disk per record after a checkpoint."""
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    done = 0
    stop = False

    async def producer(index: int) -> None:
        nonlocal done
        n = index * 1_000_000_000
        while not stop:
            if chunk == 1:
                await journal.append(new_record(n))
            else:
                await journal.append_many([new_record(n + i) for i in range(chunk)])
            n += chunk
            done += chunk

    async with asyncio.TaskGroup() as group:
        for index in range(tasks):
            group.create_task(producer(index), name=f"producer-{index}")
        await asyncio.sleep(warmup)
        first, commits0, start = done, journal.stats.commits, time.perf_counter()
        await asyncio.sleep(duration)
        last, commits1, seconds = done, journal.stats.commits, time.perf_counter() - start
        stop = True
    phase = Phase(
        "chunked" if chunk > 1 else "single",
        last - first,
        seconds,
        commits=commits1 - commits0,
        largest_batch=journal.stats.largest_batch,
    )
    per_record = await bytes_per_record(journal)
    await journal.close()
    return phase, per_record


async def bytes_per_record(journal: Journal) -> int:
    await journal.checkpoint()
    total = await journal.read(
        lambda reader: int(reader.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    )
    size = dir_bytes(journal.data_dir, [JOURNAL_FILE, f"{JOURNAL_FILE}-wal"])
    return round(size / max(total, 1))


async def paced(
    data_dir: Path, settings: JournalSection, *, rate: float, duration: float
) -> dict[str, Any]:
    """Open loop at a fixed offered rate: a new `append()` task is started on schedule whether
    or not earlier ones returned, so a slow commit shows up as latency, not as a lower rate."""
    journal = await Journal.open(data_dir, appliance_id="bench", settings=settings)
    latencies: list[float] = []

    async def one(n: int) -> None:
        record = new_record(n)
        started = time.perf_counter()
        await journal.append(record)
        latencies.append(time.perf_counter() - started)

    commits0 = journal.stats.commits
    issued = 0
    async with asyncio.TaskGroup() as group:
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
    wall = time.perf_counter() - start
    commits = journal.stats.commits - commits0
    await journal.close()
    ms = [x * 1000 for x in latencies]
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
        root / "single", settings, tasks=producers, chunk=1, duration=duration, warmup=warmup
    )
    progress(f"  {single.rate:,.0f} records/s")
    progress(f"journal: {chunk_tasks} tasks x append_many({chunk_size}) for {duration}s")
    chunked, chunked_bpr = await saturate(
        root / "chunked",
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
        "bytes_per_record": {"single": single_bpr, "chunked": chunked_bpr},
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
    duration = args.duration or (1.5 if args.quick else 5.0)
    warmup = min(0.5, duration / 5)
    settings = JournalSection()
    root = make_data_root(args.tmp_dir, "bench-journal-append-")
    try:
        box = machine(root)
        schema = journal_schema(root)
        progress(f"data dir {root} on {box['data_dir_filesystem']['type']}")
        progress(f"baseline: bare sqlite3, {settings.commit_records} rows per commit")
        before = run_baseline(root / "baseline-1", schema, settings.commit_records, duration)
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
        progress("baseline again (drift check)")
        after = run_baseline(root / "baseline-2", schema, settings.commit_records, duration)
        progress(f"  {after.rate:,.0f} records/s")
        baseline_bpr = round(
            dir_bytes(root / "baseline-2", [JOURNAL_FILE, f"{JOURNAL_FILE}-wal"])
            / max(after.records, 1)
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    baseline = (before.rate + after.rate) / 2
    single: Phase = results["single"]
    chunked: Phase = results["chunked"]
    latency: dict[str, Any] = results["latency"]
    single_ratio = single.rate / baseline
    chunked_ratio = chunked.rate / baseline
    passed = {
        "single_ratio": single_ratio >= TARGET_RATIO,
        "chunked_ratio": chunked_ratio >= TARGET_RATIO,
        "p99_latency": latency["p99_ms"] <= TARGET_P99_MS,
    }
    emit(
        {
            "benchmark": "journal_append",
            "quick": args.quick,
            "machine": box,
            "settings": {
                "body_bytes": BODY_BYTES,
                "phase_seconds": duration,
                "warmup_seconds": warmup,
                "commit_records": settings.commit_records,
                "commit_delay_s": settings.commit_delay,
                "max_pending": settings.max_pending,
                "synchronous": "FULL",
                "journal_mode": "WAL",
                "producers_single": args.producers,
                "producers_chunked": args.chunk_tasks,
                "chunk_size": args.chunk_size,
            },
            "baseline_records_per_s": round(baseline),
            "baseline_runs": {"before": before.to_dict(), "after": after.to_dict()},
            "journal_records_per_s": {
                "single_append": round(single.rate),
                "append_many": round(chunked.rate),
            },
            "ratio_to_baseline": {
                "single_append": round(single_ratio, 3),
                "append_many": round(chunked_ratio, 3),
            },
            "phases": {"single_append": single.to_dict(), "append_many": chunked.to_dict()},
            "latency": latency,
            "bytes_per_record": {
                "journal_single_append": results["bytes_per_record"]["single"],
                "journal_append_many": results["bytes_per_record"]["chunked"],
                "baseline": baseline_bpr,
            },
            "peak_rss_mib": peak_rss_mib(),
            "targets": {
                "ratio_to_baseline_min": TARGET_RATIO,
                "p99_latency_ms_max": TARGET_P99_MS,
            },
            "pass": {**passed, "all": all(passed.values())},
        }
    )


if __name__ == "__main__":
    main()

