"""A camera's reader thread: it opens the OpenCV capture, reads, paces files, caps the fps,
reconnects with jittered backoff and posts frames and state to the camera on the event loop; and
`CameraHealth`, the counters the reader and the camera keep."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy.typing as npt

from config.cameras import Camera
from sensors.base import SourceError, SourceHealth, utc_now
from sensors.capture import CameraKind, Capture, Image, Opener, as_bgr, describe_unreadable

# The camera's logger: its lines read as they did when the reader lived in sensors/camera.py.
log = logging.getLogger("sensors.camera")

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
class RawFrame:
    image: Image
    ts: datetime
    mono_ns: int
    position_s: float | None


@dataclass(frozen=True, slots=True)
class ReaderFinished:
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


class ReaderHost(Protocol):
    """What a reader needs of its camera (`sensors.camera.CameraSource`): its settings, target and
    health, and the callbacks, run on the event loop, that the reader posts to."""

    cfg: Camera
    name: str
    kind: CameraKind
    where: str
    health: CameraHealth
    _target: str | int
    _opener: Opener
    _slots: threading.Semaphore | None

    def _accept_frame(
        self, generation: int, raw: RawFrame, slots: threading.Semaphore | None
    ) -> None: ...

    def _accept_state(self, generation: int, event: str, message: str | None) -> None: ...

    def _accept_final(self, generation: int, final: SourceError | ReaderFinished) -> None: ...


class CameraReader:
    """One generation of a camera's reader thread: opens the capture, reads, paces, applies the
    fps cap and posts to the loop. Retired (at close, or by the watchdog) it stops posting and
    exits as soon as its current OpenCV call returns, releasing the capture from its own thread."""

    def __init__(
        self, camera: ReaderHost, loop: asyncio.AbstractEventLoop, generation: int
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

    def _deliver(self, raw: RawFrame) -> bool:
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
            self._deliver(RawFrame(image, utc_now(), now_ns, None))
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
                self._post(self.camera._accept_final, ReaderFinished())
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
            if not self._deliver(RawFrame(image, utc_now(), now_ns, round(pos, 6))):
                break
        return _Pass(grabbed, expected, max(pos, 0.0), interval)

    @staticmethod
    def _position(capture: Capture, grabbed: int, previous: float, interval: float) -> float:
        pos = capture.position_ms() / 1000.0
        if not math.isfinite(pos) or (grabbed > 1 and pos <= previous):
            # No usable timestamp (some containers, broken files): one frame after the last.
            return previous + interval
        return pos
