"""Benchmark: shipping a backlog upstream -- wire bytes and codec CPU per record of the telemetry
the appliance really writes (raw NDJSON, gzip, zstd), the HTTP overhead of a batch, and the
appliance's memory while it drains a 10,000,000-record backlog to the reference receiver.

Phases:
  records      the simulated sources of a shipped profile (default `demo`) run through the real
               SourcePipeline (features, limits, samples) into a real Journal at `pace: fast`,
               so the records are the ones the appliance journals (telemetry plus the few
               alert/event/sample records the profile's faults cause).
  compression  those records read back in the engine's batches (`records_after` with
               SyncSection's batch_records/batch_bytes, and with 50 records, the size of a
               batch while alerts drain), encoded by `encode_batch`; the NDJSON of every batch
               is then compressed and decompressed with each codec: bytes per record and CPU
               µs per record (thread CPU time, best of several repetitions).
  wire         the same journal drained by SyncEngine + HttpTarget to a receiver process
               through a byte-counting TCP relay: each batch's request (headers + body) and
               response bytes as they cross the link.
  drain        a journal of N records (bench.journal_growth.fill: the 200-byte detection-like
               bodies and 5/20/5/70 priority mix of the journal benchmarks) drained by
               SyncEngine.drain() with SyncSection() defaults in a child process (so only the
               appliance's memory counts) to a receiver process over loopback; the child's RSS
               is sampled every 0.5 s beside its progress. Peak RSS, RSS at 10/50/90 % and
               the slope over 10-90 %; the receiver must then hold exactly records 1..N.

Prints one JSON object on stdout; progress on stderr.
`python -m bench.sync_backlog [--quick] [--records N] [--only compression|drain]`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import psutil

from appliance.stages.pipeline import SourcePipeline
from bench.common import (
    MIB,
    base_parser,
    emit,
    machine,
    make_data_root,
    percentile,
    progress,
    source_fingerprint,
)
from bench.journal_growth import fill
from bench.receiver_proc import ReceiverProcess
from config import JournalSection, SimulatedSensor
from config.loader import PROFILES, parse_config, profile_text
from config.shipping import HttpDestination, SyncSection
from sensors import open_source
from sync import Journal, PayloadStore, Priority, StoredRecord
from sync.destination import Batch, JournalCollision, RateLimiter, encode_batch
from sync.engine import Progress, SyncEngine
from sync.http_client import HttpTarget
from sync.reader import JOURNAL_FILE, JournalReader

TARGET_PEAK_RSS_MIB = 200.0
# "Flat": over the middle 80 % of the drain, RSS may grow at most this much per million records
# shipped (a 10M drain then ends within ~8 MiB of where its middle started).
TARGET_SLOPE_MIB_PER_M = 1.0
SMALL_BATCH = 50
ROUNDED_DIGITS = 6
GZIP_LEVELS = (1, 6, 9)
ZSTD_LEVELS = (1, 3, 9, 19)
DRAIN_APPLIANCE = "bench"  # the appliance_id journal_growth.fill stamps on its rows
# Disk a drain needs per record: ~335 B of journal (journal_growth) + the receiver's copy (the
# NDJSON line verbatim, its columns and the primary key: ~460 B measured) + WAL and headroom.
DISK_BYTES_PER_RECORD = 1000
SAMPLE_INTERVAL_S = 0.5
CHILD_REPORT_INTERVAL_S = 0.2
# A token of the length `secrets.token_urlsafe(32)` gives: the Authorization header is part of
# every request's overhead.
TOKEN = "b" * 43
# Codec timing: repeat until this much CPU time was spent (at least MIN_REPEATS times) and keep
# the fastest repetition, the one least disturbed by other work on a shared 2-core box.
TIMING_BUDGET_S = 0.3
MIN_REPEATS = 3
MAX_REPEATS = 50


def sources_measured() -> dict[str, str]:
    """The journal's files (bench.common) plus the shipping code this benchmark exercises."""
    return source_fingerprint(
        "sync/engine.py",
        "sync/destination.py",
        "sync/http_client.py",
        "receiver/app.py",
        "receiver/batches.py",
        "receiver/store.py",
        "receiver/uploads.py",
    )


# --------------------------------------------------------------------------------- records


