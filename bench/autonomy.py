"""Benchmark: disk autonomy. Typical profiles replayed through the real pipeline, the journal's and
the payload store's growth measured, and days of autonomy per GB of disk budget computed from
bytes per record and records per hour of source time; with the profile's tiered telemetry, what a
day costs at each resolution and the days that fit its budget; what a reading's bytes are made of.

Profiles (built from the shipped config files, so they follow them as they change)
  turbine  config/turbine.yaml: its simulated sensors as they are (5 kHz vibration with features
           and limits, one raw window in 600 kept as a sample, the gearbox's anomaly detection) and
           its Modbus converter as a csv source with the same channels at the same poll rate, with
           its window, limits, features and anomaly settings.
  ship     config/ship.yaml: the hull as it is; the bridge's NMEA 0183 as a csv source of the 15
           channels the NMEA decoders produce, from GGA, RMC, VTG, HDT, MWV (relative and true) and
           MTW sentences generated at 1 Hz and parsed by the appliance's own parser, and every
           record stamped with the last fix as `position`, as the daemon does on a ship; the
           reefers' MQTT wildcard as REEFERS channels, one value each a minute; the engine-room
           CSV as ENGINE_CHANNELS channels every ENGINE_ROW_S seconds. Those counts and rates are
           assumptions (the profile does not fix them): see `sources` in the output.
  camera   config/demo.yaml's camera (fps 5, its classes, its zone, its sampling) on one video file
           of the demo's own clip (builtin:bikes: 10 s of a street with people and bicycles in
           view all the time) repeated end to end, each pass a grey level brighter so that no two
           snapshots are the same bytes: a busy scene, where every pass brings new objects and
           zone entries. What an object and a zone alert (with its clip) cost each is measured
           too, and a day of QUIET_SCENE is costed from those.
  Replay refuses live sources, hence the csv stand-ins: the pipeline after the source (windows,
  features, limits, anomalies, the journal) is the same, and a telemetry record's size depends on
  the channels and features, not on how the values arrived.

Protocol per profile, on one data directory, each step `Daemon(cfg, mode="replay").run()` in this
process (what `appliance replay -c CONFIG` runs; the configs are written next to the data dir):
  1. commissioning (profiles with anomaly detection; not measured): the anomaly sources replayed
     for their baseline period, so the measured stretch scores from its first window as a device
     does once its baselines are fitted.
  2. the measured stretch: every source over HOURS of source time (camera: MINUTES of footage).
     Before and after, with the journal closed (WAL checkpointed and truncated): journal.db + WAL
     bytes and the payload files. Journal growth / records = bytes per record; the growth is split
     over record kinds by the journal's own size estimate of each record (`size`). Payload bytes
     are the payload rows' sizes (what the disk budget counts); blocks allocated on this file
     system are reported beside them.
  3. tiers (profiles with `storage.tiers`; `tiered`), on a copy of the journal as the stretch
     left it: only the stretch's records of the sensor sources are kept, in whole buckets of the
     coarsest tier's resolution, the same number for every source, each source moved to one
     common start (csv sources run in 2024, simulated ones from the wall clock; a device's
     sources share one clock), then VACUUMed (an appended journal is dense); health records
     are added, one per health_interval over the window, each the stretch's newest (a replay
     writes them on its much shorter wall time). Measured: the dense copy (full resolution);
     after a `TelemetryRollup` pass with only the first tier, at a data time past every tier's
     age (its 1-minute rollups); after a pass with both tiers (10 minutes, rolled from the
     1-minute ones as a device does at 180 days), each time with the incremental vacuum and
     checkpoint retention runs after a pass, as live pages (`JournalReader.live_bytes`, what
     the disk budget counts; the pages rollups leave half empty count) and VACUUMed beside;
     then only the records no tier touches (alerts, events, anomaly records and windows,
     samples, data quality), VACUUMed. Telemetry a day at a resolution = (its state - that
     last one) x a day / the window; the untouched records and the payloads cost their full
     rate every day, and so do the `rollup_pass` reports (one an hour, at their size
     estimate). Days in the disk budget: the newest `after` days cost the full rate, then each
     tier's rate, the cumulative cost solved for the budget (`days_in_budget`).
  4. what a record is made of (`record_bytes`, the turbine): on a copy of the real journal file
     after the stretch, each reading row of each source taken apart (body keys, values and
     punctuation; the other columns; SQLite's record header, cell and index entry; page slack,
     shared out from `dbstat`), the layout checked against `dbstat`'s own counts; the same
     rows rebuilt at page sizes 4096/8192/16384, and with every body compressed (zlib-6,
     zstd-3/19, zstd-3/19 with a dictionary trained on the stretch's first half, measured on
     its second half): bytes per record, compress and decompress microseconds per body.
  5. anomaly cost (profiles whose anomaly sources are simulated): those sources replayed with one
     injected imbalance fault; records, journal bytes and payload bytes per anomaly started.

Per day = the measured rates x 24, except: bookkeeping records follow wall time, not source time
(`health` every `appliance.health_interval`, counted from the size of the stretch's own health
records; `lifecycle`, `component`, `eviction`, `recovery`, `baseline` are one-offs, left out);
camera samples are capped by the camera's `sampling.per_hour`, `per_day` and `daily_bytes`.
days_per_gb = 1e9 / bytes per day (journal + payloads, as the disk budget counts them).

The data directories go to /dev/shm unless --tmp-dir says otherwise: a replay commits one record
at a time per source, so on a disk it runs at the disk's fsync rate, and the bytes measured are
the same on any file system (but for the whole blocks allocated to payload files, reported as
`allocated_bytes`).

A tiered day is measured on whole buckets of the stretch (`tiered.window`), each state counted
in whole pages (`bytes_per_day.page_resolution`: what one page more or less moves a figure).

Prints one JSON object on stdout; progress on stderr.
`python -m bench.autonomy [--quick] [--profiles turbine ship camera] [--hours H] [--minutes M]`."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import shutil
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import cv2
import numpy as np
import numpy.typing as npt
import yaml

import appliance.daemon
from appliance.daemon import Daemon
from appliance.runtime.logs import setup_logging
from bench.common import (
    base_parser,
    emit,
    machine,
    make_data_root,
    peak_rss_mib,
    progress,
    source_fingerprint,
)
from config import (
    ApplianceConfig,
    Camera,
    CsvSensor,
    JournalSection,
    Limit,
    LiveSensorCommon,
    ModbusSensor,
    MqttSensor,
    NmeaSensor,
    OpcUaSensor,
    SimulatedSensor,
    load_config,
)
from config.sensors import SensorCommon
from sensors.camera import builtin_footage
from sensors.nmea import NMEA_CHANNELS, Position, next_position, nmea_checksum, parse_sentence
from sync.journal import Journal
from sync.payloads import PayloadStore
from sync.reader import JOURNAL_FILE, JournalReader
from sync.records import NewRecord, Priority, format_ts, parse_ts
from sync.rollup import REPORT_KIND as ROLLUP_REPORT_KIND
from sync.rollup import ROLLED_KINDS, ROLLUP_INTERVAL_S, ROLLUP_KIND, TelemetryRollup

ROOT = Path(__file__).resolve().parent.parent
PROFILE_FILES = {
    "turbine": "config/turbine.yaml",
    "ship": "config/ship.yaml",
    "camera": "config/demo.yaml",
}
GB = 1e9
DAY_S = 86_400.0
FloatArray = npt.NDArray[np.float64]

REEFERS = 100
"""Reefer channels behind the ship profile's MQTT wildcard (its config does not fix a number)."""
REEFER_EVERY_S = 60.0
ENGINE_CHANNELS = 24
"""Columns of the ship's engine-room CSV export (its config names the file, not its columns)."""
ENGINE_ROW_S = 10.0
LIVE_EVERY_S = 1.0
"""NMEA sentences and other live sources without a configured rate: one value a second."""
CSV_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
"""Where generated CSV data time starts (simulated sources start at the wall clock)."""

BOOKKEEPING_KINDS = frozenset(
    {"health", "lifecycle", "component", "eviction", "recovery", "baseline"}
)
"""Records the appliance writes on wall time or once per start, not per source time."""
QUIET_SCENE = {"objects_per_hour": 20.0, "zone_alerts_per_day": 5.0}
"""An assumed quiet camera (a yard, a deck, a nacelle door): a few people or vehicles an hour and
a few zone entries a day, costed at the measured bytes per object and per zone alert."""
SEED = 20_240_601
FAULT_MINUTES = 15.0
QUICK_FAULT_MINUTES = 3.0
QUICK_HOURS = 0.75
"""A quick run's sensor stretch: three whole 10-minute buckets at least, for the tiers."""
REPLAY_LIMIT_S = 900.0
RAM_DIR = Path("/dev/shm")
TIERED_TARGET_DAYS = {"turbine": 365.0}
"""Issue 17: the turbine keeps a year of data in its disk budget with its tiers."""
RECORD_BYTES_PROFILES = ("turbine",)
"""Profiles whose reading rows are taken apart byte by byte (`record_bytes`)."""

Rows = list[tuple[datetime, list[float]]]


# ---------------------------------------------------------------------------------- sources


@dataclass
class SourceNote:
    """How one source of the profile was replayed, and what was assumed about it."""

    name: str
    configured: str
    replayed_as: str
    channels: int
    values_every_s: float | None
    window_s: float | None
    assumption: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "configured": self.configured,
            "replayed_as": self.replayed_as,
            "channels": self.channels,
            "values_every_s": self.values_every_s,
            "window_s": self.window_s,
            "assumption": self.assumption,
        }


@dataclass
class Voyage:
    """NMEA data of a ship under way: one row of channel values a second, parsed from real
    sentences, and the positions the daemon would stamp on records."""

    rows: Rows
    positions: list[dict[str, Any]]


def nmea_line(body: str) -> str:
    return f"${body}*{nmea_checksum(body):02X}"


def _dm(value: float, degrees_width: int) -> str:
    """Decimal degrees as NMEA's dddmm.mmmm (the hemisphere goes in its own field)."""
    value = abs(value)
    degrees = int(value)
    minutes = (value - degrees) * 60.0
    return f"{degrees:0{degrees_width}d}{minutes:07.4f}"


