"""The motion gate on synthetic scenes and on real footage (vtest.avi from Debian opencv-doc)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from config.cameras import MotionSettings
from inference.motion import MotionDecision, MotionGate
from sensors.base import Frame
from tests.helpers import component_missing

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
Image = npt.NDArray[np.uint8]


def frame(image: Image, t: float, index: int = 0) -> Frame:
    """A frame taken `t` seconds into the test (mono_ns counts from a non-zero origin)."""
    mono = 5_000_000_000 + round(t * 1e9)
    return Frame("cam", image, T0 + timedelta(seconds=t), mono, index)


def textured(width: int = 640, height: int = 480, seed: int = 0) -> Image:
    """A still scene with structure at several scales, like a real room rather than a flat wall."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 215, size=(height // 40, width // 40, 3), dtype=np.uint8)
    image = np.asarray(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC))
    fine = rng.normal(0, 12, size=image.shape)
    textured_image: Image = np.clip(image + fine, 0, 255).astype(np.uint8)
    return textured_image


def noisy(image: Image, rng: np.random.Generator, sigma: float = 8.0) -> Image:
    """Sensor noise: independent Gaussian noise on every pixel and channel of every frame."""
    noise = rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def jpeg(image: Image, quality: int) -> Image:
    """Compression artefacts: the frame as a camera's encoder and our decoder would leave it."""
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.asarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR), dtype=np.uint8)


@pytest.fixture(scope="module")
def vtest_frames() -> list[Image]:
    """The first 200 frames of vtest.avi (768x576, 10 fps, people walking on a square)."""
    if not VTEST.exists():
        component_missing(f"{VTEST} (Debian package opencv-doc)")
    capture = cv2.VideoCapture(str(VTEST))
    frames: list[Image] = []
    try:
        while len(frames) < 200:
            ok, image = capture.read()
            if not ok:
                break
            frames.append(np.asarray(image, dtype=np.uint8))
    finally:
        capture.release()
    assert len(frames) == 200, f"could read only {len(frames)} frames of {VTEST}"
    return frames


def run(
    gate: MotionGate, images: Iterator[Image] | list[Image], fps: float
) -> list[MotionDecision]:
    return [gate.check(frame(image, i / fps, i)) for i, image in enumerate(images)]


@pytest.mark.parametrize("size", [(160, 120), (640, 360)], ids=["native", "shrunk"])
def test_static_noisy_scene_passes_only_first_frame_and_keepalives(size: tuple[int, int]) -> None:
    """Low-light sensor noise (sigma 12 grey levels). At the gate's own width nothing but the blur
    averages it away: the hard case."""
    rng = np.random.default_rng(1)
    scene = textured(*size)
    gate = MotionGate(MotionSettings(keepalive=10.0))
    decisions = run(gate, (noisy(scene, rng, 12.0) for _ in range(150)), fps=5.0)  # 30 s
    passed = [i for i, d in enumerate(decisions) if d.detect]
    assert passed == [0, 50, 100]
    assert decisions[0].reason == "first"
    assert {decisions[i].reason for i in passed[1:]} == {"keepalive"}
    assert max(d.changed for d in decisions[1:]) < MotionSettings().min_area
    assert (gate.stats.seen, gate.stats.passed, gate.stats.skipped) == (150, 3, 147)
    assert gate.stats.keepalives == 2


def test_real_still_frame_with_noise_and_jpeg_artefacts_stays_still(
    vtest_frames: list[Image],
) -> None:
    rng = np.random.default_rng(2)
    scene = vtest_frames[0]
    images = [jpeg(noisy(scene, rng, sigma=6.0), quality=30 + 10 * (i % 5)) for i in range(50)]
    gate = MotionGate(MotionSettings(keepalive=3.0))
    decisions = run(gate, images, fps=10.0)  # 5 s: one keepalive, at 3 s
    assert [i for i, d in enumerate(decisions) if d.detect] == [0, 30]
    assert decisions[30].reason == "keepalive"
    assert gate.stats.skipped == 48


def test_moving_blob_passes_and_its_region_is_reported() -> None:
    rng = np.random.default_rng(3)
    scene = textured()
    gate = MotionGate(MotionSettings())
    gate.check(frame(noisy(scene, rng), 0.0))
    for step in range(1, 40):
        image = noisy(scene, rng)
        x, y = 40 + 12 * step, 200
        image[y : y + 60, x : x + 30] = 30  # a dark figure walking right
        decision = gate.check(frame(image, step / 5, step))
        assert decision.detect and decision.reason == "motion", step
        assert decision.regions, step
        # The largest region covers the blob's current position (normalised coordinates).
        x1, y1, x2, y2 = decision.regions[0]
        cx, cy = (x + 15) / 640, (y + 30) / 480
        assert x1 <= cx <= x2 and y1 <= cy <= y2, (step, decision.regions[0])
        assert all(0.0 <= v <= 1.0 for region in decision.regions for v in region)
    assert gate.stats.passed == 40


