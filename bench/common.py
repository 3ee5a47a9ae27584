"""Shared helpers of the benchmarks: the machine description, peak RSS, percentiles, the
record body every benchmark writes, the journal's schema as the Journal itself creates it,
and the one-JSON-object-on-stdout convention (progress goes to stderr)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config import JournalSection
from sync.journal import Journal
from sync.reader import JOURNAL_FILE
from sync.records import Priority

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
    }


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


_PAD = "x" * (BODY_BYTES - len(json.dumps(_body_core(0), separators=(",", ":"))))


def body(n: int) -> dict[str, Any]:
    """A detection-like JSON body of exactly BODY_BYTES bytes once compactly encoded."""
    core = _body_core(n)
    core["pad"] = _PAD
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