def voyage(seconds: float, rng: np.random.Generator) -> Voyage:
    """A ship steaming at ~14 kn on a wandering course: GPGGA, GPRMC, GPVTG, HEHDT, WIMWV (R and
    T) and IIMTW every second, each parsed by sensors.nmea as the source would parse it."""
    rows: Rows = []
    positions: list[dict[str, Any]] = []
    lat, lon = 53.54, 8.58  # leaving the Weser estuary
    course, speed = 310.0, 14.0
    position: Position | None = None
    for second in range(int(seconds)):
        now = CSV_EPOCH + timedelta(seconds=second)
        course = (course + rng.normal(0.0, 0.2)) % 360.0
        speed = float(np.clip(speed + rng.normal(0.0, 0.02), 10.0, 18.0))
        lat += speed / 3600.0 / 60.0 * math.cos(math.radians(course))
        lon += speed / 3600.0 / 60.0 * math.sin(math.radians(course)) / math.cos(math.radians(lat))
        hhmmss = now.strftime("%H%M%S.00")
        ns, ew = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
        lat_dm, lon_dm = _dm(lat, 2), _dm(lon, 3)
        wind_rel = (40.0 + rng.normal(0.0, 5.0)) % 360.0
        sentences = [
            f"GPGGA,{hhmmss},{lat_dm},{ns},{lon_dm},{ew},1,{9 + second % 3},0.9,"
            f"{12.0 + rng.normal(0.0, 0.5):.1f},M,47.0,M,,",
            f"GPRMC,{hhmmss},A,{lat_dm},{ns},{lon_dm},{ew},{speed:.1f},{course:.1f},"
            f"{now:%d%m%y},,,A",
            f"GPVTG,{course:.1f},T,,M,{speed:.1f},N,{speed * 1.852:.1f},K,A",
            f"HEHDT,{(course + rng.normal(0.0, 1.0)) % 360.0:.1f},T",
            f"WIMWV,{wind_rel:.1f},R,{18.0 + rng.normal(0.0, 2.0):.1f},N,A",
            f"WIMWV,{(wind_rel + 20.0) % 360.0:.1f},T,{12.0 + rng.normal(0.0, 2.0):.1f},N,A",
            f"IIMTW,{11.5 + rng.normal(0.0, 0.05):.1f},C",
        ]
        values: dict[str, float] = {}
        for text in sentences:
            sentence = parse_sentence(nmea_line(text))
            position = next_position(position, sentence, now)
            values.update(sentence.values)
        rows.append((now, [values[channel] for channel in NMEA_CHANNELS]))
        if position is not None:
            positions.append(position.as_dict())
    return Voyage(rows, positions)


def level_within_limits(limits: Sequence[Limit], channel: str, rng: np.random.Generator) -> float:
    """A steady level for `channel` well clear of the source's limits: a limit crossing is an
    event, not steady running, and must not inflate the steady-state rate."""
    applying = [limit for limit in limits if limit.channel in (None, channel)]
    above = [limit.above for limit in applying if limit.above is not None]
    below = [limit.below for limit in applying if limit.below is not None]
    high, low = (min(above) if above else None), (max(below) if below else None)
    if high is not None and low is not None:
        return (high + low) / 2.0
    if high is not None:
        return high - 0.8 * max(1.0, abs(high))
    if low is not None:
        return low + 0.8 * max(1.0, abs(low))
    return float(rng.uniform(5.0, 500.0))


def wandering_rows(
    levels: Sequence[float], every_s: float, seconds: float, rng: np.random.Generator
) -> Rows:
    """Plausible slow process values: per channel its level, a slow swing of 3% and noise."""
    count = max(1, int(seconds / every_s))
    t = np.arange(count, dtype=np.float64) * every_s
    level = np.asarray(levels, dtype=np.float64)
    scale = np.maximum(np.abs(level), 1.0)
    periods = rng.uniform(1800.0, 7200.0, level.size)
    values: FloatArray = (
        level[:, None]
        + 0.03 * scale[:, None] * np.sin(2.0 * np.pi * t[None, :] / periods[:, None])
        + 0.002 * scale[:, None] * rng.normal(0.0, 1.0, (level.size, count))
    )
    return [
        (CSV_EPOCH + timedelta(seconds=float(t[i])), [float(v) for v in values[:, i]])
        for i in range(count)
    ]


def write_csv(
    path: Path,
    channels: Sequence[str],
    rows: Rows,
    *,
    delimiter: str = ",",
    timestamp_column: str = "time",
    timestamp_format: str = "epoch_s",
) -> Path:
    def stamp(moment: datetime) -> str:
        if timestamp_format == "iso8601":
            return moment.isoformat().replace("+00:00", "Z")
        seconds = moment.timestamp()
        return f"{seconds * 1000:.0f}" if timestamp_format == "epoch_ms" else f"{seconds:.3f}"

    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(delimiter.join([timestamp_column, *channels]) + "\n")
        for moment, values in rows:
            out.write(delimiter.join([stamp(moment), *(f"{v:.7g}" for v in values)]) + "\n")
    return path


def _common(sensor: SensorCommon) -> dict[str, Any]:
    """The fields every source kind shares (window, limits, features, anomaly, raw samples)."""
    return sensor.model_dump(mode="json", include=set(SensorCommon.model_fields))


def _live_layout(sensor: LiveSensorCommon) -> tuple[list[str], float, str | None]:
    """Channels and seconds between values of a live source, and what had to be assumed."""
    if isinstance(sensor, ModbusSensor):
        return [r.channel for r in sensor.registers], sensor.poll, None
    if isinstance(sensor, OpcUaSensor):
        return [n.channel for n in sensor.nodes], sensor.publishing_interval, None
    if isinstance(sensor, NmeaSensor):
        return list(NMEA_CHANNELS), LIVE_EVERY_S, "1 Hz GPS and instruments"
    if isinstance(sensor, MqttSensor):
        channels: list[str] = []
        assumed = None
        for topic in sensor.topics:
            if topic.channel is not None:
                channels.append(topic.channel)
            elif "+" in topic.topic or "#" in topic.topic:
                pattern = topic.topic.replace("#", "+")
                channels += [
                    pattern.replace("+", f"{n:03d}", 1).replace("+", "x").replace("/", ".")
                    for n in range(1, REEFERS + 1)
                ]
                assumed = f"{REEFERS} channels behind {topic.topic!r}"
            else:
                channels.append(topic.topic.replace("/", "."))
        rate = f"one value per channel every {REEFER_EVERY_S:g} s"
        return channels, REEFER_EVERY_S, f"{assumed}, {rate}" if assumed else rate
    raise ValueError(
        f"source {sensor.name!r}: no csv stand-in for a live {type(sensor).__name__} source"
    )


@dataclass
class Plan:
    """A profile turned into replayable sources."""

    sensors: list[dict[str, Any]]
    cameras: list[dict[str, Any]]
    notes: list[SourceNote]
    positions: list[dict[str, Any]] | None


def plan_sources(
    cfg: ApplianceConfig,
    *,
    seconds: float,
    seconds_of: Mapping[str, float] | None = None,
    seed: int,
    folder: Path,
    only_anomaly: bool = False,
    fault: bool = False,
    clip: Path | None = None,
    baseline_cap_windows: int | None = None,
) -> Plan:
    """Every source of `cfg` as a finite source covering `seconds` of source time (or
    `seconds_of[name]`).

    `only_anomaly`: only sources with anomaly detection (commissioning); `fault`: only simulated
    anomaly sources, each with an imbalance fault over the middle third; `baseline_cap_windows`:
    shorten anomaly baselines to that many windows (quick runs)."""
    rng = np.random.default_rng(seed)
    sensors: list[dict[str, Any]] = []
    notes: list[SourceNote] = []
    positions: list[dict[str, Any]] | None = None
    for index, sensor in enumerate(cfg.sensors):
        if (only_anomaly or fault) and sensor.anomaly is None:
            continue
        if fault and not isinstance(sensor, SimulatedSensor):
            continue
        span = seconds_of.get(sensor.name, seconds) if seconds_of else seconds
        common = _common(sensor)
        if baseline_cap_windows is not None and sensor.anomaly is not None:
            common["anomaly"]["baseline"] = min(
                sensor.anomaly.baseline, baseline_cap_windows * sensor.window
            )
        if isinstance(sensor, SimulatedSensor):
            doc = sensor.model_dump(mode="json")
            doc.update(common)
            doc.update(pace="fast", duration=span, seed=seed + index)
            if fault:
                channel = sensor.channels[0]
                doc["faults"] = [
                    {
                        "kind": "imbalance",
                        "channel": channel.name,
                        "start": span / 3.0,
                        "duration": span / 3.0,
                        "magnitude": 3.0 * max(channel.amplitude, 0.1),
                    }
                ]
            sensors.append(doc)
            notes.append(
                SourceNote(
                    sensor.name,
                    "simulated",
                    "simulated",
                    len(sensor.channels),
                    1.0 / sensor.sample_rate,
                    sensor.window,
                )
            )
            continue
        path = folder / f"{sensor.name}.csv"
        if isinstance(sensor, CsvSensor):
            channel_names = [f"engine_{n:02d}" for n in range(1, ENGINE_CHANNELS + 1)]
            write_csv(
                path,
                channel_names,
                wandering_rows(
                    [level_within_limits(sensor.limits, c, rng) for c in channel_names],
                    ENGINE_ROW_S,
                    span,
                    rng,
                ),
                delimiter=sensor.delimiter,
                timestamp_column=sensor.timestamp_column,
                timestamp_format=sensor.timestamp_format,
            )
            doc = sensor.model_dump(mode="json")
            doc.update(common, path=str(path), pace="fast", columns=None)
            sensors.append(doc)
            notes.append(
                SourceNote(
                    sensor.name,
                    "csv",
                    "csv",
                    ENGINE_CHANNELS,
                    ENGINE_ROW_S,
                    sensor.window,
                    f"{ENGINE_CHANNELS} columns, a row every {ENGINE_ROW_S:g} s",
                )
            )
            continue
        if not isinstance(sensor, LiveSensorCommon):
            raise ValueError(f"source {sensor.name!r}: unknown source type {sensor.type}")
        channel_names, every_s, assumption = _live_layout(sensor)
        if isinstance(sensor, NmeaSensor):
            trip = voyage(span, rng)
            rows = trip.rows
            if sensor.position:
                positions = trip.positions
        else:
            levels = [level_within_limits(sensor.limits, c, rng) for c in channel_names]
            rows = wandering_rows(levels, every_s, span, rng)
        write_csv(path, channel_names, rows)
        sensors.append(
            {
                **common,
                "type": "csv",
                "path": str(path),
                "timestamp_column": "time",
                "timestamp_format": "epoch_s",
                "pace": "fast",
            }
        )
        notes.append(
            SourceNote(
                sensor.name,
                sensor.type,
                "csv",
                len(channel_names),
                every_s,
                sensor.window,
                assumption,
            )
        )
    cameras: list[dict[str, Any]] = []
    if not (only_anomaly or fault):
        for camera in cfg.cameras:
            if clip is None:
                raise ValueError("a profile with cameras needs a clip")
            doc = camera.model_dump(mode="json")
            doc.update(url=str(clip), loop=False)
            cameras.append(doc)
            notes.append(
                SourceNote(
                    camera.name,
                    "camera",
                    "camera (video file)",
                    1,
                    1.0 / camera.fps,
                    None,
                    f"{camera.url} repeated into {seconds / 60:g} min of footage",
                )
            )
    return Plan(sensors, cameras, notes, positions)


