"""Shared helpers of the benchmarks: the machine description, peak RSS, percentiles, the
record body every benchmark writes, the journal's schema as the Journal itself creates it,
and the one-JSON-object-on-stdout convention (progress goes to stderr)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import JournalSection
from sync.journal import Journal
from sync.reader import JOURNAL_FILE
from sync.records import NewRecord, Priority

BODY_BYTES = 200
MIB = 1024 * 1024


def progress(message: str) -> None:
    """Progress for the person watching; stdout is reserved for the one JSON result."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2, sort_keys=False))


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short phases, for CI and smoke runs")
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=None,
        help="parent of the temporary data dir (default: the system temp dir); the file "
        "system it lives on is what is measured",
    )
    return parser


def make_data_root(parent: Path | None, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


# ----------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _hypervisor() -> bool:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return "hypervisor" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def filesystem_of(path: Path) -> dict[str, str]:
    """The mount holding `path`: the longest mount point that prefixes it (from /proc/mounts)."""
    target = str(path.resolve())
    best: dict[str, str] = {"mount_point": "unknown", "type": "unknown", "device": "unknown"}
    best_len = -1
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        device, mount_point, fstype, options = parts[0], parts[1], parts[2], parts[3]
        mount_point = mount_point.replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > best_len:
            best_len = len(mount_point)
            best = {
                "mount_point": mount_point,
                "type": fstype,
                "device": device,
                "options": options,
            }
    return best


def machine(data_dir: Path) -> dict[str, Any]:
    """What the numbers were measured on; results mean little without it."""
    ram = _ram_bytes()
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "virtualized": _hypervisor(),
        "ram_gib": round(ram / 1024**3, 1) if ram else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "data_dir_filesystem": filesystem_of(data_dir),
        # Other work on the box skews every number here; a load near the CPU count means noise.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def source_fingerprint(*extra: str) -> dict[str, str]:
    """sha256 (12 hex) of the journal's source files and of `extra` (paths from the repository
    root): which code the numbers belong to."""
    root = Path(__file__).resolve().parent.parent
    names = [
        f"sync/{name}"
        for name in (
            "journal.py",
            "journal_writer.py",
            "journal_open.py",
            "reader.py",
            "records.py",
            "migrations.py",
        )
    ]
    out: dict[str, str] = {}
    for name in [*names, *extra]:
        try:
            out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()[:12]
        except OSError:
            out[name] = "missing"
    return out


# ------------------------------------------------------------------------------- measures


def peak_rss_mib() -> float:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def dir_bytes(path: Path, names: Sequence[str]) -> int:
    total = 0
    for name in names:
        try:
            total += (path / name).stat().st_size
        except FileNotFoundError:
            pass
    return total


# ------------------------------------------------------------------------- what is written


def _body_core(n: int) -> dict[str, Any]:
    # Fixed-width fields, so one pad length (computed once) gives every body the same size.
    return {
        "label": "person",
        "score_pm": 500 + n % 500,
        "bbox": [100 + n % 540, 100 + n % 380, 64, 128],
        "track": f"{n % 10**12:012d}",
        "pad": "",
    }


PAD = "x" * (BODY_BYTES - len(json.dumps(_body_core(0), separators=(",", ":"))))


def body(n: int) -> dict[str, Any]:
    """A detection-like JSON body of exactly BODY_BYTES bytes once compactly encoded."""
    core = _body_core(n)
    core["pad"] = PAD
    return core


def priority_of(n: int) -> Priority:
    """A fixed mix: 5% alert, 20% event, 5% sample, 70% telemetry."""
    slot = n % 20
    if slot == 0:
        return Priority.ALERT
    if slot <= 4:
        return Priority.EVENT
    if slot == 5:
        return Priority.SAMPLE
    return Priority.TELEMETRY


KIND_OF = {
    Priority.ALERT: "detection",
    Priority.EVENT: "detection",
    Priority.SAMPLE: "sample",
    Priority.TELEMETRY: "reading",
}


def journal_schema(parent: Path) -> list[str]:
    """The CREATE statements of a journal.db that Journal.open itself created (tables and
    explicit indexes, in creation order), so a bare-sqlite3 baseline uses the exact schema."""
    scratch = Path(tempfile.mkdtemp(prefix="schema-", dir=parent))

    async def create() -> None:
        journal = await Journal.open(scratch, appliance_id="schema", settings=JournalSection())
        await journal.close()

    asyncio.run(create())
    conn = sqlite3.connect(scratch / JOURNAL_FILE)
    try:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY rowid"
        ).fetchall()
    finally:
        conn.close()
    for child in scratch.iterdir():
        child.unlink()
    scratch.rmdir()
    return [str(row[0]) for row in rows]


def new_record(n: int) -> NewRecord:
    priority = priority_of(n)
    return NewRecord(source="bench", kind=KIND_OF[priority], priority=priority, body=body(n))


# ------------------------------------------------------------------------------ producers


@dataclass
class Phase:
    """Records made durable in a measured window, and the group commits that carried them."""

    name: str
    records: int
    seconds: float
    commits: int = 0
    largest_batch: int = 0
    cpu_seconds: float = 0.0  # process CPU (all threads) spent in the window

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
        if self.cpu_seconds and self.records:
            # Above 1e6 / records_per_s means more than one core busy on average.
            out["cpu_us_per_record"] = round(self.cpu_seconds / self.records * 1e6, 1)
        return out


async def drive(
    journal: Journal, *, tasks: int, chunk: int, duration: float, warmup: float, first_n: int = 0
) -> Phase:
    """`tasks` producer tasks append as fast as the journal lets them, `chunk` records per
    call (`append()` when chunk is 1, else `append_many()`). Only records whose call returned
    (durable) inside the measured window, after `warmup`, count."""
    done = 0
    stop = False

    async def producer(index: int) -> None:
        nonlocal done
        n = first_n + index * 1_000_000_000
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
        first, commits0 = done, journal.stats.commits
        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.sleep(duration)
        last, commits1 = done, journal.stats.commits
        cpu, seconds = time.process_time() - cpu0, time.perf_counter() - start
        stop = True
    return Phase(
        "append_many" if chunk > 1 else "append",
        last - first,
        seconds,
        commits=commits1 - commits0,
        largest_batch=journal.stats.largest_batch,
        cpu_seconds=cpu,
    )


async def count_records(journal: Journal) -> int:
    return await journal.read(
        lambda reader: int(reader.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    )


async def journal_bytes_per_record(journal: Journal) -> tuple[int, int]:
    """(journal.db + WAL bytes after a TRUNCATE checkpoint, bytes per record)."""
    await journal.checkpoint()
    total = await count_records(journal)
    size = dir_bytes(journal.data_dir, [JOURNAL_FILE, f"{JOURNAL_FILE}-wal"])
    return size, round(size / max(total, 1))
