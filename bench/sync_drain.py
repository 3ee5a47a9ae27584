"""Benchmark: the sync engine's drain over HTTP to the reference receiver against a bare aiohttp
client, its bandwidth cap, and the bytes it sends again after cuts in the middle of a payload.

Every phase runs `appliance receiver` as its own process (bench.receiver_proc) on a fresh data
dir, on 127.0.0.1, with the SyncSection() defaults (batches of 1000 records / 1 MiB, payload
chunks of 4 MiB) unless an option says otherwise.

  backlog    Journal.open creates the journal; the plain records are filled in with plain
             sqlite3 exactly as bench.journal_growth does (same rows, counts, seq_hw); then the
             Journal itself, opened with its PayloadStore, stores the payload files (random,
             incompressible, 2-6 MiB each) and appends the records that refer to them
             (append_many), so payload rows and refs are the Journal's own.
  pre-encode the batches the engine will send, read the way the engine reads them
             (records_after per priority with the same limits) and encoded with encode_batch,
             written to a temp file before any clock starts; with the payload files in the
             engine's order this is the baseline's plan.
  baseline   one aiohttp session, one request at a time like the engine: every pre-encoded
             batch PUT (gzip), then that priority's payloads PATCHed in chunk_size pieces.
             Run before and after the engine; the mean of the two is the reference.
  engine     SyncEngine.drain() with an HttpTarget, from the same journal, to a new receiver.
             ratio = engine / baseline throughput (the same bytes, so records/s and MB/s agree).
  bandwidth  1000 records and about cap x cap-seconds of 256 KiB payloads, drained with
             `bandwidth` set,
             through a tests.faultproxy.FaultProxy that counts the bytes that really crossed
             (HTTP headers included): the rate over the whole drain, and the steady rate (least-
             squares slope of the byte count, sampled every 50 ms, from the moment one second's
             worth of the cap has gone: the limiter starts with that much as a burst).
  resend     one large payload uploaded through a FaultProxy that cuts the connection at random
             points (a new cut rule after each cut), the drain retried until done; a BodyTap
             between the proxy and the receiver parses the HTTP requests that got through and
             counts PATCH body bytes, so bytes re-sent = PATCH body bytes that crossed - size.
             The receiver's copy must hash to the payload's sha256.

After every drain the receiver's summary (records, max_seq, duplicates, payloads, payload bytes)
is checked against the backlog; `ok` is false when anything was lost or duplicated.

Prints one JSON object on stdout; progress on stderr. `python -m bench.sync_drain [--quick]`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    KIND_OF,
    MIB,
    base_parser,
    body,
    emit,
    machine,
    make_data_root,
    peak_rss_mib,
    progress,
    source_fingerprint,
)
from bench.journal_growth import fill
from bench.receiver_proc import ReceiverProcess
from config import JournalSection
from config.shipping import HttpDestination, SyncSection
from sync.destination import DestinationError, encode_batch
from sync.engine import Progress, SyncEngine
from sync.http_client import HttpTarget
from sync.journal import Journal
from sync.payloads import PayloadStore
from sync.reader import JournalReader
from sync.records import NewRecord, Priority
from tests.faultproxy import FaultProxy

APPLIANCE_ID = "bench"
TOKEN = "bench-token"
DESTINATION = "bench-receiver"
MB = 1_000_000  # rates and volumes are decimal megabytes; payload file sizes are MiB
TARGET_RATIO = 0.8
TARGET_CAP_ERROR = 0.05
PAYLOAD_MIB = (2, 6)  # payload file sizes of the drain backlog, uniform in MiB
CAPPED_RECORDS = 1000
CAPPED_PAYLOAD_BYTES = 256 * 1024
CAP_SAMPLE_S = 0.05
CAP_MIN_SAMPLES = 10
RESEND_MAX_DRAINS = 20
# Priorities of the records that carry a payload, in turn: detections and samples come with
# snapshots, telemetry does not.
PAYLOAD_PRIORITIES = (Priority.ALERT, Priority.EVENT, Priority.SAMPLE)


# ----------------------------------------------------------------------------- measuring


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of another process (the receiver), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0  # gone already; the phase's numbers say 0 rather than fail
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def code_fingerprint() -> dict[str, str]:
    """bench.common's journal fingerprint plus the files this benchmark exercises."""
    return source_fingerprint(
        "sync/engine.py",
        "sync/http_client.py",
        "sync/destination.py",
        "sync/payloads.py",
        "receiver/app.py",
        "receiver/batches.py",
        "receiver/store.py",
        "receiver/uploads.py",
    )


