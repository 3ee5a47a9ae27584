"""Records in words (appliance/status/wording.py): the status page's "what" column and the
alarms' texts, per kind, from bodies as the stages write them; every kind the product journals
has its own wording; anything else is a short key=value summary never cut inside a word."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from appliance.status.kinds import RECORD_KINDS
from appliance.status.wording import KINDS, MAX_CHARS, describe, number, seconds, shorten
from tests.helpers import ROOT

# Bodies as the stages write them (appliance/stages/, inference/, sync/, appliance/models/).
LIMIT = {
    "state": "violated",
    "channel": "vib_radial",
    "feature": "peak",
    "value": 3.5127,
    "above": 2.0,
    "below": None,
}
ZONE_ENTRY = {
    "zone": "cycle_lane",
    "track_id": 7,
    "label": "person",
    "score": 0.8712,
    "box": [10.0, 20.0, 110.0, 220.0],
    "frame": {"index": 42, "width": 1280, "height": 720},
    "detections": [{"label": "person", "score": 0.8712, "box": [10.0, 20.0, 110.0, 220.0]}],
}
ANOMALY = {
    "kind": "started",
    "priority": 1,
    "score": 7.2412,
    "threshold": 3.1,
    "ratio": 2.3359,
    "peak_ratio": 2.3359,
    "started_at": "2024-05-01T12:00:00+00:00",
    "at": "2024-05-01T12:00:03+00:00",
    "features": [{"name": "vib.rms", "value": 5.1}, {"name": "vib.kurtosis", "value": 3.3}],
    "windows_over": 3,
    "windows": 4,
    "baseline": "pump-20240501",
    "method": "robust_z",
}


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        ("limit", LIMIT, "vib_radial peak 3.51 over 2.0"),
        (
            "limit",
            {**LIMIT, "feature": "min", "value": 1.25, "above": None, "below": 4.0},
            "vib_radial min 1.25 under 4.0",
        ),
        (
            "limit",
            {**LIMIT, "state": "cleared", "value": 1.2},
            "vib_radial peak back to 1.2 (limit 2.0)",
        ),
        ("zone_entry", ZONE_ENTRY, "person entered cycle_lane, 0.87"),
        (
            "anomaly",
            ANOMALY,
            "anomaly started: score 7.24 over threshold 3.1 (2.34x); most unusual: vib.rms, "
            "vib.kurtosis",
        ),
        (
            "anomaly",
            {**ANOMALY, "kind": "ended", "windows": 12, "features": []},
            "anomaly ended after 12 windows, peak 2.34x threshold",
        ),
        (
            "anomaly",
            {
                "kind": "ended",
                "cause": "refit",
                "replaced_by": "pump-20240502",
                "at": "2024-05-02T00:00:00.000000Z",
                "baseline": "pump-20240501",
                "method": "robust_z",
            },
            "anomaly ended: baseline pump-20240501 replaced by pump-20240502 (refit)",
        ),
        (
            "clip",
            {
                "entries": [{"seq": 9, "zone": "cycle_lane", "track_id": 7}],
                "frames": 123,
                "width": 1280,
                "height": 720,
                "fps": 15.0,
                "duration_s": 8.2,
                "codec": "avc1",
                "capped": False,
            },
            "clip of cycle_lane: 8.2 s, 1280x720 at 15 fps",
        ),
        (
            "object",
            {
                "track_id": 7,
                "label": "car",
                "duration_s": 75.25,
                "best_score": 0.912,
                "zones_visited": ["gate"],
            },
            "car seen for 1 min 15 s, best 0.91, in gate",
        ),
        (
            "drift",
            {"kind": "started", "quantity": "temp.mean", "psi": 0.3127, "ks": 0.21},
            "temp.mean drifting: PSI 0.313 (KS 0.21)",
        ),
        (
            "baseline",
            {
                "state": "fitted",
                "version": "pump-20240501",
                "method": "robust_z",
                "windows": 600,
                "threshold": 4.5,
                "features": ["vib.rms"],
            },
            "baseline pump-20240501 fitted (robust_z, 600 windows, threshold 4.5)",
        ),
        (
            "data_quality",
            {"counts": {"nan": 3, "unparseable": 1}, "examples": []},
            "bad data: 3 nan, 1 unparseable",
        ),
        (
            "model",
            {
                "event": "canary_failed",
                "name": "deck",
                "version": "2.0",
                "cause": "agreement",
                "reason": "agreement 0.61 under 0.90",
            },
            "deck 2.0 failed its canary: agreement 0.61 under 0.90",
        ),
        (
            "model",
            {"event": "rolled_back", "name": "deck", "version": "2.0", "previous": "1.0"},
            "deck 2.0 rolled back to 1.0",
        ),
        (
            "sync_refused",
            {"destination": "shore", "error": "401 bad token", "cursor_held": True},
            "shore refuses the backlog: 401 bad token",
        ),
        (
            "eviction",
            {
                "reason": "disk_budget",
                "evicted": {"telemetry": {"records": 100}, "sample": {"records": 20}},
                "payload_files": 0,
                "payload_bytes": 0,
            },
            "120 records removed (disk budget): telemetry 100, sample 20",
        ),
        (
            "lifecycle",
            {"event": "stopped", "mode": "run", "version": "0.9.0", "pid": 1, "reason": "signal"},
            "appliance stopped (run, version 0.9.0): signal",
        ),
        (
            "component",
            {"component": "source:plc", "event": "degraded", "restarts": 5, "last_error": "gone"},
            "source:plc degraded (restarts 5): gone",
        ),
    ],
)
def test_each_kind_in_words(kind: str, body: dict[str, Any], expected: str) -> None:
    assert describe(kind, body) == expected


def test_a_kind_it_does_not_know_is_a_short_summary_never_cut_inside_a_word() -> None:
    body: dict[str, Any] = {
        "note": "the pump on deck two was serviced and its bearings were replaced " * 5,
        "count": 3,
        "ratio": 0.123456,
        "nested": {"a": 1},
        "items": [1, 2, 3],
    }
    text = describe("maintenance", body)
    assert text.startswith("note=the pump on deck two")
    assert len(text) <= MAX_CHARS and text.endswith("…")
    kept = text.removesuffix("…").split(" ")
    whole_words = set(body["note"].split()) | {"note=the"}
    assert all(word.strip(",") in whole_words for word in kept), text
    short = describe("maintenance", {"count": 3, "ratio": 0.123456, "nested": {"a": 1}})
    assert short == "count=3, ratio=0.123, nested={…}"  # nested values last, as their size


def test_a_body_without_what_its_kind_needs_falls_back_to_the_summary() -> None:
    # Written by an older version, or by hand: never an exception on the page.
    assert describe("limit", {"channel": "temp"}) == "channel=temp"
    assert describe("zone_entry", {"zone": "door", "track_id": 3}) == "zone=door, track_id=3"
    assert describe("anomaly", {}) == "anomaly"
    assert describe("clip", {"entries": "x", "duration_s": 1.0}) == "entries=x, duration_s=1.0"


def test_numbers_and_lengths_of_time_read_as_a_person_writes_them() -> None:
    assert [number(v) for v in (3.5127, 2.0, 0.001234, 152.25, 12345.6, 7, float("nan"))] == [
        "3.51",
        "2.0",
        "0.00123",
        "152.2",
        "12346",
        "7",
        "nan",
    ]
    assert [seconds(v) for v in (8.24, 8.0, 200, 3900)] == [
        "8.2 s",
        "8 s",
        "3 min 20 s",
        "1 h 5 min",
    ]
    assert shorten("one two three", 9) == "one two…"
    assert shorten("a" * 30, 10) == "a" * 9 + "…"  # one word longer than the room: its head


def journalled_kinds() -> set[str]:
    """Every kind the product's code journals for the events table: `kind="..."` in a module
    that writes `NewRecord`s, and the kinds named by constants."""
    found = set()
    for folder in ("appliance", "sync", "inference"):
        for path in Path(ROOT, folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if "NewRecord(" in text:
                found |= set(re.findall(r'\bkind="([a-z_]+)"', text))
            found |= set(re.findall(r'^[A-Z_]*KIND = "([a-z_]+)"', text, re.M))
    return found


def test_every_kind_the_appliance_journals_has_its_own_wording() -> None:
    kinds = journalled_kinds()
    assert {"limit", "zone_entry", "sync_refused", "model", "eviction"} <= kinds  # the scan works
    assert kinds - KINDS == set()


def test_the_kinds_export_lists_are_the_kinds_put_into_words() -> None:
    # One list of kinds for `export --kind`, its --help and docs/cli.md; one wording for each.
    assert {kind.name for kind in RECORD_KINDS} == KINDS