async def journal_real_records(data_dir: Path, profile: str, signal_s: float) -> dict[str, Any]:
    """Run the profile's simulated sources through SourcePipeline into a fresh journal, as the
    daemon would, for `signal_s` seconds of signal time each (fast pace)."""
    cfg = parse_config(profile_text(profile), file=f"{profile}.yaml")
    sensors = [
        sensor.model_copy(update={"pace": "fast", "duration": signal_s})
        for sensor in cfg.sensors
        if isinstance(sensor, SimulatedSensor)
    ]
    if not sensors:
        raise SystemExit(f"profile {profile!r} has no simulated sensors")
    store = PayloadStore(data_dir / "payloads")
    started = time.perf_counter()
    async with (
        await Journal.open(
            data_dir, appliance_id=cfg.appliance.id, settings=cfg.journal, payloads=store
        ) as journal,
        asyncio.TaskGroup() as group,
    ):
        for sensor in sensors:
            pipeline = SourcePipeline(sensor, open_source(sensor), journal, store)
            group.create_task(pipeline.run(), name=f"pipeline-{sensor.name}")
    with JournalReader.open(data_dir) as reader:
        counts = reader.counts()
    return {
        "appliance_id": cfg.appliance.id,
        "profile": profile,
        "sensors": [sensor.name for sensor in sensors],
        "signal_seconds": signal_s,
        "seconds": round(time.perf_counter() - started, 1),
        "by_kind": {f"{p.label}/{kind}": n for p, kind, n, _ in counts},
    }


def engine_batches(
    reader: JournalReader,
    appliance_id: str,
    priorities: Sequence[Priority],
    *,
    limit: int,
    max_bytes: int,
) -> list[Batch]:
    """The batches SyncEngine._drain_records would build, in its order, without shipping them."""
    batches: list[Batch] = []
    identity = reader.identity()
    journal_id = None if identity is None else identity.journal_id
    for priority in priorities:
        after = 0
        while True:
            records: list[StoredRecord] = reader.records_after(
                priority, after, limit=limit, max_bytes=max_bytes
            )
            if not records:
                break
            batches.append(encode_batch(appliance_id, priority, records, journal_id))
            after = records[-1].seq
    return batches


# ------------------------------------------------------------------------------ compression


@dataclass(frozen=True)
class Codec:
    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def _identity(data: bytes) -> bytes:
    return data


def _gzip_codec(level: int) -> Codec:
    # mtime=0 as encode_batch: a resent batch is byte-identical.
    return Codec(
        f"gzip-{level}",
        lambda data: gzip.compress(data, compresslevel=level, mtime=0),
        gzip.decompress,
    )


def codecs() -> tuple[list[Codec], str | None]:
    """raw, gzip and (when the package is installed) zstd; the second value says what is missing."""
    out = [Codec("raw", _identity, _identity)] + [_gzip_codec(level) for level in GZIP_LEVELS]
    try:
        import zstandard  # a test extra, not a dependency of the appliance
    except ImportError:
        return out, "zstandard is not installed (`.venv/bin/pip install zstandard`): no zstd rows"
    # One compressor per level, reused across batches as an implementation would; the frame
    # carries the content size, so a plain decompress() works on the receiving side.
    decompressor = zstandard.ZstdDecompressor()
    for level in ZSTD_LEVELS:
        compressor = zstandard.ZstdCompressor(level=level)
        out.append(Codec(f"zstd-{level}", compressor.compress, decompressor.decompress))
    return out, None


def best_cpu_seconds(work: Callable[[], object]) -> float:
    """The fastest of several runs of `work`, in thread CPU seconds (other processes' load
    inflates wall time but not this thread's CPU time, apart from cache effects)."""
    best = float("inf")
    spent = 0.0
    runs = 0
    while runs < MIN_REPEATS or (spent < TIMING_BUDGET_S and runs < MAX_REPEATS):
        start = time.thread_time()
        work()
        took = time.thread_time() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def _compress_all(codec: Codec, raws: Sequence[bytes]) -> None:
    for raw in raws:
        codec.compress(raw)


def _decompress_all(codec: Codec, blobs: Sequence[bytes]) -> None:
    for blob in blobs:
        codec.decompress(blob)


