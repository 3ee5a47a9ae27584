"""Tests of sync.rollup (tiered telemetry): readings older than a tier become aggregates in one
transaction with the rows they replace; what is never rolled up; rollups of rollups; and exact
delivery: a destination gets each reading once, raw or inside a rollup, never both, and a
destination cursor, the batches just past it and the journal's identity boundaries are never
spanned."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.status.report import collect_status, render_status
from config import ApplianceConfig, StorageSection, SyncSection
from config.shipping import DirectoryDestination
from receiver import build_receiver_app, serve_receiver
from sync import Journal, JournalReader, NewRecord, PayloadStore, Priority, StorageGuard
from sync.destination import MemoryDestination
from sync.engine import SyncEngine
from sync.rollup import REPORT_KIND, ROLLUP_KIND, TelemetryRollup
from tests.conftest import APPLIANCE_ID
from tests.test_sync_http import TOKEN, engine_for

ADMIN = "rollup-reader-admin-token"

NOW = datetime(2026, 6, 1, tzinfo=UTC)
TIERS = [{"after": "1d", "resolution": "1m"}, {"after": "2d", "resolution": "10m"}]


def storage(**extra: Any) -> StorageSection:
    return StorageSection.model_validate(
        {"disk_budget": "1TiB", "keep_synced": 0, "min_free": 0, "reserve": 0, "tiers": TIERS}
        | extra
    )


def reading(ts: datetime, i: int, source: str = "gearbox") -> NewRecord:
    value = float(i % 10)
    body: dict[str, Any] = {
        "window_s": 1.0,
        "channels": {"hss": {"rms": value, "peak": 2 * value, "gone": None}},
        "anomaly_score": float(i % 7),
    }
    return NewRecord(source, "reading", Priority.TELEMETRY, body, ts=ts)


async def journal_hours(journal: Journal, start: datetime, hours: float, every_s: int = 10) -> int:
    """Readings every `every_s` seconds from `start` for `hours`, with an alert, an event, a
    sample and a data-quality record every 10 minutes that must all survive."""
    records: list[NewRecord] = []
    steps = int(hours * 3600 / every_s)
    for i in range(steps):
        ts = start + timedelta(seconds=i * every_s)
        records.append(reading(ts, i))
        if i % (600 // every_s) == 0:
            records += [
                NewRecord("gearbox", "limit", Priority.ALERT, {"i": i}, ts=ts),
                NewRecord("gearbox", "anomaly", Priority.EVENT, {"i": i}, ts=ts),
                NewRecord("gearbox", "anomaly_window", Priority.SAMPLE, {"i": i}, ts=ts),
                NewRecord("gearbox", "data_quality", Priority.TELEMETRY, {"i": i}, ts=ts),
            ]
    await journal.append_many(records)
    return steps


def rows(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with JournalReader.open(data_dir) as reader:
        return list(reader.conn.execute(sql, args).fetchall())


def kinds(data_dir: Path) -> dict[str, int]:
    return dict(rows(data_dir, "SELECT kind, COUNT(*) FROM records GROUP BY kind"))


def engine(
    journal: Journal, store: PayloadStore, memory: MemoryDestination, tmp: Path
) -> SyncEngine:
    cfg = DirectoryDestination.model_validate(
        {"name": memory.name, "type": "directory", "path": str(tmp)}
    )
    return SyncEngine(
        journal, store, memory, cfg, SyncSection.model_validate({"batch_records": 50})
    )


async def test_tiers_roll_old_readings_into_aggregates_and_leave_the_rest(
    journal: Journal, data_dir: Path
) -> None:
    total = await journal_hours(journal, NOW - timedelta(days=3), 60)
    before = kinds(data_dir)
    rollup = TelemetryRollup(journal, storage(), batch_records=50)

    report = await rollup.run_once(now=NOW)

    after = kinds(data_dir)
    for kind in ("limit", "anomaly", "anomaly_window", "data_quality"):
        assert after[kind] == before[kind], kind  # never rolled up
    # Readings of the last day stay one by one; older ones became 1- and 10-minute aggregates.
    young = rows(
        data_dir,
        "SELECT COUNT(*) FROM records WHERE kind = 'reading' AND ts >= ?",
        (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S"),
    )[0][0]
    assert young == after["reading"] > 0
    bodies = [
        json.loads(b)
        for (b,) in rows(
            data_dir, "SELECT body FROM records WHERE kind = ? ORDER BY seq", ROLLUP_KIND
        )
    ]
    assert {b["resolution_s"] for b in bodies} == {60, 600}
    # Every reading is accounted for once: raw or counted in exactly one rollup.
    assert sum(b["replaces"]["records"] for b in bodies) + after["reading"] == total
    ten_minute = next(b for b in bodies if b["resolution_s"] == 600)
    assert ten_minute["replaces"]["records"] == 60
    rms = ten_minute["channels"]["hss"]["rms"]
    assert rms["count"] == 60 and rms["min"] == 0.0 and rms["max"] == 9.0
    assert math.isclose(rms["mean"], 4.5)
    assert ten_minute["channels"]["hss"]["gone"] == {
        "mean": None,
        "min": None,
        "max": None,
        "count": 0,
    }
    assert ten_minute["anomaly_score_max"] == 6.0
    # Counted: the table, the counts status reads, and one journalled report.
    tallies = {(r, k): (n, m) for r, k, n, m, _b, _a in rows(data_dir, "SELECT * FROM rollups")}
    assert tallies[(600, "reading")][0] >= 60 and tallies[(60, "reading")][1] > 0
    counted = dict(
        rows(
            data_dir, "SELECT kind, records FROM counts WHERE priority = ?", int(Priority.TELEMETRY)
        )
    )
    assert counted["reading"] == after["reading"] and counted[ROLLUP_KIND] == after[ROLLUP_KIND]
    reports = rows(data_dir, "SELECT body FROM records WHERE kind = ?", REPORT_KIND)
    assert len(reports) == 1 and report.records == sum(
        t["records"] for t in json.loads(reports[0][0])["tiers"]
    )
    # A second pass at the same time finds nothing more to do and journals nothing.
    assert (await rollup.run_once(now=NOW)).records == 0
    assert kinds(data_dir) == {**after, REPORT_KIND: 1}


async def test_a_destination_gets_each_reading_once_raw_or_rolled_up(
    journal: Journal, payload_store: PayloadStore, data_dir: Path, tmp_path: Path
) -> None:
    """`early` drained half the readings before the rollup, `late` none; `mid` acknowledged a
    few batches. After the rollup each holds every reading exactly once, and `early` received no
    rollup of readings it already had."""
    total = await journal_hours(journal, NOW - timedelta(days=2, hours=6), 4)
    early, late, mid = (MemoryDestination(name=n) for n in ("early", "late", "mid"))
    engines = {
        m.name: engine(journal, payload_store, m, tmp_path / m.name) for m in (early, late, mid)
    }
    await engines["late"].journal.register_destination("late")
    # `early` ships everything there is now; `mid` only three batches of telemetry.
    await engines["early"].drain()
    telemetry = rows(data_dir, "SELECT seq FROM records WHERE priority = 4 ORDER BY seq")
    mid_cursor = telemetry[150][0]
    mid_had = rows(
        data_dir, "SELECT COUNT(*) FROM records WHERE kind = 'reading' AND seq <= ?", mid_cursor
    )[0][0]
    for priority in Priority:
        await journal.acknowledge("mid", priority, 1, mid_cursor if priority == 4 else 0, "b")
    # More readings arrive after early's drain: it will receive those raw or rolled up.
    total += await journal_hours(journal, NOW - timedelta(days=2, hours=2), 1)

    await TelemetryRollup(journal, storage(), batch_records=50).run_once(now=NOW)
    for name in ("early", "late", "mid"):
        await engines[name].drain()

    for memory in (early, late, mid):
        all_readings = total - (mid_had if memory is mid else 0)
        received: dict[int, Any] = memory.records
        raw = [s for s, r in received.items() if r["kind"] == "reading"]
        rolled = [r["body"] for r in received.values() if r["kind"] == ROLLUP_KIND]
        spans = [(b["replaces"]["first_seq"], b["replaces"]["last_seq"]) for b in rolled]
        # No raw reading also inside a rollup's range, no two rollups overlapping.
        assert not [s for s in raw for lo, hi in spans if lo <= s <= hi], memory.name
        spans.sort()
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), memory.name
        assert len(raw) + sum(b["replaces"]["records"] for b in rolled) == all_readings, memory.name
    # `early` had the first four hours raw: it got no rollup of them.
    early_first_drain = max(s for s, r in early.records.items() if str(r["ts"]) < "2026-05-29T22")
    early_rollups: list[Any] = [
        r["body"] for r in early.records.values() if r["kind"] == ROLLUP_KIND
    ]
    assert not [b for b in early_rollups if b["replaces"]["first_seq"] <= early_first_drain]
    assert [r for r in late.records.values() if r["kind"] == ROLLUP_KIND]
    # The records just past `mid`'s cursor (3 batches of 50) stayed readings.
    guarded = [s for (s,) in telemetry[151:301]]
    assert all(mid.records[s]["kind"] in ("reading", "data_quality") for s in guarded)


async def test_health_snapshots_keep_the_newest_of_each_bucket(
    journal: Journal, data_dir: Path
) -> None:
    start = NOW - timedelta(days=1, hours=1)
    await journal.append_many(
        [
            NewRecord(
                "appliance",
                "health",
                Priority.TELEMETRY,
                {"n": i},
                ts=start + timedelta(seconds=20 * i),
            )
            for i in range(9)  # three minutes
        ]
    )
    await TelemetryRollup(journal, storage(), batch_records=50).run_once(now=NOW)
    bodies = [
        json.loads(b)
        for (b,) in rows(data_dir, "SELECT body FROM records WHERE kind = 'rollup' ORDER BY seq")
    ]
    assert [(b["of"], b["last"], b["replaces"]["records"]) for b in bodies] == [
        ("health", {"n": 2}, 3),
        ("health", {"n": 5}, 3),
        ("health", {"n": 8}, 3),
    ]


async def test_a_rollup_never_spans_the_journal_identity_boundary(
    journal: Journal, data_dir: Path
) -> None:
    start = NOW - timedelta(days=1, hours=1)
    await journal.append_many([reading(start + timedelta(seconds=i), i) for i in range(30)])
    await journal.fork()
    await journal.append_many([reading(start + timedelta(seconds=30 + i), i) for i in range(30)])
    boundary = rows(data_dir, "SELECT value FROM meta WHERE key = 'journal_earlier'")[0][0]
    last_of_old = json.loads(boundary)[-1][0]
    await TelemetryRollup(journal, storage(), batch_records=50).run_once(now=NOW)
    spans = [
        json.loads(b)["replaces"]
        for (b,) in rows(data_dir, "SELECT body FROM records WHERE kind = 'rollup'")
    ]
    assert len(spans) == 2
    assert all(s["last_seq"] <= last_of_old or s["first_seq"] > last_of_old for s in spans)


async def test_retention_rolls_up_before_it_evicts(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    await journal_hours(journal, NOW - timedelta(days=400), 6, every_s=2)
    await journal.checkpoint()
    async with StorageGuard(journal, payload_store, storage()) as probe:
        used = (await probe.usage()).used
    settings = storage(disk_budget=int(used * 0.8))
    rollup = TelemetryRollup(journal, settings, batch_records=50)
    async with StorageGuard(journal, payload_store, settings, rollup) as guard:
        await guard.run_once()
        assert (await guard.usage()).used <= settings.disk_budget
    # Old readings went into rollups: nothing had to be evicted.
    assert rows(data_dir, "SELECT COUNT(*) FROM evictions")[0][0] == 0
    assert kinds(data_dir)[ROLLUP_KIND] > 0


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        (
            [{"after": "2d", "resolution": "1m"}, {"after": "1d", "resolution": "10m"}],
            "youngest first",
        ),
        ([{"after": "1d", "resolution": "10m"}, {"after": "2d", "resolution": "15m"}], "multiple"),
        ([{"after": "1d", "resolution": "7s"}], "divide a day"),
    ],
)
def test_tiers_that_cannot_work_are_refused(tiers: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        storage(tiers=tiers)


async def test_a_receiver_stores_rollups_and_serves_them_with_the_readings_once(
    journal: Journal, payload_store: PayloadStore, data_dir: Path, tmp_path: Path
) -> None:
    """Over the real protocol: the receiver ashore got the first hours raw, the rest arrives as
    rollups; its read API gives each reading once, raw or inside a rollup, and no batch is
    refused. `appliance export --kind rollup` lists the same rollups on the appliance."""
    total = await journal_hours(journal, NOW - timedelta(days=2, hours=6), 2)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    app = build_receiver_app(tmp_path / "shore", {APPLIANCE_ID: TOKEN}, admin_tokens=(ADMIN,))
    async with serve_receiver(app, "127.0.0.1", 0) as bound:
        url = f"http://127.0.0.1:{bound[0][1]}"
        shore, target = engine_for(journal, payload_store, url, token_file)
        async with target:
            await shore.drain()
            total += await journal_hours(journal, NOW - timedelta(days=2, hours=3), 2)
            await TelemetryRollup(journal, storage(), batch_records=25).run_once(now=NOW)
            await shore.drain()
        assert shore.state.refused is None
        got: list[dict[str, Any]] = []
        after = None
        async with aiohttp.ClientSession() as session:
            while True:
                params = {"limit": "1000", **({"after": after} if after else {})}
                async with session.get(
                    f"{url}/v1/records",
                    params=params,
                    headers={"Authorization": f"Bearer {ADMIN}"},
                ) as response:
                    page = await response.json()
                    assert response.status == 200, page
                got += [entry["record"] for entry in page["records"]]
                after = page["next"]
                if not page["more"]:
                    break
    raw = [r["seq"] for r in got if r["kind"] == "reading"]
    rolled = [r["body"] for r in got if r["kind"] == ROLLUP_KIND]
    assert rolled and raw
    assert len(raw) + sum(b["replaces"]["records"] for b in rolled) == total
    assert len({r["seq"] for r in got}) == len(got)
    await journal.checkpoint()
    exported = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "appliance",
            "export",
            "--data-dir",
            str(data_dir),
            "--kind",
            "rollup",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    local = {r["seq"] for r in lines}
    assert {r["seq"] for r in got if r["kind"] == ROLLUP_KIND} <= local
    assert all(r["kind"] == ROLLUP_KIND and r["body"]["of"] == "reading" for r in lines)


async def test_status_counts_rollups(journal: Journal, data_dir: Path) -> None:
    """`appliance status` (and so the page and /metrics, which render the same figures)."""
    await journal_hours(journal, NOW - timedelta(days=1, hours=2), 1)
    await TelemetryRollup(journal, storage(), batch_records=25).run_once(now=NOW)
    await journal.checkpoint()
    cfg = ApplianceConfig.model_validate(
        {"appliance": {"id": APPLIANCE_ID, "data_dir": str(data_dir)}}
    )
    figures = collect_status(cfg)
    (tier,) = figures["rollups"]
    assert (tier["resolution_s"], tier["of"], tier["records"], tier["rollups"]) == (
        60,
        "reading",
        360,
        60,
    )
    assert tier["bytes_before"] > tier["bytes_after"] > 0
    assert "rollups    360 reading -> 60 of 60 s" in render_status(figures)
