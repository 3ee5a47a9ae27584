"""bench.autonomy: the sizing arithmetic on hand-made numbers (sample caps, the per-day split, levels
clear of limits, the generated NMEA voyage, days in a tiered budget), SQLite's record layout
against dbstat on a real journal, and a --quick run end to end whose JSON is checked against
itself and against the journals it leaves behind (--keep)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.autonomy import (
    GB,
    RECORDS_INDEX,
    DiskState,
    KindTally,
    RowBytes,
    Stretch,
    btree_pages,
    capped_samples,
    days_in_budget,
    json_parts,
    level_within_limits,
    profile_result,
    row_layout,
    voyage,
)
from config import Camera, Limit, load_config
from inference.builtin import BuiltinModelError, builtin_model_path
from sensors.camera import builtin_footage
from sensors.nmea import NMEA_CHANNELS
from sync import Journal, NewRecord, PayloadStore, Priority
from sync.reader import JOURNAL_FILE
from tests.helpers import component_missing

ROOT = Path(__file__).resolve().parents[1]


def camera(sampling: dict[str, Any]) -> Camera:
    return Camera.model_validate({"name": "yard", "url": "builtin:bikes", "sampling": sampling})


# ------------------------------------------------------------------------------ arithmetic


def test_camera_samples_are_held_to_the_tightest_cap() -> None:
    cam = camera({"per_hour": 30, "per_day": 200, "daily_bytes": 1_000_000})
    # 100 an hour wanted: 2400 a day; per_hour allows 720, per_day 200, daily_bytes 100.
    assert capped_samples(cam, per_hour=100.0, bytes_each=10_000.0) == (
        100.0,
        1_000_000.0,
        "daily_bytes",
    )
    assert capped_samples(cam, per_hour=100.0, bytes_each=1_000.0) == (200.0, 200_000.0, "per_day")
    # A trickle under every cap is extrapolated as measured.
    assert capped_samples(cam, per_hour=1.0, bytes_each=1_000.0) == (24.0, 24_000.0, None)


def test_per_day_is_the_measured_rates_plus_health_at_its_interval() -> None:
    cfg = load_config(ROOT / "config" / "turbine.yaml", environ={})
    stretch = Stretch(
        {
            ("gearbox", "reading"): KindTally(records=10, size_estimate=1_000),
            ("gearbox", "sample"): KindTally(
                records=1, size_estimate=500, payload_files=1, payload_bytes=30_000
            ),
            ("appliance", "health"): KindTally(records=2, size_estimate=500),
            ("appliance", "lifecycle"): KindTally(records=2, size_estimate=100),
        }
    )
    # The file grew by twice the journal's estimate of the 2,100 bytes written.
    before = DiskState(10_000, 0, 0, 0, 0)
    after = DiskState(14_200, 1, 30_000, 32_768, 15)
    result = profile_result(cfg, 2.0, stretch, before, after)
    assert result["journal"]["file_bytes_per_estimated_byte"] == 2.0
    assert result["journal"]["bytes_per_record"] == round(4_200 / 15, 1)
    assert result["records"] == {
        "in_stretch": 15,
        "measured": 11,
        "bookkeeping": {"health": 2, "lifecycle": 2},
        "per_hour": 5.5,
    }
    assert result["by_kind"]["reading"]["journal_bytes_per_record"] == 200.0
    # Per day over a 2 h stretch: readings 10 x 12 = 120 records of 200 B; samples 12 of 1,000 B
    # plus 30 kB payload each; health every 60 s (1440 a day) at 500 B each (250 x 2).
    assert result["health"] == {
        "interval_s": 60.0,
        "records_per_day": 1440.0,
        "bytes_per_record": 500.0,
    }
    journal = 120 * 200 + 12 * 1_000 + 1440 * 500
    assert result["per_day"] == {
        "records": 120 + 12 + 1440,
        "journal_bytes": journal,
        "payload_bytes": 12 * 30_000,
        "total_bytes": journal + 12 * 30_000,
    }
    assert result["days_per_gb"] == pytest.approx(GB / (journal + 360_000), rel=1e-3)
    assert result["days_in_disk_budget"] == pytest.approx(
        20 * 1024**3 / (journal + 360_000), rel=1e-3
    )


def test_generated_levels_stay_clear_of_the_limits() -> None:
    rng = np.random.default_rng(1)
    over = [Limit(feature="max", above=3.0, priority="alert")]
    assert level_within_limits(over, "reefers.001.setpoint_delta", rng) < 1.0
    band = [Limit(feature="mean", channel="oil", above=80.0, below=20.0, priority="event")]
    assert level_within_limits(band, "oil", rng) == 50.0
    # A limit on another channel does not apply.
    assert 5.0 <= level_within_limits(band, "water", rng) <= 500.0


def test_the_voyage_is_parsed_nmea_of_a_moving_ship() -> None:
    trip = voyage(120, np.random.default_rng(3))
    assert len(trip.rows) == 120 and len(trip.positions) == 120
    assert all(len(values) == len(NMEA_CHANNELS) for _, values in trip.rows)
    assert all(np.isfinite(values).all() for _, values in trip.rows)
    first, last = trip.positions[0], trip.positions[-1]
    assert first["lat"] != last["lat"] and first["lon"] != last["lon"]
    assert 10.0 <= last["sog_kn"] <= 18.0


def test_days_in_a_tiered_budget_solve_the_cumulative_cost() -> None:
    # 100 B a day for the newest 30 days, 10 B to 180 days, 1 B beyond.
    segments = [(0.0, 100.0), (30.0, 10.0), (180.0, 1.0)]
    assert days_in_budget(1_000, segments) == 10.0
    assert days_in_budget(3_000 + 10 * 20, segments) == 50.0
    assert days_in_budget(3_000 + 1_500 + 500, segments) == 680.0
    # Nothing past the last tier costs anything: everything fits.
    assert days_in_budget(1e12, [(0.0, 100.0), (30.0, 0.0)]) == float("inf")
    with pytest.raises(ValueError, match="day 0"):
        days_in_budget(1_000, [(1.0, 100.0)])


def test_json_parts_split_keys_values_and_punctuation() -> None:
    body = '{"a":1.5,"bc":[true,"xyz",null],"d":{"e":-2}}'
    parts = json_parts(body)
    assert parts is not None
    # keys a, bc, d, e: 5 bytes; values 1.5, true, xyz, null, -2: 3 + 4 + 3 + 4 + 2.
    assert (parts["keys"], parts["values"]) == (5, 16)
    assert parts["punctuation"] == len(body) - 21
    assert (parts["key_count"], parts["value_count"]) == (4, 5)
    # Not as the journal writes it: no split is guessed.
    assert json_parts('{"a": 1}') is None


async def test_the_record_layout_is_what_sqlite_stores(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    """Rows of every shape the journal writes (a model, payloads, a body long enough to spill
    onto overflow pages, large mono_ns): the computed records and index entries add up to what
    SQLite's dbstat finds on the pages."""
    ref = await payload_store.put(b"a snapshot")
    await journal.append_many(
        [
            NewRecord("gearbox", "reading", Priority.TELEMETRY, {"i": i, "x": 0.1 * i})
            for i in range(300)
        ]
        + [
            NewRecord("gearbox", "sample", Priority.SAMPLE, {"x": "v" * 9000}, model="m@1"),
            NewRecord("yard", "zone_entry", Priority.ALERT, {"n": 1}, payloads=(ref,)),
        ],
        force=True,
    )
    await journal.checkpoint()
    conn = sqlite3.connect(data_dir / JOURNAL_FILE)
    try:
        every = RowBytes()
        for values in conn.execute("SELECT * FROM records ORDER BY seq"):
            every.add(row_layout(values))
        trees = btree_pages(conn)
    finally:
        conn.close()
    assert every.rows > 300
    assert every.record == trees["records"]["payload"]
    assert every.index_record == trees[RECORDS_INDEX]["payload"]


