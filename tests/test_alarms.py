"""The alarm board (appliance/status/alarms.py) and what shows it: alarms opened and cleared by the
records the stages journal (limits, anomalies, zone alerts) and by live state (refused deliveries,
a full disk, the budget, failed commits, dropped records), one log line each way, apart from the
appliance's own health; `/api/events`' filters and pages over a real journal; and the real daemon
in a subprocess raising and clearing a sensor limit alarm in `/api/status`, `/metrics`,
`appliance status` and its log."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from functools import reduce
from operator import xor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from appliance.stages.pipeline import SourcePipeline
from appliance.status.alarms import AlarmBoard
from appliance.status.health import HealthMonitor
from appliance.status.schema import AlarmReport, StatusReport
from appliance.status.web import StatusServer
from appliance.status.wording import describe
from config import ApplianceConfig, CsvSensor, StorageSection
from sensors import open_source
from sync import Journal, JournalReader, NewRecord, PayloadStore, Priority, StorageGuard
from sync.destination import JournalCollision
from sync.engine import DestinationState
from sync.records import format_ts
from tests.helpers import (
    log_events,
    run_cli,
    start_daemon,
    stop_daemon,
    wait_for,
    write_config,
)

LOGGER = "appliance.status.alarms"


class Clock:
    """The board's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limit(
    value: float,
    *,
    state: str = "violated",
    source: str = "gearbox",
    channel: str = "vib_radial",
    feature: str = "peak",
    above: float | None = 2.0,
    below: float | None = None,
    priority: Priority = Priority.ALERT,
) -> NewRecord:
    """A `limit` record as appliance/stages/pipeline.py writes it."""
    body = {
        "state": state,
        "channel": channel,
        "feature": feature,
        "value": value,
        "above": above,
        "below": below,
    }
    return NewRecord(source, "limit", priority if state == "violated" else Priority.EVENT, body)


def reading(source: str, channel: str, **features: float) -> NewRecord:
    body = {"window_s": 1.0, "channels": {channel: {"n": 100, **features}}}
    return NewRecord(source, "reading", Priority.TELEMETRY, body)


def anomaly(kind: str, *, priority: Priority, score: float = 6.0) -> NewRecord:
    body = {
        "kind": kind,
        "priority": priority.label,
        "score": score,
        "threshold": 2.0,
        "ratio": score / 2.0,
        "peak_ratio": score / 2.0,
        "features": [{"name": "vib_radial.rms", "value": 4.2}],
        "windows": 5,
        "windows_over": 4,
        "baseline": "v1",
        "method": "robust_z",
    }
    return NewRecord("gearbox", "anomaly", priority, body)


def zone_entry(label: str, score: float, *, priority: Priority = Priority.ALERT) -> NewRecord:
    body = {"zone": "cycle_lane", "track_id": 7, "label": label, "score": score, "box": []}
    return NewRecord("yard", "zone_entry", priority, body)