def slope(samples: Sequence[tuple[float, int]]) -> float | None:
    """Least-squares slope of (t, bytes): a rate that one large item at either end cannot skew
    the way first-to-last differences are."""
    n = len(samples)
    if n < 2:
        return None
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    num = sum((t - mean_t) * (b - mean_b) for t, b in samples)
    den = sum((t - mean_t) ** 2 for t, _ in samples)
    return num / den if den else None


@dataclass
class Clock:
    """Wall and CPU time of one drain, split into record batches and payload uploads."""

    receiver_pid: int
    wall: float = 0.0
    cpu: float = 0.0
    receiver_cpu: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: {"records": 0.0, "payloads": 0.0})
    _start: float = 0.0
    _cpu0: float = 0.0
    _rcpu0: float = 0.0
    _mark: float = 0.0

    def start(self) -> None:
        self._cpu0, self._rcpu0 = time.process_time(), proc_cpu_seconds(self.receiver_pid)
        self._start = self._mark = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] += now - self._mark
        self._mark = now

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._start
        self.cpu = time.process_time() - self._cpu0
        self.receiver_cpu = proc_cpu_seconds(self.receiver_pid) - self._rcpu0


# -------------------------------------------------------------------------------- backlog


@dataclass
class Backlog:
    data_dir: Path
    records: int
    payloads: dict[str, int]  # sha256 -> size
    seconds: float
    fill: dict[str, Any] | None

    @property
    def payload_bytes(self) -> int:
        return sum(self.payloads.values())


def payload_sizes(total: int, rng: random.Random) -> list[int]:
    """Sizes uniform in PAYLOAD_MIB until they add up to at least `total` bytes."""
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(rng.randint(PAYLOAD_MIB[0] * MIB, PAYLOAD_MIB[1] * MIB))
    return sizes