def measure_codecs(batches: Sequence[Batch], all_codecs: Sequence[Codec]) -> dict[str, Any]:
    """Bytes and CPU per record of every codec over the NDJSON of `batches`."""
    raws = [gzip.decompress(batch.body) for batch in batches]  # exactly what encode_batch built
    records = sum(batch.records for batch in batches)
    raw_total = sum(len(raw) for raw in raws)
    out: dict[str, Any] = {}
    for codec in all_codecs:
        packed = [codec.compress(raw) for raw in raws]
        if [codec.decompress(blob) for blob in packed] != raws:
            raise SystemExit(f"{codec.name} did not round-trip")
        packed_total = sum(len(blob) for blob in packed)
        compress_s = best_cpu_seconds(functools.partial(_compress_all, codec, raws))
        decompress_s = best_cpu_seconds(functools.partial(_decompress_all, codec, packed))
        out[codec.name] = {
            "bytes_per_record": round(packed_total / records, 1),
            "ratio": round(raw_total / packed_total, 2),
            "compress_us_per_record": round(compress_s / records * 1e6, 2),
            "decompress_us_per_record": round(decompress_s / records * 1e6, 2),
        }
    return out


def compression_set(
    reader: JournalReader,
    appliance_id: str,
    priorities: Sequence[Priority],
    all_codecs: Sequence[Codec],
    *,
    limit: int,
    max_bytes: int,
) -> dict[str, Any]:
    batches = engine_batches(reader, appliance_id, priorities, limit=limit, max_bytes=max_bytes)
    if not batches:
        return {"records": 0, "batches": 0}
    records = sum(batch.records for batch in batches)

    # The engine's whole per-batch CPU (records -> to_dict -> JSON -> gzip-6), for scale.
    identity = reader.identity()
    journal_id = None if identity is None else identity.journal_id

    def encode_all() -> None:
        for priority in priorities:
            after = 0
            while True:
                found = reader.records_after(priority, after, limit=limit, max_bytes=max_bytes)
                if not found:
                    break
                encode_batch(appliance_id, priority, found, journal_id)
                after = found[-1].seq

    def read_all() -> None:
        for priority in priorities:
            after = 0
            while True:
                found = reader.records_after(priority, after, limit=limit, max_bytes=max_bytes)
                if not found:
                    break
                after = found[-1].seq

    read_s = best_cpu_seconds(read_all)
    encode_s = best_cpu_seconds(encode_all) - read_s
    return {
        "priorities": [p.label for p in priorities],
        "batch_records": limit,
        "batch_bytes": max_bytes,
        "records": records,
        "batches": len(batches),
        "mean_records_per_batch": round(records / len(batches), 1),
        "raw_bytes_per_record": round(sum(b.raw_bytes for b in batches) / records, 1),
        "encode_batch_us_per_record": round(encode_s / records * 1e6, 2),
        "codecs": measure_codecs(batches, all_codecs),
    }


def _round_floats(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: _round_floats(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_round_floats(item, digits) for item in value]
    return value


def rounded_features(
    reader: JournalReader, appliance_id: str, settings: SyncSection, all_codecs: Sequence[Codec]
) -> dict[str, Any]:
    """Context, not what the appliance does: the same telemetry batches with every float of the
    body rounded to ROUNDED_DIGITS significant digits. The features are printed with 17 digits,
    most of them noise that no codec can squeeze; this shows what that noise costs on the wire."""
    batches = engine_batches(
        reader,
        appliance_id,
        [Priority.TELEMETRY],
        limit=settings.batch_records,
        max_bytes=settings.batch_bytes,
    )
    raws: list[bytes] = []
    for batch in batches:
        lines = []
        for line in gzip.decompress(batch.body).splitlines():
            record = json.loads(line)
            record["body"] = _round_floats(record["body"], ROUNDED_DIGITS)
            lines.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
        raws.append(("\n".join(lines) + "\n").encode())
    records = sum(batch.records for batch in batches)
    wanted = {"raw", "gzip-6", "zstd-1"}
    return {
        "significant_digits": ROUNDED_DIGITS,
        "bytes_per_record": {
            codec.name: round(sum(len(codec.compress(raw)) for raw in raws) / records, 1)
            for codec in all_codecs
            if codec.name in wanted
        },
    }


# ------------------------------------------------------------------------------------ wire


@dataclass
class Meter:
    """Bytes a CountingRelay forwarded, per direction; connections opened."""

    upstream: int = 0
    downstream: int = 0
    connections: int = 0


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes crossing it each way: HTTP/1.1 as it would
    cross the link (TCP/IP and TLS framing are not in these counts)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.meter = Meter()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        # Closing the sockets ends the pipes by EOF. Cancelling the handlers instead would log
        # an error on 3.11: asyncio.streams calls task.exception() on a cancelled handler.
        for writer in self._writers:
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=10)
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.meter.connections += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        upstream_r, upstream_w = await asyncio.open_connection(self.host, self.port)
        self._writers.update((client_w, upstream_w))

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
        ) -> None:
            try:
                while data := await src.read(65536):
                    if upstream:
                        self.meter.upstream += len(data)
                    else:
                        self.meter.downstream += len(data)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(
                pipe(client_r, upstream_w, True), pipe(upstream_r, client_w, False)
            )
        finally:
            self._writers.difference_update((client_w, upstream_w))


