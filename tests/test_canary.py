"""The shadow canary, activation and watch of staged detector packages (appliance/models/canary.py): the
real daemon in this process with a real camera on real footage (builtin:bikes), real signed
packages in a real model store, real ONNX detectors whose outputs are known boxes, the real
journal, status page and a directory destination that ships the records.

The models: v1 (active) finds a car (0.8) and a bicycle (0.6); a good candidate finds the same
boxes scoring 0.81 and 0.61, so every sample record's scores say which model produced it; a bad
one finds a person and a truck elsewhere; a slow one finds v1's boxes after a much bigger matrix
chain. The latency spike after an activation is a real sleep inside the new model's inference
call: the test wraps that detector's session run (`ModelSession._session_run`) with monkeypatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from appliance.daemon import Daemon
from appliance.models.canary import ModelCanaries
from appliance.models.shadow import Limits, frame_agreement
from appliance.models.store import ModelStore, StoreError
from config import ApplianceConfig
from config.cameras import CanarySettings
from inference.detections import Detection
from inference.package_keys import public_key_text
from inference.package_manifest import CanaryLimits, Thresholds
from inference.packages import build_package
from sensors.camera import builtin_footage
from sync.reader import JournalReader
from tests.helpers import component_missing
from tests.onnx_graphs import Box, slow_model, yolov8_output

APPLIANCE = "boat-7"
LABELS = ("person", "bicycle", "car", "truck")
# bikes.mp4 is 640 x 272: letterboxed into the models' 64 x 64 input it is 64 x 27 from row 18,
# so these boxes (network pixels) lie on the picture.
CAR = Box(8, 22, 28, 40, class_id=2, score=0.8)
BICYCLE = Box(36, 20, 52, 36, class_id=1, score=0.6)
V1_SCORES = {"car": 0.8, "bicycle": 0.6}
GOOD_SCORES = {"car": 0.81, "bicycle": 0.61}


def _with_score(box: Box, score: float) -> Box:
    return Box(box.x1, box.y1, box.x2, box.y2, box.class_id, score)


def _model(folder: Path, version: str, boxes: list[Box], *, size: int, steps: int) -> Path:
    """A 64 x 64 detector answering `boxes`; `size` and `steps` set its cost (onnx_graphs)."""
    folder.mkdir(parents=True, exist_ok=True)
    output = yolov8_output(boxes, len(LABELS))
    return slow_model(folder / f"cars-{version}.onnx", {"output0": output}, size=size, steps=steps)


def good_boxes() -> list[Box]:
    return [_with_score(CAR, GOOD_SCORES["car"]), _with_score(BICYCLE, GOOD_SCORES["bicycle"])]


MODELS: dict[str, Callable[[], tuple[list[Box], int, int]]] = {
    "v1": lambda: ([CAR, BICYCLE], 128, 4),
    "good": lambda: (good_boxes(), 128, 4),
    "bad": lambda: (
        [Box(40, 24, 60, 44, class_id=0, score=0.9), Box(2, 19, 12, 30, class_id=3, score=0.7)],
        128,
        4,
    ),
    "slow": lambda: ([CAR, BICYCLE], 512, 8),
}


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def footage() -> str:
    try:
        return str(builtin_footage("bikes"))
    except ValueError as exc:
        component_missing(str(exc))


def publish(
    folder: Path,
    key: Ed25519PrivateKey,
    version: str,
    kind: str,
    *,
    canary: CanaryLimits | None = None,
) -> Path:
    boxes, size, steps = MODELS[kind]()
    output = folder / f"cars-{version}.tar"
    build_package(
        output,
        key,
        name="cars",
        version=version,
        task="detector",
        model=_model(folder / "models", version, boxes, size=size, steps=steps),
        labels=LABELS,
        thresholds=Thresholds(score_threshold=0.5),
        canary=canary,
    )
    return output


def make_config(
    tmp_path: Path, key: Ed25519PrivateKey, *, loop: bool, canary: Mapping[str, Any]
) -> ApplianceConfig:
    settings = {
        "sample_every": 2,
        "duration": "1s",
        "min_frames": 8,
        "max_duration": "20s",
        "max_latency_ratio": 6.0,
        **canary,
    }
    (tmp_path / "shore").mkdir()  # the "USB disk" the records ship to
    return ApplianceConfig.model_validate(
        {
            "appliance": {
                "id": APPLIANCE,
                "data_dir": str(tmp_path / "data"),
                "health_interval": "1s",
            },
            "status": {"listen": "127.0.0.1:0"},
            "model_packages": {
                "trusted_keys": {"publisher": public_key_text(key.public_key())},
                "canary": settings,
            },
            "models": {"front": {"path": "package:cars", "threads": 1}},
            "cameras": [
                {
                    "name": "quay",
                    "url": footage(),
                    "loop": loop,
                    "fps": 10,
                    # Room for a stall of most of a second: a dropped frame is the pipeline's.
                    "queue": 8,
                    "model": "front",
                    "motion": {"enabled": False},  # every frame analysed, so every frame counts
                    "snapshot": {"max_width": 160},
                    # One sample record per analysed frame: its model stamp and its scores.
                    "sampling": {
                        "random": 1.0,
                        "uncertain": None,
                        "per_hour": 100_000,
                        "per_day": 100_000,
                    },
                }
            ],
            "sync": {
                "interval": "1s",
                "destinations": [
                    {"name": "shore", "type": "directory", "path": str(tmp_path / "shore")}
                ],
            },
        }
    )


def install(
    cfg: ApplianceConfig, tmp_path: Path, key: Ed25519PrivateKey, *staged: tuple[str, str]
) -> ModelStore:
    """v1 imported and active, then each (version, kind) imported as staged."""
    store = ModelStore.from_config(cfg)
    store.import_package(publish(tmp_path / "pub", key, "1.0", "v1"))
    store.activate("cars", "1.0")
    for version, kind in staged:
        store.import_package(publish(tmp_path / "pub", key, version, kind))
    return store


async def until(check: Callable[[], bool], within: float, what: Callable[[], object]) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting; state: {what()}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(cfg: ApplianceConfig) -> AsyncIterator[Daemon]:
    """The daemon in this process (`run` mode), stopped and checked on the way out."""
    stop = asyncio.Event()
    daemon = Daemon(cfg, stop=stop)
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        await until(
            lambda: task.done() or (daemon.canaries is not None and "quay" in daemon.cameras),
            30,
            lambda: "daemon starting",
        )
        assert not task.done(), task.result()
        yield daemon
    finally:
        stop.set()
        code = await asyncio.wait_for(task, 30)
    assert code == 0


def canaries(daemon: Daemon) -> ModelCanaries:
    assert daemon.canaries is not None
    return daemon.canaries


def package_status(daemon: Daemon) -> dict[str, Any]:
    assert daemon.monitor is not None
    models = daemon.monitor.snapshot()["models"]
    assert models is not None
    status: dict[str, Any] = models["packages"]["cars"]
    return status


def records(data_dir: Path, kind: str) -> list[dict[str, Any]]:
    with JournalReader.open(data_dir) as reader:
        return [r.to_dict() for r in reader.iter_records(kind=kind)]


def model_events(data_dir: Path) -> list[dict[str, Any]]:
    return [r["body"] for r in records(data_dir, "model")]


def shipped(shore: Path) -> list[dict[str, Any]]:
    """Every record the directory destination received, in journal order (it ships alerts
    first)."""
    found = []
    for batch in shore.glob("records/*/*/*/*.ndjson.gz"):
        with gzip.open(batch, "rt", encoding="utf-8") as handle:
            found += [json.loads(line) for line in handle if line.strip()]
    return sorted(found, key=lambda record: int(record["seq"]))


def check_samples(samples: list[dict[str, Any]]) -> list[str]:
    """Every sample's detections come from the one model its record names: v1's scores under
    front@1.0, the good candidate's under front@2.0. Returns the stamps in frame order."""
    expected = {"front@1.0": V1_SCORES, "front@2.0": GOOD_SCORES}
    for sample in samples:
        body = sample["body"]
        assert sample["model"] == body["model"]
        scores = {p["label"]: p["score"] for p in body["predictions"]}
        assert scores == expected[body["model"]], (body["frame"], body["model"], scores)
    ordered = sorted(samples, key=lambda s: s["body"]["frame"]["index"])
    return [s["body"]["model"] for s in ordered]