def repeated_clip(source: Path, target: Path, seconds: float) -> tuple[Path, int]:
    """`source` played end to end until `seconds` of footage, as one MP4 at its own frame rate.
    Pass k is k grey levels brighter: real footage never repeats, and byte-identical snapshots
    and clips of a repeated file would be stored once (payloads are content-addressed), hiding
    what each event costs."""
    capture = cv2.VideoCapture(str(source))
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS)) or 25.0
        frames = []
        while True:
            ok, image = capture.read()
            if not ok:
                break
            frames.append(image)
    finally:
        capture.release()
    if not frames:
        raise RuntimeError(f"{source}: no frames could be read")
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    total = max(1, round(seconds * fps))
    try:
        for index in range(total):
            passes, position = divmod(index, len(frames))
            writer.write(cv2.convertScaleAbs(frames[position], alpha=1.0, beta=passes))
    finally:
        writer.release()
    return target, total


# ---------------------------------------------------------------------------------- replays


def positioned(provider: Callable[[], Mapping[str, Any] | None]) -> Any:
    """The daemon's Journal with a position provider, as `PositionBoard` installs one when an NMEA
    source has a fix: every record's body gets `position`."""

    class PositionedJournal(Journal):
        @classmethod
        async def open(
            cls,
            data_dir: Path,
            *,
            appliance_id: str,
            settings: JournalSection | None = None,
            payloads: PayloadStore | None = None,
        ) -> Journal:
            journal = await super().open(
                data_dir, appliance_id=appliance_id, settings=settings, payloads=payloads
            )
            journal.position_source = provider
            return journal

    return mock.patch.object(appliance.daemon, "Journal", PositionedJournal)


def cycling(positions: Sequence[Mapping[str, Any]]) -> Callable[[], Mapping[str, Any] | None]:
    """One fix after another, around again: positions vary as they do under way."""
    items = itertools.cycle(positions)
    return lambda: next(items)


@contextmanager
def nothing() -> Iterator[None]:
    yield


def write_replay_config(
    path: Path, base: ApplianceConfig, data_dir: Path, plan: Plan
) -> ApplianceConfig:
    """The replay's config file (kept next to the data for `--keep`), and the config it loads to.
    Storage keeps the profile's budget; min_free and reserve are 0 so that the free space of
    the machine running the benchmark cannot make the appliance shed what it measures."""
    doc = {
        "appliance": {
            **base.appliance.model_dump(mode="json"),
            "data_dir": str(data_dir),
        },
        "storage": {
            **base.storage.model_dump(mode="json"),
            "min_free": 0,
            "reserve": 0,
        },
        "journal": base.journal.model_dump(mode="json"),
        "models": {name: m.model_dump(mode="json") for name, m in base.models.items()},
        "sensors": plan.sensors,
        "cameras": plan.cameras,
        "status": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path, environ={})