@dataclass
class SentBatch:
    priority: Priority
    records: int
    body: int
    upstream: int
    downstream: int


@dataclass
class MeteredTarget:
    """The Destination protocol around an HttpTarget: the relay's counters before and after each
    request give that request's bytes exactly, since the engine sends one thing at a time."""

    inner: HttpTarget
    meter: Meter
    name: str = "shore"
    dedups_records: bool = True  # as the HttpTarget inside: the receiver keeps each seq once
    batches: list[SentBatch] = field(default_factory=list)
    payload_upstream: int = 0
    payload_bytes: int = 0

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    @property
    def collision(self) -> JournalCollision | None:
        return self.inner.collision

    async def reachable(self) -> bool:
        return await self.inner.reachable()

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        up, down = self.meter.upstream, self.meter.downstream
        await self.inner.send_batch(batch, limiter)
        self.batches.append(
            SentBatch(
                batch.priority,
                batch.records,
                len(batch.body),
                self.meter.upstream - up,
                self.meter.downstream - down,
            )
        )

    async def send_payload(
        self,
        sha256: str,
        size: int,
        media_type: str,
        path: Path,
        limiter: RateLimiter,
        journal_id: str | None = None,
    ) -> int:
        up = self.meter.upstream
        sent = await self.inner.send_payload(sha256, size, media_type, path, limiter, journal_id)
        self.payload_upstream += self.meter.upstream - up
        self.payload_bytes += sent
        return sent