# -- the daemon end to end ----------------------------------------------------------------------------


async def test_a_failing_candidate_is_refused_and_the_active_model_stays(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    cfg = make_config(tmp_path, key, loop=True, canary={})
    # The bad one was staged before the start (a restart during its canary, say): the daemon
    # tries it by itself. Its manifest's limit beats the config's 0.8.
    store = install(cfg, tmp_path, key)
    store.import_package(
        publish(tmp_path / "pub", key, "2.0", "bad", canary=CanaryLimits(min_agreement=0.95))
    )
    data_dir = cfg.appliance.data_dir
    async with running(cfg) as daemon:
        manager = canaries(daemon)
        cars = manager.packages["cars"]
        await until(lambda: cars.run is not None, 10, lambda: package_status(daemon))
        running_status = package_status(daemon)["canary"]
        assert (running_status["state"], running_status["version"]) == ("running", "2.0")
        assert running_status["ends_at"]
        await until(
            lambda: (cars.last_canary or {}).get("version") == "2.0",
            30,
            lambda: package_status(daemon),
        )
        # The slow one arrives the way model_updates hands it over.
        store.import_package(publish(tmp_path / "pub", key, "3.0", "slow"))
        await manager.consider("cars", "3.0")
        await until(
            lambda: (cars.last_canary or {}).get("version") == "3.0",
            30,
            lambda: package_status(daemon),
        )
        # A refused version is not tried again.
        await manager.consider("cars", "2.0")
        assert cars.task is not None
        await cars.task
        status = package_status(daemon)
        current = daemon.cameras["quay"].detector
        assert (current.name, current.version) == ("front", "1.0")
        page = await fetch_page(daemon)

    events = model_events(data_dir)
    assert [(e["event"], e["version"]) for e in events] == [
        ("canary_started", "2.0"),
        ("canary_failed", "2.0"),
        ("canary_started", "3.0"),
        ("canary_failed", "3.0"),
    ]
    bad, slow = events[1], events[3]
    assert bad["previous"] == "1.0"
    assert bad["limits"]["min_agreement"] == 0.95  # the manifest's
    assert bad["metrics"]["agreement"] == 0.0
    assert bad["metrics"]["frames"] >= 8
    assert any(
        f["metric"] == "agreement" and f["limit"] == "min_agreement" and f["threshold"] == 0.95
        for f in bad["failed"]
    ), bad["failed"]
    assert "agreement 0.000 < min_agreement 0.95" in bad["reason"]
    assert slow["metrics"]["agreement"] == 1.0
    assert [f["limit"] for f in slow["failed"]] == ["max_latency_ratio"], slow
    assert slow["metrics"]["latency_ratio"] > 6.0
    assert slow["cause"] == "latency_ratio"

    states = {e.version: e.state for e in store.entries()}
    assert states == {"1.0": "active", "2.0": "refused", "3.0": "refused"}
    assert store.pointer("cars") == ("1.0", None)
    assert "min_agreement" in (store.refusal("cars", "2.0") or "")
    assert status["active"] == "1.0"
    assert status["canary"]["state"] == "failed"
    assert status["canary"]["version"] == "3.0"
    assert 'data-name="models"' in page and "failed" in page
    # Every frame ran on v1.
    samples = records(data_dir, "sample")
    assert samples and set(check_samples(samples)) == {"front@1.0"}
    shipped_events = [
        r["body"]["event"] for r in shipped(tmp_path / "shore") if r["kind"] == "model"
    ]
    assert shipped_events.count("canary_failed") == 2


async def fetch_page(daemon: Daemon) -> str:
    assert daemon.monitor is not None and daemon.monitor.status_url is not None
    async with aiohttp.ClientSession() as session, session.get(daemon.monitor.status_url) as reply:
        assert reply.status == 200
        return await reply.text()


async def test_a_passing_candidate_takes_over_between_two_frames_with_none_dropped(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    cfg = make_config(
        tmp_path, key, loop=False, canary={"watch": "2s", "latency_budget_ratio": 20.0}
    )
    store = install(cfg, tmp_path, key, ("2.0", "good"))
    data_dir = cfg.appliance.data_dir
    async with running(cfg) as daemon:
        cars = canaries(daemon).packages["cars"]
        pipeline = daemon.cameras["quay"]
        await until(lambda: cars.watch is not None, 30, lambda: package_status(daemon))
        watching = package_status(daemon)
        assert watching["active"] == "2.0" and watching["previous"] == "1.0"
        assert watching["watch"]["state"] == "watching" and watching["watch"]["until"]
        # The file ends before the pipeline has worked through its queue: wait for the last
        # frame's sample too (a sample that never comes fails here).
        await until(
            lambda: (
                pipeline.source.health.state == "finished"
                and cars.last_watch is not None
                and pipeline.stats.analysed == pipeline.source.health.frames_delivered
                and pipeline.stats.samples == pipeline.stats.analysed
            ),
            30,
            lambda: (pipeline.source.health, pipeline.stats, package_status(daemon)),
        )
        camera = pipeline.source.health
        stats = pipeline.stats
        status = package_status(daemon)
        page = await fetch_page(daemon)

    events = model_events(data_dir)
    assert [e["event"] for e in events] == [
        "canary_started",
        "canary_passed",
        "activated",
        "watch_ended",
    ]
    assert all((e["version"], e["previous"]) == ("2.0", "1.0") for e in events)
    passed = events[1]["metrics"]
    assert passed["agreement"] == 1.0 and passed["errors"] == 0 and passed["frames"] >= 8
    assert store.pointer("cars") == ("2.0", "1.0")
    assert status["canary"]["state"] == "passed" and status["watch"]["state"] == "ended"
    assert "passed" in page and "ended" in page

    # No frame dropped: every frame the file gave passed the fps cap, reached the pipeline and
    # was analysed, across the swap.
    assert camera.frames_dropped == 0 and camera.corrupt_frames == 0
    assert camera.frames_delivered == camera.frames_read - camera.frames_skipped
    assert stats.frames == stats.analysed == camera.frames_delivered
    assert stats.inference_errors == 0
    assert 90 <= stats.frames <= 110  # 10 s of footage at 10 fps

    # No mixed results: each frame's detections are all one model's, the one its record names,
    # and the cameras switched once, from v1 to v2.
    samples = records(data_dir, "sample")
    assert len(samples) == stats.analysed
    assert sorted(s["body"]["frame"]["index"] for s in samples) == list(range(stats.frames))
    stamps = check_samples(samples)
    switch = stamps.index("front@2.0")
    assert switch > 0
    assert stamps == ["front@1.0"] * switch + ["front@2.0"] * (len(stamps) - switch)

    shipped_models = [r for r in shipped(tmp_path / "shore") if r["kind"] == "model"]
    assert [r["body"]["event"] for r in shipped_models] == [e["event"] for e in events]


@pytest.mark.parametrize("fault", ["latency", "error_rate"])
async def test_a_spike_after_activation_rolls_back_by_itself(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """`latency`: every run of the new model sleeps 200 ms first; `error_rate`: every run fails
    (onnxruntime raising), which the camera counts and skips."""
    cfg = make_config(
        tmp_path, key, loop=True, canary={"watch": "60s", "latency_budget_ratio": 5.0}
    )
    store = install(cfg, tmp_path, key, ("2.0", "good"))
    data_dir = cfg.appliance.data_dir
    async with running(cfg) as daemon:
        cars = canaries(daemon).packages["cars"]
        pool = canaries(daemon).pool
        await until(
            lambda: (d := pool.current("front")) is not None and d.version == "2.0",
            30,
            lambda: package_status(daemon),
        )
        spiking = pool.current("front")
        assert spiking is not None
        session = spiking.session
        real_run = session._session_run

        def faulty_run(feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
            if fault == "error_rate":
                raise RuntimeError("injected fault: CUDA out of memory")
            time.sleep(0.2)
            return real_run(feeds)

        monkeypatch.setattr(session, "_session_run", faulty_run)
        await until(
            lambda: (cars.last_watch or {}).get("state") == "rolled_back",
            30,
            lambda: package_status(daemon),
        )
        restored = pool.current("front")
        assert restored is not None and restored.version == "1.0"
        # The camera takes the restored model up at its next frame.
        pipeline = daemon.cameras["quay"]
        rolled_at = pipeline.stats.frames
        await until(lambda: pipeline.stats.frames >= rolled_at + 5, 10, lambda: pipeline.stats)
        assert pipeline.model == "front@1.0"
        status = package_status(daemon)

    events = model_events(data_dir)
    assert [e["event"] for e in events] == [
        "canary_started",
        "canary_passed",
        "activated",
        "rolled_back",
    ]
    rolled = records(data_dir, "model")[-1]
    assert rolled["priority"] == "alert"
    body = rolled["body"]
    assert (body["version"], body["active"], body["cause"]) == ("2.0", "1.0", fault)
    watched = body["metrics"]["models"]["front"]
    if fault == "latency":
        assert "p95 latency" in body["detail"]
        assert watched["p95_ms"] > watched["budget_ms"]
    else:
        assert "> max_error_rate 0.01" in body["detail"]
        assert watched["errors"] > 0 and "runs failed" in body["detail"]
    assert store.pointer("cars") == ("1.0", "2.0")
    assert fault in (store.refusal("cars", "2.0") or "")
    assert status["active"] == "1.0"
    assert status["watch"]["state"] == "rolled_back"
    # Before, during and after: each frame's detections from one model, the one stamped.
    stamps = check_samples(records(data_dir, "sample"))
    assert stamps[0] == "front@1.0" and stamps[-1] == "front@1.0"
    if fault == "latency":  # slow, but its results stand (failed runs leave no sample)
        assert "front@2.0" in stamps
    shipped_models = [r for r in shipped(tmp_path / "shore") if r["kind"] == "model"]
    assert [r["body"]["event"] for r in shipped_models] == [e["event"] for e in events]
    assert shipped_models[-1]["priority"] == "alert"


# -- the parts ---------------------------------------------------------------------------------------


def _det(label: str, x1: float, y1: float, x2: float, y2: float) -> Detection:
    return Detection(x1, y1, x2, y2, score=0.9, class_id=LABELS.index(label), label=label)


def test_agreement_matches_detections_of_one_class_one_to_one() -> None:
    car = _det("car", 0, 0, 10, 10)
    assert frame_agreement([], []) == 1.0  # both see nothing: they agree
    assert frame_agreement([car], []) == 0.0
    assert frame_agreement([], [car]) == 0.0
    assert frame_agreement([car], [_det("car", 1, 0, 11, 10)]) == 1.0  # IoU 0.82
    assert frame_agreement([car], [_det("truck", 0, 0, 10, 10)]) == 0.0  # another class
    assert frame_agreement([car], [_det("car", 4, 0, 14, 10)]) == 0.0  # IoU 0.43 < 0.5
    # One of two matched: F1 = 2 * 1 / (2 + 1).
    person = _det("person", 50, 50, 60, 70)
    assert frame_agreement([car, person], [car]) == pytest.approx(2 / 3)
    # One to one: two shadow boxes on one active box count once.
    assert frame_agreement([car], [car, _det("car", 0, 1, 10, 11)]) == pytest.approx(2 / 3)


def test_limits_come_from_the_manifest_where_it_sets_them() -> None:
    settings = CanarySettings()
    assert Limits.resolve(None, settings) == Limits(0.8, 2.0, 0.01)
    manifest = CanaryLimits(min_agreement=0.95, max_latency_ratio=None, max_error_rate=0.05)
    assert Limits.resolve(manifest, settings) == Limits(0.95, 2.0, 0.05)
    with pytest.raises(ValidationError, match="max_duration must be at least duration"):
        CanarySettings.model_validate({"duration": "1h", "max_duration": "30m"})


def test_a_refused_version_is_marked_until_activated_by_hand(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    cfg = make_config(tmp_path, key, loop=False, canary={})
    store = install(cfg, tmp_path, key, ("2.0", "good"))
    event = store.refuse("cars", "2.0", "agreement 0.1 < min_agreement 0.8")
    assert (event.action, event.version, event.previous) == ("refuse", "2.0", "1.0")
    assert {e.version: e.state for e in store.entries()}["2.0"] == "refused"
    assert store.refusal("cars", "2.0") == "agreement 0.1 < min_agreement 0.8"
    assert store.refusal("cars", "1.0") is None
    with pytest.raises(StoreError, match="is the active version"):
        store.refuse("cars", "1.0", "no")
    assert store.history()[-1]["action"] == "refuse"
    # `appliance models activate` is the manual override: it clears the refusal.
    store.activate("cars", "2.0")
    assert store.refusal("cars", "2.0") is None
    assert store.resolve_version("cars", "1.0").manifest.version == "1.0"
