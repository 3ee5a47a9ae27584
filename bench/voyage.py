"""Benchmark: a voyage end to end (issue 17). The ship profile journals 180 days of data time with
its disk budget and tiered telemetry, then reaches port: a USB disk (the `directory` destination)
and then the shore link (an `http` destination to a real receiver over a 64 kbit/s link) drain it.
Reports what was kept at each resolution, journal and payload bytes, rollups and evictions, the
time until the last alert is ashore, and whether anything that must never be lost was lost.

What is real and what is synthesised
  1. The record mix is the real pipeline's: config/ship.yaml's sensors (the deck camera left out,
     as bench.autonomy's ship profile does; its cost is the camera row there) replayed through
     `Daemon(cfg, mode="replay")` for TAPE_HOURS of data time with bench.autonomy's CSV stand-ins
     for the live sources, every record stamped with the NMEA position. That stretch is the
     *tape*: every reading, sample (with its raw-window payload) and other record it journalled,
     at its offset in data time, and the last `health` record (journalled every
     `appliance.health_interval` of data time on the voyage).
  2. Incidents, also from the real pipeline: a second replay in which a reefer's setpoint delta
     goes over its 3.0 limit for one 5-minute window (a `limit` alert, then its `cleared` event),
     and the hull takes a 1-minute imbalance over its peak limit (a `limit` event and its
     clearing) while it runs anomaly detection (HULL_ANOMALY: the profile configures none; added
     here so that the voyage carries anomaly records and anomaly windows with their payloads).
     Placed at INCIDENTS_PER_DAY (assumed rates) at random moments of the voyage.
  3. 180 days of data time are journalled through the real `Journal.append_many`, an hour of data
     at a time: the tape repeated, each copy's values jittered (one value per channel by
     JITTER, rounded to 7 significant digits as the pipeline rounds them) so that no two
     bodies are equal, each sample's raw window re-encoded with jittered values (no two payload
     files are equal), the incidents at their moments. After every data hour, the real
     `StorageGuard.run_once` with the profile's storage section (min_free and reserve 0, so that
     this machine's free space cannot make it shed) and its `TelemetryRollup`, whose ages count
     from the data clock rather than the wall clock: it rolls up every pass (every data hour) and
     evicts over the budget. `--budget` gives a smaller one to force evictions.
  4. Port: both destinations of the profile are registered from the start (as the daemon does),
     so nothing counts as synced at sea. The `directory` destination (a temp folder standing for
     the USB disk, `require_mount` off) drains everything with `SyncEngine.drain()`. Then the
     `http` destination, `bandwidth: 8000` (64 kbit/s), drains to a real receiver process on
     127.0.0.1 through tests.faultproxy.FaultProxy limited to 8000 bytes/s each way: the link
     (the engine's own limiter lets a batch go at once and pays for it afterwards, so alone it
     would not delay the first batches, which are the alerts).
     The time until the receiver holds the last alert is measured on that link (read back with
     `GET /v1/records?priority=alert`, from the receiver's `received_at`). Then the cap is lifted
     (the proxy's and the engine's: said so in the output) and the rest drains at full speed;
     the time the rest would take at 64 kbit/s is projected from its wire bytes (the gzip batch
     bodies, as the USB disk holds them, and the payload files; HTTP headers not counted).
  5. Checks: the receiver's store and the USB disk each hold every record live at port exactly
     once, and the receiver got them in priority order (every alert before any event, sample or
     telemetry); every alert, event and anomaly window journalled on the voyage is ashore; every
     reading journalled is ashore exactly once, raw or counted in exactly one rollup, unless it
     went to the budget (then it is older than the last telemetry eviction).

--quick: QUICK_DAYS with the tiers scaled down (QUICK_TIERS, both reached), a QUICK_BUDGET that
evicts the oldest telemetry, a 15-minute tape.

Prints one JSON object on stdout; progress on stderr.
`python -m bench.voyage [--quick] [--days D] [--budget SIZE] [--tmp-dir DIR] [--keep]`."""

from __future__ import annotations

import array
import asyncio
import csv
import functools
import gzip
import io
import json
import math
import random
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

from appliance.runtime.logs import setup_logging
from bench.autonomy import (
    BOOKKEEPING_KINDS,
    Plan,
    create_journal,
    plan_sources,
    replay,
    write_replay_config,
)
from bench.common import (
    base_parser,
    emit,
    machine,
    make_data_root,
    peak_rss_mib,
    progress,
    source_fingerprint,
)
from bench.receiver_proc import ReceiverProcess
from config import ApplianceConfig, StorageSection, load_config
from config.shipping import DirectoryDestination, HttpDestination
from sync.destination import DestinationError
from sync.directory import DirectoryTarget
from sync.engine import SyncEngine
from sync.http_client import HttpTarget
from sync.journal import Journal
from sync.payloads import PayloadStore
from sync.reader import JOURNAL_FILE, JournalReader
from sync.records import NewRecord, PayloadRef, Priority, format_ts, parse_ts
from sync.retention import EvictionReport, StorageGuard
from sync.rollup import ROLLUP_KIND, RollupReport, TelemetryRollup
from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "config/ship.yaml"
DAYS = 180
QUICK_DAYS = 2
QUICK_TIERS = [{"after": "6h", "resolution": "1m"}, {"after": "1d", "resolution": "10m"}]
"""--quick: the profile's tiers scaled down so that both are reached in QUICK_DAYS."""
QUICK_BUDGET = "40MiB"
"""--quick: small enough that the oldest telemetry goes to the budget, large enough that
nothing else does."""
TAPE_HOURS = 1.0
QUICK_TAPE_HOURS = 0.25
LINK_BYTES_PER_S = 8000
"""64 kbit/s: a narrow satellite link."""
INCIDENT_S = 20 * 60
HULL_ANOMALY = {"method": "hotelling", "baseline": "2m", "raw_windows": [3, 3]}
HULL_FAULT = {"kind": "imbalance", "start": 360.0, "duration": 60.0, "magnitude": 3.0}
REEFER_EXCURSION = (6, 3.6, 300.0, 600.0)
"""(channel index, value, from s, to s): one reefer over its 3.0 limit for one 5-minute window."""
INCIDENTS_PER_DAY = {"reefers": 1.0, "hull": 0.5}
"""Assumed: a reefer alarm a day, a hull shock (limit event + anomaly) every other day."""
INCIDENT_KINDS = frozenset({"limit", "anomaly", "anomaly_window"})
JITTER = 1e-3
SEED = 20_261_207
SHORE, PORTCALL = "shore", "portcall"
WATCH_EVERY_S = 0.25
IntArray = npt.NDArray[np.int64]