def alarm_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, Any]]]:
    """(level, message, fields) of every log line the board wrote."""
    return [
        (r.levelname, r.getMessage(), getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == LOGGER
    ]


def ids(board: AlarmBoard) -> list[str]:
    return [alarm["id"] for alarm in board.reports()]


# ------------------------------------------------------------------------- records open alarms


def test_a_limit_alarm_opens_follows_its_value_and_clears_with_one_log_line_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    board = AlarmBoard()
    caplog.set_level(logging.INFO, logger=LOGGER)
    board.observe(reading("gearbox", "vib_radial", peak=1.1))
    assert board.reports() == []

    board.observe(limit(3.51))
    (alarm,) = board.reports()
    assert alarm["id"] == "limit:gearbox:vib_radial:peak>2.0"
    assert (alarm["kind"], alarm["source"], alarm["severity"]) == ("limit", "gearbox", "critical")
    assert alarm["what"] == "vib_radial peak 3.51 over 2.0" and alarm["value"] == 3.51
    since = alarm["since"]

    # Each window still over the limit keeps the alarm current, with no new log line.
    board.observe(reading("gearbox", "vib_radial", peak=4.2))
    board.observe(reading("gearbox", "vib_axial", peak=9.0))  # another channel: not this alarm
    (alarm,) = board.reports()
    assert (alarm["value"], alarm["what"], alarm["since"]) == (
        4.2,
        "vib_radial peak 4.2 over 2.0",
        since,
    )
    assert alarm["updated"] >= since

    board.observe(limit(1.4, state="cleared"))
    assert board.reports() == []
    lines = alarm_lines(caplog)
    assert [(level, msg) for level, msg, _ in lines] == [
        ("WARNING", "alarm raised"),
        ("INFO", "alarm cleared"),
    ]
    raised, cleared = lines[0][2], lines[1][2]
    assert raised == {
        "alarm": "limit:gearbox:vib_radial:peak>2.0",
        "kind": "limit",
        "source": "gearbox",
        "severity": "critical",
        "what": "vib_radial peak 3.51 over 2.0",
        "value": 3.51,
        "since": since,
    }
    assert cleared["alarm"] == raised["alarm"] and cleared["what"] == "vib_radial peak 4.2 over 2.0"
    assert cleared["why"] == "vib_radial peak back to 1.4 (limit 2.0)" and "lasted" in cleared


def test_a_warning_and_an_alarm_level_on_one_feature_are_two_alarms() -> None:
    board = AlarmBoard()
    board.observe(limit(2.5, above=2.0, priority=Priority.EVENT))
    board.observe(limit(3.5, above=3.0, priority=Priority.ALERT))
    board.observe(limit(-1.0, channel="temp", feature="mean", above=None, below=0.0))
    assert ids(board) == [
        "limit:gearbox:vib_radial:peak>3.0",  # critical first...
        "limit:gearbox:temp:mean<0.0",  # ...oldest first among them
        "limit:gearbox:vib_radial:peak>2.0",
    ]
    assert [a["severity"] for a in board.reports()] == ["critical", "critical", "warning"]
    board.observe(limit(2.6, above=3.0, state="cleared"))
    assert ids(board) == ["limit:gearbox:temp:mean<0.0", "limit:gearbox:vib_radial:peak>2.0"]


async def test_an_anomaly_alarm_escalates_and_clears_when_it_ends_or_its_stage_starts_over(
    data_dir: Path, journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    guard = await live_parts(data_dir, journal, 10**12)
    board = AlarmBoard()
    caplog.set_level(logging.INFO, logger=LOGGER)
    started = anomaly("started", priority=Priority.EVENT, score=3.0)
    board.observe(started)
    (alarm,) = board.reports()
    assert (alarm["id"], alarm["severity"], alarm["value"]) == ("anomaly:gearbox", "warning", 3.0)
    # One wording for the alarm and the page's events (appliance/status/wording.py).
    assert alarm["what"] == describe("anomaly", started.body)
    assert "vib_radial.rms" in alarm["what"]
    board.observe(anomaly("escalated", priority=Priority.ALERT, score=9.0))
    (alarm,) = board.reports()
    assert (alarm["severity"], alarm["value"]) == ("critical", 9.0)
    board.observe(anomaly("ended", priority=Priority.ALERT, score=1.0))
    assert board.reports() == []
    assert [msg for _, msg, _ in alarm_lines(caplog)] == [
        "alarm raised",
        "alarm escalated",
        "alarm cleared",
    ]

    # A restarted source's anomaly stage starts without an anomaly: its alarm goes with it.
    stage: dict[str, Any] = {"in_anomaly": True, "last_score": 7.5}
    board.observe(anomaly("started", priority=Priority.ALERT))
    stages = {"gearbox": lambda: stage}
    board.refresh(destinations={}, guard=guard, journal=journal, anomalies=stages)
    assert board.reports()[0]["value"] == 7.5
    stage["in_anomaly"] = False
    board.refresh(destinations={}, guard=guard, journal=journal, anomalies=stages)
    assert board.reports() == []


async def test_a_zone_alert_stays_a_while_after_the_last_entry_and_event_zones_raise_none(
    data_dir: Path, journal: Journal
) -> None:
    guard = await live_parts(data_dir, journal, 10**12)
    clock = Clock()
    board = AlarmBoard(clock=clock)
    board.observe(zone_entry("person", 0.7, priority=Priority.EVENT))
    assert board.reports() == []
    board.observe(zone_entry("person", 0.87))
    (alarm,) = board.reports()
    assert alarm["id"] == "zone:yard:cycle_lane"
    assert (alarm["kind"], alarm["severity"]) == ("zone", "critical")
    assert alarm["what"] == "person entered cycle_lane, 0.87"
    clock.now += 200
    board.observe(zone_entry("bicycle", 0.61))
    assert board.reports()[0]["what"] == "bicycle entered cycle_lane, 0.61 (2 entries)"
    clock.now += 299  # 5 minutes after the last entry, not the first
    board.refresh(destinations={}, guard=guard, journal=journal, anomalies={})
    assert len(board) == 1
    clock.now += 1
    board.refresh(destinations={}, guard=guard, journal=journal, anomalies={})
    assert board.reports() == []


# ------------------------------------------------------------------------ live state, for real


async def live_parts(data_dir: Path, journal: Journal, budget: int) -> StorageGuard:
    """A real storage guard over the test's journal, with `budget` as its disk budget."""
    store = PayloadStore(data_dir / "payloads")
    return StorageGuard(journal, store, StorageSection(disk_budget=budget))


async def test_a_refused_destination_and_a_collision_are_delivery_alarms_and_health_reasons(
    data_dir: Path, journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    guard = await live_parts(data_dir, journal, 10**12)
    board = AlarmBoard()
    monitor = HealthMonitor(journal, guard, mode="run", alarms=board)
    shore = DestinationState("shore")
    usb = DestinationState("usb")
    monitor.destinations.update({"shore": shore, "usb": usb})
    assert monitor.snapshot()["alarms"] == []

    shore.refused = "409 conflicting records: seqs 10-12 hold other content"
    shore.refused_since = "2026-03-15T10:00:00.000000Z"
    usb.collision = JournalCollision(journals=("j-other",), detail="two journals")
    snap = monitor.snapshot()
    # The appliance at fault AND an alarm: an operator must see a held cursor.
    assert snap["state"] == "degraded"
    assert snap["reasons"] == ["sync_refused:shore", "journal_collision:usb"]
    refused, collision = snap["alarms"]
    assert refused == {
        "id": "delivery:shore",
        "kind": "delivery",
        "source": "shore",
        "what": "shore refuses the backlog: 409 conflicting records: seqs 10-12 hold other content",
        "severity": "critical",
        "since": "2026-03-15T10:00:00.000000Z",
        "updated": "2026-03-15T10:00:00.000000Z",
        "value": None,
    }
    assert (collision["id"], collision["severity"]) == ("delivery:usb:collision", "warning")
    assert "j-other" in collision["what"]
    monitor.snapshot()  # looked at again: no second line
    shore.refused = None
    usb.collision = None
    snap = monitor.snapshot()
    assert (snap["state"], snap["alarms"]) == ("ok", [])
    assert [msg for _, msg, _ in alarm_lines(caplog)] == ["alarm raised"] * 2 + [
        "alarm cleared"
    ] * 2


async def test_a_full_disk_the_budget_and_journal_trouble_are_appliance_alarms(
    data_dir: Path, journal: Journal
) -> None:
    clock = Clock()
    board = AlarmBoard(clock=clock)
    await journal.append(NewRecord("a", "reading", Priority.TELEMETRY, {"x": 1}))
    small = await live_parts(data_dir, journal, 1)  # any journal is over a 1-byte budget
    await small.usage()

    def refresh(guard: StorageGuard) -> None:
        board.refresh(destinations={}, guard=guard, journal=journal, anomalies={})

    refresh(small)
    (budget,) = board.reports()
    assert (budget["id"], budget["source"], budget["severity"]) == (
        "storage:budget",
        "appliance",
        "warning",
    )
    assert budget["what"].startswith("disk budget ") and isinstance(budget["value"], float)

    small.journal.shed_level = 2  # what the guard sets when the file system is full
    small.degraded_reason = "disk_full"
    refresh(small)
    assert ids(board) == ["storage:disk_full", "storage:budget"]
    full = board.reports()[0]
    assert (
        full["severity"] == "critical" and "not journalling telemetry and samples" in full["what"]
    )
    small.journal.shed_level = 0
    small.degraded_reason = None
    roomy = await live_parts(data_dir, journal, 10**12)
    await roomy.usage()
    refresh(roomy)
    assert board.reports() == []

    # Dropped records: a warning; a dropped alert is critical. Quiet for 5 minutes: cleared.
    journal.count_drop(Priority.TELEMETRY, "disk_full", 40)
    refresh(roomy)
    (dropped,) = board.reports()
    assert dropped["what"] == "40 records not journalled: telemetry 40 (disk full)"
    assert (dropped["severity"], dropped["value"]) == ("warning", 40)
    clock.now += 200
    journal.count_drop(Priority.ALERT, "payload_vanished")
    refresh(roomy)
    (dropped,) = board.reports()
    assert dropped["severity"] == "critical" and dropped["value"] == 41
    # The writer counts a failed commit so (sync/journal_writer.py): one more, and its error.
    journal.stats.failed_commits += 1
    journal.stats.last_error = "disk I/O error"
    refresh(roomy)
    assert ids(board) == ["journal:dropped", "journal:commits"]
    assert (
        board.reports()[1]["what"]
        == "journal commits failing: 1 failed; last error: disk I/O error"
    )
    clock.now += 299
    refresh(roomy)
    assert len(board) == 2
    clock.now += 1
    refresh(roomy)
    assert board.reports() == []


async def test_a_machine_alarm_leaves_the_appliance_healthy(
    data_dir: Path, journal: Journal
) -> None:
    guard = await live_parts(data_dir, journal, 10**12)
    board = AlarmBoard()
    monitor = HealthMonitor(journal, guard, mode="run", alarms=board)
    board.observe(limit(3.51))
    snap = monitor.snapshot()
    assert (snap["state"], snap["reasons"]) == ("ok", [])
    assert [a["id"] for a in snap["alarms"]] == ["limit:gearbox:vib_radial:peak>2.0"]
    TypeAdapter(list[AlarmReport]).validate_python(snap["alarms"], strict=True)


# ----------------------------------------------------------------- through the stages, for real


def csv_sensor(path: Path, values: list[float]) -> CsvSensor:
    start = datetime(2026, 3, 15, 10, tzinfo=UTC)
    rows = "".join(
        f"{format_ts(start + timedelta(seconds=i))},{value}\n" for i, value in enumerate(values)
    )
    path.write_text("timestamp,temp\n" + rows)
    return CsvSensor.model_validate(
        {
            "name": "boiler",
            "type": "csv",
            "path": str(path),
            "window": "1s",
            "limits": [{"feature": "max", "channel": "temp", "above": 40.0, "priority": "event"}],
        }
    )


def limit_states(data_dir: Path) -> list[str]:
    with JournalReader.open(data_dir) as reader:
        return [json.loads(r.body_json)["state"] for r in reader.iter_records(kind="limit")]


async def test_a_source_restarted_while_over_its_limit_clears_it_when_it_comes_back_under(
    data_dir: Path, journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    board = AlarmBoard()
    hot = csv_sensor(tmp_path / "hot.csv", [20.0, 55.0, 56.0])
    first = SourcePipeline(hot, open_source(hot), journal, payload_store, watch=board.observe)
    await first.run()
    assert ids(board) == ["limit:boiler:temp:max>40.0"] and first.violated == {(0, "temp")}
    assert board.reports()[0]["value"] == 56.0  # the last window over the limit

    # The supervisor's next attempt is a new pipeline: it takes over what the last one left.
    cool = csv_sensor(tmp_path / "cool.csv", [21.0, 22.0])
    again = SourcePipeline(
        cool,
        open_source(cool),
        journal,
        payload_store,
        watch=board.observe,
        violated=first.violated,
    )
    await again.run()
    assert board.reports() == []
    assert limit_states(data_dir) == ["violated", "cleared"]  # no second `violated`


async def test_a_full_disk_does_not_hide_an_alarm(
    data_dir: Path, journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    board = AlarmBoard()
    hot = csv_sensor(tmp_path / "hot.csv", [55.0])
    pipeline = SourcePipeline(hot, open_source(hot), journal, payload_store, watch=board.observe)
    journal.shed_level = 3  # the disk is full: events are refused
    await pipeline.run()
    assert ids(board) == ["limit:boiler:temp:max>40.0"]
    assert pipeline.recorder.stats.dropped >= 1


# --------------------------------------------------------------------------- /api/events


@pytest.fixture
async def events_server(tmp_path: Path) -> AsyncIterator[tuple[str, Journal]]:
    """A status server on loopback over a real journal, with no sources of its own."""
    data = tmp_path / "data"
    cfg = ApplianceConfig.model_validate(
        {
            "appliance": {"id": "events-01", "data_dir": str(data)},
            "status": {"listen": "127.0.0.1:0"},
        }
    )
    store = PayloadStore(data / "payloads")
    journal = await Journal.open(data, appliance_id="events-01", payloads=store)
    try:
        async with AsyncExitStack() as stack:
            guard = await stack.enter_async_context(StorageGuard(journal, store, cfg.storage))
            monitor = HealthMonitor(journal, guard, mode="run")
            server = await stack.enter_async_context(
                StatusServer(cfg, journal, store, monitor, [], token=None)
            )
            assert server.url is not None
            yield server.url.rstrip("/"), journal
    finally:
        await journal.close()


START = datetime(2026, 3, 15, 10, tzinfo=UTC)


async def flood(journal: Journal) -> list[NewRecord]:
    """A camera's flood of events with a sensor's few limit alerts among them, one second apart,
    and the telemetry /api/events never lists."""
    records = []
    for i in range(400):
        ts = START + timedelta(seconds=i)
        if i % 50 == 7:
            record = limit(3.0 + i / 100)
        elif i % 40 == 3:
            record = zone_entry("person", 0.9)
        elif i % 3 == 0:
            record = reading("gearbox", "vib_radial", peak=1.0)
        else:
            record = NewRecord("yard", "object", Priority.EVENT, {"label": "bicycle", "i": i})
        records.append(NewRecord(record.source, record.kind, record.priority, record.body, ts=ts))
    for record in records:
        await journal.append(record)
    return records


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        text = await response.text()
        return response.status, (json.loads(text) if response.status == 200 else text)


def expected(
    journal_dir: Path, keep: Any, priorities: tuple[int, ...] = (1, 2)
) -> list[tuple[int, str, str]]:
    """(seq, source, kind) of every record `keep` accepts, newest first, from the journal."""
    with JournalReader.open(journal_dir) as reader:
        found = [
            (r.seq, r.source, r.kind)
            for r in reader.iter_records()
            if int(r.priority) in priorities and keep(r)
        ]
    return sorted(found, reverse=True)


async def test_api_events_filters_by_priority_kind_source_and_since(
    events_server: tuple[str, Journal],
) -> None:
    base, journal = events_server
    await flood(journal)
    data = journal.data_dir
    async with aiohttp.ClientSession() as session:

        async def shown(query: str) -> list[tuple[int, str, str]]:
            status, answer = await get(session, f"{base}/api/events?limit=500&{query}")
            assert status == 200, answer
            return [(e["seq"], e["source"], e["kind"]) for e in answer["events"]]

        limits = expected(data, lambda r: r.kind == "limit")
        assert len(limits) == 8 and await shown("kind=limit") == limits
        both = expected(data, lambda r: r.kind in ("limit", "zone_entry"))
        assert await shown("kind=limit,zone_entry") == both
        assert await shown("kind=limit&kind=zone_entry") == both
        gearbox = expected(data, lambda r: r.source == "gearbox")
        assert await shown("source=gearbox") == gearbox == limits  # its readings are telemetry
        assert await shown("source=gearbox,yard") == expected(data, lambda r: True)
        alerts = expected(data, lambda r: True, priorities=(1,))
        assert await shown("priority=alert") == alerts
        assert {kind for _, _, kind in alerts} == {"limit", "zone_entry"}
        assert await shown("priority=alert,event") == expected(data, lambda r: True)
        cut = format_ts(START + timedelta(seconds=300))
        late = expected(data, lambda r: r.ts >= cut and r.kind == "limit")
        assert len(late) == 2 and await shown(f"since={cut}&kind=limit") == late
        assert await shown("kind=limit&source=yard") == []


async def test_api_events_pages_with_a_cursor_and_no_record_twice_or_missed(
    events_server: tuple[str, Journal],
) -> None:
    base, journal = events_server
    await flood(journal)
    everything = expected(journal.data_dir, lambda r: True)
    async with aiohttp.ClientSession() as session:
        for first, want in (
            ("/api/events?limit=37", everything),
            (
                "/api/events?limit=3&kind=limit",
                expected(journal.data_dir, lambda r: r.kind == "limit"),
            ),
        ):
            seen: list[tuple[int, str, str]] = []
            path: str | None = first
            pages = 0
            while path is not None:
                status, answer = await get(session, base + path)
                assert status == 200, answer
                seen += [(e["seq"], e["source"], e["kind"]) for e in answer["events"]]
                path = answer["next"]
                if path is not None:
                    assert f"before={answer['next_before']}" in path
                pages += 1
            assert seen == want
            assert pages >= 2


def test_a_rare_filter_reads_a_bounded_slice_per_page_and_still_finds_everything(
    tmp_path: Path,
) -> None:
    async def fill() -> None:
        journal = await Journal.open(
            tmp_path, appliance_id="scan", payloads=PayloadStore(tmp_path / "payloads")
        )
        try:
            await flood(journal)
        finally:
            await journal.close()

    asyncio.run(fill())
    want = expected(tmp_path, lambda r: r.kind == "limit")
    with JournalReader.open(tmp_path) as reader:
        found: list[tuple[int, str, str]] = []
        before: int | None = None
        short_pages = 0
        while True:
            page, before = reader.events_page(
                (Priority.ALERT, Priority.EVENT), limit=5, before=before, kinds=("limit",), scan=20
            )
            found += [(r.seq, r.source, r.kind) for r in page]
            short_pages += len(page) < 5 and before is not None
            if before is None:
                break
    assert found == want
    assert short_pages > 0  # pages that read their 20 rows and found too few, yet went on


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("priority=telemetry", "priority must be alert or event"),
        ("kind=limits", "did you mean limit?"),
        ("source=no%20such%20name", "is no source name"),
        ("since=yesterday", "since 'yesterday'"),
        ("before=0", "before must be a record's seq"),
        ("before=ten", "before must be a record's seq"),
        ("limit=501", "limit must be a whole number from 1 to 500"),
    ],
)
async def test_api_events_refuses_a_bad_filter_naming_it(
    events_server: tuple[str, Journal], query: str, named: str
) -> None:
    base, _ = events_server
    async with aiohttp.ClientSession() as session:
        status, text = await get(session, f"{base}/api/events?{query}")
    assert status == 400 and named in text, text


# ------------------------------------------------------------------------- the real daemon


def nmea(body: str) -> bytes:
    """A sentence framed with its checksum (XOR of the characters between $ and *)."""
    return f"${body}*{reduce(xor, body.encode('ascii'), 0):02X}\r\n".encode("ascii")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def fetch_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


@pytest.fixture
def nmea_daemon(tmp_path: Path) -> Iterator[tuple[str, int, Path, Path]]:
    """The daemon with an NMEA source on UDP whose water temperature limit the test sets off:
    (status URL, UDP port, config, log)."""
    port = free_udp_port()
    config = write_config(
        tmp_path / "c.yaml",
        tmp_path / "data",
        [
            {
                "name": "gps",
                "type": "nmea",
                "transport": "udp",
                "host": "127.0.0.1",
                "port": port,
                "window": "300ms",
                "limits": [
                    {
                        "feature": "max",
                        "channel": "water_temp_c",
                        "above": 40.0,
                        "priority": "alert",
                    }
                ],
            }
        ],
        appliance={"health_interval": "1h"},
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:

        def announced() -> str | None:
            try:
                events = log_events(log)
            except json.JSONDecodeError:  # a line still being written
                return None
            urls = [e["url"] for e in events if e["msg"] == "status page listening"]
            return urls[-1].rstrip("/") if urls else None

        yield wait_for(announced, 30, "the status page to listen"), port, config, log
    finally:
        assert stop_daemon(proc) == 0, log.read_text()[-3000:]


ALARM_ID = "limit:gps:water_temp_c:max>40.0"


def test_the_daemon_raises_and_clears_a_sensor_limit_alarm_everywhere_it_shows(
    nmea_daemon: tuple[str, int, Path, Path],
) -> None:
    base, port, config, log = nmea_daemon

    def send(celsius: float) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(nmea(f"IIMTW,{celsius:.1f},C"), ("127.0.0.1", port))

    def alarms() -> list[dict[str, Any]]:
        status, report = fetch_json(f"{base}/api/status")
        assert status == 200
        found: list[dict[str, Any]] = report["alarms"]
        return found

    def listening() -> bool:
        status, report = fetch_json(f"{base}/api/status")
        return (
            status == 200 and report["daemon"]["sources"].get("gps", {}).get("state") == "running"
        )

    # The page listens before the sources start: a datagram sent earlier would be lost.
    wait_for(listening, 20, "the NMEA source to listen", interval=0.2)
    send(21.0)
    send(55.0)
    (alarm,) = wait_for(alarms, 20, "the limit alarm in /api/status", interval=0.2)
    assert (alarm["id"], alarm["kind"], alarm["source"], alarm["severity"]) == (
        ALARM_ID,
        "limit",
        "gps",
        "critical",
    )
    assert alarm["what"] == "water_temp_c max 55.0 over 40.0" and alarm["value"] == 55.0

    # A machine in alarm, an appliance in good health.
    status, report = fetch_json(f"{base}/api/status")
    TypeAdapter(StatusReport).validate_python(report, strict=True)
    assert (report["state"], report["reasons"], report["healthy"]) == ("ok", [], True)
    assert report["daemon"]["alarms"] == report["alarms"]
    assert fetch_json(f"{base}/healthz") == (200, {"status": "ok"})
    gauges = {
        (s.labels["kind"], s.labels["severity"]): s.value
        for family in text_string_to_metric_families(fetch_text(f"{base}/metrics"))
        if family.name == "appliance_alarms_active"
        for s in family.samples
    }
    assert gauges[("limit", "critical")] == 1.0
    assert sum(gauges.values()) == 1.0 and len(gauges) == 12  # every kind and severity

    def status_text() -> str | None:
        shown = run_cli("status", "-c", str(config)).stdout
        return shown if "alarms     1 active" in shown else None

    # `appliance status` reads the heartbeat, written every 5 s.
    text = wait_for(status_text, 20, "`appliance status` to show the alarm", interval=0.5)
    assert "  CRITICAL gps: water_temp_c max 55.0 over 40.0 (since " in text

    # Still over the limit: the alarm follows the value, without a second log line.
    send(61.5)
    wait_for(
        lambda: [a for a in alarms() if a["value"] == 61.5],
        20,
        "the alarm's value to follow the reading",
        interval=0.2,
    )
    (alarm,) = alarms()
    assert alarm["what"] == "water_temp_c max 61.5 over 40.0"

    send(20.5)
    wait_for(lambda: alarms() == [], 20, "the alarm to clear", interval=0.2)
    status, events = fetch_json(f"{base}/api/events?kind=limit&source=gps")
    assert status == 200
    assert [e["body"]["state"] for e in events["events"]] == [
        "cleared",
        "violated",
    ]
    assert fetch_json(f"{base}/healthz") == (200, {"status": "ok"})

    lines = wait_for(
        lambda: (
            [
                e
                for e in log_events(log)
                if e.get("alarm") == ALARM_ID and e["msg"].startswith("alarm ")
            ]
            or None
        ),
        5,
        "the alarm's log lines",
    )
    assert [(e["level"], e["msg"]) for e in lines] == [
        ("warning", "alarm raised"),
        ("info", "alarm cleared"),
    ]
    assert lines[0]["what"] == "water_temp_c max 55.0 over 40.0"
    assert lines[1]["why"] == "water_temp_c max back to 20.5 (limit 40.0)"
