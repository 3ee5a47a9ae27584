"""Drift checks: PSI and its binned KS against quantile references, hysteresis, references saved and
loaded (and refused when damaged), non-finite values counted; the sampling boost under its caps; a
simulated sensor whose mean drifts is flagged (with and without an anomaly baseline) while a
stable one is not; real footage that turns dark (night) is flagged while the same footage
unchanged is not, with the boost showing in the samples, the health record, the status page's
drift column and /metrics."""

from __future__ import annotations

import asyncio
import functools
import html
import json
import math
import random
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.stages.drift import INPUTS_MODEL
from appliance.stages.pipeline import SourcePipeline
from appliance.status.health import HealthMonitor
from appliance.status.history import HISTORY_FILE, History
from appliance.status.web import StatusServer
from config import ApplianceConfig, SamplingSettings, SimulatedSensor
from config.analysis import DriftSettings
from inference.detections import Detection
from inference.drift import (
    PSI_EPSILON,
    DriftError,
    DriftMonitor,
    Reference,
    load_references,
    reference_path,
    save_references,
)
from inference.sampling import RawWindowSampler, Sampler
from sensors.camera import builtin_footage
from sensors.simulated import SimulatedSource
from sync import Journal, PayloadStore, StorageGuard
from sync.reader import JournalReader
from tests.conftest import APPLIANCE_ID
from tests.helpers import component_missing, run_cli, write_config

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def settings(**overrides: Any) -> DriftSettings:
    base: dict[str, Any] = {"check_interval": "5s", "window": "5s", "min_count": 50}
    base.update(overrides)
    return DriftSettings.model_validate(base)


def feed(monitor: DriftMonitor, name: str, values: Any, start_s: float, step_s: float) -> None:
    for index, value in enumerate(values):
        monitor.observe(name, float(value), T0 + timedelta(seconds=start_s + index * step_s))


# --------------------------------------------------------------------------- PSI and KS


def test_psi_and_ks_follow_their_formulas_with_epsilon_for_empty_bins() -> None:
    reference = Reference("q", edges=(1.0,), proportions=(0.5, 0.5), n=10)
    psi, ks = reference.compare(np.array([0.0, 0.0, 0.0, 2.0]))
    assert psi == pytest.approx(0.25 * math.log(0.75 / 0.5) + (-0.25) * math.log(0.25 / 0.5))
    assert ks == pytest.approx(0.25)
    # Every value below the edge: the empty upper bin counts as PSI_EPSILON, not as log(0).
    psi, ks = reference.compare(np.array([0.0, 0.5]))
    expected = 0.5 * math.log(1.0 / 0.5) + (PSI_EPSILON - 0.5) * math.log(PSI_EPSILON / 0.5)
    assert psi == pytest.approx(expected) and ks == pytest.approx(0.5)
    # The bins are [edge, next): a value on the edge belongs to the bin above it.
    assert reference.bin_counts(np.array([1.0])).tolist() == [0, 1]


def test_same_distribution_scores_low_and_a_shift_scores_high() -> None:
    rng = np.random.default_rng(3)
    reference = Reference.fit("x", rng.normal(0.0, 1.0, 5000))
    assert len(reference.edges) == 9 and sum(reference.proportions) == pytest.approx(1.0)
    assert all(p == pytest.approx(0.1, abs=0.005) for p in reference.proportions)
    same, same_ks = reference.compare(rng.normal(0.0, 1.0, 2000))
    shifted, shifted_ks = reference.compare(rng.normal(1.0, 1.0, 2000))
    assert same < 0.05 and same_ks < 0.05
    assert shifted > 0.25 and shifted_ks > 0.3


def test_a_constant_or_discrete_reference_still_sees_a_shift_upwards() -> None:
    # A detector that always sees 3 people: a crowd of 5 must not hide in the top open bin.
    constant = Reference.fit("detections", [3.0] * 300)
    assert constant.compare(np.full(100, 3.0))[0] == pytest.approx(0.0)
    assert constant.compare(np.full(100, 5.0))[0] > 1.0
    assert constant.compare(np.full(100, 0.0))[0] > 1.0
    counts = Reference.fit("detections", [0.0] * 250 + [1.0] * 40 + [2.0] * 10)
    assert counts.compare(np.array([0.0] * 83 + [1.0] * 13 + [2.0] * 4))[0] < 0.05
    assert counts.compare(np.array([2.0] * 50 + [4.0] * 50))[0] > 1.0