# ------------------------------------------------------------------------------- the tape


@dataclass(frozen=True)
class Template:
    """One record of a replay, to be journalled again at `offset_s` into a copy."""

    offset_s: float
    seq: int
    source: str
    kind: str
    priority: Priority
    model: str | None
    body: dict[str, Any]
    paths: tuple[tuple[str, ...], ...]  # values jittered in each copy
    payload: bytes | None
    media_type: str


@dataclass
class Mix:
    """What the voyage journals: the tape, the health record, the incidents."""

    tape: list[Template]
    tape_s: float
    health: dict[str, Any]
    health_every_s: float
    incidents: dict[str, list[Template]]
    replays: dict[str, Any] = field(default_factory=dict)


def jitter_paths(body: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """One value per channel (its mean, or rms), and a record's own value or score."""
    paths: list[tuple[str, ...]] = []
    for top in ("channels", "features"):
        group = body.get(top)
        if not isinstance(group, dict):
            continue
        for channel, features in group.items():
            if isinstance(features, dict):
                key = next(
                    (k for k in ("mean", "rms", "max") if isinstance(features.get(k), float)), None
                )
                if key is not None:
                    paths.append((top, channel, key))
    paths += [(key,) for key in ("value", "score") if isinstance(body.get(key), float)]
    return tuple(paths)


def jitter_factors(rng: np.random.Generator) -> Iterator[float]:
    """1 + N(0, JITTER), drawn a block at a time (one draw per value is the voyage's hot path)."""
    while True:
        yield from rng.normal(1.0, JITTER, 65_536).tolist()


def jittered(
    body: dict[str, Any], paths: Iterable[tuple[str, ...]], factors: Iterator[float]
) -> dict[str, Any]:
    """A copy of `body` with the values at `paths` moved by a factor each (only the dicts on those
    paths are copied: the rest is shared, never modified), at the pipeline's 7 digits."""
    out = dict(body)
    copied: dict[tuple[str, ...], dict[str, Any]] = {(): out}
    for path in paths:
        node = out
        for depth in range(len(path) - 1):
            prefix = path[: depth + 1]
            child = copied.get(prefix)
            if child is None:
                child = dict(node[path[depth]])
                node[path[depth]] = child
                copied[prefix] = child
            node = child
        node[path[-1]] = float(f"{node[path[-1]] * next(factors):.7g}")
    return out


def jittered_npz(data: bytes, ts: datetime, rng: np.random.Generator) -> bytes:
    """A raw-window payload (.npz) with its values jittered and its time moved to `ts`: the same
    format and size, never the same bytes."""
    with np.load(io.BytesIO(data)) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    values = arrays["values"]
    arrays["values"] = (values * (1.0 + rng.normal(0.0, JITTER, values.shape))).astype(values.dtype)
    if "ts" in arrays:
        arrays["ts"] = np.array(format_ts(ts))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def templates(data_dir: Path, after_seq: int, keep: Callable[[str, str], bool]) -> list[Template]:
    """The records a replay journalled after `after_seq` that `keep(source, kind)`, each at its
    offset from its source's first record, with its payload's bytes."""
    store = PayloadStore(data_dir / "payloads")
    found: list[tuple[int, str, str, str, int, str | None, str, str | None]] = []
    with JournalReader.open(data_dir) as reader:
        for row in reader.conn.execute(
            "SELECT seq, ts, source, kind, priority, model, body, payloads FROM records "
            "WHERE seq > ? ORDER BY seq",
            (after_seq,),
        ):
            if keep(row[2], row[3]):
                found.append(row)
        shas = [sha for *_, p in found for sha in json.loads(p or "[]")]
        info = reader.payload_info(shas)
    first: dict[str, float] = {}
    for _, ts, source, *_ in found:
        first[source] = min(first.get(source, math.inf), parse_ts(ts).timestamp())
    out: list[Template] = []
    for seq, ts, source, kind, priority, model, body_json, payloads in found:
        shas = json.loads(payloads or "[]")
        if len(shas) > 1:
            raise RuntimeError(f"record {seq} ({kind}) carries {len(shas)} payloads; one expected")
        body = json.loads(body_json)
        out.append(
            Template(
                parse_ts(ts).timestamp() - first[source],
                seq,
                source,
                kind,
                Priority(priority),
                model,
                body,
                jitter_paths(body),
                store.read(shas[0]) if shas else None,
                info[shas[0]][1] or "application/octet-stream" if shas else "",
            )
        )
    return out


def ship_profile() -> ApplianceConfig:
    base = load_config(ROOT / PROFILE, environ={})
    return base.model_copy(update={"cameras": []})


def sample_mix(base: ApplianceConfig, folder: Path, tape_hours: float) -> Mix:
    """The two replays: the steady tape and the incidents (see the module docstring)."""
    tape_s = tape_hours * 3600.0
    steady_dir = folder / "steady"
    create_journal(steady_dir / "data", base.appliance.id, base.journal)
    plan = plan_sources(base, seconds=tape_s, seed=SEED, folder=steady_dir)
    cfg = write_replay_config(steady_dir / "steady.yaml", base, steady_dir / "data", plan)
    progress(f"tape: the ship profile replayed for {tape_hours:g} h of data time")
    steady_wall = replay(cfg, plan.positions)
    tape = [
        t
        for t in templates(steady_dir / "data", 0, lambda _s, kind: kind not in BOOKKEEPING_KINDS)
        if t.offset_s < tape_s
    ]
    with JournalReader.open(steady_dir / "data") as reader:
        row = reader.conn.execute(
            "SELECT body FROM records WHERE kind = 'health' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    if row is None:
        raise RuntimeError("the tape's replay journalled no health record")
    health = json.loads(row[0])

    incident_dir = folder / "incidents"
    create_journal(incident_dir / "data", base.appliance.id, base.journal)
    full = plan_sources(base, seconds=INCIDENT_S, seed=SEED + 1, folder=incident_dir)
    sensors = []
    for doc in full.sensors:
        if doc["name"] == "hull":
            channel = doc["channels"][0]["name"]
            doc = {
                **doc,
                "anomaly": HULL_ANOMALY,
                "faults": [{**HULL_FAULT, "channel": channel}],
            }
        elif doc["name"] == "reefers":
            excursion(Path(doc["path"]))
        else:
            continue
        sensors.append(doc)
    incidents_plan = Plan(sensors, [], full.notes, full.positions)
    cfg = write_replay_config(
        incident_dir / "incidents.yaml", base, incident_dir / "data", incidents_plan
    )
    progress("incidents: a reefer over its limit; a hull shock with anomaly detection on")
    incident_wall = replay(cfg, full.positions)
    found = templates(incident_dir / "data", 0, lambda _s, kind: kind in INCIDENT_KINDS)
    incidents: dict[str, list[Template]] = {}
    for template in found:
        incidents.setdefault(template.source, []).append(template)
    for name in INCIDENTS_PER_DAY:
        if name not in incidents:
            raise RuntimeError(f"the incident replay journalled nothing for {name!r}")
    return Mix(
        tape,
        tape_s,
        health,
        base.appliance.health_interval,
        incidents,
        {
            "tape_hours": tape_hours,
            "tape_replay_wall_s": round(steady_wall, 2),
            "tape_records": dict(Counter(f"{t.source}/{t.kind}" for t in tape)),
            "body_bytes": body_bytes([*tape, *found])
            | {"appliance/health": len(json.dumps(health, separators=(",", ":")))},
            "incident_replay_wall_s": round(incident_wall, 2),
            "incidents": {
                name: [f"{t.kind}:{t.priority.label}" for t in records]
                for name, records in incidents.items()
            },
        },
    )


def body_bytes(found: Iterable[Template]) -> dict[str, int]:
    """Mean compact-JSON body bytes per source and kind (what sizes the journal and the wire)."""
    sizes: dict[str, list[int]] = {}
    for template in found:
        size = len(json.dumps(template.body, separators=(",", ":")))
        sizes.setdefault(f"{template.source}/{template.kind}", []).append(size)
    return {key: round(sum(v) / len(v)) for key, v in sorted(sizes.items())}


def excursion(path: Path) -> None:
    """Rewrite a reefers CSV so that one reefer reads REEFER_EXCURSION's value for a window."""
    index, value, start, end = REEFER_EXCURSION
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    first = float(rows[1][0])
    for row in rows[1:]:
        if start <= float(row[0]) - first < end:
            row[1 + index] = f"{value:g}"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


# ----------------------------------------------------------------------------- the voyage


class DataClockRollup(TelemetryRollup):
    """The profile's rollup with ages counted from the voyage's data clock, not the wall clock:
    what the daemon's retention job runs, at the speed the bench journals."""

    def __init__(
        self,
        journal: Journal,
        settings: StorageSection,
        batch_records: int,
        clock: Callable[[], datetime],
    ) -> None:
        # interval 0: due at every retention pass, which the voyage runs once per data hour.
        super().__init__(journal, settings, batch_records, interval_s=0.0)
        self.clock = clock
        self.seconds = 0.0  # wall time spent in passes

    async def run_once(self, now: datetime | None = None) -> RollupReport:
        started = time.perf_counter()
        try:
            return await super().run_once(now or self.clock())
        finally:
            self.seconds += time.perf_counter() - started


@dataclass
class Logbook:
    """The seqs of everything journalled on the voyage, by what must become of them."""

    readings: dict[str, array.array[int]] = field(default_factory=dict)
    by_priority: dict[Priority, list[int]] = field(default_factory=dict)
    anomaly_windows: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    payload_files: int = 0
    payload_bytes: int = 0
    evicted: dict[str, dict[str, int]] = field(default_factory=dict)
    last_telemetry_evicted: int = 0
    peak_used_bytes: int = 0
    incidents: Counter[str] = field(default_factory=Counter)
    spent: dict[str, float] = field(default_factory=dict)  # wall seconds by part of the voyage

    def note(self, record: NewRecord, seq: int) -> None:
        self.kinds[record.kind] += 1
        for ref in record.payloads:
            self.payload_files += 1
            self.payload_bytes += ref.size
        if record.kind in ("reading", "health"):
            key = f"{record.source}/{record.kind}"
            self.readings.setdefault(key, array.array("q")).append(seq)
        elif record.priority != Priority.TELEMETRY:
            self.by_priority.setdefault(record.priority, []).append(seq)
        if record.kind == "anomaly_window":
            self.anomaly_windows.append(seq)
        elif record.kind == "sample":
            self.samples.append(seq)

    def evicted_report(self, report: EvictionReport) -> None:
        for priority, tally in report.by_priority.items():
            mine = self.evicted.setdefault(priority.label, {"records": 0, "bytes": 0})
            mine["records"] += tally.records
            mine["bytes"] += tally.bytes
            if priority == Priority.TELEMETRY:
                self.last_telemetry_evicted = max(self.last_telemetry_evicted, tally.last_seq)


def schedule(days: float, start: float, rng: random.Random) -> list[tuple[float, str]]:
    """When each incident happens (data seconds), at INCIDENTS_PER_DAY."""
    moments: list[tuple[float, str]] = []
    for name, per_day in INCIDENTS_PER_DAY.items():
        count = round(days * per_day)
        moments += [(start + rng.uniform(0.0, days * 86400.0 - 3600.0), name) for _ in range(count)]
    return sorted(moments)


async def hour_of_readings(
    mix: Mix,
    hour_start: float,
    voyage_start: float,
    store: PayloadStore,
    factors: Iterator[float],
    nprng: np.random.Generator,
) -> list[NewRecord]:
    """One data hour of the tape (and the health records) in data-time order, payloads stored."""
    timed: list[tuple[float, NewRecord]] = []
    copies = max(1, round(3600.0 / mix.tape_s))
    jobs: list[tuple[int, Template, datetime]] = []
    for copy in range(copies):
        base = hour_start + copy * mix.tape_s
        for template in mix.tape:
            moment = base + template.offset_s
            if template.payload is not None:
                jobs.append((len(timed), template, _dt(moment)))
            timed.append((moment, _record(template, moment, factors)))
    moment = hour_start
    while moment < hour_start + 3600.0:
        body = {**mix.health, "uptime_s": round(moment - voyage_start, 1)}
        timed.append(
            (moment, NewRecord("appliance", "health", Priority.TELEMETRY, body, ts=_dt(moment)))
        )
        moment += mix.health_every_s
    refs = await asyncio.gather(
        *(asyncio.to_thread(_store_payload, store, t, at, nprng) for _, t, at in jobs)
    )
    for (index, _, _), ref in zip(jobs, refs, strict=True):
        at, record = timed[index]
        timed[index] = (at, _with_payload(record, ref))
    timed.sort(key=lambda item: item[0])  # stable: same-time records keep the tape's order
    return [record for _, record in timed]


async def journal_incident(
    journal: Journal,
    templates_: Sequence[Template],
    start: float,
    store: PayloadStore,
    factors: Iterator[float],
    nprng: np.random.Generator,
    log: Logbook,
) -> None:
    """One incident's records in the order the pipeline journalled them; an anomaly window names
    the seq its anomaly record got here."""
    seqs: dict[int, int] = {}
    for template in templates_:
        moment = start + template.offset_s
        record = _record(template, moment, factors)
        if template.kind == "anomaly_window":
            body = dict(record.body)
            body["anomaly_seq"] = seqs.get(int(body.get("anomaly_seq") or 0), 0)
            body["start"] = format_ts(_dt(moment))
            record = NewRecord(**{**_fields(record), "body": body})
        if template.payload is not None:
            ref = await asyncio.to_thread(_store_payload, store, template, _dt(moment), nprng)
            record = _with_payload(record, ref)
        (seq,) = await journal.append_many([record])
        seqs[template.seq] = seq
        log.note(record, seq)


def _fields(record: NewRecord) -> dict[str, Any]:
    return {
        "source": record.source,
        "kind": record.kind,
        "priority": record.priority,
        "body": record.body,
        "model": record.model,
        "payloads": record.payloads,
        "ts": record.ts,
    }


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _record(template: Template, moment: float, factors: Iterator[float]) -> NewRecord:
    body = jittered(template.body, template.paths, factors) if template.paths else template.body
    return NewRecord(
        template.source, template.kind, template.priority, body, template.model, ts=_dt(moment)
    )


def _with_payload(record: NewRecord, ref: PayloadRef) -> NewRecord:
    return NewRecord(**{**_fields(record), "payloads": (ref,)})


def _store_payload(
    store: PayloadStore, template: Template, moment: datetime, nprng: np.random.Generator
) -> PayloadRef:
    if template.payload is None:
        raise ValueError(f"{template.kind} record {template.seq} carries no payload")
    return store.put_bytes(jittered_npz(template.payload, moment, nprng), template.media_type)


async def sail(
    journal: Journal,
    store: PayloadStore,
    base: ApplianceConfig,
    storage: StorageSection,
    mix: Mix,
    days: int,
    voyage_start: float,
) -> Logbook:
    """Journal `days` of data time an hour at a time; retention (and rollups) after each hour."""
    rng = random.Random(SEED)
    nprng = np.random.default_rng(SEED)
    factors = jitter_factors(nprng)
    log = Logbook()
    plan = schedule(days, voyage_start, rng)
    clock = {"now": _dt(voyage_start)}
    started = time.perf_counter()
    for name in (SHORE, PORTCALL):
        await journal.register_destination(name)
    rollup = DataClockRollup(journal, storage, base.sync.batch_records, lambda: clock["now"])
    async with StorageGuard(journal, store, storage, rollup) as guard:
        upcoming = await hour_of_readings(mix, voyage_start, voyage_start, store, factors, nprng)
        for hour in range(days * 24):
            hour_start = voyage_start + hour * 3600.0
            records = upcoming
            mark = time.perf_counter()
            appending = asyncio.ensure_future(journal.append_many(records))
            if hour + 1 < days * 24:
                # The next hour is made while the writer thread commits this one (SQLite lets
                # go of the GIL): the two cores both work. Retention still runs between hours.
                upcoming = await hour_of_readings(
                    mix, hour_start + 3600.0, voyage_start, store, factors, nprng
                )
            mark = _lap(log.spent, "encoding_and_making_the_next_hour", mark)
            seqs = await appending
            mark = _lap(log.spent, "waiting_for_commits", mark)
            for record, seq in zip(records, seqs, strict=True):
                log.note(record, seq)
            for moment, name in plan:
                if hour_start <= moment < hour_start + 3600.0:
                    log.incidents[name] += 1
                    await journal_incident(
                        journal, mix.incidents[name], moment, store, factors, nprng, log
                    )
            clock["now"] = _dt(hour_start + 3600.0)
            mark = _lap(log.spent, "bookkeeping_and_incidents", mark)
            for report in await guard.run_once():
                log.evicted_report(report)
            _lap(log.spent, "retention_passes", mark)
            if guard.last_usage is not None:
                log.peak_used_bytes = max(log.peak_used_bytes, guard.last_usage.used)
            day, hour_of_day = divmod(hour + 1, 24)
            if hour_of_day == 0 and day % max(1, days // 12) == 0:
                progress(
                    f"voyage: day {day}/{days}, {sum(log.kinds.values()):,} records "
                    f"journalled, {time.perf_counter() - started:.0f} s"
                )
        log.spent["of_which_rollups"] = rollup.seconds
    await journal.checkpoint()
    return log


def _lap(spent: dict[str, float], part: str, since: float) -> float:
    now = time.perf_counter()
    spent[part] = spent.get(part, 0.0) + now - since
    return now


# ------------------------------------------------------------------------------- at port


@dataclass
class Survey:
    """The journal as the ship reaches port."""

    live: dict[Priority, IntArray]
    counts: dict[str, dict[str, dict[str, int]]]  # priority -> kind -> records, bytes
    rollups: list[dict[str, int | str]]
    evictions: list[dict[str, int | str]]
    days_kept: dict[str, dict[str, float]]
    payloads: dict[str, int]  # sha256 -> size, present ones
    payload_priority: dict[str, Priority]  # the most urgent record carrying each

    @property
    def seqs(self) -> IntArray:
        return np.sort(np.concatenate(list(self.live.values())))


def survey(reader: JournalReader, resolutions: Sequence[int]) -> Survey:
    """Live seqs by priority, counts, rollups, evictions, and per source the days of data time
    kept raw and at each tier's resolution (hours holding such records / 24)."""
    conn = reader.conn
    live = {
        p: np.fromiter(
            (
                s
                for (s,) in conn.execute(
                    "SELECT seq FROM records WHERE priority = ? ORDER BY seq", (int(p),)
                )
            ),
            dtype=np.int64,
        )
        for p in Priority
    }
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for priority, kind, records, size in reader.counts():
        counts.setdefault(priority.label, {})[kind] = {"records": records, "bytes": size}
    days: dict[str, dict[str, float]] = {}
    empty = {"full": 0.0, **{f"{r // 60}m": 0.0 for r in resolutions}}
    for source, hours in conn.execute(
        "SELECT source, COUNT(DISTINCT substr(ts, 1, 13)) FROM records WHERE kind = 'reading' "
        "GROUP BY source"
    ):
        days.setdefault(source, dict(empty))["full"] = round(hours / 24.0, 2)
    for source, resolution, hours in conn.execute(
        "SELECT source, json_extract(body, '$.resolution_s'), COUNT(DISTINCT substr(ts, 1, 13)) "
        "FROM records WHERE kind = ? AND json_extract(body, '$.of') = 'reading' GROUP BY 1, 2",
        (ROLLUP_KIND,),
    ):
        days.setdefault(source, dict(empty))[f"{int(resolution) // 60}m"] = round(hours / 24.0, 2)
    payloads = {
        sha: size for sha, (size, _, state) in reader.payload_rows().items() if state == "present"
    }
    carried: dict[str, Priority] = {}
    for priority, shas in conn.execute(
        "SELECT priority, payloads FROM records WHERE payloads IS NOT NULL"
    ):
        for sha in json.loads(shas):
            carried[sha] = min(carried.get(sha, Priority(priority)), Priority(priority))
    return Survey(
        live,
        counts,
        [
            {
                "resolution_s": r,
                "of": k,
                "records": n,
                "rollups": m,
                "bytes_before": b,
                "bytes_after": a,
            }
            for r, k, n, m, b, a in reader.rollups()
        ],
        [
            {"priority": p.label, "reason": reason, "records": n, "bytes": b}
            for p, reason, n, b in reader.evictions()
        ],
        days,
        payloads,
        carried,
    )


def file_bytes(data_dir: Path) -> dict[str, int]:
    journal = sum(
        (data_dir / f"{JOURNAL_FILE}{suffix}").stat().st_size
        for suffix in ("", "-wal")
        if (data_dir / f"{JOURNAL_FILE}{suffix}").exists()
    )
    return {"journal_file_bytes": journal}


def add_admin_token(receiver_dir: Path) -> str:
    """An admin token in the receiver's store (`appliance receiver tokens add --admin`), for the
    read API."""
    receiver_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "receiver",
            "--data",
            str(receiver_dir),
            "tokens",
            "add",
            "--admin",
            "--label",
            "bench.voyage",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return done.stdout.strip()


async def watch_alerts(
    url: str, admin_token: str, expected: int, drain: asyncio.Task[bool]
) -> tuple[list[int], str | None]:
    """Follow `GET /v1/records?priority=alert` until the receiver holds `expected` alerts (or the
    drain ended); their seqs in arrival order and the last one's `received_at`."""
    seqs: list[int] = []
    last: str | None = None
    after: str | None = None
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession() as session:
        while True:
            params = {"priority": "alert", "limit": "5000", **({"after": after} if after else {})}
            async with session.get(f"{url}/v1/records", params=params, headers=headers) as answer:
                answer.raise_for_status()
                page = await answer.json()
            for item in page["records"]:
                seqs.append(int(item["seq"]))
                last = str(item["received_at"])
            after = page["next"] or after
            if len(seqs) >= expected or (drain.done() and not page["more"]):
                return seqs, last
            if not page["more"]:
                await asyncio.sleep(WATCH_EVERY_S)


@dataclass
class ShoreDrain:
    complete: bool
    wall_s: float
    alert_seqs: list[int]
    time_to_last_alert_s: float | None
    wire_bytes_to_last_alert: int
    after_lift_wall_s: float
    engine: dict[str, int]
    failures: list[str]


async def drain_until_done(engine: SyncEngine, failures: list[str]) -> bool:
    """`drain()` again after a retryable failure, as the daemon's loop does (minus its backoff)."""
    while True:
        try:
            return await engine.drain()
        except DestinationError as exc:
            if not exc.retryable or len(failures) >= 3:
                raise
            failures.append(str(exc))


async def to_shore(
    journal: Journal,
    store: PayloadStore,
    base: ApplianceConfig,
    receiver_url: str,
    admin_token: str,
    token_file: Path,
    expected_alerts: int,
) -> ShoreDrain:
    """The shore link: a 64 kbit/s proxy in front of the receiver and the engine capped to match,
    until the last alert is ashore; then both caps lifted for the rest."""
    shore = next(d for d in base.sync.destinations if isinstance(d, HttpDestination))
    host, _, port = receiver_url.removeprefix("http://").partition(":")
    async with FaultProxy(host, int(port)) as proxy:
        proxy.rate_limit(LINK_BYTES_PER_S)
        cfg = HttpDestination.model_validate(
            {
                **shore.model_dump(mode="json", exclude_none=True),
                "url": proxy.url_for(),
                "token_file": str(token_file),
                "bandwidth": LINK_BYTES_PER_S,
                "daily_payload_budget": None,
            }
        )
        target = HttpTarget(cfg, base.appliance.id, base.sync.chunk_size)
        engine = SyncEngine(journal, store, target, cfg, base.sync)
        failures: list[str] = []
        async with target:
            started_at = datetime.now(UTC)
            started = time.perf_counter()
            drain = asyncio.ensure_future(drain_until_done(engine, failures))
            seqs, last = await watch_alerts(receiver_url, admin_token, expected_alerts, drain)
            wire = proxy.stats.bytes_upstream
            # The link widens (the ship is alongside): what is left drains at full speed, and
            # its time at 64 kbit/s is projected from its bytes instead.
            proxy.rate_limit(None)
            engine.limiter.rate = None
            lifted = time.perf_counter()
            complete = await drain
            done = time.perf_counter()
    state = engine.state
    return ShoreDrain(
        complete=complete,
        wall_s=done - started,
        alert_seqs=seqs,
        time_to_last_alert_s=(
            round((parse_ts(last) - started_at).total_seconds(), 3) if last is not None else None
        ),
        wire_bytes_to_last_alert=wire,
        after_lift_wall_s=done - lifted,
        engine={
            "records_sent": state.records_sent,
            "batches_sent": state.batches_sent,
            "bytes_sent": state.bytes_sent,
            "payloads_sent": state.payloads_sent,
        },
        failures=failures,
    )


async def to_usb(
    journal: Journal, store: PayloadStore, base: ApplianceConfig, usb: Path
) -> dict[str, Any]:
    portcall = next(d for d in base.sync.destinations if isinstance(d, DirectoryDestination))
    cfg = DirectoryDestination.model_validate(
        {**portcall.model_dump(mode="json"), "path": str(usb), "require_mount": False}
    )
    target = DirectoryTarget(cfg, base.appliance.id, base.sync.chunk_size, create=True)
    engine = SyncEngine(journal, store, target, cfg, base.sync)
    async with target:
        started = time.perf_counter()
        complete = await engine.drain()
        wall = time.perf_counter() - started
    state = engine.state
    return {
        "complete": complete,
        "wall_s": round(wall, 2),
        "records": state.records_sent,
        "batches": state.batches_sent,
        "bytes_written": state.bytes_sent,
        "payload_files": state.payloads_sent,
        "records_per_s": round(state.records_sent / wall) if wall > 0 else None,
    }


# ----------------------------------------------------------------------------- the checks

SEQ_LINE = re.compile(rb'^\{"seq":(\d+),', re.MULTILINE)
LABELS = {p.label: int(p) for p in Priority}


@dataclass
class Ashore:
    """What the receiver's store holds of the ship, read after the receiver stopped."""

    arrival_seqs: IntArray
    arrival_priorities: IntArray
    raw_readings: IntArray
    rollups: dict[str, list[tuple[int, int, int]]]  # "source/of" -> (first, last, records)
    payloads: dict[str, int]
    duplicates_ignored: int


def read_ashore(db: Path, appliance_id: str) -> Ashore:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        seqs: list[int] = []
        priorities: list[int] = []
        for seq, priority in conn.execute(
            "SELECT seq, priority FROM records WHERE appliance_id = ? ORDER BY arrival",
            (appliance_id,),
        ):
            seqs.append(seq)
            priorities.append(LABELS[priority])
        raw = np.fromiter(
            (
                s
                for (s,) in conn.execute(
                    "SELECT seq FROM records WHERE appliance_id = ? AND kind IN ('reading', 'health')",
                    (appliance_id,),
                )
            ),
            dtype=np.int64,
        )
        rollups: dict[str, list[tuple[int, int, int]]] = {}
        for (found,) in conn.execute(
            "SELECT json_extract(line, '$.source', '$.body.of', '$.body.replaces.first_seq', "
            "'$.body.replaces.last_seq', '$.body.replaces.records') FROM records "
            "WHERE appliance_id = ? AND kind = ?",
            (appliance_id, ROLLUP_KIND),
        ):
            source, of, first, last, records = json.loads(found)
            rollups.setdefault(f"{source}/{of}", []).append((first, last, records))
        payloads = dict(
            conn.execute(
                "SELECT sha256, size FROM payloads WHERE appliance_id = ?", (appliance_id,)
            )
        )
        (ignored,) = conn.execute(
            "SELECT COALESCE(SUM(duplicates_ignored), 0) FROM journals WHERE appliance_id = ?",
            (appliance_id,),
        ).fetchone()
    finally:
        conn.close()
    return Ashore(
        np.asarray(seqs, dtype=np.int64),
        np.asarray(priorities, dtype=np.int64),
        np.sort(raw),
        rollups,
        payloads,
        int(ignored),
    )


@dataclass
class OnUsb:
    seqs: dict[str, IntArray]
    batch_bytes: dict[str, int]
    payloads: set[str]


def read_usb(usb: Path, appliance_id: str) -> OnUsb:
    """Every batch file on the USB disk, decompressed: the seqs it holds, per priority."""
    seqs: dict[str, list[int]] = {}
    sizes: Counter[str] = Counter()
    for path in sorted((usb / "records" / appliance_id).glob("*/*/*.ndjson.gz")):
        priority = path.parent.name
        data = path.read_bytes()
        sizes[priority] += len(data)
        seqs.setdefault(priority, []).extend(
            int(s) for s in SEQ_LINE.findall(gzip.decompress(data))
        )
    payloads = {
        path.name for path in (usb / "payloads" / appliance_id).glob("*/*/*") if path.is_file()
    }
    return OnUsb({p: np.asarray(s, dtype=np.int64) for p, s in seqs.items()}, dict(sizes), payloads)


def same_set(found: IntArray, expected: IntArray) -> dict[str, int]:
    """How `found` (any order, maybe repeats) differs from the set `expected` (sorted, unique)."""
    unique = np.unique(found)
    return {
        "expected": int(expected.size),
        "found": int(found.size),
        "repeated": int(found.size - unique.size),
        "missing": int(np.setdiff1d(expected, unique, assume_unique=True).size),
        "unexpected": int(np.setdiff1d(unique, expected, assume_unique=True).size),
    }


def readings_once(log: Logbook, ashore: Ashore) -> dict[str, Any]:
    """Each reading (and health record) journalled at sea: ashore raw, or counted in a rollup of
    its source whose seq span holds exactly as many of that source's readings as it says it
    replaces. Twice is a duplicate; never is a loss, unless it went to the budget (then it is no
    newer than the last telemetry eviction)."""
    out = Counter[str]()
    for key, seqs in log.readings.items():
        journalled = np.frombuffer(seqs, dtype=np.int64)
        cover = np.isin(journalled, ashore.raw_readings).astype(np.int64)
        out["raw_ashore"] += int(cover.sum())
        spans = np.zeros(journalled.size + 1, dtype=np.int64)
        for first, last, records in ashore.rollups.get(key, []):
            low = int(np.searchsorted(journalled, first, "left"))
            high = int(np.searchsorted(journalled, last, "right"))
            if high - low != records:
                out["rollups_not_matching_their_span"] += 1
            spans[low] += 1
            spans[high] -= 1
            out["in_rollups"] += records
            out["rollups"] += 1
        cover += np.cumsum(spans[:-1])
        missing = journalled[cover == 0]
        out["journalled"] += int(journalled.size)
        out["twice_or_more"] += int((cover > 1).sum())
        out["evicted"] += int((missing <= log.last_telemetry_evicted).sum())
        out["lost"] += int((missing > log.last_telemetry_evicted).sum())
    return {
        name: out[name]
        for name in (
            "journalled",
            "raw_ashore",
            "in_rollups",
            "rollups",
            "evicted",
            "lost",
            "twice_or_more",
            "rollups_not_matching_their_span",
        )
    }


def lost(seqs: Sequence[int], present: IntArray) -> int:
    return int(np.isin(np.asarray(seqs, dtype=np.int64), present, invert=True).sum())


def projection(on_usb: OnUsb, at_port: Survey) -> dict[str, Any]:
    """Seconds each part of the backlog takes at LINK_BYTES_PER_S, in the engine's drain order:
    its gzip batch bodies (as the USB disk holds them) and payload files (HTTP headers, a few
    hundred bytes per request, not counted)."""
    steps: list[dict[str, Any]] = []
    elapsed = 0.0
    for priority in Priority:
        payload_bytes = sum(
            size
            for sha, size in at_port.payloads.items()
            if at_port.payload_priority.get(sha) == priority
        )
        for part, size in (
            ("records", on_usb.batch_bytes.get(priority.label, 0)),
            ("payloads", payload_bytes),
        ):
            seconds = size / LINK_BYTES_PER_S
            elapsed += seconds
            steps.append(
                {
                    "part": f"{priority.label} {part}",
                    "bytes": size,
                    "seconds": round(seconds, 1),
                    "done_after_s": round(elapsed, 1),
                }
            )
    return {
        "link_bytes_per_s": LINK_BYTES_PER_S,
        "steps": steps,
        "total_days": round(elapsed / 86400.0, 2),
    }


def verdict(
    log: Logbook, at_port: Survey, ashore: Ashore, on_usb: OnUsb, drains_complete: bool
) -> tuple[dict[str, bool], dict[str, Any]]:
    """The checks (each must hold) and the figures behind them."""
    live = at_port.seqs
    priorities = ashore.arrival_priorities
    alert_positions = np.flatnonzero(priorities == int(Priority.ALERT))
    other_positions = np.flatnonzero(priorities != int(Priority.ALERT))
    readings = readings_once(log, ashore)
    usb_all = np.concatenate(list(on_usb.seqs.values())) if on_usb.seqs else np.zeros(0, np.int64)
    receiver_set = same_set(ashore.arrival_seqs, live)
    usb_set = same_set(usb_all, live)
    usb_priorities_right = all(
        np.array_equal(np.sort(on_usb.seqs.get(p.label, np.zeros(0, np.int64))), at_port.live[p])
        for p in Priority
    )
    at_receiver, on_disk = np.sort(ashore.arrival_seqs), np.sort(usb_all)
    alerts, events = (log.by_priority.get(p, []) for p in (Priority.ALERT, Priority.EVENT))
    losses = {
        "alerts": lost(alerts, at_receiver),
        "events": lost(events, at_receiver),
        "anomaly_windows": lost(log.anomaly_windows, at_receiver),
        "alerts_on_usb": lost(alerts, on_disk),
        "events_on_usb": lost(events, on_disk),
        "anomaly_windows_on_usb": lost(log.anomaly_windows, on_disk),
    }
    payloads_ashore = set(ashore.payloads) == set(at_port.payloads) and all(
        ashore.payloads[sha] == size for sha, size in at_port.payloads.items()
    )
    checks = {
        "no_alert_event_or_anomaly_window_lost": not any(losses.values()),
        "receiver_holds_every_live_record_once": not any(
            receiver_set[k] for k in ("repeated", "missing", "unexpected")
        ),
        "usb_holds_every_live_record_once": not any(
            usb_set[k] for k in ("repeated", "missing", "unexpected")
        )
        and usb_priorities_right,
        "every_alert_ashore_before_any_other_record": bool(
            alert_positions.size == at_port.live[Priority.ALERT].size
            and (other_positions.size == 0 or alert_positions.max() < other_positions.min())
        ),
        "arrived_in_priority_order": bool(np.all(np.diff(priorities) >= 0)),
        "every_reading_once_raw_or_rolled_up": readings["twice_or_more"] == 0
        and readings["lost"] == 0
        and readings["rollups_not_matching_their_span"] == 0,
        "no_resend_stored_twice": ashore.duplicates_ignored == 0,
        "payloads_ashore_and_on_usb": payloads_ashore and on_usb.payloads == set(at_port.payloads),
        "rolled_up": bool(at_port.rollups),
        "drains_complete": drains_complete,
    }
    return checks, {
        "lost": losses,
        "receiver": receiver_set,
        "usb": usb_set,
        "readings": readings,
        "receiver_duplicates_ignored": ashore.duplicates_ignored,
        # Samples may go to the budget (after telemetry, before events): counted, not a loss.
        "samples_not_ashore": lost(log.samples, at_receiver),
    }


# ------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Settings:
    days: int
    tape_hours: float
    storage: StorageSection
    quick: bool


async def voyage(root: Path, base: ApplianceConfig, settings: Settings, mix: Mix) -> dict[str, Any]:
    appliance_id = base.appliance.id
    end = math.floor(time.time() / 3600.0) * 3600.0  # the ship reaches port this hour
    start = end - settings.days * 86400.0
    data_dir = root / "ship"
    store = PayloadStore(data_dir / "payloads")
    journal = await Journal.open(
        data_dir, appliance_id=appliance_id, settings=base.journal, payloads=store
    )
    async with journal:
        progress(f"voyage: {settings.days} days of data time from {format_ts(_dt(start))}")
        sail_started = time.perf_counter()
        log = await sail(journal, store, base, settings.storage, mix, settings.days, start)
        sail_wall = time.perf_counter() - sail_started
        resolutions = [int(tier.resolution) for tier in settings.storage.tiers]
        at_port = await journal.read(functools.partial(survey, resolutions=resolutions))
        journal_bytes = await journal.read(JournalReader.live_bytes)
        files = file_bytes(data_dir)
        progress(f"port: {int(at_port.seqs.size):,} records live; the USB disk first")
        usb = await to_usb(journal, store, base, root / "usb")
        receiver_dir = root / "receiver"
        admin_token = add_admin_token(receiver_dir)
        token = secrets.token_urlsafe(32)
        token_file = root / "shore.token"
        token_file.write_text(token + "\n")
        progress(
            f"port: the shore link, {LINK_BYTES_PER_S * 8 // 1000} kbit/s until the last alert is ashore"
        )
        with ReceiverProcess(receiver_dir, {appliance_id: token}) as receiver:
            shore = await to_shore(
                journal,
                store,
                base,
                receiver.url,
                admin_token,
                token_file,
                int(at_port.live[Priority.ALERT].size),
            )
    progress("checking the receiver's store and the USB disk")
    ashore = read_ashore(receiver_dir / "receiver.db", appliance_id)
    on_usb = read_usb(root / "usb", appliance_id)
    checks, figures = verdict(
        log, at_port, ashore, on_usb, bool(usb["complete"]) and shore.complete
    )
    if settings.quick:
        # The quick run's budget is there to force evictions: of telemetry only.
        checks["telemetry_evicted_and_nothing_else"] = set(log.evicted) == {"telemetry"}
    journalled = sum(log.kinds.values())
    return {
        "voyage": {
            "data_start": format_ts(_dt(start)),
            "data_end": format_ts(_dt(end)),
            "wall_s": round(sail_wall, 1),
            "records_journalled": journalled,
            "records_per_s": round(journalled / sail_wall),
            "by_kind": dict(log.kinds.most_common()),
            "incidents": dict(log.incidents),
            "payload_files": log.payload_files,
            "payload_bytes": log.payload_bytes,
            "peak_used_bytes": log.peak_used_bytes,
            "wall_split_s": {part: round(seconds, 1) for part, seconds in log.spent.items()},
        },
        "at_port": {
            "records_live": int(at_port.seqs.size),
            "by_priority": {p.label: int(at_port.live[p].size) for p in Priority},
            "by_priority_and_kind": at_port.counts,
            "journal_live_bytes": journal_bytes,
            **files,
            "payload_files": len(at_port.payloads),
            "payload_bytes": sum(at_port.payloads.values()),
            "data_days_kept": at_port.days_kept,
            "rollups": at_port.rollups,
            "evictions": at_port.evictions,
            "evicted_by_priority": log.evicted,
        },
        "usb": usb,
        "shore": {
            "link_bytes_per_s": LINK_BYTES_PER_S,
            "alerts": len(shore.alert_seqs),
            "time_to_last_alert_s": shore.time_to_last_alert_s,
            "wire_bytes_to_last_alert": shore.wire_bytes_to_last_alert,
            "cap_lifted_after_last_alert": True,
            "wall_s": round(shore.wall_s, 2),
            "wall_s_after_lift": round(shore.after_lift_wall_s, 2),
            "engine": shore.engine,
            "retried_drains": shore.failures,
            "at_link_speed": projection(on_usb, at_port),
        },
        "checks": {**checks, **figures},
        "ok": all(checks.values()),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--days", type=int, help=f"days of data time (default {DAYS}, quick {QUICK_DAYS})"
    )
    parser.add_argument(
        "--budget",
        help=f"disk budget, e.g. 2GiB (default: the profile's; quick: {QUICK_BUDGET}); smaller "
        "forces evictions",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dirs (prints the path)")
    args = parser.parse_args()
    setup_logging("warning", json_lines=False)
    base = ship_profile()
    days = args.days or (QUICK_DAYS if args.quick else DAYS)
    if days < 1:
        raise SystemExit("--days must be at least 1")
    storage_doc = base.storage.model_dump(mode="json") | {"min_free": 0, "reserve": 0}
    if args.quick:
        storage_doc["tiers"] = QUICK_TIERS
    budget = args.budget or (QUICK_BUDGET if args.quick else None)
    if budget is not None:
        storage_doc["disk_budget"] = budget
    settings = Settings(
        days=days,
        tape_hours=QUICK_TAPE_HOURS if args.quick else TAPE_HOURS,
        storage=StorageSection.model_validate(storage_doc),
        quick=args.quick,
    )
    root = make_data_root(args.tmp_dir, "bench-voyage-")
    started = time.perf_counter()
    code = source_fingerprint(  # at the start: the code that runs, whatever changes meanwhile
        "sync/rollup.py",
        "sync/retention.py",
        "sync/engine.py",
        "sync/directory.py",
        "sync/http_client.py",
        "bench/voyage.py",
    )
    try:
        box = machine(root)
        mix = sample_mix(base, root / "replays", settings.tape_hours)
        result = asyncio.run(voyage(root, base, settings, mix))
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    emit(
        {
            "benchmark": "voyage",
            "quick": args.quick,
            "machine": box,
            "settings": {
                "profile": PROFILE,
                "days": days,
                "tiers": [t.model_dump(mode="json") for t in settings.storage.tiers],
                "disk_budget_bytes": settings.storage.disk_budget,
                "tape_hours": settings.tape_hours,
                "incidents_per_day": INCIDENTS_PER_DAY,
                "hull_anomaly_assumed": HULL_ANOMALY,
                "jitter": JITTER,
                "link_bytes_per_s": LINK_BYTES_PER_S,
            },
            "source": code,
            "replays": mix.replays,
            **result,
            "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mib": peak_rss_mib(),
        }
    )


if __name__ == "__main__":
    main()