# ------------------------------------------------------------------------------- a quick run


def kept_journal(root: Path, profile: str) -> sqlite3.Connection:
    (data_root,) = root.iterdir()
    return sqlite3.connect(data_root / profile / "data" / "journal.db")


def test_a_quick_run_adds_up_and_matches_the_journals_it_wrote(tmp_path: Path) -> None:
    try:
        builtin_footage("bikes")
        builtin_model_path()
    except (ValueError, BuiltinModelError) as exc:
        component_missing(f"the demo camera's footage and detector ({exc})")
    done = subprocess.run(
        [sys.executable, "-m", "bench.autonomy", "--quick", "--keep", f"--tmp-dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=115,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "autonomy" and result["ok"] is True
    profiles = result["profiles"]
    assert set(profiles) == {"turbine", "ship", "camera"}
    assert [row["profile"] for row in result["table"]][:3] == ["turbine", "ship", "camera"]

    for name, profile in profiles.items():
        per_day = profile["per_day"]
        assert min(per_day.values()) >= 0 and per_day["total_bytes"] > 0, name
        assert per_day["total_bytes"] == pytest.approx(
            per_day["journal_bytes"] + per_day["payload_bytes"], abs=1
        )
        assert profile["days_per_gb"] == pytest.approx(GB / per_day["total_bytes"], rel=1e-3)
        assert profile["days_in_disk_budget"] == pytest.approx(
            profile["disk_budget_bytes"] / per_day["total_bytes"], rel=1e-3
        )
        records = profile["records"]
        assert records["measured"] == sum(k["records"] for k in profile["by_kind"].values())
        assert records["measured"] + sum(records["bookkeeping"].values()) == records["in_stretch"]
        assert records["per_hour"] == pytest.approx(
            records["measured"] / profile["source_hours"], abs=0.1
        )
        journal = profile["journal"]
        assert journal["growth_bytes"] == journal["bytes_after"] - journal["bytes_before"] > 0
        assert journal["bytes_per_record"] == pytest.approx(
            journal["growth_bytes"] / journal["records"], abs=0.1
        )
        # The kinds' shares never exceed what the file grew by.
        assert (
            sum(k["journal_bytes"] for k in profile["by_kind"].values()) <= journal["growth_bytes"]
        )
        assert profile["payloads"]["bytes"] == profile["payloads"]["bytes_by_rows"]

    # The ship's journal holds only the measured stretch: check the JSON against it.
    ship = profiles["ship"]
    conn = kept_journal(tmp_path, "ship")
    try:
        counted = dict(conn.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall())
        hull_readings = conn.execute(
            "SELECT COUNT(*) FROM records WHERE source = 'hull' AND kind = 'reading'"
        ).fetchone()[0]
        unstamped = conn.execute(
            "SELECT COUNT(*) FROM records WHERE source != 'appliance' "
            "AND json_extract(body, '$.position.lat') IS NULL"
        ).fetchone()[0]
    finally:
        conn.close()
    assert sum(counted.values()) == ship["records"]["in_stretch"]
    for kind, row in ship["by_kind"].items():
        assert counted[kind] == row["records"], kind
    file_bytes = (next(tmp_path.iterdir()) / "ship" / "data" / "journal.db").stat().st_size
    assert file_bytes == ship["journal"]["bytes_after"]
    # The hull's 2 s windows: 1800 readings an hour of source time, whatever the replay speed.
    ship_cfg = load_config(ROOT / "config" / "ship.yaml", environ={})
    (hull,) = [s for s in ship_cfg.sensors if s.name == "hull"]
    assert hull_readings == pytest.approx(ship["source_hours"] * 3600 / hull.window, abs=1)
    assert ship["by_source"]["hull"]["per_hour"] == pytest.approx(3600 / hull.window, abs=10)
    assert ship["position_stamped"] is True and unstamped == 0

    turbine = profiles["turbine"]
    assert turbine["commissioning"] is not None
    cost = turbine["anomaly_cost"]["per_anomaly"]
    assert cost is not None and cost["payload_bytes"] > 0 and cost["records"] >= 2

    for name in ("turbine", "ship"):
        check_tiers(name, profiles[name], tmp_path)
    assert profiles["turbine"]["tiered"]["target"]["days"] == 365
    check_record_bytes(turbine)
    assert [row["days_in_disk_budget_tiered"] for row in result["table"][:2]] == [
        profiles["turbine"]["days_in_disk_budget_tiered"],
        profiles["ship"]["days_in_disk_budget_tiered"],
    ]

    cam = profiles["camera"]
    assert cam["tiered"] is None and cam["days_in_disk_budget_tiered"] is None
    demo = load_config(ROOT / "config" / "demo.yaml", environ={})
    for samples in cam["camera_samples"].values():
        assert samples["per_day"] <= demo.cameras[0].sampling.per_day
    events = cam["camera_events"]
    assert events["object"]["bytes_each"] > 0
    quiet = events["quiet_scene"]
    assert quiet["days_per_gb"] == pytest.approx(GB / quiet["total_bytes_per_day"], rel=1e-3)


def check_tiers(name: str, profile: dict[str, Any], root: Path) -> None:
    """The tiered figures add up, solve the budget as the issue states it, and match the tier
    copy the run left behind."""
    tiered = profile["tiered"]
    assert profile["days_in_disk_budget_tiered"] == tiered["days_in_disk_budget"]
    day = tiered["bytes_per_day"]
    telemetry = day["telemetry"]
    resolutions = ["full"] + [str(t["resolution_s"]) for t in tiered["tiers"]]
    falling = [telemetry[resolution] for resolution in resolutions]
    assert falling == sorted(falling, reverse=True) and falling[-1] > 0, name
    always = day["never_rolled_records"] + day["payloads"] + day["rollup_reports"]
    for resolution, total in day["total"].items():
        assert total == pytest.approx(telemetry[resolution] + always, abs=2), (name, resolution)
    # The days found cost the budget: the newest days at full resolution, then each tier's
    # rate from its age on.
    days = tiered["days_in_disk_budget"]
    starts = [0.0] + [t["after_days"] for t in tiered["tiers"]]
    rates = [day["total"][resolution] for resolution in resolutions]
    ends = [*starts[1:], float("inf")]
    cost = sum(
        rate * max(0.0, min(days, end) - start)
        for start, end, rate in zip(starts, ends, rates, strict=True)
    )
    assert cost == pytest.approx(profile["disk_budget_bytes"], rel=1e-3), name
    assert tiered["days_in_disk_budget"] > profile["days_in_disk_budget"]
    # The same data measured two ways: the stretch's growth and the tier copy's dense pages.
    assert 0.8 < tiered["full_total_vs_untiered"] < 1.25, name
    assert all(tiered["checks"].values()), name
    readings_rolled = sum(
        t["records_replaced"]
        for t in tiered["rollups"]
        if t["of"] == "reading" and t["resolution_s"] == tiered["tiers"][0]["resolution_s"]
    )
    assert 0 < readings_rolled <= tiered["rolled_in_window"]["reading"]
    # The copy ends holding only the records no tier touches, every one of them.
    conn = sqlite3.connect(next(root.iterdir()) / name / "tiers" / "journal.db")
    try:
        left = dict(conn.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall())
    finally:
        conn.close()
    assert left == tiered["never_rolled_in_window"], name


def check_record_bytes(profile: dict[str, Any]) -> None:
    """Each source's reading is taken apart into parts that add up to its file bytes, and those
    agree with the bytes per reading the stretch's growth gave."""
    record_bytes = profile["record_bytes"]
    readings = record_bytes["readings"]
    assert set(readings) == {"main_bearing", "gearbox", "temperatures", "converter"}
    weighted = 0.0
    for source, row in readings.items():
        body = row["body"]
        assert body["keys"] + body["values"] + body["punctuation"] == pytest.approx(
            body["bytes"], abs=0.2
        ), source
        parts = (
            body["bytes"]
            + row["other_columns_total"]
            + row["record_header"]
            + row["cell_overhead"]
            + row["index_entry"]
            + row["page_slack"]
            + row["rest_of_file"]
        )
        assert parts == pytest.approx(row["file_bytes"], abs=0.6), source
        weighted += row["file_bytes"] * row["rows"]
    rows = sum(row["rows"] for row in readings.values())
    grown = profile["by_kind"]["reading"]["journal_bytes_per_record"]
    assert weighted / rows == pytest.approx(grown, rel=0.1)
    options = record_bytes["options"]
    assert set(options["page_size"]) == {"4096", "8192", "16384"}
    codecs = options["compression"]
    assert "zlib-6" in codecs
    assert ("zstd-3+dict" in codecs) == (options["compression_missing"] is None)
    for name, codec in codecs.items():
        assert 0 < codec["compressed_bytes"] < codec["body_bytes"], name
        assert codec["decompress_us_per_record"] > 0, name
        assert codec["vs_journal"] < 1.0, name