# ---------------------------------------------------------------------------- monitoring


def test_hysteresis_needs_consecutive_checks_to_start_and_a_low_psi_to_end() -> None:
    rng = np.random.default_rng(11)
    reference = Reference.fit("x", rng.normal(0.0, 1.0, 5000))
    monitor = DriftMonitor(settings(consecutive=2, psi_start=0.25, psi_end=0.1), [reference])
    # One block of 400 values per 10 s; the 5 s window holds only the newest block.
    shifts = [0.0, 1.5, 0.0, 1.5, 1.5, 0.4, 0.0]
    kinds: list[list[str]] = []
    psis: list[float] = []
    for block, shift in enumerate(shifts):
        feed(monitor, "x", rng.normal(shift, 1.0, 400), block * 10.0, 0.01)
        events = monitor.check()
        kinds.append([e.kind for e in events])
        psis.append(monitor.status()["quantities"]["x"]["psi"])
    # A single high check (block 1) starts nothing; two in a row (3, 4) do; a PSI between the
    # two thresholds (block 5) keeps the drift; the first check under psi_end (6) ends it.
    assert kinds == [[], [], [], [], ["started"], [], ["ended"]], psis
    assert psis[1] >= 0.25 and 0.1 <= psis[5] < 0.25, psis
    assert monitor.status()["state"] == "ok" and monitor.status()["since"] is None


def test_events_carry_the_figures_and_the_status_says_since_when() -> None:
    reference = Reference.fit("x", np.linspace(0.0, 1.0, 1000))
    monitor = DriftMonitor(settings(consecutive=1), [reference])
    feed(monitor, "x", np.linspace(5.0, 6.0, 100), 0.0, 0.01)
    (event,) = monitor.check()
    assert event.kind == "started" and event.quantity == "x"
    assert event.window_n == 100 and event.reference_n == 1000
    # Binned KS is a lower bound: the open top bin already holds the reference's top 10 %.
    assert event.psi > 5 and event.ks == pytest.approx(0.9)
    assert event.ts == T0 + timedelta(seconds=0.99)
    status = monitor.status()
    assert status["state"] == "drift" and status["since"] == event.ts.isoformat()
    assert status["quantities"]["x"]["state"] == "drift" and monitor.active


def test_a_window_with_too_few_values_is_not_compared() -> None:
    reference = Reference.fit("x", np.linspace(0.0, 1.0, 1000))
    monitor = DriftMonitor(settings(consecutive=1, min_count=50), [reference])
    feed(monitor, "x", np.full(49, 9.0), 0.0, 0.01)
    assert monitor.check() == []
    assert monitor.status()["quantities"]["x"]["psi"] is None


def test_non_finite_values_are_counted_and_skipped() -> None:
    reference = Reference.fit("x", np.linspace(0.0, 1.0, 1000))
    monitor = DriftMonitor(settings(consecutive=1), [reference])
    values = [math.nan, math.inf, -math.inf] * 10 + list(np.linspace(0.0, 1.0, 60))
    feed(monitor, "x", values, 0.0, 0.01)
    assert monitor.check() == []
    quantity = monitor.status()["quantities"]["x"]
    assert quantity["non_finite"] == 30 and quantity["n"] == 60 and quantity["psi"] < 0.25
    # numpy scalars and arrays go in as they come, NaN inside an array counted the same way.
    monitor.observe("x", np.float32(0.5), T0 + timedelta(seconds=1))
    monitor.observe("x", np.array([0.25, math.nan], dtype=np.float32), T0 + timedelta(seconds=1))
    assert monitor.status()["quantities"]["x"]["non_finite"] == 31
    with pytest.raises(DriftError, match="no finite value"):
        Reference.fit("x", [math.nan, math.inf])


