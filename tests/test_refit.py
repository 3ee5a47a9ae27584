"""Refitting anomaly baselines on the device (appliance/models/refit.py), end to end on a real journal
with a real simulated machine through the real pipeline: a healthy refit validated, canaried,
activated and watched; candidates refused by validation, by their canary, and rolled back by the
watch; too few clean windows; the schedule and a stop in the middle of a fit; and a heavy refit
beside a real camera pipeline on real footage, which must not cost the camera a frame.

Spans are short (60 s of data, a 20 s canary, a 20 s watch, five windows a second) and the
simulated machine runs at `pace: fast`, so a minute of its data takes a fraction of a second.
The camera test (`-k camera` runs it alone) takes about 35 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import resource
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.models.candidate import Prepared, RefitJob, prepare_candidate
from appliance.models.candidate import run_in_child as refit_in_child
from appliance.models.refit import BaselineRefit, BaselineRefits
from appliance.runtime.control import ControlServer
from appliance.stages.baselines import BaselineStore
from appliance.stages.pipeline import SourcePipeline
from appliance.stages.recorder import Recorder
from appliance.stages.vision import CameraPipeline, quiet_opencv
from config import ApplianceConfig, Camera, DetectorModel
from config.analysis import AnomalySettings
from config.sensors import SimulatedSensor
from inference.anomaly_fit import fit_baseline
from inference.baseline import Baseline
from inference.detect import open_detector
from inference.features import feature_vector, summarise
from inference.session import ModelError
from sensors.base import SampleWindow
from sensors.camera import CameraHealth, CameraSource, builtin_footage
from sensors.simulated import SimulatedSource
from sync import Journal, NewRecord, PayloadStore, Priority
from sync.reader import JournalReader
from sync.records import StoredRecord
from tests.helpers import component_missing, run_cli, write_config
from tests.helpers import wait_until as until

SOURCE = "vib"
FEATURES = ["vib.rms", "vib.mean"]
REFIT = {"enabled": True, "every": "0s", "data": "60s", "canary": "20s", "watch": "20s"}


def machine(
    duration_s: float, *, seed: int, faults: list[dict[str, Any]] | None = None, **anomaly: Any
) -> dict[str, Any]:
    """One vibration channel (25 Hz, noise 0.3) in 0.2 s windows, as fast as it is consumed;
    robust_z on its rms and mean, its threshold at 100 false alarms a day (0.2 s windows)."""
    return {
        "name": SOURCE,
        "type": "simulated",
        "sample_rate": 500,
        "window": "200ms",
        "pace": "fast",
        "duration": f"{duration_s}s",
        "seed": seed,
        "channels": [{"name": "vib", "signal": "vibration", "noise": 0.3}],
        "faults": faults or [],
        "anomaly": {
            "method": "robust_z",
            "features": FEATURES,
            "baseline": "20s",
            "false_alarms_per_day": 100,
            "refit": REFIT,
            **anomaly,
        },
    }


def drift(start_s: float, per_minute: float, duration_s: float | None = None) -> dict[str, Any]:
    fault: dict[str, Any] = {
        "kind": "drift",
        "channel": "vib",
        "start": f"{start_s}s",
        "magnitude": per_minute,
    }
    if duration_s is not None:
        fault["duration"] = f"{duration_s}s"
    return fault


class Device:
    """What a refit meets in the daemon: the journal, the baselines on disk, the source's
    pipeline (a new one per run, as the supervisor makes one per attempt) and the refits."""

    def __init__(
        self, journal: Journal, payloads: PayloadStore, data_dir: Path, **anomaly: Any
    ) -> None:
        self.journal = journal
        self.payloads = payloads
        self.anomaly = anomaly
        self.store = BaselineStore.in_data_dir(data_dir)
        self.pipelines: dict[str, SourcePipeline] = {}
        cfg = ApplianceConfig.model_validate(
            {
                "appliance": {"id": "t", "data_dir": str(data_dir)},
                "sensors": [machine(1, seed=0, **anomaly)],
            }
        )
        self.refits = BaselineRefits(cfg, journal, self.pipelines, self.store)
        self.refit: BaselineRefit = self.refits.refits[SOURCE]

    async def run(
        self, duration_s: float, *, seed: int, faults: list[dict[str, Any]] | None = None
    ) -> SourcePipeline:
        """The machine from start to end. A canary waiting for the source is on its stage
        before the first window flows (a fast machine would otherwise run ahead of it)."""
        cfg = SimulatedSensor.model_validate(
            machine(duration_s, seed=seed, faults=faults, **self.anomaly)
        )
        pipeline = SourcePipeline(
            cfg, SimulatedSource(cfg), self.journal, self.payloads, self.store, replay=True
        )
        stage = pipeline.anomaly
        assert stage is not None
        await asyncio.to_thread(stage.load)
        self.pipelines[SOURCE] = pipeline
        if self.refit.state == "canary":
            await until(lambda: stage.observer is self.refit.canary, "the canary to attach")
        await pipeline.run()
        return pipeline

    async def refit_then_run(
        self, duration_s: float, *, seed: int, faults: list[dict[str, Any]] | None = None
    ) -> tuple[str | None, SourcePipeline | None]:
        """A refit on what the journal holds; once its candidate is in the canary, the machine
        runs again. The refit's last event, and that run's pipeline (None: no canary)."""
        assert self.refits.start(SOURCE, "test") is None
        task = self.refits.running(SOURCE)
        assert task is not None
        await until(lambda: self.refit.state == "canary" or task.done(), "a candidate")
        pipeline = None
        if self.refit.state == "canary":
            shown = self.refit.describe()
            assert shown["candidate"] is not None and shown["canary"]["candidate"]["scored"] == 0
            pipeline = await self.run(duration_s, seed=seed, faults=faults)
        event = await asyncio.wait_for(task, 60)
        return event, pipeline

    def records(self, kind: str) -> list[StoredRecord]:
        with JournalReader.open(self.journal.data_dir) as reader:
            return list(reader.iter_records(kind=kind))

    def events(self) -> list[StoredRecord]:
        return [r for r in self.records("model") if r.body["source"] == SOURCE]

    def install_broad_baseline(self) -> Baseline:
        """A current baseline fitted with margin 10 on 30 s of the same healthy machine (the
        margin was lowered since): slow drifts that a refitted baseline flags pass under it."""
        cfg = SimulatedSensor.model_validate(machine(30, seed=100))
        source = SimulatedSource(cfg)
        start = datetime(2024, 1, 1, tzinfo=UTC)
        vectors = []
        for k in range(150):
            window = SampleWindow(
                source=SOURCE,
                channels=("vib",),
                values=source.window_values(k),
                ts=start + timedelta(seconds=k * cfg.window),
                mono_ns=0,
                duration_s=cfg.window,
                sample_rate=cfg.sample_rate,
            )
            vectors.append(feature_vector(summarise(window), FEATURES))
        settings = AnomalySettings.model_validate(
            {"method": "robust_z", "features": FEATURES, "margin": 10}
        )
        baseline = fit_baseline(settings, np.array(vectors), FEATURES)
        self.store.save(SOURCE, baseline)
        return baseline


@pytest.fixture
async def device(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> AsyncIterator[Device]:
    made = Device(journal, payload_store, data_dir)
    async with made.refits:
        yield made


def model_of(version: str) -> str:
    return f"{SOURCE}-baseline@{version}"


def stamps(readings: list[StoredRecord]) -> list[str | None]:
    """The model names on consecutive readings, one entry per change."""
    runs: list[str | None] = []
    for reading in readings:
        if not runs or runs[-1] != reading.model:
            runs.append(reading.model)
    return runs


# -- the refit's course ------------------------------------------------------------------------


async def test_a_healthy_refit_is_validated_canaried_activated_and_watched(
    device: Device,
) -> None:
    first = await device.run(65, seed=1)  # fits its baseline on the first 20 s, then scores
    assert first.anomaly is not None and first.anomaly.baseline is not None
    old = first.anomaly.baseline.version

    event, second = await device.refit_then_run(60, seed=2)

    assert event == "watch_ended"
    events = device.events()
    assert [e.body["event"] for e in events] == [
        "refit_started",
        "canary_started",
        "canary_passed",
        "activated",
        "watch_ended",
    ]
    started, canary, passed, activated, ended = events
    new = canary.body["version"]
    assert new != old and started.body["previous"] == old and canary.body["previous"] == old
    assert all(e.body["model"] == f"{SOURCE}-baseline" for e in events)
    assert canary.model == model_of(new)
    validation = canary.body["validation"]
    # 60 s of data at five windows a second, the newest quarter held out of the fit.
    assert validation["windows_fit"] + validation["windows_held_out"] == validation["windows"]
    assert 290 <= validation["windows"] <= 305 and validation["windows_held_out"] >= 73
    assert validation["held_out_over_share"] <= 0.05
    assert validation["nice"] == 10  # fitted in the niced child process
    figures = passed.body["canary"]
    assert figures["candidate"]["scored"] >= 100 and figures["candidate"]["errors"] == 0
    assert figures["candidate"]["scored"] == figures["current"]["scored"]
    assert figures["data_s"] >= 20
    assert activated.body["watch_s"] == 20
    assert ended.body["watch"]["scored"] >= 100 and ended.body["watch"]["errors"] == 0
    assert ended.priority == Priority.EVENT

    # Current on disk, the old one kept as previous; the running stage scores with it.
    assert device.store.current_version(SOURCE) == new
    assert device.store.previous_version(SOURCE) == old
    assert second is not None and second.anomaly is not None
    assert second.anomaly.baseline is not None and second.anomaly.baseline.version == new
    assert second.anomaly.stats.swaps == 1 and second.anomaly.observer is None
    # One boundary between two windows: every reading carries the one baseline that scored it.
    readings = [r for r in device.records("reading") if r.seq > started.seq]
    assert stamps(readings) == [model_of(old), model_of(new)]
    first_new = next(r for r in readings if r.model == model_of(new))
    assert passed.seq < first_new.seq
    assert device.records("anomaly") == []
    shown = device.refit.describe()
    assert shown["state"] == "idle" and shown["last_result"]["event"] == "watch_ended"


async def test_a_candidate_that_fails_validation_is_rejected_and_nothing_changes(
    device: Device,
) -> None:
    old = device.install_broad_baseline()
    # A slow drift the broad baseline lets pass; the newest quarter of the data is drifted.
    await device.run(65, seed=3, faults=[drift(46, 2.0)])
    assert device.records("anomaly") == []

    event, second = await device.refit_then_run(20, seed=4)

    assert event == "refit_rejected" and second is None
    assert [e.body["event"] for e in device.events()] == ["refit_started", "refit_rejected"]
    rejected = device.events()[-1].body
    assert rejected["held_out_over_share"] > 0.05 and "held-out windows" in rejected["reason"]
    assert rejected["current_held_out_over_share"] == 0.0
    assert device.store.current_version(SOURCE) == old.version
    assert device.store.versions(SOURCE) == [old.version]  # a rejected candidate is not kept
    assert device.refit.describe()["last_result"]["event"] == "refit_rejected"


async def test_a_candidate_that_alarms_more_in_its_canary_is_refused(device: Device) -> None:
    old = device.install_broad_baseline()
    await device.run(65, seed=5)

    event, second = await device.refit_then_run(40, seed=6, faults=[drift(0, 1.0)])

    assert event == "canary_failed"
    assert [e.body["event"] for e in device.events()] == [
        "refit_started",
        "canary_started",
        "canary_failed",
    ]
    failed = device.events()[-1].body
    assert failed["cause"] == "alarm_share"
    canary = failed["canary"]
    assert canary["current"]["over_share"] == 0.0
    assert canary["candidate"]["over_share"] > canary["limit_share"] == 0.01
    assert canary["candidate_anomalies"] >= 1  # its detector saw them; nothing was journalled
    assert device.records("anomaly") == []
    # Still the old baseline, on disk and in the stage; the candidate kept on disk, not current.
    candidate = failed["version"]
    assert device.store.current_version(SOURCE) == old.version
    assert candidate in device.store.versions(SOURCE)
    assert second is not None and second.anomaly is not None and second.anomaly.baseline
    assert second.anomaly.baseline.version == old.version and second.anomaly.stats.swaps == 0
    readings = [r for r in device.records("reading") if r.seq > device.events()[0].seq]
    assert stamps(readings) == [model_of(old.version)]


async def test_the_watch_rolls_back_a_baseline_that_alarms_far_more_than_the_old(
    device: Device,
) -> None:
    old = device.install_broad_baseline()
    await device.run(65, seed=7)

    # Healthy through the canary; after the activation a mild drift that the new, tighter
    # baseline alarms on and the old one lets pass.
    event, second = await device.refit_then_run(60, seed=8, faults=[drift(25, 1.5, 25)])

    assert event == "rolled_back"
    events = device.events()
    assert [e.body["event"] for e in events] == [
        "refit_started",
        "canary_started",
        "canary_passed",
        "activated",
        "rolled_back",
    ]
    new = events[1].body["version"]
    rolled = events[-1]
    assert rolled.priority == Priority.ALERT
    assert rolled.body["cause"] == "alarm_share" and rolled.body["active"] == old.version
    assert rolled.body["watch"]["over_share"] > rolled.body["watch"]["limit_share"]
    # The previous baseline is current again, on disk and in the running stage.
    assert device.store.current_version(SOURCE) == old.version
    assert second is not None and second.anomaly is not None and second.anomaly.baseline
    assert second.anomaly.baseline.version == old.version and second.anomaly.stats.swaps == 2
    readings = [r for r in device.records("reading") if r.seq > events[0].seq]
    assert stamps(readings) == [model_of(old.version), model_of(new), model_of(old.version)]
    # What the rolled-back baseline found is stamped with it; its open anomaly was closed.
    anomalies = device.records("anomaly")
    assert anomalies and {a.model for a in anomalies} == {model_of(new)}
    assert anomalies[0].body["kind"] == "started"
    assert anomalies[-1].body["kind"] == "ended" and anomalies[-1].body["cause"] == "rolled_back"


async def test_too_few_clean_windows_skip_the_refit(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    device = Device(journal, payload_store, data_dir, min_windows=100)
    async with device.refits:
        # 20 s of baseline, then an imbalance to the end: its windows (and the three before it)
        # are in an anomaly, which leaves fewer than 100 clean windows to fit on.
        imbalance = {"kind": "imbalance", "channel": "vib", "start": "24s", "magnitude": 1.0}
        first = await device.run(40, seed=9, faults=[imbalance])
        assert first.anomaly is not None and first.anomaly.baseline is not None
        assert [a.body["kind"] for a in device.records("anomaly")] == ["started"]

        event, _ = await device.refit_then_run(10, seed=10)

    assert event == "refit_skipped"
    skipped = device.events()[-1].body
    assert "fewer than min_windows=100" in skipped["reason"]
    assert skipped["skipped_near_anomaly"] >= 75
    assert skipped["windows_fit"] < 100
    assert device.store.current_version(SOURCE) == first.anomaly.baseline.version


async def test_the_schedule_and_a_stop_in_the_middle_of_a_fit(device: Device) -> None:
    pipeline = await device.run(25, seed=11)
    stage = pipeline.anomaly
    assert stage is not None and stage.baseline is not None
    now = datetime.now(UTC)

    def refit(**settings: Any) -> BaselineRefit:
        anomaly = machine(1, seed=0)["anomaly"]
        anomaly["refit"] = {**REFIT, **settings}
        return BaselineRefit(
            SOURCE,
            AnomalySettings.model_validate(anomaly),
            device.journal,
            device.store,
            lambda: stage,
        )

    assert "old" in (refit(every="1h").not_due(now) or "")
    hour = now.hour
    elsewhere = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"
    here = f"{hour:02d}:00-{(hour + 1) % 24:02d}:00"
    assert refit(windows=[elsewhere]).not_due(now) == "outside refit.windows"
    assert refit(windows=[here]).not_due(now) is None
    nothing = BaselineRefit(SOURCE, stage.settings, device.journal, device.store, lambda: None)
    assert nothing.not_due(now) == "no baseline scores the source yet"

    # The daemon's job: due, so a refit starts; stopping the daemon mid-fit kills its child.
    await device.refits.tick()
    task = device.refits.running(SOURCE)
    assert task is not None
    await until(lambda: multiprocessing.active_children(), "the fitting process")
    assert "a refit is" in (device.refit.not_due(datetime.now(UTC)) or "")
    stopping = time.monotonic()
    await device.refits.__aexit__(None, None, None)
    assert time.monotonic() - stopping < 10
    assert task.cancelled()
    assert multiprocessing.active_children() == []
    assert [e.body["event"] for e in device.events()] == ["refit_started"]
    assert device.refit.state == "idle"
    # An attempt waits a day (or `every`, here 0) before the next one: due again.
    assert device.refit.not_due(datetime.now(UTC)) is None


async def test_models_refit_asks_the_running_daemon_to_refit_now(
    device: Device, data_dir: Path, tmp_path: Path
) -> None:
    await device.run(25, seed=12)
    config = write_config(tmp_path / "c.yaml", data_dir, [machine(1, seed=0)])

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_cli, "models", "refit", *args, "-c", str(config))

    alone = await cli(SOURCE)
    assert alone.returncode == 1 and "no running appliance answers" in alone.stderr
    async with ControlServer(data_dir, [], device.refits.start):
        started = await cli(SOURCE)
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"refit of {SOURCE} started"
        assert device.refits.running(SOURCE) is not None
        again = await cli(SOURCE)
        assert again.returncode == 1 and f"a refit of {SOURCE} is" in again.stderr
        unknown = await cli("nobody")
        assert unknown.returncode == 2 and "anomaly.refit enabled" in unknown.stderr
    await until(lambda: device.events(), "the refit's first record")
    assert device.events()[0].body["trigger"] == "manual"


# -- the CPU limit -----------------------------------------------------------------------------

CAMERA_RUN_S = 15.0
CAMERA_RUN_MAX_S = 60.0
BIG_WINDOWS = 2400
BIG_CHANNELS = 8


async def record_big_history(journal: Journal) -> list[str]:
    """BIG_WINDOWS one-second readings of eight correlated channels: what an isolation forest
    takes seconds of CPU to fit and export."""
    rng = np.random.default_rng(5)
    start = datetime.now(UTC) - timedelta(seconds=BIG_WINDOWS)
    features = ("rms", "peak")
    common = rng.normal(size=BIG_WINDOWS)
    records = []
    for k in range(BIG_WINDOWS):
        channels = {
            f"ch{c}": {
                name: round(float(common[k] + 0.3 * rng.normal() + c), 5) for name in features
            }
            for c in range(BIG_CHANNELS)
        }
        records.append(
            NewRecord(
                source="big",
                kind="reading",
                priority=Priority.TELEMETRY,
                body={"window_s": 1.0, "sample_rate": None, "channels": channels},
                ts=start + timedelta(seconds=k),
            )
        )
    for at in range(0, BIG_WINDOWS, 500):
        await journal.append_many(records[at : at + 500])
    return [f"ch{c}.{name}" for c in range(BIG_CHANNELS) for name in features]


async def camera_run(
    journal: Journal,
    payloads: PayloadStore,
    detector: Any,
    data_dir: Path,
    *,
    at_least_s: float,
    until: Callable[[], bool] = lambda: True,
) -> tuple[CameraHealth, float]:
    """builtin:vtest played at its own pace (10 fps) into the camera's default 5 fps, through the
    real camera pipeline and the real default detector, for `at_least_s` and until `until()`
    (CAMERA_RUN_MAX_S at most): the camera's health after (the frames it dropped among its
    counters) and how long it ran. At 5 fps this two-core test machine analyses every frame
    with room to spare (the detector's p95 is about 100 ms); the same fit run in a thread of
    this process instead of the child drops 20 to 27 of its 75 frames in 15 s."""
    camera = Camera.model_validate({"name": "street", "url": "builtin:vtest"})
    source = CameraSource(camera)
    scratch = data_dir / "scratch"
    scratch.mkdir(exist_ok=True)
    pipeline = CameraPipeline(
        camera, source, detector, Recorder("street", journal, payloads), scratch_dir=scratch
    )
    started = time.monotonic()
    task = asyncio.create_task(pipeline.run(), name="camera:street")
    await asyncio.sleep(at_least_s)
    while not until() and time.monotonic() - started < CAMERA_RUN_MAX_S:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # `until` is a plain condition: polled, like tests' `until`
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return source.health, time.monotonic() - started


@pytest.mark.slow
async def test_a_heavy_refit_beside_the_camera_costs_it_no_frame(
    journal: Journal, payload_store: PayloadStore, data_dir: Path
) -> None:
    try:
        builtin_footage("vtest")
    except ValueError as exc:
        component_missing(str(exc))
    quiet_opencv()  # as the daemon does with cameras: no FFmpeg thread-safety notice per open
    try:
        detector = await asyncio.to_thread(open_detector, DetectorModel(), "detector")
    except ModelError as exc:
        component_missing(f"the built-in detector ({exc})")
    names = await record_big_history(journal)
    settings = AnomalySettings.model_validate(
        {"method": "isolation_forest", "features": names, "refit": {"data": "1h"}}
    )
    job = RefitJob(
        data_dir=data_dir,
        baselines=data_dir / "models" / "baselines",
        source="big",
        settings=settings,
        names=tuple(names),
        current=None,
    )
    fitted: list[Prepared] = []

    async def refit_meanwhile() -> None:
        while True:
            fitted.append(await refit_in_child(prepare_candidate, job, nice=settings.refit.nice))

    try:
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        refitting = asyncio.create_task(refit_meanwhile())
        # Refits back to back for as long as the camera runs (at least until one finished)...
        beside, ran_s = await camera_run(
            journal,
            payload_store,
            detector,
            data_dir,
            at_least_s=CAMERA_RUN_S,
            until=lambda: bool(fitted),
        )
        refitting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refitting
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # ...then the same camera as long without them.
        alone, _ = await camera_run(journal, payload_store, detector, data_dir, at_least_s=ran_s)
    finally:
        await detector.aclose()

    child_cpu_s = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    print(
        f"beside {len(fitted)} refits ({child_cpu_s:.1f} s of child CPU in {ran_s:.1f} s): "
        f"{beside.frames_delivered} frames delivered, {beside.frames_dropped} dropped; alone: "
        f"{alone.frames_delivered} delivered, {alone.frames_dropped} dropped"
    )
    # The refits really ran, heavy, beside the camera, in niced child processes...
    assert fitted and all(p.outcome == "validated" for p in fitted)
    assert all(p.figures["nice"] == settings.refit.nice for p in fitted)
    assert all(p.figures["fit_cpu_s"] >= 1.0 for p in fitted)
    # ...and the camera kept up with them as well as it did without: frames counted, not timed.
    assert beside.frames_delivered >= ran_s * 5 * 0.8
    assert beside.frames_dropped <= alone.frames_dropped
