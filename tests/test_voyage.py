"""bench.voyage: the jitter that keeps copied records apart, the accounting that tells a reading
ashore twice, lost or evicted from one ashore once, and the voyage itself run short (`--quick`:
two days of the ship profile with its tiers scaled down and a small budget, then the USB disk
and the 64 kbit/s shore link), its JSON checked against its own numbers and the issue's
targets: nothing that must never be lost is lost, every alert ashore before anything else, the
whole backlog acknowledged exactly once."""

from __future__ import annotations

import array
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.voyage import (
    LINK_BYTES_PER_S,
    Ashore,
    Logbook,
    jitter_factors,
    jitter_paths,
    jittered,
    readings_once,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- helpers


def test_jitter_moves_one_value_per_channel_and_leaves_the_template_alone() -> None:
    template = {
        "window_s": 60.0,
        "channels": {
            "lat": {"n": 60, "mean": 53.55322, "max": 53.55427},
            "speed": {"n": 60, "rms": 13.7119, "max": 13.8},
        },
        "position": {"lat": 53.5, "lon": 8.5},
    }
    before = json.dumps(template, sort_keys=True)
    paths = jitter_paths(template)
    assert paths == (("channels", "lat", "mean"), ("channels", "speed", "rms"))

    copies = [
        jittered(template, paths, jitter_factors(np.random.default_rng(n))) for n in range(50)
    ]

    assert json.dumps(template, sort_keys=True) == before  # the tape is never modified
    means = {c["channels"]["lat"]["mean"] for c in copies}
    assert len(means) == 50  # no two copies alike
    for copy in copies:
        lat = copy["channels"]["lat"]
        assert lat["mean"] == pytest.approx(53.55322, rel=1e-2) and lat["max"] == 53.55427
        assert len(repr(lat["mean"]).replace(".", "").lstrip("0")) <= 7  # 7 digits, as stored
        assert copy["position"] is template["position"]  # what is not jittered is shared


def test_readings_once_tells_duplicates_losses_evictions_and_bad_spans_apart() -> None:
    log = Logbook()
    hull = list(range(10, 200, 10))  # 19 readings of one source, seqs 10..190
    other = [15, 25, 35]  # another source's readings between them
    log.readings["hull/reading"] = array.array("q", hull)
    log.readings["bridge/reading"] = array.array("q", other)
    log.last_telemetry_evicted = 30  # seqs 10..30 went to the budget
    ashore = Ashore(
        arrival_seqs=np.zeros(0, np.int64),
        arrival_priorities=np.zeros(0, np.int64),
        # 60 raw, and inside the rollup of 40..60 too: twice. 190 never arrives: lost.
        raw_readings=np.array([15, 25, 35, 60, 110, 120], np.int64),
        rollups={
            "hull/reading": [
                (40, 60, 3),  # 40, 50, 60
                (70, 100, 4),  # 70, 80, 90, 100
                (130, 180, 5),  # spans six hull readings, says five: its span is wrong
            ],
        },
        payloads={},
        duplicates_ignored=0,
    )

    found = readings_once(log, ashore)

    assert found == {
        "journalled": 22,
        "raw_ashore": 6,
        "in_rollups": 12,
        "rollups": 3,
        "evicted": 3,
        "lost": 1,
        "twice_or_more": 1,
        "rollups_not_matching_their_span": 1,
    }


# ---------------------------------------------------------------------------- the voyage


@pytest.fixture(scope="module")
def voyage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`python -m bench.voyage --quick`, as a person would run it (about 25 s)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.voyage",
            "--quick",
            "--tmp-dir",
            str(tmp_path_factory.mktemp("voyage")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_nothing_that_must_not_be_lost_is_lost(voyage: dict[str, Any]) -> None:
    checks = voyage["checks"]
    assert checks["lost"] == {
        "alerts": 0,
        "events": 0,
        "anomaly_windows": 0,
        "anomaly_windows_on_usb": 0,
        "alerts_on_usb": 0,
        "events_on_usb": 0,
    }
    journalled = voyage["voyage"]["by_kind"]
    assert journalled["limit"] > 0 and journalled["anomaly"] > 0
    assert journalled["anomaly_window"] > 0 and journalled["sample"] > 0
    # The small budget evicted telemetry, and only telemetry.
    assert set(voyage["at_port"]["evicted_by_priority"]) == {"telemetry"}
    assert checks["readings"]["evicted"] > 0 and checks["readings"]["lost"] == 0
    assert voyage["voyage"]["peak_used_bytes"] <= voyage["settings"]["disk_budget_bytes"] * 1.1


def test_every_alert_is_ashore_before_anything_else_over_the_narrow_link(
    voyage: dict[str, Any],
) -> None:
    checks, shore = voyage["checks"], voyage["shore"]
    assert checks["every_alert_ashore_before_any_other_record"]
    assert checks["arrived_in_priority_order"]
    alerts = voyage["at_port"]["by_priority"]["alert"]
    assert alerts > 0 and shore["alerts"] == alerts
    # The link really was 64 kbit/s: the alerts' batch bytes cannot cross it faster.
    alert_bytes = shore["at_link_speed"]["steps"][0]
    assert alert_bytes["part"] == "alert records"
    assert shore["wire_bytes_to_last_alert"] >= alert_bytes["bytes"]
    assert shore["time_to_last_alert_s"] >= 0.8 * alert_bytes["bytes"] / LINK_BYTES_PER_S
    assert shore["link_bytes_per_s"] == LINK_BYTES_PER_S and shore["cap_lifted_after_last_alert"]


def test_the_whole_backlog_is_acknowledged_exactly_once(voyage: dict[str, Any]) -> None:
    checks = voyage["checks"]
    live = voyage["at_port"]["records_live"]
    for where in ("receiver", "usb"):
        assert checks[where] == {
            "expected": live,
            "found": live,
            "repeated": 0,
            "missing": 0,
            "unexpected": 0,
        }, where
    assert voyage["usb"]["records"] == voyage["shore"]["engine"]["records_sent"] == live
    assert checks["receiver_duplicates_ignored"] == 0
    readings = checks["readings"]
    assert readings["twice_or_more"] == 0 and readings["rollups_not_matching_their_span"] == 0
    assert (
        readings["raw_ashore"] + readings["in_rollups"] + readings["evicted"]
        == readings["journalled"]
    )
    assert checks["payloads_ashore_and_on_usb"]
    assert voyage["ok"] is True


def test_old_readings_were_rolled_up_at_both_tiers(voyage: dict[str, Any]) -> None:
    at_port = voyage["at_port"]
    tiers = {(r["resolution_s"], r["of"]): r for r in at_port["rollups"]}
    assert tiers[(60, "reading")]["records"] > 0 and tiers[(600, "reading")]["records"] > 0
    one_minute = tiers[(60, "reading")]
    assert one_minute["bytes_after"] < one_minute["bytes_before"] / 5  # the hull's 2 s windows
    assert voyage["checks"]["readings"]["in_rollups"] > 0
    hull = at_port["data_days_kept"]["hull"]
    assert 0 < hull["full"] < 0.5 and hull["1m"] > 0.5  # 6 h raw (and the guard), then 1 min