def test_the_reference_is_collected_first_then_saved_and_loaded(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    monitor = DriftMonitor(settings(reference="20s", check_interval="5s", window="10s"))
    feed(monitor, "x", rng.normal(10.0, 1.0, 150), 0.0, 0.1)  # 15 s: still collecting
    assert monitor.check() == [] and monitor.status()["state"] == "reference"
    assert not monitor.unsaved
    feed(monitor, "x", rng.normal(10.0, 1.0, 60), 15.0, 0.1)  # 21 s: the period is over
    assert monitor.check() == [] and monitor.unsaved
    (fitted,) = monitor.references()
    assert fitted.n == 210 and monitor.status()["state"] == "ok"

    path = reference_path(tmp_path, "detector@abc123", "yard")
    assert path == tmp_path / "models" / "drift" / "detector@abc123" / "yard.json"
    save_references(path, monitor.references(), model="detector@abc123", source="yard")
    assert not list(path.parent.glob(".*partial"))  # written aside, then renamed
    assert load_references(path) == [fitted]
    assert load_references(tmp_path / "absent.json") == []
    again = DriftMonitor(settings(consecutive=1), load_references(path))
    feed(again, "x", rng.normal(14.0, 1.0, 100), 0.0, 0.01)  # compared at once: no period
    assert [e.kind for e in again.check()] == ["started"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"edges": [2.0, 1.0]}, "strictly increasing"),
        ({"edges": []}, "at least one edge"),
        ({"edges": [1.0, "x"]}, "finite numbers"),
        ({"proportions": [1.0]}, "len\\(edges\\) \\+ 1"),
        ({"proportions": [0.7, 0.7]}, "sum to 1"),
        ({"n": 0}, "`n` must be a positive integer"),
        ({"colour": "blue"}, "unknown keys \\['colour'\\]"),
        ({"quantity": ""}, "`quantity`"),
    ],
)
def test_a_wrong_reference_is_refused_naming_the_field(
    change: dict[str, Any], message: str
) -> None:
    good = {"quantity": "brightness", "edges": [100.0], "proportions": [0.5, 0.5], "n": 40}
    assert Reference.from_dict(good) == Reference("brightness", (100.0,), (0.5, 0.5), 40)
    with pytest.raises(DriftError, match=message):
        Reference.from_dict({**good, **change})


def test_a_damaged_reference_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "yard.json"
    path.write_text('{"format": 1, "references": [')
    with pytest.raises(DriftError, match=r"yard\.json: not a readable JSON file"):
        load_references(path)
    path.write_text(json.dumps({"format": 1, "references": [{"quantity": "x", "edges": [1]}]}))
    with pytest.raises(DriftError, match=r"yard\.json: reference of 'x': `proportions`"):
        load_references(path)


def test_a_clock_stepping_back_past_the_window_starts_the_windows_over() -> None:
    reference = Reference.fit("x", np.linspace(0.0, 1.0, 1000))
    monitor = DriftMonitor(settings(consecutive=1), [reference])
    feed(monitor, "x", np.linspace(0.0, 1.0, 60), 3600.0, 0.01)
    feed(monitor, "x", np.full(60, 7.0), 0.0, 0.01)  # an hour back: the old values go
    assert monitor.clock_steps == 1
    (event,) = monitor.check()
    assert event.window_n == 60 and event.kind == "started"


# ------------------------------------------------------------------------------- boost