def test_an_object_that_stops_melts_into_the_background() -> None:
    rng = np.random.default_rng(4)
    scene = textured()
    parked = scene.copy()
    parked[100:220, 300:420] = 255
    gate = MotionGate(MotionSettings())
    gate.check(frame(noisy(scene, rng), 0.0))
    decisions = [gate.check(frame(noisy(parked, rng), i / 5, i)) for i in range(1, 60)]
    assert decisions[0].reason == "motion"
    first_still = next(i for i, d in enumerate(decisions) if not d.detect)
    # With the default learning rate a 160-grey-level step fades under 25 in ~18 frames.
    assert 5 < first_still < 30
    assert all(not d.detect for d in decisions[first_still:])


def test_real_footage_of_people_walking_mostly_passes(vtest_frames: list[Image]) -> None:
    gate = MotionGate(MotionSettings())
    decisions = run(gate, vtest_frames, fps=10.0)
    motion = [d for d in decisions[1:] if d.reason == "motion"]
    assert len(motion) >= 0.9 * (len(decisions) - 1)
    assert all(d.regions for d in motion)
    # People are a small part of the square: nothing here is a global change.
    assert all(d.changed < 0.5 for d in decisions[1:])


def test_keepalive_is_timed_by_mono_ns_from_the_last_pass() -> None:
    scene = textured(320, 240)
    moved = scene.copy()
    moved[50:150, 50:150] //= 2
    gate = MotionGate(MotionSettings(keepalive=10.0))
    script = [
        (0.0, scene, "first"),
        (3.0, scene, "still"),
        (9.999, scene, "still"),
        (10.0, scene, "keepalive"),
        (19.5, scene, "still"),
        (20.0, scene, "keepalive"),
        (25.0, moved, "motion"),  # a motion pass restarts the keepalive period...
        (30.0, scene, "still"),  # (a one-frame change leaves too faint a trace to matter)
        (34.9, scene, "still"),
        (35.0, scene, "keepalive"),  # ...so the next keepalive is 10 s after the last pass
        (41.0, scene, "still"),
        (100.0, scene, "keepalive"),  # a long gap between frames: one keepalive, not several
        (100.1, scene, "still"),
    ]
    reasons = [gate.check(frame(image, t, i)).reason for i, (t, image, _) in enumerate(script)]
    assert reasons == [reason for _, _, reason in script]
    assert gate.stats.keepalives == 4


def test_disabled_gate_passes_everything_without_looking() -> None:
    scene = textured(320, 240)
    gate = MotionGate(MotionSettings(enabled=False))
    decisions = [gate.check(frame(scene, i / 5, i)) for i in range(20)]
    assert all(d.detect and d.reason == "disabled" and not d.motion for d in decisions)
    assert (gate.stats.seen, gate.stats.passed, gate.stats.skipped) == (20, 20, 0)
    assert gate.should_detect(frame(scene, 10.0, 20))


def test_global_change_passes_once_then_relearns() -> None:
    rng = np.random.default_rng(5)
    scene = textured(320, 240)
    darker = (scene * 0.4).astype(np.uint8)  # lights off / exposure jump
    gate = MotionGate(MotionSettings())
    gate.check(frame(noisy(scene, rng), 0.0))
    first = gate.check(frame(noisy(darker, rng), 0.2, 1))
    assert first.detect and first.reason == "global" and first.motion
    assert first.regions == ((0.0, 0.0, 1.0, 1.0),)
    after = [gate.check(frame(noisy(darker, rng), 0.2 * i, i)) for i in range(2, 20)]
    assert not any(d.detect for d in after)
    assert gate.stats.resets == 1


def test_new_picture_size_starts_over() -> None:
    gate = MotionGate(MotionSettings())
    assert gate.check(frame(textured(320, 240), 0.0)).reason == "first"
    assert gate.check(frame(textured(320, 240), 0.2, 1)).reason == "still"
    assert gate.check(frame(textured(640, 480), 0.4, 2)).reason == "first"
    assert gate.stats.resets == 1
    gate.reset()
    assert gate.check(frame(textured(640, 480), 0.6, 3)).reason == "first"


def test_frame_smaller_than_the_gate_width_is_not_upscaled() -> None:
    gate = MotionGate(MotionSettings(width=160))
    small = textured(80, 60)
    assert gate.check(frame(small, 0.0)).reason == "first"
    moved = small.copy()
    moved[10:30, 10:30] = 0
    decision = gate.check(frame(moved, 0.2, 1))
    assert decision.reason == "motion"


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (np.zeros((48, 64), dtype=np.uint8), "shape (48, 64)"),
        (np.zeros((48, 64, 4), dtype=np.uint8), "shape (48, 64, 4)"),
        (np.zeros((48, 64, 3), dtype=np.float32), "dtype float32"),
    ],
)
def test_a_frame_that_is_not_bgr_uint8_is_refused(image: Image, words: str) -> None:
    gate = MotionGate(MotionSettings())
    with pytest.raises(ValueError, match="BGR uint8") as raised:
        gate.check(frame(image, 0.0))
    assert words in str(raised.value)
    assert gate.stats.seen == 0


def test_alpha_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        MotionGate(MotionSettings(), alpha=0.0)