def replay(cfg: ApplianceConfig, positions: Sequence[Mapping[str, Any]] | None) -> float:
    """`appliance replay` in this process; its wall seconds. Fails unless it exits 0."""

    async def run() -> int:
        async with asyncio.timeout(REPLAY_LIMIT_S):
            return await Daemon(cfg, mode="replay").run()

    patch = positioned(cycling(positions)) if positions else nothing()
    start = time.perf_counter()
    with patch:
        code = asyncio.run(run())
    if code != 0:
        raise RuntimeError(f"replay of {cfg.appliance.data_dir} exited {code}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class DiskState:
    """The data directory with the journal closed."""

    journal_bytes: int
    payload_files: int
    payload_bytes: int
    payload_allocated_bytes: int
    max_seq: int


def disk_state(data_dir: Path) -> DiskState:
    journal = 0
    for suffix in ("", "-wal"):
        path = data_dir / f"{JOURNAL_FILE}{suffix}"
        if path.exists():
            journal += path.stat().st_size
    files = size = allocated = 0
    root = data_dir / "payloads"
    if root.is_dir():
        for shard in root.iterdir():
            if shard.name == "tmp" or not shard.is_dir():
                continue
            for item in shard.iterdir():
                stat = item.stat()
                files += 1
                size += stat.st_size
                allocated += stat.st_blocks * 512
    with JournalReader.open(data_dir) as reader:
        max_seq = reader.max_seq()
    return DiskState(journal, files, size, allocated, max_seq)


@dataclass
class KindTally:
    """Records of one (source, kind) in a stretch, and what they cost."""

    records: int = 0
    size_estimate: int = 0
    payload_files: int = 0
    payload_bytes: int = 0


@dataclass
class Stretch:
    """What one replay added to the journal, by (source, kind)."""

    tallies: dict[tuple[str, str], KindTally] = field(default_factory=dict)
    anomalies_started: int = 0

    @property
    def records(self) -> int:
        return sum(t.records for t in self.tallies.values())

    @property
    def size_estimate(self) -> int:
        return sum(t.size_estimate for t in self.tallies.values())

    @property
    def payload_bytes(self) -> int:
        return sum(t.payload_bytes for t in self.tallies.values())

    @property
    def payload_files(self) -> int:
        return sum(t.payload_files for t in self.tallies.values())


def stretch_records(data_dir: Path, after_seq: int) -> Stretch:
    """Records after `after_seq`: counts, the journal's size estimates, and the payloads they
    brought (each payload once, to the first record referring to it)."""
    stretch = Stretch()
    seen: set[str] = set()
    with JournalReader.open(data_dir) as reader:
        sizes = {
            sha: int(size) for sha, size in reader.conn.execute("SELECT sha256, size FROM payloads")
        }
        rows = reader.conn.execute(
            "SELECT source, kind, size, payloads, body FROM records WHERE seq > ? ORDER BY seq",
            (after_seq,),
        )
        for source, kind, size, payloads, body in rows:
            tally = stretch.tallies.setdefault((source, kind), KindTally())
            tally.records += 1
            tally.size_estimate += int(size)
            for sha in json.loads(payloads) if payloads else ():
                if sha in seen:
                    continue
                seen.add(sha)
                tally.payload_files += 1
                tally.payload_bytes += sizes.get(sha, 0)
            if kind == "anomaly" and json.loads(body).get("kind") == "started":
                stretch.anomalies_started += 1
    return stretch


def create_journal(data_dir: Path, appliance_id: str, settings: JournalSection) -> None:
    async def create() -> None:
        journal = await Journal.open(data_dir, appliance_id=appliance_id, settings=settings)
        await journal.close()

    asyncio.run(create())


def significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits: days run from hours to years."""
    return float(f"{value:.{digits}g}")


def capped_samples(
    camera: Camera, per_hour: float, bytes_each: float
) -> tuple[float, float, str | None]:
    """Samples per day and their payload bytes under the camera's sampling caps; which cap
    bound (None: none did)."""
    wanted = per_hour * 24.0
    caps = {
        "per_hour": camera.sampling.per_hour * 24.0,
        "per_day": float(camera.sampling.per_day),
    }
    if bytes_each > 0:
        caps["daily_bytes"] = camera.sampling.daily_bytes / bytes_each
    bound = min(caps, key=lambda name: caps[name])
    if caps[bound] >= wanted:
        return wanted, wanted * bytes_each, None
    return caps[bound], caps[bound] * bytes_each, bound


def profile_result(
    cfg: ApplianceConfig,
    hours: float,
    stretch: Stretch,
    before: DiskState,
    after: DiskState,
) -> dict[str, Any]:
    """Rates, bytes per record and the autonomy of one profile's measured stretch."""
    growth = after.journal_bytes - before.journal_bytes
    # Journal file bytes per byte of the journal's own estimate (page slack, indexes).
    factor = growth / stretch.size_estimate if stretch.size_estimate else 0.0
    cameras = {camera.name: camera for camera in cfg.cameras}
    by_kind: dict[str, dict[str, float]] = {}
    per_day_journal = per_day_payload = per_day_records = 0.0
    capped: dict[str, Any] = {}
    bookkeeping: dict[str, int] = {}
    by_source: dict[str, dict[str, float]] = {}
    for (source, kind), tally in sorted(stretch.tallies.items()):
        journal_bytes = tally.size_estimate * factor
        if kind in BOOKKEEPING_KINDS:
            bookkeeping[kind] = bookkeeping.get(kind, 0) + tally.records
            continue
        row = by_kind.setdefault(
            kind,
            {"records": 0, "journal_bytes": 0.0, "payload_files": 0, "payload_bytes": 0},
        )
        row["records"] += tally.records
        row["journal_bytes"] += journal_bytes
        row["payload_files"] += tally.payload_files
        row["payload_bytes"] += tally.payload_bytes
        mine = by_source.setdefault(
            source, {"records": 0, "journal_bytes": 0.0, "payload_bytes": 0}
        )
        mine["records"] += tally.records
        mine["journal_bytes"] += journal_bytes
        mine["payload_bytes"] += tally.payload_bytes
        per_hour = tally.records / hours
        day_records = per_hour * 24.0
        day_journal = journal_bytes / hours * 24.0
        day_payload = tally.payload_bytes / hours * 24.0
        if kind == "sample" and source in cameras and tally.records:
            each = tally.payload_bytes / tally.records
            day_records, day_payload, bound = capped_samples(cameras[source], per_hour, each)
            day_journal = day_records * journal_bytes / tally.records
            capped[source] = {
                "measured_per_hour": round(per_hour, 2),
                "per_day": round(day_records, 1),
                "bound_by": bound,
                "payload_bytes_each": round(each),
                "bytes_per_day": round(day_journal + day_payload),
            }
        per_day_records += day_records
        per_day_journal += day_journal
        per_day_payload += day_payload
    health = [t for (_, kind), t in stretch.tallies.items() if kind == "health"]
    health_records = sum(t.records for t in health)
    health_each = (
        sum(t.size_estimate for t in health) * factor / health_records if health_records else 0.0
    )
    health_per_day = DAY_S / cfg.appliance.health_interval
    per_day_records += health_per_day
    per_day_journal += health_per_day * health_each
    total_per_day = per_day_journal + per_day_payload
    measured = sum(int(row["records"]) for row in by_kind.values())
    camera_events = (
        scene_costs(stretch, factor, hours, cfg, capped, health_per_day * health_each)
        if cameras
        else None
    )
    return {
        "source_hours": hours,
        "records": {
            "in_stretch": stretch.records,
            "measured": measured,
            "bookkeeping": bookkeeping,
            "per_hour": round(measured / hours, 1),
        },
        "by_kind": {
            kind: {
                "records": int(row["records"]),
                "per_hour": round(row["records"] / hours, 2),
                "journal_bytes": round(row["journal_bytes"]),
                "journal_bytes_per_record": round(row["journal_bytes"] / row["records"], 1),
                "payload_files": int(row["payload_files"]),
                "payload_bytes": int(row["payload_bytes"]),
                "payload_bytes_per_record": round(row["payload_bytes"] / row["records"], 1),
            }
            for kind, row in sorted(by_kind.items())
        },
        "by_source": {
            source: {
                "records": int(row["records"]),
                "per_hour": round(row["records"] / hours, 2),
                "journal_bytes_per_record": round(row["journal_bytes"] / row["records"], 1),
                "payload_bytes_per_hour": round(row["payload_bytes"] / hours),
            }
            for source, row in sorted(by_source.items())
        },
        "journal": {
            "bytes_before": before.journal_bytes,
            "bytes_after": after.journal_bytes,
            "growth_bytes": growth,
            "records": stretch.records,
            "bytes_per_record": round(growth / stretch.records, 1) if stretch.records else None,
            "size_estimate_bytes": stretch.size_estimate,
            "file_bytes_per_estimated_byte": round(factor, 3),
        },
        "payloads": {
            "files": after.payload_files - before.payload_files,
            "bytes": after.payload_bytes - before.payload_bytes,
            "allocated_bytes": after.payload_allocated_bytes - before.payload_allocated_bytes,
            "bytes_by_rows": stretch.payload_bytes,
        },
        "health": {
            "interval_s": cfg.appliance.health_interval,
            "records_per_day": round(health_per_day, 1),
            "bytes_per_record": round(health_each, 1),
        },
        "camera_samples": capped,
        "camera_events": camera_events,
        "per_day": {
            "records": round(per_day_records),
            "journal_bytes": round(per_day_journal),
            "payload_bytes": round(per_day_payload),
            "total_bytes": round(total_per_day),
        },
        "days_per_gb": significant(GB / total_per_day) if total_per_day else None,
        "disk_budget_bytes": cfg.storage.disk_budget,
        "days_in_disk_budget": (
            significant(cfg.storage.disk_budget / total_per_day) if total_per_day else None
        ),
    }


def scene_costs(
    stretch: Stretch,
    factor: float,
    hours: float,
    cfg: ApplianceConfig,
    samples: Mapping[str, Mapping[str, Any]],
    health_bytes_per_day: float,
) -> dict[str, Any]:
    """What a camera's events cost each (an object with its snapshot; a zone entry with its
    snapshot; a clip), measured, and a day of QUIET_SCENE at those costs, one clip per zone
    alert (on a busy scene one clip covers several entries)."""
    cameras = {camera.name for camera in cfg.cameras}

    def each(kind: str) -> tuple[float, int]:
        tallies = [t for (src, k), t in stretch.tallies.items() if src in cameras and k == kind]
        records = sum(t.records for t in tallies)
        spent = sum(t.size_estimate * factor + t.payload_bytes for t in tallies)
        return (spent / records if records else 0.0), records

    object_each, objects = each("object")
    entry_each, entries = each("zone_entry")
    clip_each, clips = each("clip")
    sample_bytes_per_day = sum(float(s["bytes_per_day"]) for s in samples.values())
    quiet_per_day = (
        QUIET_SCENE["objects_per_hour"] * 24.0 * object_each * len(cameras)
        + QUIET_SCENE["zone_alerts_per_day"] * (entry_each + clip_each) * len(cameras)
        + sample_bytes_per_day
        + health_bytes_per_day
    )
    return {
        "object": {"per_hour": round(objects / hours, 1), "bytes_each": round(object_each)},
        "zone_entry": {"per_hour": round(entries / hours, 1), "bytes_each": round(entry_each)},
        "clip": {"per_hour": round(clips / hours, 1), "bytes_each": round(clip_each)},
        "quiet_scene": {
            "assumed_per_camera": QUIET_SCENE,
            "samples_bytes_per_day": round(sample_bytes_per_day),
            "health_bytes_per_day": round(health_bytes_per_day),
            "total_bytes_per_day": round(quiet_per_day),
            "days_per_gb": significant(GB / quiet_per_day) if quiet_per_day else None,
            "days_in_disk_budget": (
                significant(cfg.storage.disk_budget / quiet_per_day) if quiet_per_day else None
            ),
        },
    }


def anomaly_cost(stretch: Stretch, factor: float) -> dict[str, Any]:
    """Records and bytes the anomaly stage wrote per anomaly started."""
    tallies = [
        t for (_, kind), t in stretch.tallies.items() if kind in ("anomaly", "anomaly_window")
    ]
    records = sum(t.records for t in tallies)
    journal_bytes = sum(t.size_estimate for t in tallies) * factor
    payload_bytes = sum(t.payload_bytes for t in tallies)
    started = stretch.anomalies_started
    return {
        "anomalies_started": started,
        "records": records,
        "journal_bytes": round(journal_bytes),
        "payload_bytes": payload_bytes,
        "per_anomaly": (
            {
                "records": round(records / started, 2),
                "journal_bytes": round(journal_bytes / started),
                "payload_bytes": round(payload_bytes / started),
                "total_bytes": round((journal_bytes + payload_bytes) / started),
            }
            if started
            else None
        ),
    }


# ------------------------------------------------------------------------- tiered telemetry


@dataclass(frozen=True)
class TierWindow:
    """What the tier copy holds: `buckets` whole buckets of `bucket_s` seconds (the coarsest
    tier's resolution) of every sensor source, each source moved to start at `start`."""

    start: datetime
    buckets: int
    bucket_s: int
    shifted_s: dict[str, float]

    @property
    def seconds(self) -> float:
        return float(self.buckets * self.bucket_s)


@dataclass(frozen=True)
class JournalBytes:
    """One state of the tier copy, the journal closed and its WAL checkpointed."""

    live: int
    """Pages in use (free pages left out): what the disk budget counts (JournalReader.live_bytes)."""
    dense: int
    """The same rows VACUUMed into a scratch file: what the pages would be without slack."""
    records: int
    by_kind: dict[str, int]
    """The journal's size estimate per kind (a rollup under `rollup:<kind it rolled>`)."""
    page_size: int

    def to_dict(self, scale: float) -> dict[str, Any]:
        return {
            "live_bytes": self.live,
            "dense_bytes": self.dense,
            "records": self.records,
            "estimated_bytes_per_day_by_kind": {
                kind: round(size * scale) for kind, size in sorted(self.by_kind.items())
            },
        }


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


def _aligned(moment: float, size: int, *, up: bool) -> int:
    return (math.ceil(moment / size) if up else math.floor(moment / size)) * size


def prepare_tier_copy(
    data_dir: Path,
    target: Path,
    *,
    first_seq: int,
    last_seq: int,
    sources: Sequence[str],
    bucket_s: int,
) -> TierWindow:
    """Copy data_dir's journal into `target` (payload files stay where they are: rollups never
    touch them) and keep the measured stretch's records (`first_seq`..`last_seq`) of `sources`
    in whole buckets of `bucket_s`, the same number of buckets for every source, each source
    moved to one common start (whole buckets, so that every tier's buckets line up as on a
    device whose sources share one clock: the replay's csv sources run in 2024, its simulated
    ones from the wall clock). Then VACUUM: the copy starts dense, as an appended journal is."""
    target.mkdir(parents=True)
    for item in data_dir.iterdir():
        if item.is_file() and item.name != "journal.lock":
            shutil.copy2(item, target / item.name)
    conn = sqlite3.connect(target / JOURNAL_FILE, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            f"DELETE FROM records WHERE seq < ? OR seq > ? OR source NOT IN ({_marks(sources)}) "
            f"OR kind IN ({_marks(sorted(BOOKKEEPING_KINDS))})",
            (first_seq, last_seq, *sources, *sorted(BOOKKEEPING_KINDS)),
        )
        firsts: dict[str, int] = {}
        whole: dict[str, int] = {}
        for source, low, high in conn.execute(
            "SELECT source, MIN(ts), MAX(ts) FROM records GROUP BY source"
        ).fetchall():
            first = _aligned(parse_ts(low).timestamp(), bucket_s, up=True)
            # The bucket the last record starts in may end past the stretch: not whole.
            end = _aligned(parse_ts(high).timestamp(), bucket_s, up=False)
            firsts[str(source)] = first
            whole[str(source)] = (end - first) // bucket_s
        if not whole or min(whole.values()) < 1:
            raise ValueError(
                f"the measured stretch holds no whole {bucket_s} s bucket of every source "
                f"({whole}): run with more --hours"
            )
        buckets = min(whole.values())
        start = max(firsts.values())
        for source, first in firsts.items():
            conn.execute(
                "DELETE FROM records WHERE source = ? AND (ts < ? OR ts >= ?)",
                (
                    source,
                    format_ts(datetime.fromtimestamp(first, UTC)),
                    format_ts(datetime.fromtimestamp(first + buckets * bucket_s, UTC)),
                ),
            )
            shift = timedelta(seconds=start - first)
            if shift:
                moved = [
                    (format_ts(parse_ts(ts) + shift), seq)
                    for seq, ts in conn.execute(
                        "SELECT seq, ts FROM records WHERE source = ?", (source,)
                    ).fetchall()
                ]
                conn.executemany("UPDATE records SET ts = ? WHERE seq = ?", moved)
        # Nothing has shipped anywhere in the copy; the counts and payload rows follow the rows
        # kept (the payloads table's rows are journal bytes too).
        for table in ("cursors", "acks", "payload_outbox"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute(
            "DELETE FROM payloads WHERE sha256 NOT IN (SELECT j.value FROM records r, "
            "json_each(r.payloads) j WHERE r.payloads IS NOT NULL)"
        )
        conn.execute("DELETE FROM counts")
        conn.execute(
            "INSERT INTO counts (priority, kind, records, bytes) "
            "SELECT priority, kind, COUNT(*), SUM(size) FROM records GROUP BY priority, kind"
        )
        conn.execute("COMMIT")
        conn.execute("VACUUM")
    finally:
        conn.close()
    return TierWindow(
        start=datetime.fromtimestamp(start, UTC),
        buckets=buckets,
        bucket_s=bucket_s,
        shifted_s={source: float(start - first) for source, first in sorted(firsts.items())},
    )


def measure_journal(data_dir: Path) -> JournalBytes:
    """The closed journal's live pages, its VACUUMed size, and its records by kind."""
    scratch = data_dir / "vacuumed.db"
    scratch.unlink(missing_ok=True)
    conn = sqlite3.connect(data_dir / JOURNAL_FILE, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        live = JournalReader(conn).live_bytes()
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        by_kind: dict[str, int] = {}
        records = 0
        for kind, of_kind, count, size in conn.execute(
            "SELECT kind, CASE WHEN kind = ? THEN json_extract(body, '$.of') END, COUNT(*), "
            "SUM(size) FROM records GROUP BY 1, 2",
            (ROLLUP_KIND,),
        ).fetchall():
            name = f"{kind}:{of_kind}" if of_kind else str(kind)
            by_kind[name] = by_kind.get(name, 0) + int(size)
            records += int(count)
        conn.execute("VACUUM INTO ?", (str(scratch),))
    finally:
        conn.close()
    dense = scratch.stat().st_size
    scratch.unlink()
    return JournalBytes(live, dense, records, by_kind, page_size)


def never_rolled(data_dir: Path) -> list[tuple[int, str, int, str]]:
    """Every record tiers must never touch (alerts, events, anomaly records and windows,
    samples, data-quality records...), as (seq, kind, size, body)."""
    conn = sqlite3.connect(data_dir / JOURNAL_FILE)
    try:
        return [
            (int(seq), str(kind), int(size), str(body))
            for seq, kind, size, body in conn.execute(
                f"SELECT seq, kind, size, body FROM records WHERE kind NOT IN "
                f"({_marks(ROLLED_KINDS)}) ORDER BY seq",
                ROLLED_KINDS,
            )
        ]
    finally:
        conn.close()


def rolled_counts(data_dir: Path) -> dict[str, int]:
    """Telemetry records by kind, each rollup counted as the records it replaced: the same
    before and after every pass when nothing was lost or counted twice."""
    conn = sqlite3.connect(data_dir / JOURNAL_FILE)
    try:
        out: dict[str, int] = {}
        for kind, count in conn.execute(
            "SELECT CASE WHEN kind = ? THEN json_extract(body, '$.of') ELSE kind END, "
            "SUM(CASE WHEN kind = ? THEN json_extract(body, '$.replaces.records') ELSE 1 END) "
            f"FROM records WHERE kind IN ({_marks(ROLLED_KINDS)}) GROUP BY 1",
            (ROLLUP_KIND, ROLLUP_KIND, *ROLLED_KINDS),
        ).fetchall():
            out[str(kind)] = int(count)
        return out
    finally:
        conn.close()


def take_reports(data_dir: Path) -> list[int]:
    """Remove the `rollup_pass` reports the passes journalled (their size estimates are
    returned): one report stands for a pass over the whole stretch, where a device journals
    one an hour; they are costed per day on their own."""
    conn = sqlite3.connect(data_dir / JOURNAL_FILE, isolation_level=None)
    try:
        sizes = [
            int(size)
            for (size,) in conn.execute(
                "SELECT size FROM records WHERE kind = ?", (ROLLUP_REPORT_KIND,)
            )
        ]
        conn.execute("DELETE FROM records WHERE kind = ?", (ROLLUP_REPORT_KIND,))
        conn.execute("DELETE FROM counts WHERE kind = ?", (ROLLUP_REPORT_KIND,))
        return sizes
    finally:
        conn.close()


def keep_only_never_rolled(data_dir: Path) -> None:
    conn = sqlite3.connect(data_dir / JOURNAL_FILE, isolation_level=None)
    try:
        conn.execute(f"DELETE FROM records WHERE kind IN ({_marks(ROLLED_KINDS)})", ROLLED_KINDS)
        conn.execute("VACUUM")
    finally:
        conn.close()


async def _with_journal(
    cfg: ApplianceConfig, data_dir: Path, work: Callable[[Journal], Any]
) -> Any:
    journal = await Journal.open(data_dir, appliance_id=cfg.appliance.id, settings=cfg.journal)
    try:
        return await work(journal)
    finally:
        await journal.close()


def add_health(
    cfg: ApplianceConfig, data_dir: Path, window: TierWindow, body: Mapping[str, Any]
) -> int:
    """The health records a device journals over the window (one per health_interval, of wall
    time; a replay writes them on its own, much shorter, wall time), each the stretch's newest.
    Appended after the stretch's records: a device interleaves them, the same rows on slightly
    different pages."""
    interval = cfg.appliance.health_interval
    count = int(window.seconds // interval)

    async def append(journal: Journal) -> None:
        await journal.append_many(
            [
                NewRecord(
                    "appliance",
                    "health",
                    Priority.TELEMETRY,
                    body,
                    ts=window.start + timedelta(seconds=i * interval),
                )
                for i in range(count)
            ]
        )

    asyncio.run(_with_journal(cfg, data_dir, append))
    return count


def roll_up(cfg: ApplianceConfig, data_dir: Path, tiers: int, now: datetime) -> None:
    """One TelemetryRollup pass with the profile's first `tiers` tiers at data time `now`, then
    what retention does after a pass that rolled something up (incremental vacuum, checkpoint)."""
    storage = cfg.storage.model_copy(update={"tiers": cfg.storage.tiers[:tiers]})

    async def run(journal: Journal) -> None:
        rollup = TelemetryRollup(journal, storage, batch_records=cfg.sync.batch_records)
        await rollup.run_once(now=now)
        await journal.execute_write(
            lambda conn: conn.executescript("PRAGMA incremental_vacuum;"), transaction=False
        )
        await journal.checkpoint()

    asyncio.run(_with_journal(cfg, data_dir, run))


def rollup_tallies(data_dir: Path) -> list[dict[str, Any]]:
    with JournalReader.open(data_dir) as reader:
        return [
            {
                "resolution_s": resolution,
                "of": of_kind,
                "records_replaced": records,
                "rollups": rollups,
                "estimated_bytes_before": before,
                "estimated_bytes_after": after,
            }
            for resolution, of_kind, records, rollups, before, after in reader.rollups()
        ]


def days_in_budget(budget: float, segments: Sequence[tuple[float, float]]) -> float:
    """Days of data that fit `budget` bytes when the data of age [start_i, start_i+1) days
    costs rate_i bytes a day (`segments`: (start_i, rate_i), the first starting at 0, the last
    running on): the cumulative cost solved for the age where it reaches the budget."""
    if not segments or segments[0][0] != 0:
        raise ValueError("the first segment must start at day 0")
    spent = 0.0
    for index, (start, rate) in enumerate(segments):
        end = segments[index + 1][0] if index + 1 < len(segments) else math.inf
        if rate <= 0:
            continue
        if end == math.inf or spent + rate * (end - start) >= budget:
            return start + (budget - spent) / rate
        spent += rate * (end - start)
    return math.inf


def tiered_result(
    cfg: ApplianceConfig,
    window: TierWindow,
    states: Mapping[str, JournalBytes],
    *,
    payload_bytes: int,
    report_sizes: Sequence[int],
    fixed_bytes: int,
    untiered_bytes_per_day: float,
) -> dict[str, Any]:
    """Bytes per data day at each resolution and days in the disk budget with the tiers.

    `states`: "full" (the copy before any pass, dense), one per tier's resolution in seconds
    (after the pass that added that tier: live pages, as the budget counts them), and "kept"
    (only the records no tier touches, dense). Telemetry at a resolution = its state - kept;
    the never-rolled records = kept - the empty journal's pages."""
    scale = DAY_S / window.seconds
    kept = states["kept"]
    never_rolled_journal = (kept.live - fixed_bytes) * scale
    payloads = payload_bytes * scale
    reports = (
        DAY_S / ROLLUP_INTERVAL_S * (sum(report_sizes) / len(report_sizes)) if report_sizes else 0
    )
    always = never_rolled_journal + payloads + reports
    resolutions = [int(tier.resolution) for tier in cfg.storage.tiers]
    telemetry = {"full": (states["full"].live - kept.live) * scale}
    for resolution in resolutions:
        telemetry[str(resolution)] = (states[str(resolution)].live - kept.live) * scale
    segments = [(0.0, telemetry["full"] + always)] + [
        (tier.after / DAY_S, telemetry[str(int(tier.resolution))] + always)
        for tier in cfg.storage.tiers
    ]
    days = days_in_budget(cfg.storage.disk_budget, segments)
    coarsest = segments[-1][1]
    return {
        "tiers": [
            {"after_days": tier.after / DAY_S, "resolution_s": int(tier.resolution)}
            for tier in cfg.storage.tiers
        ],
        "window": {
            "buckets": window.buckets,
            "bucket_s": window.bucket_s,
            "data_hours": round(window.seconds / 3600.0, 3),
            "start": format_ts(window.start),
            "sources_shifted_s": window.shifted_s,
        },
        "states": {name: state.to_dict(scale) for name, state in states.items()},
        "bytes_per_day": {
            "telemetry": {name: round(value) for name, value in telemetry.items()},
            "never_rolled_records": round(never_rolled_journal),
            "payloads": round(payloads),
            "rollup_reports": round(reports),
            "total": {name: round(value + always) for name, value in telemetry.items()},
            # Each state is counted in whole pages: one page more or less in a state moves
            # its figures by this much.
            "page_resolution": round(states["full"].page_size * scale),
        },
        "full_total_vs_untiered": round((telemetry["full"] + always) / untiered_bytes_per_day, 3),
        "slack_after_rollups": {
            str(r): round(states[str(r)].live / states[str(r)].dense, 3) for r in resolutions
        },
        "past_last_tier_shares": {
            "telemetry": round((coarsest - always) / coarsest, 3),
            "never_rolled_records": round(never_rolled_journal / coarsest, 3),
            "payloads": round(payloads / coarsest, 3),
            "rollup_reports": round(reports / coarsest, 3),
        },
        "disk_budget_bytes": cfg.storage.disk_budget,
        "days_in_disk_budget": significant(days),
    }


def measure_tiers(
    name: str,
    cfg: ApplianceConfig,
    data_dir: Path,
    folder: Path,
    *,
    first_seq: int,
    last_seq: int,
    untiered_bytes_per_day: float,
) -> dict[str, Any]:
    """The measured stretch rolled up tier by tier on a copy of its journal."""
    tiers = cfg.storage.tiers
    coarsest = int(tiers[-1].resolution)
    copy_dir = folder / "tiers"
    window = prepare_tier_copy(
        data_dir,
        copy_dir,
        first_seq=first_seq,
        last_seq=last_seq,
        sources=[sensor.name for sensor in cfg.sensors],
        bucket_s=coarsest,
    )
    with JournalReader.open(data_dir) as reader:
        found = reader.conn.execute(
            "SELECT body FROM records WHERE kind = 'health' AND seq BETWEEN ? AND ? "
            "ORDER BY seq DESC LIMIT 1",
            (first_seq, last_seq),
        ).fetchone()
    health = add_health(cfg, copy_dir, window, json.loads(found[0])) if found else 0
    with JournalReader.open(copy_dir) as reader:
        fixed = reader.fixed_bytes()
        payload_bytes = reader.payload_totals()[1]
        newest = parse_ts(reader.conn.execute("SELECT MAX(ts) FROM records").fetchone()[0])
    # Every record is past every tier's age at this data time.
    now = newest + timedelta(seconds=tiers[-1].after + 2 * DAY_S)
    progress(
        f"{name}: tiers on {window.buckets} whole {coarsest} s buckets "
        f"({window.seconds / 3600:.2f} h), {health} health records added"
    )
    untouched = never_rolled(copy_dir)
    counted = rolled_counts(copy_dir)
    states = {"full": measure_journal(copy_dir)}
    reports: list[int] = []
    accounted = True
    for index, tier in enumerate(tiers, start=1):
        roll_up(cfg, copy_dir, index, now)
        reports += take_reports(copy_dir)
        states[str(int(tier.resolution))] = measure_journal(copy_dir)
        accounted = accounted and rolled_counts(copy_dir) == counted
    kept_whole = never_rolled(copy_dir) == untouched
    tallies = rollup_tallies(copy_dir)
    keep_only_never_rolled(copy_dir)
    states["kept"] = measure_journal(copy_dir)
    result = tiered_result(
        cfg,
        window,
        states,
        payload_bytes=payload_bytes,
        report_sizes=reports,
        fixed_bytes=fixed,
        untiered_bytes_per_day=untiered_bytes_per_day,
    )
    never = Counter(kind for _, kind, _, _ in untouched)
    result.update(
        {
            "health_records_added": health,
            "never_rolled_in_window": dict(sorted(never.items())),
            "rolled_in_window": counted,
            "rollups": tallies,
            "rollup_report_estimated_bytes": (
                round(sum(reports) / len(reports)) if reports else None
            ),
            "checks": {
                "never_rolled_records_unchanged": kept_whole,
                "every_reading_and_health_record_accounted_once": accounted,
                "rates_fall_tier_by_tier": all(
                    a > b
                    for a, b in itertools.pairwise(
                        [states["full"].live] + [states[str(int(t.resolution))].live for t in tiers]
                    )
                ),
            },
        }
    )
    target = TIERED_TARGET_DAYS.get(name)
    if target is not None:
        result["target"] = {
            "days": target,
            "met": result["days_in_disk_budget"] >= target,
            "margin_days": significant(result["days_in_disk_budget"] - target),
        }
    return result


# ---------------------------------------------------------------------- what a record is made of

RECORD_COLUMNS = (
    "seq",
    "appliance_id",
    "boot_id",
    "ts",
    "mono_ns",
    "source",
    "kind",
    "priority",
    "model",
    "body",
    "payloads",
    "size",
)
"""The records table's columns in their order (sync/migrations.py); seq is the rowid."""
RECORDS_INDEX = "records_priority_seq"
PAGE_SIZES = (4096, 8192, 16384)
DICTIONARY_BYTES = 16_384
TIMING_ROUNDS = 3

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def varint_bytes(value: int) -> int:
    """Bytes of SQLite's variable-length integer (7 bits a byte, the ninth byte takes 8)."""
    if value < 0:
        return 9
    for size in range(1, 9):
        if value < 1 << (7 * size):
            return size
    return 9


def serial(value: object) -> tuple[int, int]:
    """(serial type, content bytes) of one value in a SQLite record (file format 4)."""
    if value is None:
        return 0, 0
    if isinstance(value, int):
        if value in (0, 1):
            return 8 + value, 0
        for code, size in ((1, 1), (2, 2), (3, 3), (4, 4), (5, 6)):
            if -(1 << (8 * size - 1)) <= value < 1 << (8 * size - 1):
                return code, size
        return 6, 8
    if isinstance(value, float):
        return 7, 8
    if isinstance(value, str):
        size = len(value.encode())
        return 2 * size + 13, size
    if isinstance(value, bytes):
        return 2 * len(value) + 12, len(value)
    raise TypeError(f"no SQLite serial type for {type(value).__name__}")


def record_layout(values: Sequence[object]) -> tuple[int, list[int]]:
    """(header bytes, content bytes per value) of the record SQLite stores for `values`."""
    types = [serial(value) for value in values]
    body = sum(varint_bytes(code) for code, _ in types)
    header = body + 1
    while varint_bytes(header) + body != header:
        header = varint_bytes(header) + body
    return header, [size for _, size in types]


def json_parts(text: str) -> dict[str, int] | None:
    """A compact JSON body's bytes: key names, values (numbers, strings without their quotes,
    true/false/null), and punctuation (braces, brackets, colons, commas, quotes). None when
    the text is not compact JSON as the journal writes it (then the split would be a guess)."""
    document = json.loads(text)
    if _compact(document) != text:
        return None
    keys = values = key_count = value_count = 0

    def walk(item: Any) -> None:
        nonlocal keys, values, key_count, value_count
        if isinstance(item, dict):
            for key, inner in item.items():
                keys += len(_compact(key).encode()) - 2
                key_count += 1
                walk(inner)
        elif isinstance(item, list):
            for inner in item:
                walk(inner)
        else:
            encoded = len(_compact(item).encode())
            values += encoded - 2 if isinstance(item, str) else encoded
            value_count += 1

    walk(document)
    total = len(text.encode())
    return {
        "bytes": total,
        "keys": keys,
        "values": values,
        "punctuation": total - keys - values,
        "key_count": key_count,
        "value_count": value_count,
    }


def btree_pages(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Per table and index (sqlite's dbstat): pages, cells, payload, unused and page bytes."""
    return {
        str(name): {
            "pages": int(pages),
            "cells": int(cells),
            "payload": int(payload),
            "unused": int(unused),
            "bytes": int(size),
        }
        for name, pages, cells, payload, unused, size in conn.execute(
            "SELECT name, COUNT(*), SUM(ncell), SUM(payload), SUM(unused), SUM(pgsize) "
            "FROM dbstat GROUP BY name"
        )
    }


def file_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])


def grown_bytes(conn: sqlite3.Connection) -> int:
    """File bytes beyond an empty journal's (a root page per table and index, and page 1):
    what the rows cost, the part that grows with them."""
    return file_bytes(conn) - JournalReader(conn).fixed_bytes()


@dataclass(frozen=True)
class RowLayout:
    """One records row as SQLite stores it, in bytes."""

    header: int
    columns: list[int]
    """Per column of RECORD_COLUMNS after seq (seq is the rowid: in the cell, not the record)."""
    cell_overhead: int
    """The payload-size and rowid varints and the cell's 2-byte pointer."""
    index_record: int
    """Its entry in the (priority, seq) index: priority, seq and the rowid (seq again)."""

    @property
    def index_entry(self) -> int:
        """The index cell: its record, its payload-size varint and its 2-byte pointer."""
        return varint_bytes(self.index_record) + self.index_record + 2


@dataclass
class RowBytes:
    """Sums over the rows of one group (a source's readings, or every row), in bytes."""

    rows: int = 0
    body: Counter[str] = field(default_factory=Counter)
    columns: Counter[str] = field(default_factory=Counter)
    header: int = 0
    cell_overhead: int = 0
    index_entry: int = 0
    index_record: int = 0
    not_compact: int = 0

    def add(self, layout: RowLayout) -> None:
        self.rows += 1
        self.header += layout.header
        self.columns.update(dict(zip(RECORD_COLUMNS[1:], layout.columns, strict=True)))
        self.cell_overhead += layout.cell_overhead
        self.index_entry += layout.index_entry
        self.index_record += layout.index_record

    @property
    def record(self) -> int:
        return self.header + sum(self.columns.values())

    @property
    def cell(self) -> int:
        return self.record + self.cell_overhead


def row_layout(values: Sequence[Any]) -> RowLayout:
    """A records row (values in RECORD_COLUMNS order) as SQLite lays it out. A row too long for
    its page also has a 4-byte overflow pointer, left out: no reading comes near 4 kB."""
    seq, priority = int(values[0]), values[7]
    header, sizes = record_layout([None, *values[1:]])
    index_header, index_sizes = record_layout([priority, seq, seq])
    return RowLayout(
        header=header,
        columns=sizes[1:],
        cell_overhead=varint_bytes(header + sum(sizes)) + varint_bytes(seq) + 2,
        index_record=index_header + sum(index_sizes),
    )


def rebuild(
    source: Path, target: Path, page_size: int, squeeze: Callable[[str], bytes] | None = None
) -> sqlite3.Connection:
    """The same schema and rows in a new file at `page_size`, inserted in rowid order as the
    journal appends them (indexes made first, so they grow as the journal's do); `squeeze`
    replaces every record's body by its compressed bytes."""
    target.unlink(missing_ok=True)
    conn = sqlite3.connect(target, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {int(page_size)}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("ATTACH DATABASE ? AS src", (str(source),))
    schema = conn.execute(
        "SELECT type, name, sql FROM src.sqlite_master WHERE sql IS NOT NULL "
        "AND name NOT LIKE 'sqlite_%' ORDER BY type = 'index', rowid"
    ).fetchall()
    conn.execute("BEGIN")
    for _, _, sql in schema:
        conn.execute(sql)
    if squeeze is not None:
        conn.create_function("squeeze", 1, squeeze, deterministic=True)
    for kind, name, _ in schema:
        if kind != "table":
            continue
        columns = "*"
        if name == "records" and squeeze is not None:
            columns = ", ".join(
                "squeeze(body)" if column == "body" else column for column in RECORD_COLUMNS
            )
        conn.execute(f"INSERT INTO main.[{name}] SELECT {columns} FROM src.[{name}] ORDER BY rowid")
    conn.execute("COMMIT")
    conn.execute("DETACH DATABASE src")
    return conn


@dataclass(frozen=True)
class Codec:
    """One way to store a body compressed, and to read it back."""

    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]
    note: str | None = None


def codecs(training: Sequence[bytes]) -> tuple[list[Codec], str | None]:
    """zlib, zstd and zstd with a dictionary trained on `training`; the second value says what
    could not be measured and why."""
    out = [Codec("zlib-6", lambda b: zlib.compress(b, 6), zlib.decompress)]
    try:
        import zstandard  # a test extra, not a dependency of the appliance
    except ImportError:
        return out, "zstandard is not installed (`.venv/bin/pip install zstandard`): no zstd rows"
    plain = zstandard.ZstdDecompressor()
    for level in (3, 19):
        compressor = zstandard.ZstdCompressor(level=level)
        out.append(Codec(f"zstd-{level}", compressor.compress, plain.decompress))
    trained = zstandard.train_dictionary(DICTIONARY_BYTES, list(training))
    with_dict = zstandard.ZstdDecompressor(dict_data=trained)
    for level in (3, 19):
        compressor = zstandard.ZstdCompressor(level=level, dict_data=trained)
        out.append(
            Codec(
                f"zstd-{level}+dict",
                compressor.compress,
                with_dict.decompress,
                f"{len(trained.as_bytes()):,}-byte dictionary trained on {len(training):,} "
                "bodies of the stretch's first half",
            )
        )
    return out, None


def squeezer(compress: Callable[[bytes], bytes]) -> Callable[[str], bytes]:
    """A stored body (text) to its compressed bytes, as SQL function `squeeze`."""

    def squeeze(text: str) -> bytes:
        return compress(text.encode())

    return squeeze


def per_record_us(fn: Callable[[bytes], bytes], items: Sequence[bytes]) -> float:
    """Microseconds per call of `fn` over `items`, the best of TIMING_ROUNDS rounds."""
    best = math.inf
    for _ in range(TIMING_ROUNDS):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e6


def record_bytes(
    journal_file: Path, folder: Path, *, first_seq: int, last_seq: int
) -> dict[str, Any]:
    """What the stretch's `reading` rows are made of, measured on a copy of the real journal
    file, and what other page sizes and compressed bodies would make of the same rows."""
    folder.mkdir(parents=True)
    copy = folder / JOURNAL_FILE
    for suffix in ("", "-wal"):
        if Path(f"{journal_file}{suffix}").exists():
            shutil.copy2(f"{journal_file}{suffix}", f"{copy}{suffix}")
    conn = sqlite3.connect(copy, isolation_level=None)
    try:
        # Out of WAL mode, so that the rebuilds read the copy as one file.
        conn.execute("PRAGMA journal_mode = DELETE")
        file_total = file_bytes(conn)
        journal_grown = grown_bytes(conn)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        trees = btree_pages(conn)
        every = RowBytes()
        groups: dict[str, RowBytes] = {}
        bodies: list[tuple[str | None, bytes]] = []  # (source of a reading, body), seq order
        for values in conn.execute(f"SELECT {', '.join(RECORD_COLUMNS)} FROM records ORDER BY seq"):
            layout = row_layout(values)
            every.add(layout)
            seq, source, kind, body = values[0], values[5], values[6], values[9]
            if not first_seq <= seq <= last_seq:
                continue
            bodies.append((source if kind == "reading" else None, body.encode()))
            if kind != "reading":
                continue
            group = groups.setdefault(source, RowBytes())
            group.add(layout)
            parts = json_parts(body)
            if parts is None:
                group.not_compact += 1
            else:
                group.body.update(parts)
    finally:
        conn.close()
    table, index = trees["records"], trees[RECORDS_INDEX]
    # A b-tree's page bytes per byte of its cells (with their pointers): page headers, space
    # left free in pages, interior pages. The rest of the file (page 1, the other tables, free
    # pages) beyond one page per table and index is shared out over the records by their bytes
    # in those two b-trees.
    table_factor = table["bytes"] / every.cell
    index_factor = index["bytes"] / every.index_entry
    rest = file_total - table["bytes"] - index["bytes"] - page_size * (len(trees) - 2)
    rest_factor = rest / (table["bytes"] + index["bytes"])
    readings: dict[str, Any] = {}
    for source, group in sorted(groups.items()):
        n = group.rows
        cell, index_entry = group.cell / n, group.index_entry / n
        on_pages = cell * table_factor + index_entry * index_factor
        columns = {c: round(size / n, 1) for c, size in group.columns.items() if c != "body"}
        readings[source] = {
            "rows": n,
            "body": {key: round(value / n, 1) for key, value in group.body.items()},
            "body_not_compact_json": group.not_compact,
            "other_columns": columns,
            "other_columns_total": round(sum(columns.values()), 1),
            "record_header": round(group.header / n, 1),
            "cell_overhead": round(group.cell_overhead / n, 1),
            "index_entry": round(index_entry, 1),
            "page_slack": round(on_pages - cell - index_entry, 1),
            "rest_of_file": round(on_pages * rest_factor, 1),
            "file_bytes": round(on_pages * (1 + rest_factor), 1),
        }
    return {
        "journal": {
            "file_bytes": file_total,
            "bytes_beyond_an_empty_journal": journal_grown,
            "page_size": page_size,
            "records": every.rows,
            "row_bytes": every.record,
            "file_bytes_per_row_byte": round(file_total / every.record, 3),
            "records_btree_bytes_per_cell_byte": round(table_factor, 3),
            "index_bytes_per_entry_byte": round(index_factor, 3),
            "btrees": trees,
            # The layout computed here is SQLite's own: the records' bytes and the index's
            # are what dbstat counts on their pages.
            "rows_match_dbstat": every.record == table["payload"],
            "index_matches_dbstat": every.index_record == index["payload"],
        },
        "readings": readings,
        "what_is_what": {
            "body": "keys: names without quotes; values: numbers, strings without quotes, "
            "true/false/null; punctuation: braces, brackets, colons, commas, quotes",
            "other_columns": "stored bytes of each column (seq is the rowid, in the cell; "
            "NULL, 0 and 1 take no bytes)",
            "record_header": "SQLite's record header: its length and a serial type per column",
            "cell_overhead": "payload-size and rowid varints and the cell's 2-byte pointer",
            "index_entry": f"its {RECORDS_INDEX} cell (priority, seq, rowid) with its pointer",
            "page_slack": "its share of its b-trees' page headers, free space in pages and "
            "interior pages",
            "rest_of_file": "its share of the other tables' pages beyond their first, and "
            "of free pages",
        },
        "options": record_options(copy, folder, bodies, every.rows, journal_grown, page_size),
    }


def record_options(
    copy: Path,
    folder: Path,
    bodies: Sequence[tuple[str | None, bytes]],
    records: int,
    journal_bytes: int,
    page_size: int,
) -> dict[str, Any]:
    """The same rows rebuilt at other page sizes, and with every body compressed: file bytes
    per record beyond an empty journal's pages (`journal_bytes`: the real file's); and per
    reading body, the bytes each codec saves and what it costs to compress and to decompress
    (a drain would decompress each record it sends)."""
    pages: dict[str, Any] = {}
    for size in PAGE_SIZES:
        target = folder / f"page-{size}.db"
        conn = rebuild(copy, target, size)
        total, grown = file_bytes(conn), grown_bytes(conn)
        conn.close()
        target.unlink()
        pages[str(size)] = {
            "file_bytes": total,
            "bytes_per_record": round(grown / records, 1),
            "vs_journal": round(grown / journal_bytes, 3),
        }
    half = len(bodies) // 2
    training = [body for _, body in bodies[:half]]
    # Measured on bodies the dictionary was not trained on.
    held = [(source, body) for source, body in bodies[half:] if source is not None]
    raw = [body for _, body in held]
    found, missing = codecs(training)
    compression: dict[str, Any] = {}
    for codec in found:
        packed = [codec.compress(body) for body in raw]
        if any(codec.decompress(p) != b for p, b in zip(packed, raw, strict=True)):
            raise RuntimeError(f"{codec.name} does not give back the bodies it compressed")
        by_source: dict[str, list[int]] = {}
        for (source, body), small in zip(held, packed, strict=True):
            pair = by_source.setdefault(str(source), [0, 0, 0])
            pair[0] += 1
            pair[1] += len(body)
            pair[2] += len(small)
        target = folder / f"{codec.name}.db"
        conn = rebuild(copy, target, page_size, squeezer(codec.compress))
        grown = grown_bytes(conn)
        conn.close()
        target.unlink()
        compression[codec.name] = {
            "reading_bodies": len(raw),
            "body_bytes": round(sum(map(len, raw)) / len(raw), 1),
            "compressed_bytes": round(sum(map(len, packed)) / len(packed), 1),
            "by_source": {
                source: {"body_bytes": round(b / n, 1), "compressed_bytes": round(c / n, 1)}
                for source, (n, b, c) in sorted(by_source.items())
            },
            "compress_us_per_record": round(per_record_us(codec.compress, raw), 2),
            "decompress_us_per_record": round(per_record_us(codec.decompress, packed), 2),
            "bytes_per_record_every_body_compressed": round(grown / records, 1),
            "vs_journal": round(grown / journal_bytes, 3),
            "note": codec.note,
        }
    return {
        "records": records,
        "journal_bytes_per_record": round(journal_bytes / records, 1),
        "page_size": pages,
        "compression": compression,
        "compression_missing": missing,
    }


@dataclass
class Settings:
    hours: float
    minutes: float
    fault_minutes: float
    quick: bool


def measure_profile(name: str, root: Path, settings: Settings) -> dict[str, Any]:
    config_file = ROOT / PROFILE_FILES[name]
    base = load_config(config_file, environ={})
    if name == "camera":
        base = base.model_copy(update={"sensors": []})
    else:
        base = base.model_copy(update={"cameras": []})
    folder = root / name
    data_dir = folder / "data"
    folder.mkdir(parents=True)
    seconds = settings.minutes * 60.0 if base.cameras else settings.hours * 3600.0
    hours = seconds / 3600.0
    cap = 30 if settings.quick else None
    out: dict[str, Any] = {"config": PROFILE_FILES[name]}

    if any(sensor.anomaly is not None for sensor in base.sensors):
        settle: dict[str, float] = {}
        for sensor in base.sensors:
            if sensor.anomaly is not None:
                baseline_s = sensor.anomaly.baseline
                if cap is not None:
                    baseline_s = min(baseline_s, cap * sensor.window)
                windows = max(sensor.anomaly.min_windows, math.ceil(baseline_s / sensor.window))
                # A few windows more: the fit happens on the window that completes the span.
                settle[sensor.name] = (windows + 3) * sensor.window
        commissioning = plan_sources(
            base,
            seconds=0.0,
            seconds_of=settle,
            seed=SEED,
            folder=folder,
            only_anomaly=True,
            baseline_cap_windows=cap,
        )
        progress(
            f"{name}: commissioning: "
            + ", ".join(f"{n} {s / 60:.0f} min" for n, s in settle.items())
        )
        cfg = write_replay_config(folder / "commissioning.yaml", base, data_dir, commissioning)
        wall = replay(cfg, commissioning.positions)
        out["commissioning"] = {
            "source_minutes": {n: round(s / 60.0, 1) for n, s in settle.items()},
            "replay_wall_s": round(wall, 2),
        }
    else:
        create_journal(data_dir, base.appliance.id, base.journal)
        out["commissioning"] = None

    clip = None
    if base.cameras:
        footage = base.cameras[0].url.removeprefix("builtin:")
        clip, frames = repeated_clip(builtin_footage(footage), folder / "footage.mp4", seconds)
        progress(f"{name}: {frames} frames of {base.cameras[0].url} in {clip.name}")
    plan = plan_sources(
        base,
        seconds=seconds,
        seed=SEED + 1000,
        folder=folder,
        clip=clip,
        baseline_cap_windows=cap,
    )
    cfg = write_replay_config(folder / "stretch.yaml", base, data_dir, plan)
    before = disk_state(data_dir)
    progress(f"{name}: measured stretch, {hours:.2f} h of source time")
    wall = replay(cfg, plan.positions)
    after = disk_state(data_dir)
    stretch = stretch_records(data_dir, before.max_seq)
    progress(f"{name}: {stretch.records:,} records in {wall:.1f} s")
    out["sources"] = [note.to_dict() for note in plan.notes]
    out["position_stamped"] = plan.positions is not None
    out["replay_wall_s"] = round(wall, 2)
    result = profile_result(cfg, hours, stretch, before, after)
    out.update(result)
    out["anomalies_in_stretch"] = stretch.anomalies_started
    # Both on copies of the journal as the stretch left it, before the fault replay adds to it.
    out["tiered"] = None
    if base.storage.tiers and base.sensors:
        out["tiered"] = measure_tiers(
            name,
            cfg,
            data_dir,
            folder,
            first_seq=before.max_seq + 1,
            last_seq=after.max_seq,
            untiered_bytes_per_day=result["per_day"]["total_bytes"],
        )
    out["days_in_disk_budget_tiered"] = (
        out["tiered"]["days_in_disk_budget"] if out["tiered"] else None
    )
    out["record_bytes"] = None
    if name in RECORD_BYTES_PROFILES:
        progress(f"{name}: what a reading is made of; page sizes and compression")
        out["record_bytes"] = record_bytes(
            data_dir / JOURNAL_FILE,
            folder / "record-bytes",
            first_seq=before.max_seq + 1,
            last_seq=after.max_seq,
        )

    faulty = plan_sources(
        base,
        seconds=settings.fault_minutes * 60.0,
        seed=SEED + 2000,
        folder=folder,
        fault=True,
        baseline_cap_windows=cap,
    )
    if faulty.sensors:
        cfg = write_replay_config(folder / "fault.yaml", base, data_dir, faulty)
        progress(f"{name}: anomaly cost, {settings.fault_minutes:g} min with an imbalance fault")
        fault_before = disk_state(data_dir)
        fault_wall = replay(cfg, faulty.positions)
        fault_stretch = stretch_records(data_dir, fault_before.max_seq)
        factor = result["journal"]["file_bytes_per_estimated_byte"]
        out["anomaly_cost"] = {
            "sources": [s["name"] for s in faulty.sensors],
            "source_minutes": settings.fault_minutes,
            "fault": "imbalance on the first channel, 3 x its amplitude, the middle third",
            "replay_wall_s": round(fault_wall, 2),
            **anomaly_cost(fault_stretch, factor),
        }
    else:
        out["anomaly_cost"] = None
    out["checks"] = checks(out)
    return out


def checks(profile: Mapping[str, Any]) -> dict[str, bool]:
    """The numbers hold together: payload bytes on disk match the rows, the journal grew, and
    the per-day total is its parts."""
    per_day = profile["per_day"]
    out = {
        "journal_grew": profile["journal"]["growth_bytes"] > 0,
        "payload_rows_match_files": (
            profile["payloads"]["bytes"] == profile["payloads"]["bytes_by_rows"]
        ),
        "per_day_is_its_parts": (
            abs(per_day["total_bytes"] - per_day["journal_bytes"] - per_day["payload_bytes"]) <= 1
        ),
    }
    if profile.get("tiered"):
        out.update({f"tiers_{k}": v for k, v in profile["tiered"]["checks"].items()})
    if profile.get("record_bytes"):
        journal = profile["record_bytes"]["journal"]
        out["record_bytes_rows_match_dbstat"] = journal["rows_match_dbstat"]
        out["record_bytes_index_matches_dbstat"] = journal["index_matches_dbstat"]
    return out


def table_rows(name: str, profile: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The profile's row of the summary table (a camera profile adds its quiet-scene row)."""
    cost = profile.get("anomaly_cost")
    per_anomaly = cost["per_anomaly"] if cost else None
    rows = [
        {
            "profile": name,
            "records_per_hour": profile["records"]["per_hour"],
            "journal_bytes_per_record": profile["journal"]["bytes_per_record"],
            "journal_mb_per_day": round(profile["per_day"]["journal_bytes"] / 1e6, 2),
            "payload_mb_per_day": round(profile["per_day"]["payload_bytes"] / 1e6, 2),
            "total_mb_per_day": round(profile["per_day"]["total_bytes"] / 1e6, 2),
            "days_per_gb": profile["days_per_gb"],
            "disk_budget_gib": round(profile["disk_budget_bytes"] / 1024**3, 2),
            "days_in_disk_budget": profile["days_in_disk_budget"],
            "days_in_disk_budget_tiered": profile.get("days_in_disk_budget_tiered"),
            "kb_per_anomaly": round(per_anomaly["total_bytes"] / 1e3, 1) if per_anomaly else None,
        }
    ]
    events = profile.get("camera_events")
    if events:
        quiet = events["quiet_scene"]
        scene = quiet["assumed_per_camera"]
        rows.append(
            {
                "profile": (
                    f"{name}, quiet scene (assumed: {scene['objects_per_hour']:g} objects an hour, "
                    f"{scene['zone_alerts_per_day']:g} zone alerts with clips a day)"
                ),
                "records_per_hour": None,
                "journal_bytes_per_record": None,
                "journal_mb_per_day": None,
                "payload_mb_per_day": None,
                "total_mb_per_day": round(quiet["total_bytes_per_day"] / 1e6, 2),
                "days_per_gb": quiet["days_per_gb"],
                "disk_budget_gib": round(profile["disk_budget_bytes"] / 1024**3, 2),
                "days_in_disk_budget": quiet["days_in_disk_budget"],
                "days_in_disk_budget_tiered": None,
                "kb_per_anomaly": None,
            }
        )
    return rows


def code_fingerprint() -> dict[str, str]:
    """The journal's files (bench.common) and the stages that decide what a record holds."""
    return source_fingerprint(
        "appliance/stages/pipeline.py",
        "appliance/stages/anomalies.py",
        "appliance/stages/vision.py",
        "inference/features.py",
        "inference/sampling.py",
        "inference/media.py",
    )


EXTRAPOLATED = [
    "Per day = the stretch's records and bytes per hour of source time x 24; the stretch itself "
    "is measured. A longer run adds nothing new per record: telemetry comes one record per "
    "window per source, samples one per N windows.",
    "Anomalies in the stretch are whatever the profile's anomaly settings raised on healthy "
    "data; each real anomaly adds `anomaly_cost.per_anomaly` bytes on top.",
    "Health records: one per health_interval of wall time, at the size of the stretch's own "
    "(a replay's health records carry no destinations; a running daemon's carry a few hundred "
    "bytes more per destination).",
    "Camera: a busy scene (people and bicycles in view all the time); objects, zone alerts and "
    "clips scale with how much happens in view. Samples are capped by the sampling caps.",
    "Ship: the reefer count and the engine-room CSV's columns and rate are assumptions (see "
    "`sources`); telemetry grows with the number of channels, not with their sample rate.",
    "Payload bytes are the files' sizes, which the disk budget counts; the file system "
    "allocates whole blocks (`payloads.allocated_bytes`).",
    "Tiers: a day at each resolution is the stretch's whole buckets rolled up, x a day / their "
    "span; the never-rolled records and payloads at the stretch's rate every day; days in the "
    "budget solve the cumulative cost of the newest days at full resolution and older ones at "
    "each tier's resolution.",
]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--profiles",
        nargs="+",
        choices=sorted(PROFILE_FILES),
        default=list(PROFILE_FILES),
        help="which profiles to measure (default: all)",
    )
    parser.add_argument(
        "--hours",
        type=float,
        help="source hours of the sensor profiles (default 2, quick 0.75: tiers need whole "
        "buckets of their coarsest resolution)",
    )
    parser.add_argument(
        "--minutes", type=float, help="minutes of camera footage (default 2, quick 0.3)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dirs (prints the path)")
    args = parser.parse_args()
    # The daemons' own warnings (a source that failed, and why) go to stderr beside the progress.
    setup_logging("warning", json_lines=False)
    settings = Settings(
        hours=args.hours or (QUICK_HOURS if args.quick else 2.0),
        minutes=args.minutes or (0.3 if args.quick else 2.0),
        fault_minutes=QUICK_FAULT_MINUTES if args.quick else FAULT_MINUTES,
        quick=args.quick,
    )
    if settings.hours <= 0 or settings.minutes <= 0:
        raise SystemExit("--hours and --minutes must be > 0")
    parent = args.tmp_dir
    if parent is None and RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK):
        # A replay commits (fsyncs) one record at a time per source, so on a disk it runs at the
        # disk's fsync rate; the bytes measured are the same on any file system, but for whole
        # blocks allocated to payload files (reported as allocated_bytes).
        parent = RAM_DIR
    root = make_data_root(parent, "bench-autonomy-")
    started = time.perf_counter()
    profiles: dict[str, Any] = {}
    try:
        box = machine(root)
        for name in args.profiles:
            profiles[name] = measure_profile(name, root, settings)
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    emit(
        {
            "benchmark": "autonomy",
            "quick": args.quick,
            "machine": box,
            "source": code_fingerprint(),
            "settings": {
                "sensor_source_hours": settings.hours,
                "camera_footage_minutes": settings.minutes,
                "fault_minutes": settings.fault_minutes,
                "baselines_capped_to_windows": 30 if settings.quick else None,
                "gb": GB,
            },
            "table": [row for name, p in profiles.items() for row in table_rows(name, p)],
            "profiles": profiles,
            "extrapolated": EXTRAPOLATED,
            "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mib": peak_rss_mib(),
            "ok": all(all(p["checks"].values()) for p in profiles.values()),
        }
    )


if __name__ == "__main__":
    main()