def test_a_boost_multiplies_the_random_share_and_the_caps_still_hold() -> None:
    cfg = SamplingSettings(uncertain=None, random=0.1, per_hour=150, per_day=1000)
    sampler = Sampler(cfg, random.Random(7))

    def kept_in(hour: int) -> int:
        kept = 0
        for second in range(1000):
            ts = T0 + timedelta(hours=hour, seconds=second)
            ticket = sampler.consider(ts, [])
            kept += ticket is not None and sampler.commit(ticket, 1000)
        return kept

    plain = kept_in(0)
    assert 70 <= plain <= 130  # ~10% of 1000
    sampler.boost(4.0, T0 + timedelta(hours=2))
    assert sampler.random_share(T0 + timedelta(hours=1)) == pytest.approx(0.4)
    boosted = kept_in(1)
    assert boosted == 150  # ~400 wanted, the hourly cap allows 150
    assert sampler.counters["skipped_cap_hour"] > 0
    assert sampler.counters["kept_boosted"] == 150
    assert sampler.status()["boost"] == {
        "factor": 4.0,
        "until": (T0 + timedelta(hours=2)).isoformat(),
    }
    assert 70 <= kept_in(2) <= 130  # the boost has run out
    assert sampler.random_share(T0 + timedelta(hours=3)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="factor >= 1"):
        sampler.boost(0.5, T0)
    # A boost never makes a share above 1.
    full = Sampler(SamplingSettings(uncertain=None, random=0.5), random.Random(1))
    full.boost(4.0, T0 + timedelta(hours=1))
    assert full.random_share(T0) == 1.0
    assert full.reason_for([Detection(0, 0, 1, 1, 0.9, 0, "person")], share=1.0) == "random"


def test_raw_window_sampling_keeps_windows_more_often_while_boosted() -> None:
    sampler = RawWindowSampler(8)
    kept = [k for k in range(32) if sampler.take(T0 + timedelta(seconds=k))]
    assert kept == [7, 15, 23, 31]
    sampler.boost(4.0, T0 + timedelta(seconds=48))
    kept = [k for k in range(32, 64) if sampler.take(T0 + timedelta(seconds=k))]
    assert kept == [33, 35, 37, 39, 41, 43, 45, 47, 55, 63]
    assert sampler.status()["kept_boosted"] == 8
    assert not any(RawWindowSampler(0).take(T0) for _ in range(10))


# ------------------------------------------------------------------------------ sensors


def sensor(name: str, *, drift_fault: bool, anomaly: bool) -> SimulatedSensor:
    """A temperature at 40 °C (noise 0.5, 100 samples a window of 0.1 s), 200 s of data time;
    the fault ramps it by 2 °C a minute from 120 s on."""
    doc: dict[str, Any] = {
        "name": name,
        "type": "simulated",
        "sample_rate": 1000,
        "window": "100ms",
        "pace": "fast",
        "duration": "200s",
        "seed": 4,
        "sample_raw_every": 8,
        "features": {"kind": "slow"},
        "channels": [
            {"name": "temp", "signal": "temperature", "base": 40.0, "amplitude": 0.0, "noise": 0.5}
        ],
        "faults": [{"kind": "drift", "channel": "temp", "start": "120s", "magnitude": 2.0}]
        if drift_fault
        else [],
        "drift": {
            "reference": "60s",
            "window": "30s",
            "check_interval": "5s",
            "min_count": 100,
            "consecutive": 2,
            "sampling_boost": 4,
            "boost_duration": "30s",
        },
    }
    if anomaly:
        doc["anomaly"] = {"method": "robust_z", "baseline": "20s", "min_windows": 30}
    return SimulatedSensor.model_validate(doc)


def journal_records(data_dir: Path, kind: str, source: str | None = None) -> list[dict[str, Any]]:
    with JournalReader.open(data_dir) as reader:
        found = [r.to_dict() for r in reader.iter_records(kind=kind)]
    return [r for r in found if source is None or r["source"] == source]


def seconds_after(record: dict[str, Any], start: str) -> float:
    parse = datetime.fromisoformat
    return (parse(record["ts"].replace("Z", "+00:00")) - parse(start)).total_seconds()


