"""The camera source: `CameraSource` takes the frames its reader thread reads onto the event loop
through a bounded newest-wins queue, and keeps its state and health, with a watchdog for reads
stuck in OpenCV. The reader thread (reads, pacing, fps cap, reconnects) is sensors/camera_reader.py;
where a camera is and how its capture opens, sensors/capture.py. `CameraHealth` and
`builtin_footage` are re-exported here (in `__all__`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self

from config.cameras import Camera
from sensors.base import Frame, SourceError
from sensors.camera_reader import CameraHealth, CameraReader, RawFrame, ReaderFinished
from sensors.capture import (
    Opener,
    allow_parallel_opens,
    builtin_footage,
    open_capture,
    parse_camera_url,
    redact_url,
)

log = logging.getLogger(__name__)

# Frames per second are measured over this much recent time.
FPS_WINDOW_S = 5.0
# How often the watchdog looks at the reader and refreshes fps / frame age.
TICK_S = 0.2
# Closing waits this long for a reader blocked in OpenCV, then abandons it (it exits on its own).
STOP_GRACE_S = 1.5
# Readers abandoned by the watchdog that may still be blocked in OpenCV, per camera. Past this no
# new reader starts until one returns: a wedged driver must not cost a thread per read_timeout.
MAX_STUCK_READERS = 2


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
        allow_parallel_opens()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[RawFrame] = deque()
        self._wakeup = asyncio.Event()
        self._final: SourceError | ReaderFinished | None = None
        self._generation = 0
        self._reader: CameraReader | None = None
        self._stuck: list[CameraReader] = []
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
            self._final = ReaderFinished()  # a consumer still waiting in frames() ends
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
        self._reader = CameraReader(self, self._loop, self._generation)
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

    def _abandon(self, reader: CameraReader, what: str, seconds: float, limit: float) -> None:
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

    def _accept_frame(
        self, generation: int, raw: RawFrame, slots: threading.Semaphore | None
    ) -> None:
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

    def _accept_final(self, generation: int, final: SourceError | ReaderFinished) -> None:
        if generation != self._generation:
            return
        self._set_final(final)

    def _set_final(self, final: SourceError | ReaderFinished) -> None:
        if self._final is not None:
            return
        self._final = final
        if isinstance(final, SourceError):
            self.health.state = "failed"
            self.health.error = str(final)
        else:
            self.health.state = "finished"
        self._wakeup.set()


__all__ = ["MAX_STUCK_READERS", "CameraHealth", "CameraSource", "builtin_footage"]