def fetch_summary(url: str, appliance_id: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/v1/appliances/{appliance_id}/summary",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        summary: dict[str, Any] = json.load(response)
    return summary


async def metered_drain(
    data_dir: Path, appliance_id: str, url: str, token_file: Path, settings: SyncSection
) -> tuple[MeteredTarget, Meter]:
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80
    store = PayloadStore(data_dir / "payloads")
    async with (
        await Journal.open(data_dir, appliance_id=appliance_id, payloads=store) as journal,
        CountingRelay(host, port) as relay,
    ):
        cfg = HttpDestination.model_validate(
            {"name": "shore", "type": "http", "url": relay.url, "token_file": str(token_file)}
        )
        target = MeteredTarget(HttpTarget(cfg, appliance_id, settings.chunk_size), relay.meter)
        engine = SyncEngine(journal, store, target, cfg, settings)
        async with target:
            await engine.drain()
    return target, relay.meter


def wire_phase(
    root: Path, data_dir: Path, appliance_id: str, settings: SyncSection, label: str
) -> dict[str, Any]:
    """Drain a copy of the real-records journal to a fresh receiver through the relay."""
    copy = root / f"wire-{label}"
    shutil.copytree(data_dir, copy)
    token_file = root / f"wire-{label}.token"
    token_file.write_text(TOKEN + "\n")
    with ReceiverProcess(root / f"wire-{label}-receiver", {appliance_id: TOKEN}) as rx:
        target, meter = asyncio.run(metered_drain(copy, appliance_id, rx.url, token_file, settings))
        summary = fetch_summary(rx.url, appliance_id, TOKEN)
    shutil.rmtree(copy, ignore_errors=True)
    by_priority: dict[str, Any] = {}
    for priority in Priority:
        sent = [b for b in target.batches if b.priority == priority]
        if not sent:
            continue
        records = sum(b.records for b in sent)
        body = sum(b.body for b in sent)
        up = sum(b.upstream for b in sent)
        down = sum(b.downstream for b in sent)
        by_priority[priority.label] = {
            "records": records,
            "batches": len(sent),
            "body_bytes": body,
            "upstream_bytes": up,
            "downstream_bytes": down,
            "request_overhead_bytes_per_batch": round((up - body) / len(sent), 1),
            "response_bytes_per_batch": round(down / len(sent), 1),
            "upstream_bytes_per_record": round(up / records, 1),
            "downstream_bytes_per_record": round(down / records, 1),
        }
    overheads = [b.upstream - b.body for b in target.batches]
    responses = [b.downstream for b in target.batches]
    return {
        "batch_records": settings.batch_records,
        "batch_bytes": settings.batch_bytes,
        "connections": meter.connections,
        "request_overhead_bytes_per_batch": {
            "median": statistics.median(overheads),
            "min": min(overheads),
            "max": max(overheads),
        },
        "response_bytes_per_batch": {
            "median": statistics.median(responses),
            "min": min(responses),
            "max": max(responses),
        },
        "by_priority": by_priority,
        "payloads": {"bytes": target.payload_bytes, "upstream_bytes": target.payload_upstream},
        "receiver_summary": summary,
    }


def wire_per_record(
    compression: dict[str, Any], wire: dict[str, Any], set_name: str, wire_name: str
) -> dict[str, Any]:
    """Per telemetry record, each codec's body bytes plus the measured request overhead of its
    batch (the headers do not depend on the codec: `Content-Encoding: zstd` is as long as gzip)."""
    data = compression["sets"][set_name]
    overhead = wire[wire_name]["request_overhead_bytes_per_batch"]["median"]
    response = wire[wire_name]["response_bytes_per_batch"]["median"]
    per_batch = data["mean_records_per_batch"]
    return {
        "batch_records": data["batch_records"],
        "mean_records_per_batch": per_batch,
        "request_overhead_bytes_per_record": round(overhead / per_batch, 1),
        "downstream_bytes_per_record": round(response / per_batch, 1),
        "upstream_bytes_per_record": {
            name: round(codec["bytes_per_record"] + overhead / per_batch, 1)
            for name, codec in data["codecs"].items()
        },
    }


def compression_phase(root: Path, profile: str, signal_s: float) -> dict[str, Any]:
    data_dir = root / "records"
    progress(f"records: {profile} profile, {signal_s:,.0f} s of signal through SourcePipeline")
    made = asyncio.run(journal_real_records(data_dir, profile, signal_s))
    progress(f"  {made['by_kind']} in {made['seconds']} s")
    appliance_id = made["appliance_id"]
    all_codecs, missing = codecs()
    if missing:
        progress(f"  {missing}")
    defaults = SyncSection()
    others = [Priority.ALERT, Priority.EVENT, Priority.SAMPLE]
    sets: dict[str, Any] = {}
    with JournalReader.open(data_dir) as reader:
        for name, priorities, limit in (
            ("telemetry", [Priority.TELEMETRY], defaults.batch_records),
            ("telemetry_small_batches", [Priority.TELEMETRY], SMALL_BATCH),
            ("alert_event_sample", others, defaults.batch_records),
        ):
            progress(f"compression: {name} (batches of up to {limit} records)")
            sets[name] = compression_set(
                reader,
                appliance_id,
                priorities,
                all_codecs,
                limit=limit,
                max_bytes=defaults.batch_bytes,
            )
        sets["telemetry"]["context_features_rounded"] = rounded_features(
            reader, appliance_id, defaults, all_codecs
        )
    out: dict[str, Any] = {"records": made, "zstd_missing": missing, "sets": sets}
    wire: dict[str, Any] = {}
    for label, settings in (
        ("default", defaults),
        ("small_batches", SyncSection(batch_records=SMALL_BATCH)),
    ):
        progress(f"wire: drain through a counting relay, batch_records={settings.batch_records}")
        wire[label] = wire_phase(root, data_dir, appliance_id, settings, label)
    out["wire"] = wire
    out["telemetry_wire"] = {
        "default": wire_per_record(out, wire, "telemetry", "default"),
        "small_batches": wire_per_record(out, wire, "telemetry_small_batches", "small_batches"),
    }
    shutil.rmtree(data_dir, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------- drain


def _rss_mib() -> float:
    return round(psutil.Process().memory_info().rss / MIB, 1)


async def drain_child(
    data_dir: Path, url: str, token_file: Path, records: int, trace: bool
) -> None:
    """The appliance side of the drain phase, in its own process: open the journal as the daemon
    does, drain it with SyncSection() defaults, report progress as JSON lines on stdout."""

    def say(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def maxrss_mib() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    # The interpreter and its imports (the daemon's own: numpy, aiohttp, pydantic ...): the floor
    # under everything the drain itself uses.
    say({"event": "started", "rss_mib": _rss_mib()})
    if trace:
        tracemalloc.start(10)
    started = time.perf_counter()
    store = PayloadStore(data_dir / "payloads")
    journal = await Journal.open(
        data_dir, appliance_id=DRAIN_APPLIANCE, settings=JournalSection(), payloads=store
    )
    say(
        {
            "event": "opened",
            "open_s": round(time.perf_counter() - started, 2),
            "check_at_open": journal.recovery.check,
            "rss_mib": _rss_mib(),
            "ru_maxrss_mib": maxrss_mib(),
        }
    )
    settings = SyncSection()
    cfg = HttpDestination.model_validate(
        {"name": "shore", "type": "http", "url": url, "token_file": str(token_file)}
    )
    target = HttpTarget(cfg, DRAIN_APPLIANCE, settings.chunk_size)
    engine = SyncEngine(journal, store, target, cfg, settings)
    last_report = 0.0
    snapshots: list[tracemalloc.Snapshot] = []
    marks = [records // 10, records * 9 // 10]

    def on_progress(step: Progress) -> None:
        nonlocal last_report
        now = time.monotonic()
        if now - last_report >= CHILD_REPORT_INTERVAL_S:
            last_report = now
            say({"records": step.records})
        if trace and marks and step.records >= marks[0]:
            marks.pop(0)
            snapshots.append(tracemalloc.take_snapshot())

    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with target:
            complete = await engine.drain(on_progress)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        drained_maxrss = maxrss_mib()
        backlog = await engine.backlog()
    finally:
        await journal.close()
    done: dict[str, Any] = {
        "event": "done",
        "complete": complete,
        "records_sent": engine.state.records_sent,
        "batches_sent": engine.state.batches_sent,
        "bytes_sent": engine.state.bytes_sent,
        "seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "backlog_left": {p.label: n for p, (n, _, _) in backlog.items()},
        "ru_maxrss_mib_after_drain": drained_maxrss,
        "ru_maxrss_mib": maxrss_mib(),
    }
    if len(snapshots) == 2:
        top = snapshots[1].compare_to(snapshots[0], "lineno")[:15]
        done["tracemalloc_growth_10_to_90"] = [str(stat) for stat in top]
        current, peak = tracemalloc.get_traced_memory()
        done["tracemalloc_mib"] = {"current": round(current / MIB, 1), "peak": round(peak / MIB, 1)}
    say(done)


@dataclass
class Sample:
    t: float
    rss: int
    records: int


class ChildWatch:
    """Reads the child's JSON lines in a thread: the latest progress and its events."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.records = 0
        self.events: dict[str, dict[str, Any]] = {}
        self._proc = proc
        self._thread = threading.Thread(target=self._read, name="child-progress", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "records" in message and "event" not in message:
                self.records = int(message["records"])
            else:
                self.events[str(message["event"])] = message

    def join(self) -> None:
        self._thread.join(timeout=30)


def rss_at(samples: Sequence[Sample], records: int) -> float | None:
    """RSS (MiB) of the first sample taken at or after `records` shipped."""
    for sample in samples:
        if sample.records >= records:
            return round(sample.rss / MIB, 1)
    return None


def slope_mib_per_m(samples: Sequence[Sample]) -> float | None:
    """Least-squares slope of RSS (MiB) against records shipped (millions)."""
    if len(samples) < 3:
        return None
    xs = [s.records / 1e6 for s in samples]
    ys = [s.rss / MIB for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var, 3)


def drain_phase(root: Path, records: int, trace: bool) -> dict[str, Any]:
    data_dir = root / "appliance"
    asyncio.run(_create_journal(data_dir))
    progress(f"drain: fill {records:,} records")
    filled = fill(data_dir, records)
    journal_bytes = (data_dir / JOURNAL_FILE).stat().st_size
    token_file = root / "drain.token"
    token_file.write_text(TOKEN + "\n")
    rx_dir = root / "receiver"
    with ReceiverProcess(rx_dir, {DRAIN_APPLIANCE: TOKEN}) as rx:
        receiver = psutil.Process(rx.pid)
        command = [
            sys.executable,
            "-m",
            "bench.sync_backlog",
            "--drain-child",
            "--child-data",
            str(data_dir),
            "--child-url",
            rx.url,
            "--child-token-file",
            str(token_file),
            "--records",
            str(records),
        ] + (["--trace-memory"] if trace else [])
        progress(f"drain: child process ships {records:,} records to {rx.url}")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        watch = ChildWatch(proc)
        child = psutil.Process(proc.pid)
        samples: list[Sample] = []
        loads: list[list[float]] = []
        receiver_rss = 0
        start = time.monotonic()
        last_log = start
        while proc.poll() is None:
            try:
                rss = child.memory_info().rss
                receiver_rss = max(receiver_rss, receiver.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            now = time.monotonic()
            if "opened" in watch.events:
                samples.append(Sample(now - start, rss, watch.records))
            if now - last_log >= 15:
                last_log = now
                load = [round(x, 2) for x in os.getloadavg()]
                loads.append(load)
                progress(
                    f"  {watch.records:,} shipped, RSS {rss / MIB:.1f} MiB, load {load}, "
                    f"{now - start:.0f} s"
                )
            time.sleep(SAMPLE_INTERVAL_S)
        returncode = proc.wait()
        watch.join()
        receiver_cpu = sum(receiver.cpu_times()[:2])
        summary = fetch_summary(rx.url, DRAIN_APPLIANCE, TOKEN) if returncode == 0 else {}
    receiver_bytes = sum(
        f.stat().st_size for f in rx_dir.iterdir() if f.name.startswith("receiver.db")
    )
    done = watch.events.get("done", {})
    opened = watch.events.get("opened", {})
    drained = [s for s in samples if s.records > 0]
    middle = [s for s in drained if records * 0.1 <= s.records <= records * 0.9]
    peak = max((s.rss for s in samples), default=0) / MIB
    slope = slope_mib_per_m(middle)
    ok = (
        returncode == 0
        and bool(done.get("complete"))
        and done.get("records_sent") == records
        and summary.get("records") == records
        and summary.get("max_seq") == records
        and not any(done.get("backlog_left", {}).values())
    )
    seconds = float(done.get("seconds", 0.0)) or 1e-9
    return {
        "records": records,
        "fill": filled,
        "journal_bytes": journal_bytes,
        "child_returncode": returncode,
        "open_s": opened.get("open_s"),
        "check_at_open": opened.get("check_at_open"),
        "rss_at_start_mib": watch.events.get("started", {}).get("rss_mib"),
        "rss_after_open_mib": opened.get("rss_mib"),
        "child_ru_maxrss_mib_after_open": opened.get("ru_maxrss_mib"),
        "child_ru_maxrss_mib_after_drain": done.get("ru_maxrss_mib_after_drain"),
        "peak_rss_mib": round(peak, 1),
        "child_ru_maxrss_mib": done.get("ru_maxrss_mib"),
        "rss_mib_at": {
            "10%": rss_at(drained, records // 10),
            "50%": rss_at(drained, records // 2),
            "90%": rss_at(drained, records * 9 // 10),
        },
        "rss_slope_mib_per_million_records_10_to_90": slope,
        "rss_samples": len(samples),
        "rss_p50_mib_during_drain": round(percentile([s.rss / MIB for s in drained], 50), 1)
        if drained
        else None,
        "drain_seconds": done.get("seconds"),
        "records_per_s": round(records / seconds),
        "appliance_cpu_us_per_record": round(
            float(done.get("cpu_seconds", 0.0)) / records * 1e6, 1
        ),
        "receiver_cpu_us_per_record": round(receiver_cpu / records * 1e6, 1),
        "batches_sent": done.get("batches_sent"),
        "wire_body_bytes_per_record": round(int(done.get("bytes_sent", 0)) / records, 1),
        "receiver_peak_rss_mib": round(receiver_rss / MIB, 1),
        "receiver_db_bytes_per_record": round(receiver_bytes / records),
        "backlog_left": done.get("backlog_left"),
        "receiver_summary": summary,
        "load_averages_during": loads,
        "tracemalloc_growth_10_to_90": done.get("tracemalloc_growth_10_to_90"),
        "ok": ok,
        "pass": {
            "peak_rss": peak <= TARGET_PEAK_RSS_MIB,
            "flat": slope is not None and slope <= TARGET_SLOPE_MIB_PER_M,
        },
    }


async def _create_journal(data_dir: Path) -> None:
    journal = await Journal.open(data_dir, appliance_id=DRAIN_APPLIANCE, settings=JournalSection())
    await journal.close()


# ------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--records", type=int, help="backlog of the drain phase (default 10,000,000; quick 300,000)"
    )
    parser.add_argument(
        "--signal-seconds",
        type=float,
        help="signal time each simulated source runs for the real records (default 3000, quick 1000)",
    )
    parser.add_argument("--profile", choices=PROFILES, default="demo", help="shipped profile")
    parser.add_argument("--only", choices=("compression", "drain"), help="run one phase only")
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="tracemalloc in the drain child: what grew between 10 %% and 90 %% (slow)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir (prints its path)")
    # The drain phase's child process (internal).
    parser.add_argument("--drain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-url", help=argparse.SUPPRESS)
    parser.add_argument("--child-token-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    records: int = args.records or (300_000 if args.quick else 10_000_000)
    if args.drain_child:
        asyncio.run(
            drain_child(
                args.child_data, args.child_url, args.child_token_file, records, args.trace_memory
            )
        )
        return
    signal_s: float = args.signal_seconds or (1000.0 if args.quick else 3000.0)
    root = make_data_root(args.tmp_dir, "bench-sync-backlog-")
    if args.only != "compression":
        free = shutil.disk_usage(root).free
        need = records * DISK_BYTES_PER_RECORD
        if free < need:
            shutil.rmtree(root, ignore_errors=True)
            raise SystemExit(
                f"not enough space in {root.parent}: {free:,} B free, {need:,} B needed "
                f"(journal + receiver copy of {records:,} records)"
            )
    result: dict[str, Any] = {"benchmark": "sync_backlog", "quick": args.quick}
    try:
        box = machine(root)
        progress(f"data dir {root} on {box['data_dir_filesystem']['type']}, load {os.getloadavg()}")
        result["machine"] = box
        result["source"] = sources_measured()
        defaults = SyncSection()
        result["settings"] = {
            "batch_records": defaults.batch_records,
            "batch_bytes": defaults.batch_bytes,
            "small_batch_records": SMALL_BATCH,
            "engine_codec": "gzip-6",
            "drain_records": records,
        }
        if args.only != "drain":
            result["compression"] = compression_phase(root, args.profile, signal_s)
        if args.only != "compression":
            result["drain"] = drain_phase(root, records, args.trace_memory)
            drain = result["drain"]
            progress(
                f"  peak RSS {drain['peak_rss_mib']} MiB, slope "
                f"{drain['rss_slope_mib_per_million_records_10_to_90']} MiB/M, "
                f"{drain['records_per_s']:,} records/s, ok={drain['ok']}"
            )
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result["targets"] = {
        "drain_peak_rss_mib_max": TARGET_PEAK_RSS_MIB,
        "drain_rss_slope_mib_per_million_records_max": TARGET_SLOPE_MIB_PER_M,
    }
    if "drain" in result:
        passed = dict(result["drain"]["pass"])
        passed["ok"] = result["drain"]["ok"]
        result["pass"] = {**passed, "all": all(passed.values())}
    emit(result)


if __name__ == "__main__":
    main()