async def test_a_sensor_whose_mean_drifts_is_flagged_and_a_stable_one_is_not(
    data_dir: Path, journal: Journal, payload_store: PayloadStore
) -> None:
    configs = {
        "drifting": sensor("drifting", drift_fault=True, anomaly=True),
        "stable": sensor("stable", drift_fault=False, anomaly=True),
        "plain": sensor("plain", drift_fault=True, anomaly=False),
    }
    pipelines = {
        name: SourcePipeline(cfg, SimulatedSource(cfg), journal, payload_store, replay=True)
        for name, cfg in configs.items()
    }
    await asyncio.gather(*(p.run() for p in pipelines.values()))

    assert journal_records(data_dir, "drift", "stable") == []
    stable = pipelines["stable"].drift_status()
    assert stable["state"] == "ok" and stable["model"].startswith("stable-baseline@")
    assert set(stable["quantities"]) == {"temp.mean", "anomaly_score"}
    assert all(q["psi"] < 0.25 for q in stable["quantities"].values())

    for name in ("drifting", "plain"):
        first = journal_records(data_dir, "reading", name)[0]["ts"].replace("Z", "+00:00")
        drifts = journal_records(data_dir, "drift", name)
        started = [r for r in drifts if r["body"]["quantity"] == "temp.mean"]
        assert started, f"{name}: the drifting mean went unnoticed"
        record = started[0]
        assert record["priority"] == "event" and record["body"]["kind"] == "started"
        assert record["body"]["psi"] >= 0.25 and record["body"]["source"] == name
        assert record["body"]["window_n"] >= 100 and record["body"]["reference_n"] >= 100
        # The ramp starts at 120 s; two 5 s checks over the threshold confirm it.
        assert 120 < seconds_after(record, first) <= 150, seconds_after(record, first)
        assert pipelines[name].drift_status()["state"] == "drift"
        # One raw window in 8 before the drift, one in 2 while it lasts.
        samples = journal_records(data_dir, "sample", name)
        before = [s for s in samples if s["seq"] < record["seq"]]
        after = [s for s in samples if s["seq"] > record["seq"]]
        span_after = 200 - seconds_after(record, first)
        assert len(before) == pytest.approx(seconds_after(record, first) * 10 / 8, abs=2)
        assert len(after) == pytest.approx(span_after * 10 / 2, abs=2)
    drifting = journal_records(data_dir, "drift", "drifting")[0]
    assert drifting["model"].startswith("drifting-baseline@")
    assert drifting["body"]["model"] == drifting["model"]
    plain = journal_records(data_dir, "drift", "plain")[0]
    assert plain["model"] is None and plain["body"]["model"] == INPUTS_MODEL
    assert "anomaly_score" in pipelines["drifting"].drift_status()["quantities"]

    # The references were saved: a restart compares at once instead of collecting again.
    saved = reference_path(data_dir, INPUTS_MODEL, "plain")
    (reference,) = load_references(saved)
    again = SourcePipeline(
        configs["plain"], SimulatedSource(configs["plain"]), journal, payload_store
    )
    await again.drift.activate(INPUTS_MODEL)
    status = again.drift_status()
    assert (
        status["state"] == "ok" and status["quantities"]["temp.mean"]["reference_n"] == reference.n
    )

    # The health entry, the status page's drift column and /metrics show it.
    async with status_server(data_dir, journal, payload_store) as (base, monitor):
        for name, pipeline in pipelines.items():
            monitor.sources[name] = pipeline.source.health
            monitor.drift[name] = pipeline.drift_status
        health = monitor.snapshot()["sources"]
        assert health["drifting"]["drift"]["state"] == "drift"
        assert health["stable"]["drift"]["state"] == "ok"
        page, metrics = await page_and_metrics(base)
    sources = table_rows(page, "sources")
    assert re.fullmatch(r"drift .*temp\.mean \d+\.\d+.*", sources["drifting"][-2])
    assert sources["stable"][-2] == "ok"
    assert metrics[("appliance_drift_active", ("drifting",))] == 1.0
    assert metrics[("appliance_drift_active", ("stable",))] == 0.0
    assert metrics[("appliance_drift_psi", ("drifting", "temp.mean"))] >= 0.25
    assert metrics[("appliance_drift_psi", ("stable", "anomaly_score"))] < 0.25


# ------------------------------------------------------------------------- status page