async def make_backlog(data_dir: Path, records: int, sizes: Sequence[int]) -> Backlog:
    """A journal of `records` records, `len(sizes)` of them (the last ones) with a payload."""
    start = time.perf_counter()
    plain = records - len(sizes)
    if plain < 0:
        raise ValueError("more payloads than records")
    journal = await Journal.open(data_dir, appliance_id=APPLIANCE_ID, settings=JournalSection())
    await journal.close()
    filled = await asyncio.to_thread(fill, data_dir, plain) if plain else None
    store = PayloadStore(data_dir / "payloads")
    # The payload files must be stored while the Journal is open: opened with a store, it
    # removes files that no row refers to.
    payloads: dict[str, int] = {}
    journal = await Journal.open(data_dir, appliance_id=APPLIANCE_ID, payloads=store)
    try:
        batch: list[NewRecord] = []
        for i, size in enumerate(sizes):
            ref = await store.put(os.urandom(size))
            payloads[ref.sha256] = size
            priority = PAYLOAD_PRIORITIES[i % len(PAYLOAD_PRIORITIES)]
            n = plain + i + 1
            batch.append(
                NewRecord(
                    source="bench",
                    kind=KIND_OF[priority],
                    priority=priority,
                    body=body(n),
                    payloads=(ref,),
                )
            )
            if len(batch) == 64:
                await journal.append_many(batch)
                batch = []
        if batch:
            await journal.append_many(batch)
        total = await journal.read(
            lambda r: int(r.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        )
    finally:
        await journal.close()
    if total != records:
        raise RuntimeError(f"backlog holds {total} records, not {records}")
    return Backlog(data_dir, records, payloads, time.perf_counter() - start, filled)


# ------------------------------------------------------------------------ the baseline plan


@dataclass(frozen=True)
class BatchStep:
    batch_id: str
    offset: int  # of its gzip body in the bodies file
    length: int
    records: int


@dataclass(frozen=True)
class PayloadStep:
    sha256: str
    size: int
    path: Path


@dataclass
class Plan:
    steps: list[BatchStep | PayloadStep]
    bodies: Path
    seconds: float
    journal_id: str | None = None  # sent as Journal-Id, as the engine does

    @property
    def batches(self) -> int:
        return sum(1 for s in self.steps if isinstance(s, BatchStep))

    @property
    def batch_bytes(self) -> int:
        return sum(s.length for s in self.steps if isinstance(s, BatchStep))

    @property
    def raw_payload_bytes(self) -> int:
        return sum(s.size for s in self.steps if isinstance(s, PayloadStep))


def encode_plan(backlog: Backlog, bodies: Path, settings: SyncSection) -> Plan:
    """The engine's batches and payload order, encoded before any clock starts: per priority,
    records_after from the previous batch's last seq with the engine's limits, encode_batch,
    then the payloads those batches carry, in record order (the outbox's order)."""
    start = time.perf_counter()
    store = PayloadStore(backlog.data_dir / "payloads")
    steps: list[BatchStep | PayloadStep] = []
    with JournalReader.open(backlog.data_dir) as reader, bodies.open("wb") as out:
        identity = reader.identity()
        journal_id = None if identity is None else identity.journal_id
        for priority in Priority:
            after = 0
            carried: list[str] = []
            while True:
                records = reader.records_after(
                    priority,
                    after,
                    limit=settings.batch_records,
                    max_bytes=settings.batch_bytes,
                )
                if not records:
                    break
                batch = encode_batch(APPLIANCE_ID, priority, records, journal_id)
                steps.append(BatchStep(batch.batch_id, out.tell(), len(batch.body), batch.records))
                out.write(batch.body)
                carried.extend(batch.payloads)
                after = batch.last_seq
            for sha256 in dict.fromkeys(carried):
                steps.append(PayloadStep(sha256, backlog.payloads[sha256], store.path_for(sha256)))
    return Plan(steps, bodies, time.perf_counter() - start, journal_id)


# ----------------------------------------------------------------------------- the drains


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def receiver_summary(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/appliances/{APPLIANCE_ID}/summary", headers=_auth()) as response,
    ):
        response.raise_for_status()
        summary: dict[str, Any] = await response.json()
        return summary


def check_summary(summary: dict[str, Any], backlog: Backlog) -> dict[str, bool]:
    return {
        "records": summary.get("records") == backlog.records,
        "max_seq": summary.get("max_seq") == backlog.records,
        "no_duplicates": summary.get("duplicates_ignored") == 0,
        "payloads": summary.get("payloads") == len(backlog.payloads),
        "payload_bytes": summary.get("payload_bytes") == backlog.payload_bytes,
    }


async def run_baseline(url: str, plan: Plan, chunk_size: int, clock: Clock) -> None:
    """The bare client: the pre-encoded bodies and the payload files, one request at a time."""
    base = f"{url}/v1/appliances/{APPLIANCE_ID}"
    journal = {} if plan.journal_id is None else {"Journal-Id": plan.journal_id}
    batch_headers = {
        **_auth(),
        **journal,
        "Content-Encoding": "gzip",
        "Content-Type": "application/x-ndjson",
    }
    fd = os.open(plan.bodies, os.O_RDONLY)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session:
            clock.start()
            for step in plan.steps:
                if isinstance(step, BatchStep):
                    data = os.pread(fd, step.length, step.offset)
                    async with session.put(
                        f"{base}/batches/{step.batch_id}", data=data, headers=batch_headers
                    ) as response:
                        await response.read()
                        if response.status != 200:
                            raise RuntimeError(f"baseline batch answered {response.status}")
                    clock.lap("records")
                    continue
                with step.path.open("rb") as handle:
                    offset = 0
                    while offset < step.size:
                        chunk = handle.read(chunk_size)
                        headers = {
                            **_auth(),
                            **journal,
                            "Upload-Offset": str(offset),
                            "Upload-Length": str(step.size),
                            "Content-Type": "application/offset+octet-stream",
                        }
                        async with session.patch(
                            f"{base}/payloads/{step.sha256}", data=chunk, headers=headers
                        ) as response:
                            await response.read()
                            if response.status != 204:
                                raise RuntimeError(f"baseline chunk answered {response.status}")
                        offset += len(chunk)
                clock.lap("payloads")
            clock.stop()
    finally:
        os.close(fd)


def http_destination(url: str, token_file: Path, **extra: Any) -> HttpDestination:
    return HttpDestination.model_validate(
        {"name": DESTINATION, "type": "http", "url": url, "token_file": str(token_file), **extra}
    )


async def run_engine(
    backlog: Backlog,
    cfg: HttpDestination,
    settings: SyncSection,
    clock: Clock,
    *,
    on_start: Callable[[], None] | None = None,
    retry: bool = False,
) -> dict[str, Any]:
    """SyncEngine.drain() of the backlog's journal to `cfg`; with `retry`, drain again after a
    retryable failure, as the daemon's loop would (minus its backoff)."""
    store = PayloadStore(backlog.data_dir / "payloads")
    journal = await Journal.open(backlog.data_dir, appliance_id=APPLIANCE_ID, payloads=store)
    last = Progress(DESTINATION, 0, 0, 0)

    def laps(step: Progress) -> None:
        nonlocal last
        clock.lap("records" if step.records != last.records else "payloads")
        last = step

    failures: list[str] = []
    async with journal:
        target = HttpTarget(cfg, APPLIANCE_ID, settings.chunk_size)
        engine = SyncEngine(journal, store, target, cfg, settings)
        async with target:
            await journal.register_destination(DESTINATION)
            if on_start is not None:
                on_start()
            clock.start()
            while True:
                try:
                    complete = await engine.drain(laps)
                    break
                except DestinationError as exc:
                    if not retry or not exc.retryable or len(failures) >= RESEND_MAX_DRAINS:
                        raise
                    failures.append(str(exc))
            clock.stop()
        cursors = await journal.read(lambda r: {p: r.cursor(DESTINATION, p) for p in Priority})
        newest = await journal.read(
            lambda r: {
                p: int(
                    r.conn.execute(
                        "SELECT COALESCE(MAX(seq), 0) FROM records WHERE priority = ?", (int(p),)
                    ).fetchone()[0]
                )
                for p in Priority
            }
        )
        waiting = await journal.read(lambda r: r.payloads_waiting(DESTINATION))
    state = engine.state
    return {
        "complete": complete,
        "cursors_at_newest": cursors == newest,
        "outbox_empty": waiting == (0, 0),
        "batches_sent": state.batches_sent,
        "records_sent": state.records_sent,
        "payloads_sent": state.payloads_sent,
        "bytes_sent": state.bytes_sent,
        "failed_drains": failures,
    }


def rates(clock: Clock, records: int, wire_bytes: int) -> dict[str, Any]:
    return {
        "seconds": round(clock.wall, 3),
        "records_per_s": round(records / clock.wall),
        "mb_per_s": round(wire_bytes / clock.wall / MB, 2),
        "seconds_in_batches": round(clock.parts["records"], 3),
        "seconds_in_payloads": round(clock.parts["payloads"], 3),
        "cpu_s": round(clock.cpu, 2),
        "receiver_cpu_s": round(clock.receiver_cpu, 2),
    }


async def baseline_run(
    root: Path, name: str, backlog: Backlog, plan: Plan, settings: SyncSection
) -> dict[str, Any]:
    wire = plan.batch_bytes + plan.raw_payload_bytes
    load = load_average()
    progress(f"{name}: bare aiohttp, {plan.batches:,} batches + {len(backlog.payloads)} payloads")
    with ReceiverProcess(root / f"rx-{name}", {APPLIANCE_ID: TOKEN}) as rx:
        clock = Clock(rx.pid)
        await run_baseline(rx.url, plan, settings.chunk_size, clock)
        summary = await receiver_summary(rx.url)
    shutil.rmtree(root / f"rx-{name}", ignore_errors=True)
    progress(f"  {backlog.records / clock.wall:,.0f} records/s in {clock.wall:.1f} s")
    checks = check_summary(summary, backlog)
    checks["batches"] = summary.get("batches") == plan.batches
    return {
        **rates(clock, backlog.records, wire),
        "receiver_summary": summary,
        "checks": checks,
        "load_average": {"before": load, "after": load_average()},
    }


async def drain_phase(
    root: Path, backlog: Backlog, plan: Plan, settings: SyncSection, token_file: Path
) -> dict[str, Any]:
    """The baseline before and after the engine (the mean is the reference, the difference
    shows drift from other work on the box), each against a new receiver."""
    wire = plan.batch_bytes + plan.raw_payload_bytes
    before = await baseline_run(root, "baseline-1", backlog, plan, settings)

    load = load_average()
    progress("engine: SyncEngine.drain() with an HttpTarget")
    with ReceiverProcess(root / "rx-engine", {APPLIANCE_ID: TOKEN}) as rx:
        clock = Clock(rx.pid)
        engine = await run_engine(backlog, http_destination(rx.url, token_file), settings, clock)
        engine_summary = await receiver_summary(rx.url)
    shutil.rmtree(root / "rx-engine", ignore_errors=True)
    engine_load = {"before": load, "after": load_average()}
    progress(f"  {backlog.records / clock.wall:,.0f} records/s in {clock.wall:.1f} s")

    after = await baseline_run(root, "baseline-2", backlog, plan, settings)

    engine_checks = check_summary(engine_summary, backlog)
    engine_checks.update(
        batches=engine_summary.get("batches") == plan.batches,
        same_batches_as_baseline=engine["batches_sent"] == plan.batches,
        same_bytes_as_baseline=engine["bytes_sent"] == wire,
        complete=engine["complete"],
        cursors_at_newest=engine["cursors_at_newest"],
        outbox_empty=engine["outbox_empty"],
    )
    base_seconds = (before["seconds"] + after["seconds"]) / 2
    ratio_by_part = {}
    for part, key in (("records", "seconds_in_batches"), ("payloads", "seconds_in_payloads")):
        mine = clock.parts[part]
        if mine > 0:
            ratio_by_part[part] = round((before[key] + after[key]) / 2 / mine, 3)
    return {
        "wire_bytes": wire,
        "batch_body_bytes": plan.batch_bytes,
        "payload_bytes": plan.raw_payload_bytes,
        "batches": plan.batches,
        "baseline_records_per_s": round(backlog.records / base_seconds),
        "baseline_mb_per_s": round(wire / base_seconds / MB, 2),
        "engine_records_per_s": round(backlog.records / clock.wall),
        "engine_mb_per_s": round(wire / clock.wall / MB, 2),
        # The same bytes in both, so this is the ratio of records/s and of MB/s alike.
        "ratio": round(base_seconds / clock.wall, 3),
        "ratio_by_part": ratio_by_part,
        "baseline_before": before,
        "engine": {
            **rates(clock, backlog.records, wire),
            # Appliance CPU (all threads) per record shipped: less noisy than wall time on a
            # shared box, and what has to shrink for the engine to keep up with the receiver.
            "cpu_us_per_record": round(clock.cpu / backlog.records * 1e6, 1),
            **engine,
            "receiver_summary": engine_summary,
            "checks": engine_checks,
            "load_average": engine_load,
        },
        "baseline_after": after,
        "ok": all(before["checks"].values())
        and all(after["checks"].values())
        and all(engine_checks.values()),
    }


# ------------------------------------------------------------------------------ bandwidth


async def bandwidth_phase(
    root: Path, settings: SyncSection, token_file: Path, *, cap: float, seconds: float
) -> dict[str, Any]:
    """Enough records and 256 KiB payloads for about `seconds` at `cap`, drained with the cap
    set, through a FaultProxy (no faults) that counts every byte that crosses."""
    # Mostly payloads: record batches (about 21 kB of gzip per 1000 records) are bound by the
    # CPU that encodes them, far below a cap of a few MB/s, so they would measure the engine
    # rather than the limiter.
    records = CAPPED_RECORDS
    sizes = [CAPPED_PAYLOAD_BYTES] * max(1, int(cap * seconds / CAPPED_PAYLOAD_BYTES))
    backlog = await make_backlog(root / "capped", records, sizes)
    progress(f"bandwidth: cap {cap / MB:g} MB/s, {records:,} records + {len(sizes)} payloads")
    samples: list[tuple[float, int]] = []
    with ReceiverProcess(root / "rx-capped", {APPLIANCE_ID: TOKEN}) as rx:
        host, port = rx.url.removeprefix("http://").rsplit(":", 1)
        async with FaultProxy(host, int(port)) as proxy:
            clock = Clock(rx.pid)
            t0 = 0.0
            stop = asyncio.Event()

            def started() -> None:
                nonlocal t0
                t0 = time.perf_counter()
                samples.append((0.0, proxy.stats.bytes_upstream))

            async def sample() -> None:
                while not stop.is_set():
                    await asyncio.sleep(CAP_SAMPLE_S)
                    if t0:
                        samples.append((time.perf_counter() - t0, proxy.stats.bytes_upstream))

            async with asyncio.TaskGroup() as group:
                sampler = group.create_task(sample(), name="byte-sampler")
                cfg = http_destination(proxy.url_for(), token_file, bandwidth=int(cap))
                engine = await run_engine(backlog, cfg, settings, clock, on_start=started)
                wire = proxy.stats.bytes_upstream - samples[0][1]
                samples.append((clock.wall, proxy.stats.bytes_upstream))
                stop.set()
                await sampler
        summary = await receiver_summary(rx.url)
    shutil.rmtree(root / "rx-capped", ignore_errors=True)
    shutil.rmtree(backlog.data_dir, ignore_errors=True)
    whole = wire / clock.wall
    # The limiter starts with a full bucket (one second of the cap), sent at line speed; the
    # steady part starts once that much has gone.
    burst_end = next((t for t, b in samples if b - samples[0][1] >= cap), clock.wall)
    steady_samples = [(t, b) for t, b in samples if t >= burst_end]
    steady = slope(steady_samples) if len(steady_samples) >= CAP_MIN_SAMPLES else None
    body_rate = engine["bytes_sent"] / clock.wall
    checks = check_summary(summary, backlog)
    checks.update(complete=engine["complete"], outbox_empty=engine["outbox_empty"])
    progress(f"  whole run {whole / MB:.3f} MB/s, steady {(steady or 0) / MB:.3f} MB/s")
    return {
        "cap_bytes_per_s": cap,
        "records": records,
        "payloads": len(sizes),
        "payload_size": CAPPED_PAYLOAD_BYTES,
        "seconds": round(clock.wall, 3),
        "wire_bytes": wire,
        "body_bytes": engine["bytes_sent"],
        "header_overhead": round(wire / engine["bytes_sent"] - 1, 4),
        "whole_run_bytes_per_s": round(whole),
        "whole_run_ratio_to_cap": round(whole / cap, 4),
        # What the limiter lets through over the whole run: the cap plus its one-second burst
        # (HTTP headers, which it does not count, and the last item's unpaid debt come on top).
        "whole_run_ratio_expected": round((clock.wall + 1.0) / clock.wall, 4),
        "steady_bytes_per_s": None if steady is None else round(steady),
        "steady_ratio_to_cap": None if steady is None else round(steady / cap, 4),
        "steady_window_s": [round(burst_end, 3), round(clock.wall, 3)],
        "body_bytes_per_s": round(body_rate),
        "samples": len(samples),
        "receiver_summary": summary,
        "checks": checks,
        "ok": all(checks.values()),
    }


# --------------------------------------------------------------------------------- resend


_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with RST (SO_LINGER 0), passing a cut on as a cut rather than a clean EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    assert isinstance(transport, asyncio.Transport)
    transport.abort()


@dataclass
class TapStats:
    header_bytes: int = 0
    body_bytes: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)  # complete requests by method
    # Requests whose connection ended before their body did: (method, body bytes, Content-Length).
    cut: list[tuple[str, int, int]] = field(default_factory=list)
    total_bytes: int = 0


