"""bench.autonomy: the sizing arithmetic on hand-made numbers (sample caps, the per-day split, levels
clear of limits, the generated NMEA voyage), and a --quick run end to end whose JSON is checked
against itself and against the journals it leaves behind (--keep)."""

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
    DiskState,
    KindTally,
    Stretch,
    capped_samples,
    level_within_limits,
    profile_result,
    voyage,
)
from config import Camera, Limit, load_config
from inference.builtin import BuiltinModelError, builtin_model_path
from sensors.camera import builtin_footage
from sensors.nmea import NMEA_CHANNELS
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
        timeout=110,
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

    cam = profiles["camera"]
    demo = load_config(ROOT / "config" / "demo.yaml", environ={})
    for samples in cam["camera_samples"].values():
        assert samples["per_day"] <= demo.cameras[0].sampling.per_day
    events = cam["camera_events"]
    assert events["object"]["bytes_each"] > 0
    quiet = events["quiet_scene"]
    assert quiet["days_per_gb"] == pytest.approx(GB / quiet["total_bytes_per_day"], rel=1e-3)