@asynccontextmanager
async def status_server(
    data_dir: Path, journal: Journal, store: PayloadStore
) -> AsyncIterator[tuple[str, HealthMonitor]]:
    """The real status server on loopback over `journal`, with an empty health monitor."""
    cfg = ApplianceConfig.model_validate(
        {
            "appliance": {"id": APPLIANCE_ID, "data_dir": str(data_dir)},
            "status": {"listen": "127.0.0.1:0"},
        }
    )
    async with StorageGuard(journal, store, cfg.storage) as guard:
        monitor = HealthMonitor(journal, guard, mode="run")
        history = History(data_dir / HISTORY_FILE, appliance_id=APPLIANCE_ID, interval_s=60.0)
        async with StatusServer(
            cfg, journal, store, monitor, [], token=None, history=history
        ) as server:
            assert server.url is not None
            yield server.url.rstrip("/"), monitor


async def page_and_metrics(base: str) -> tuple[str, dict[tuple[str, tuple[str, ...]], float]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/partial") as response:
            assert response.status == 200
            page = await response.text()
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    metrics = {
        (
            sample.name,
            tuple(sample.labels[k] for k in ("source", "quantity") if k in sample.labels),
        ): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("appliance_drift")
    }
    return page, metrics


def table_rows(page: str, name: str) -> dict[str, list[str]]:
    """The rows of the page's table `name`, by their first cell, as plain text."""
    table = re.search(rf'<table data-name="{name}">(.*?)</table>', page, re.S)
    assert table is not None, f"no {name} table on the page"
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)[1:]:
        cells = [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td>(.*?)</td>", row, re.S)
        ]
        rows[cells[0]] = cells
    return rows


# ------------------------------------------------------------------------------ cameras

PASS_S = 79.5  # vtest.avi: 795 frames at 10 fps


def footage_frames() -> list[np.ndarray[Any, np.dtype[np.uint8]]]:
    """vtest.avi's frames (people walking in a mall), at half size to keep the test quick."""
    try:
        path = builtin_footage("vtest")
    except ValueError as exc:
        component_missing(str(exc))
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            small = cv2.resize(image, (384, 288), interpolation=cv2.INTER_AREA)
            frames.append(np.asarray(small, dtype=np.uint8))
    finally:
        capture.release()
    assert len(frames) == 795
    return frames


def write_video(path: Path, frames: list[np.ndarray[Any, np.dtype[np.uint8]]]) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (width, height))
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()