class _TapUpstream(asyncio.Protocol):
    """The tap's connection to the receiver: answers go back to the client unchanged."""

    def __init__(self, client: _TapClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None and not self.client.transport.is_closing():
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.client.pause()

    def resume_writing(self) -> None:
        self.client.resume()


class _TapClient(asyncio.Protocol):
    """One client connection through the tap. Parses HTTP/1.1 requests as they stream (aiohttp
    sends one request at a time per connection, bodies with Content-Length) and counts header
    and body bytes; counts in data_received, so bytes that arrived before a reset are seen."""

    def __init__(self, tap: BodyTap) -> None:
        self.tap = tap
        self.transport: asyncio.Transport | None = None
        self.upstream: _TapUpstream | None = None
        self._pending = bytearray()  # bytes that arrived before the upstream connected
        self._head = bytearray()
        self._method = ""
        self._length = 0
        self._seen = 0
        self._in_body = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.tap.connections.add(self)
        self.tap.spawn(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: _TapUpstream(self), self.tap.host, self.tap.port
            )
        except OSError:
            self.close(reset=True)
            return
        self.upstream = upstream
        if self._closed:
            assert upstream.transport is not None
            _reset(upstream.transport)
            return
        if self._pending:
            assert upstream.transport is not None
            upstream.transport.write(bytes(self._pending))
            self._pending.clear()

    def data_received(self, data: bytes) -> None:
        self._count(data)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)
        else:
            self._pending += data

    def _count(self, data: bytes) -> None:
        stats = self.tap.stats
        stats.total_bytes += len(data)
        view = memoryview(data)
        while view:
            if self._in_body:
                take = min(len(view), self._length - self._seen)
                self._seen += take
                stats.body_bytes[self._method] += take
                view = view[take:]
                if self._seen == self._length:
                    stats.requests[self._method] += 1
                    self._in_body = False
                continue
            self._head += view
            view = memoryview(b"")
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                continue
            head, rest = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
            self._head.clear()
            stats.header_bytes += len(head)
            lines = head.decode("latin-1").split("\r\n")
            self._method = lines[0].split(" ", 1)[0]
            self._length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    self._length = int(value.strip())
                elif name.strip().lower() == "transfer-encoding":
                    raise RuntimeError("BodyTap counts Content-Length bodies only")
            self._seen = 0
            self._in_body = True
            view = memoryview(rest)
            if self._length == 0:
                stats.requests[self._method] += 1
                self._in_body = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._in_body or self._head:
            self.tap.stats.cut.append((self._method, self._seen, self._length))
        self.tap.connections.discard(self)
        self._closed = True
        if self.upstream is not None and self.upstream.transport is not None:
            if exc is not None:
                _reset(self.upstream.transport)
            else:
                self.upstream.transport.close()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.close(reset=exc is not None)

    def close(self, *, reset: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if reset:
                _reset(self.transport)
            else:
                self.transport.close()

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class BodyTap:
    """A counting TCP relay on 127.0.0.1 in front of an HTTP server: what reached the server
    side of a FaultProxy, split into request headers and bodies per method."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.stats = TapStats()
        self.connections: set[_TapClient] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> BodyTap:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _TapClient(self), "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self.connections):
            conn.close(reset=True)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])


async def resend_phase(
    root: Path,
    settings: SyncSection,
    token_file: Path,
    *,
    size: int,
    cuts: int,
    rng: random.Random,
) -> dict[str, Any]:
    """One payload of `size` bytes, `cuts` connection cuts at random points of its upload."""
    backlog = await make_backlog(root / "resend", 1, [size])
    (sha256,) = backlog.payloads
    # Each rule cuts after n more bytes on the connection it catches; n <= size / cuts makes
    # sure every cut still finds upload left to cut (a resumed upload restarts at or before
    # the previous cut).
    points = [rng.randint(64 * 1024, size // cuts - 1) for _ in range(cuts)]
    progress(f"resend: {size / MIB:g} MiB payload, cuts after {points} more bytes")
    with ReceiverProcess(root / "rx-resend", {APPLIANCE_ID: TOKEN}) as rx:
        host, port = rx.url.removeprefix("http://").rsplit(":", 1)
        async with (
            BodyTap(host, int(port)) as tap,
            FaultProxy("127.0.0.1", tap.bound_port) as proxy,
        ):
            stop = asyncio.Event()
            installed = 0

            def arm() -> None:
                nonlocal installed
                proxy.cut_after(points[0], "upstream")
                installed = 1

            async def rearm() -> None:
                # The next rule as soon as the previous one has cut: the client's retry (after
                # tenacity's backoff of 0.2 s or more) then meets it on its new connection.
                nonlocal installed
                while not stop.is_set() and installed < cuts:
                    await asyncio.sleep(0.002)
                    if proxy.stats.connections_cut >= installed:
                        proxy.cut_after(points[installed], "upstream")
                        installed += 1

            clock = Clock(rx.pid)
            async with asyncio.TaskGroup() as group:
                rearming = group.create_task(rearm(), name="rearm-cuts")
                engine = await run_engine(
                    backlog,
                    http_destination(proxy.url_for(), token_file),
                    settings,
                    clock,
                    on_start=arm,
                    retry=True,
                )
                stop.set()
                await rearming
            proxy_upstream = proxy.stats.bytes_upstream
            cut_count = proxy.stats.connections_cut
        summary = await receiver_summary(rx.url)
        copy = rx.data_dir / "payloads" / APPLIANCE_ID / sha256
        copy_sha = await asyncio.to_thread(_file_sha256, copy) if copy.exists() else None
    shutil.rmtree(root / "rx-resend", ignore_errors=True)
    shutil.rmtree(backlog.data_dir, ignore_errors=True)
    stats = tap.stats
    patch_bytes = stats.body_bytes["PATCH"]
    resent = patch_bytes - size
    per_cut = [seen for method, seen, _ in stats.cut if method == "PATCH"]
    checks = check_summary(summary, backlog)
    checks.update(
        sha256_match=copy_sha == sha256,
        complete=engine["complete"],
        every_cut_happened=cut_count == cuts,
        tap_saw_what_proxy_forwarded=stats.total_bytes == proxy_upstream,
    )
    progress(f"  {cut_count} cuts, {resent:,} bytes sent again (chunk {settings.chunk_size:,})")
    return {
        "payload_bytes": size,
        "chunk_size": settings.chunk_size,
        "cuts": cut_count,
        "cut_rules_bytes": points,
        "patch_body_bytes": patch_bytes,
        "bytes_resent": resent,
        "bytes_resent_per_cut": round(resent / max(cut_count, 1)),
        # Body bytes of each PATCH that a cut interrupted: what crossed, then had to go again.
        "cut_requests": [
            {"method": method, "body_bytes_crossed": seen, "content_length": length}
            for method, seen, length in stats.cut
        ],
        "resent_beyond_cut_requests": resent - sum(per_cut),
        "requests": dict(stats.requests),
        "header_bytes": stats.header_bytes,
        "seconds": round(clock.wall, 3),
        "failed_drains": engine["failed_drains"],
        "receiver_summary": summary,
        "checks": checks,
        "ok": all(checks.values()),
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- main


PHASES = ("drain", "bandwidth", "resend")


async def run(args: Any, root: Path) -> dict[str, Any]:
    settings = SyncSection()
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    rng = random.Random(args.seed)
    results: dict[str, Any] = {}
    phases = args.only or PHASES
    if "drain" in phases:
        sizes = payload_sizes(int(args.payload_mb * MB), rng)
        progress(
            f"backlog: {args.records:,} records, {len(sizes)} payloads ({sum(sizes) / MB:,.0f} MB)"
        )
        backlog = await make_backlog(root / "appliance", args.records, sizes)
        progress(f"  built in {backlog.seconds:.1f} s; pre-encoding the baseline's batches")
        plan = await asyncio.to_thread(encode_plan, backlog, root / "bodies.bin", settings)
        progress(
            f"  {plan.batches:,} batches, {plan.batch_bytes / MB:.1f} MB gzip, {plan.seconds:.1f} s"
        )
        results["backlog"] = {
            "records": backlog.records,
            "payloads": len(backlog.payloads),
            "payload_bytes": backlog.payload_bytes,
            "payload_file_mib": list(PAYLOAD_MIB),
            "build_seconds": round(backlog.seconds, 1),
            "fill": backlog.fill,
            "pre_encode_seconds": round(plan.seconds, 1),
        }
        results["drain"] = await drain_phase(root, backlog, plan, settings, token_file)
        shutil.rmtree(backlog.data_dir, ignore_errors=True)
        plan.bodies.unlink(missing_ok=True)
    if "bandwidth" in phases:
        results["bandwidth"] = await bandwidth_phase(
            root, settings, token_file, cap=args.cap_mb * MB, seconds=args.cap_seconds
        )
    if "resend" in phases:
        results["resend"] = await resend_phase(
            root, settings, token_file, size=int(args.cut_mib * MIB), cuts=args.cuts, rng=rng
        )
    return results


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--records", type=int, help="backlog records (default 1,000,000; quick 50,000)"
    )
    parser.add_argument(
        "--payload-mb", type=float, help="backlog payload MB (default 500; quick 20)"
    )
    parser.add_argument("--cap-mb", type=float, default=2.0, help="bandwidth cap, MB/s (default 2)")
    parser.add_argument(
        "--cap-seconds", type=float, help="length of the capped drain (default 30; quick 5)"
    )
    parser.add_argument(
        "--cut-mib", type=float, help="payload cut mid-upload, MiB (default 64; quick 8)"
    )
    parser.add_argument("--cuts", type=int, default=3, help="cuts during that upload (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of payload sizes and cut points")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    args = parser.parse_args()
    args.records = args.records or (50_000 if args.quick else 1_000_000)
    args.payload_mb = (
        args.payload_mb if args.payload_mb is not None else (20 if args.quick else 500)
    )
    args.cap_seconds = args.cap_seconds or (5.0 if args.quick else 30.0)
    args.cut_mib = args.cut_mib or (8 if args.quick else 64)
    root = make_data_root(args.tmp_dir, "bench-sync-drain-")
    try:
        box = machine(root)
        progress(
            f"data dir {root} on {box['data_dir_filesystem']['type']}, load {box['load_average_at_start']}"
        )
        results = asyncio.run(run(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    settings = SyncSection()
    passed: dict[str, bool] = {}
    ok: dict[str, bool] = {}
    if "drain" in results:
        passed["drain_ratio"] = results["drain"]["ratio"] >= TARGET_RATIO
        ok["drain"] = results["drain"]["ok"]
    if "bandwidth" in results:
        steady_ratio = results["bandwidth"]["steady_ratio_to_cap"]
        passed["bandwidth_steady_within"] = (
            steady_ratio is not None and abs(steady_ratio - 1) <= TARGET_CAP_ERROR
        )
        ok["bandwidth"] = results["bandwidth"]["ok"]
    if "resend" in results:
        resend = results["resend"]
        passed["resend_per_cut"] = all(
            c["body_bytes_crossed"] <= settings.chunk_size for c in resend["cut_requests"]
        ) and resend["bytes_resent"] <= settings.chunk_size * max(resend["cuts"], 1)
        ok["resend"] = resend["ok"]
    emit(
        {
            "benchmark": "sync_drain",
            "quick": args.quick,
            "machine": box,
            "source": code_fingerprint(),
            "settings": {
                "records": args.records,
                "payload_mb": args.payload_mb,
                "batch_records": settings.batch_records,
                "batch_bytes": settings.batch_bytes,
                "chunk_size": settings.chunk_size,
                "cap_bytes_per_s": args.cap_mb * MB,
                "cap_seconds": args.cap_seconds,
                "cut_payload_bytes": int(args.cut_mib * MIB),
                "cuts": args.cuts,
                "seed": args.seed,
            },
            **results,
            "load_average_at_end": load_average(),
            "peak_rss_mib": peak_rss_mib(),
            "targets": {
                "drain_ratio_min": TARGET_RATIO,
                "bandwidth_steady_error_max": TARGET_CAP_ERROR,
                "resend_max_per_cut": settings.chunk_size,
            },
            "pass": {**passed, "all": all(passed.values())},
            "ok": all(ok.values()),
        }
    )


if __name__ == "__main__":
    main()