def camera(name: str, path: Path) -> dict[str, Any]:
    return {
        "name": name,
        "url": str(path),
        "fps": 10,  # every frame of the file
        "classes": ["person"],
        # The detector runs on keepalives (every 2 s of footage) and global changes only: the
        # drift of the picture is the point here, and CPU time is short.
        "motion": {"min_area": 1.0, "keepalive": "2s"},
        "sampling": {"random": 0.25, "uncertain": None, "per_hour": 1000, "per_day": 1000},
        "drift": {
            # One pass of the footage is the reference; a window of the same length sees the
            # scene's whole variation again (people come and go, the exposure breathes).
            "reference": "79s",
            "window": "79s",
            "check_interval": "5s",
            "min_count": 100,
            "consecutive": 2,
            "input_every": 1,
            "boost_duration": "30s",
        },
    }


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two passes of the same real footage, replayed: `stable` shows it twice unchanged,
    `night` darkens the second pass to 30 % (dusk falls at once)."""
    tmp = tmp_path_factory.mktemp("footage")
    frames = footage_frames()
    write_video(tmp / "stable.mp4", frames + frames)
    dark = [np.asarray(f * 0.3, dtype=np.uint8) for f in frames]
    write_video(tmp / "night.mp4", frames + dark)
    data_dir = tmp / "data"
    cfg = write_config(
        tmp / "cfg.yaml",
        data_dir,
        [],
        cameras=[camera("night", tmp / "night.mp4"), camera("stable", tmp / "stable.mp4")],
        appliance={"health_interval": "1h"},
    )
    result = run_cli("replay", "-c", str(cfg), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    yield data_dir


def test_footage_that_turns_dark_is_flagged_and_the_same_footage_unchanged_is_not(
    replayed: Path,
) -> None:
    assert journal_records(replayed, "drift", "stable") == []
    cameras = journal_records(replayed, "health")[-1]["body"]["cameras"]
    stable = cameras["stable"]["drift"]
    assert stable["state"] == "ok" and stable["model"].startswith("detector@")
    assert stable["quantities"]["brightness"]["reference_n"] >= 790
    assert stable["quantities"]["brightness"]["psi"] < 0.1

    drifts = journal_records(replayed, "drift", "night")
    started = {r["body"]["quantity"]: r for r in drifts if r["body"]["kind"] == "started"}
    assert "brightness" in started, drifts
    brightness = started["brightness"]
    assert brightness["priority"] == "event" and brightness["model"].startswith("detector@")
    assert brightness["body"]["model"] == brightness["model"]
    assert brightness["body"]["psi"] >= 0.25 and brightness["body"]["window_n"] >= 100
    # Footage time: the night begins at 79.5 s; it takes a share of the window to show. The
    # monitor's clock starts at the first frame's wall time; the test only knows the first
    # sample's (wall time w0 into the replay, footage position p0), so its estimate of that start
    # is off by w0 - p0: between -p0 (a replay much faster than real time, as here) and 0.
    first = journal_records(replayed, "sample", "night")[0]["body"]["frame"]
    p0 = first["position_s"]
    footage_start = datetime.fromisoformat(first["ts"]) - timedelta(seconds=p0)
    at = (datetime.fromisoformat(brightness["body"]["data_ts"]) - footage_start).total_seconds()
    assert at > PASS_S and at - p0 < PASS_S + 40, (at, p0)
    night = cameras["night"]["drift"]
    assert night["state"] == "drift" and night["quantities"]["brightness"]["state"] == "drift"
    # Cheap: measuring one frame costs well under a millisecond of the frame's budget.
    assert cameras["night"]["drift"]["measure_us"] < 3000
    print(f"drift measurement per frame: {cameras['night']['drift']['measure_us']} us")
    # Too few detector runs (keepalives only) to compare outputs: counted, never guessed at.
    assert night["quantities"]["detections"]["psi"] is None


def test_while_the_night_drifts_every_analysed_frame_becomes_a_sample(replayed: Path) -> None:
    (started,) = [
        r
        for r in journal_records(replayed, "drift", "night")
        if r["body"]["kind"] == "started" and r["body"]["quantity"] == "brightness"
    ]
    samples = journal_records(replayed, "sample", "night")
    before = [s["body"]["frame"]["position_s"] for s in samples if s["seq"] < started["seq"]]
    during = [s["body"]["frame"]["position_s"] for s in samples if s["seq"] > started["seq"]]
    # Before: a quarter of the analysed frames (one every 2 s), so gaps of several keepalives;
    # boosted x4 the share is 1: every keepalive frame is kept, none skipped.
    assert max(np.diff(before)) > 4.0
    assert len(during) >= 8 and max(np.diff(during)) <= 2.25, during
    sampling = journal_records(replayed, "health")[-1]["body"]["cameras"]["night"]["sampling"]
    assert sampling["boost"]["factor"] == 4.0
    assert sampling["counters"]["kept_boosted"] == len(during)


async def test_the_cameras_drift_shows_on_the_page_and_in_the_metrics(replayed: Path) -> None:
    cameras = journal_records(replayed, "health")[-1]["body"]["cameras"]
    store = PayloadStore(replayed / "payloads")
    journal = await Journal.open(replayed, appliance_id="test-01", payloads=store)
    try:
        async with status_server(replayed, journal, store) as (base, monitor):
            for name, entry in cameras.items():
                monitor.cameras[name] = functools.partial(dict, entry)
            page, metrics = await page_and_metrics(base)
    finally:
        await journal.close()
    rows = table_rows(page, "cameras")
    assert rows["night"][-1].startswith("drift brightness ")
    assert rows["stable"][-1] == "ok"
    assert metrics[("appliance_drift_active", ("night",))] == 1.0
    assert metrics[("appliance_drift_active", ("stable",))] == 0.0
    assert metrics[("appliance_drift_psi", ("night", "brightness"))] >= 0.25
