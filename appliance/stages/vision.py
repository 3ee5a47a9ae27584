"""The pipeline of one camera: frames -> motion gate -> detector -> tracker and zones -> event and
alert records with snapshots and clips, and samples for retraining, in the journal.

One record per tracked object (kind `object`, at its end: start, end, best score, best snapshot),
one per zone entry (kind `zone_entry`, at once, priority from the zone, with a snapshot and later
a `clip` record with pre- and post-roll), `sample` records chosen by the sampling policy, and
`drift` records when the frames' brightness or sharpness or the detector's outputs drift from
the model's reference.
Every image that leaves the device goes through the camera's blur classes first.

`DetectorPool` holds one `DetectorSlot` per model: the detector its cameras run now. A canary
(appliance/models/canary.py) swaps it between two frames and, while it tries a staged model, takes a
sample of the frames through the slot's `shadow`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from appliance.runtime.logs import RateLimitedLog
from appliance.stages.drift import DriftStage
from appliance.stages.recorder import Recorder
from config import ApplianceConfig, Camera, ClipSettings, DetectorModel
from inference.clips import ClipInfo, clip_fourcc, write_clip
from inference.detect import OnnxDetector, open_detector
from inference.detections import Detection, Detector
from inference.media import (
    ClipBuilder,
    ClipRecorder,
    MediaError,
    TimedImage,
    blur_regions,
    encode_snapshot,
)
from inference.motion import MotionGate
from inference.sampling import Sampler, sample_body
from inference.session import InferenceError, ModelError
from inference.tracking import Tracker, TrackEvent
from sensors.base import Frame
from sensors.camera import CameraSource
from sync import NewRecord, PayloadRef, Priority

if TYPE_CHECKING:
    from inference.packages import PackageResolver

log = logging.getLogger(__name__)

Image = npt.NDArray[np.uint8]
_NS = 1_000_000_000
_BEST_SNAPSHOT_INTERVAL_NS = _NS  # re-encode a track's best snapshot at most this often
_STATS_WIDTH = 160  # frames are measured for drift at this width (like the motion gate's)
# Clips of one camera being encoded or waiting for its clip thread. Each holds its frames (10 s
# at 5 fps and 640 px: 46 MB); when this many are, the frame loop waits for the oldest, like a
# producer of the journal's queue: a clip is evidence and is not dropped. A camera finishes a
# clip at most once per post-roll, and one encodes in a few hundredths of its length
# (docs/benchmarks.md), so a camera only waits when its clip thread is starved of CPU.
CLIP_BACKLOG = 2


def image_statistics(image: Image) -> tuple[float, float]:
    """(brightness, sharpness) of a BGR frame: the mean grey level, and the variance of the
    Laplacian, both on a small grey copy (a blurred, fogged or dirty lens loses sharpness)."""
    height, width = image.shape[:2]
    small_w = min(_STATS_WIDTH, width)
    small_h = max(1, round(height * small_w / width))
    # One bilinear resize samples the frame rather than averaging it: a few times cheaper than
    # INTER_AREA (which motion.py needs against noise), and it keeps the fine detail that the
    # sharpness measure is after. Both figures are only ever compared with the same camera's.
    small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_LINEAR)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
    _, deviation = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return float(cv2.mean(grey)[0]), float(deviation[0, 0]) ** 2


@dataclass
class CameraStats:
    """What the pipeline did with the camera's frames (health and status read it)."""

    frames: int = 0
    analysed: int = 0
    skipped_motion: int = 0
    detections: int = 0
    inference_errors: int = 0
    objects: int = 0
    zone_entries: int = 0
    clips: int = 0
    clips_waited: int = 0  # times the frame loop waited for room in the clip backlog
    clip_encode_cpu_s: float = 0.0  # CPU time of the clip thread, encoding (clip.threads: 1)
    samples: int = 0
    media_errors: int = 0


@dataclass
class _PendingClip:
    """Zone entries a clip being recorded covers, so its record can name them."""

    builder: ClipBuilder
    priority: Priority
    entries: list[dict[str, Any]] = field(default_factory=list)


class FrameClock:
    """The clock the gate, tracker, clips and sampling caps run on: the file's own time for video
    files (so a fast replay tracks, cuts clips and meets its hourly sampling caps exactly as a
    realtime run would), the monotonic clock and wall time for live cameras. A looping file keeps
    counting forward across its restarts."""

    def __init__(self) -> None:
        self._offset_ns = 0
        self._last_pos_ns: int | None = None
        self._step_ns = _NS // 25
        self._footage_epoch: datetime | None = None

    def at(self, frame: Frame) -> int:
        """The frame's time in nanoseconds: monotonic for live cameras, footage time for files."""
        if frame.position_s is None:
            return frame.mono_ns
        pos = round(frame.position_s * _NS)
        if self._last_pos_ns is not None:
            if pos <= self._last_pos_ns:  # the file started over
                self._offset_ns += self._last_pos_ns - pos + self._step_ns
            else:
                self._step_ns = pos - self._last_pos_ns
        self._last_pos_ns = pos
        return pos + self._offset_ns

    def wall(self, frame: Frame, at_ns: int) -> datetime:
        """The UTC time the frame stands for: its wall time for live cameras; for files, the wall
        time of the first frame plus the footage time since (`at_ns` from `at()`), so that an hour
        of footage replayed in minutes spans an hour of sampling periods."""
        if frame.position_s is None:
            return frame.ts
        if self._footage_epoch is None:
            self._footage_epoch = frame.ts - timedelta(microseconds=at_ns / 1000)
        return self._footage_epoch + timedelta(microseconds=at_ns / 1000)


def quiet_opencv() -> None:
    """OpenCV prints its own warnings (open timeouts, FFmpeg thread-safety notes) to stderr,
    outside our structured log; the camera's health and our log lines already say what matters."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class ShadowSink(Protocol):
    """Takes a sample of a model's frames while a canary tries a staged model beside it
    (appliance/models/canary.py). `offer` returns at once: the camera never waits for the shadow."""

    def offer(self, image: Image, found: Sequence[Detection]) -> None:
        """One frame the active model analysed and what it found there (before the camera's
        class filter)."""
        ...


@dataclass(eq=False)
class DetectorSlot:
    """The detector one model runs now. A camera reads `detector` once per frame and a swap is
    one reference assignment on the loop, so it lands between two frames: every frame's
    detections come from one model. `shadow` is set while a canary runs for this model."""

    name: str
    detector: OnnxDetector
    shadow: ShadowSink | None = None


class DetectorPool:
    """The detectors cameras share, opened on first use (conversion, hashing and warm-up run in a
    worker thread) and closed with the daemon. A model that fails to open fails the camera that
    asked for it (which the supervisor restarts within its budget), not the appliance."""

    def __init__(self, cfg: ApplianceConfig, packages: PackageResolver | None = None) -> None:
        self.cfg = cfg
        # `package:NAME` detectors resolve to the active version of an installed package in the
        # model store the daemon gives (appliance/models/store.py, a room above this one).
        self.packages = packages
        self._slots: dict[str, DetectorSlot] = {}
        self._shadows: dict[str, ShadowSink] = {}
        self._lock = asyncio.Lock()
        # Told when a model fails to open (a canary's watch rolls back on it).
        self.on_load_error: Callable[[str, ModelError], None] | None = None

    async def slot(self, name: str) -> DetectorSlot:
        """The slot of model `name`, its detector opened first if it is not yet."""
        async with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                return slot
            model_cfg = self.cfg.models.get(name) or DetectorModel()
            try:
                detector = await asyncio.to_thread(
                    open_detector, model_cfg, name, packages=self.packages
                )
            except ModelError as exc:
                if self.on_load_error is not None:
                    self.on_load_error(name, exc)
                raise
            slot = self._slots.get(name)
            if slot is not None:
                # A canary's activation installed a (newer, warm) detector while this one opened.
                await detector.aclose()
                return slot
            slot = self._slots[name] = DetectorSlot(name, detector, self._shadows.get(name))
            log.info(
                "model loaded",
                extra={"fields": {"model": f"{detector.name}@{detector.version}"}},
            )
            return slot

    async def get(self, name: str) -> OnnxDetector:
        return (await self.slot(name)).detector

    def current(self, name: str) -> OnnxDetector | None:
        """The detector model `name` runs now; None while no camera has loaded it."""
        slot = self._slots.get(name)
        return None if slot is None else slot.detector

    def swap(self, name: str, detector: OnnxDetector) -> OnnxDetector | None:
        """Make `detector` (already opened and warmed up) the one model `name` runs from its
        cameras' next frame on. Returns the detector it replaces (None when none was loaded),
        which the caller keeps or closes: frames already submitted to it finish first."""
        slot = self._slots.get(name)
        if slot is None:
            self._slots[name] = DetectorSlot(name, detector, self._shadows.get(name))
            return None
        replaced, slot.detector = slot.detector, detector
        log.info(
            "model swapped",
            extra={
                "fields": {
                    "model": f"{detector.name}@{detector.version}",
                    "replaced": f"{replaced.name}@{replaced.version}",
                }
            },
        )
        return replaced

    def attach_shadow(self, name: str, sink: ShadowSink | None) -> None:
        """Hand a sample of model `name`'s frames to `sink` from now on (None: stop)."""
        if sink is None:
            self._shadows.pop(name, None)
        else:
            self._shadows[name] = sink
        slot = self._slots.get(name)
        if slot is not None:
            slot.shadow = sink

    @property
    def loaded(self) -> dict[str, OnnxDetector]:
        return {name: slot.detector for name, slot in self._slots.items()}

    async def aclose(self) -> None:
        for slot in self._slots.values():
            await slot.detector.aclose()
        self._slots.clear()


class CameraPipeline:
    """Runs one camera until its file ends (or cancellation) and journals what it sees."""

    def __init__(
        self,
        cfg: Camera,
        source: CameraSource,
        detector: Detector,
        recorder: Recorder,
        *,
        scratch_dir: Path,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.detector = detector
        # Set by follow(): the pool's slot whose swaps (canary activation, rollback) this camera
        # takes up, and the slot's detector it last took.
        self.slot: DetectorSlot | None = None
        self._slot_detector: Detector | None = None
        self.recorder = recorder
        self.scratch_dir = scratch_dir
        self.model = f"{detector.name}@{detector.version}"
        self.stats = CameraStats()
        self.gate = MotionGate(cfg.motion)
        self.sampler = Sampler(cfg.sampling)
        self.drift = DriftStage(
            cfg.name, cfg.drift, recorder, recorder.journal.data_dir, boostable=self.sampler
        )
        self._measured = 0  # frames measured for drift, and the time it took
        self._measure_ns = 0
        self.classes = set(cfg.classes)
        named = {*cfg.classes, *cfg.blur_classes, *(c for zone in cfg.zones for c in zone.classes)}
        unknown = sorted(named - set(detector.labels))
        if unknown:
            raise ValueError(
                f"camera {cfg.name!r} names classes {unknown} that model {self.model} does not "
                f"know; its labels include {list(detector.labels[:12])}"
            )
        # Clips are only cut at zone entries: without zones, no pre-roll ring to keep.
        self.clips = ClipRecorder(cfg.clip, cfg.fps) if cfg.clip.enabled and cfg.zones else None
        self.tracker: Tracker | None = None  # sized by the first frame
        self._clock = FrameClock()
        # track id -> (frame info, JPEG) of its best detection: encoded when it improves, so an
        # open track holds a bounded snapshot, not a full frame; at most once a second per track
        # (a new track improves on most frames at first), the latest improvement waiting in
        # _better until then or until the track ends.
        self._best: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._best_encoded_ns: dict[int, int] = {}
        self._better: dict[int, tuple[Frame, Image, Detection]] = {}
        self._pending_clips: list[_PendingClip] = []
        # Clips are encoded in the camera's own clip thread, and their records journalled by
        # these tasks, while the frame loop goes on; _finish() waits for them.
        self._clip_thread: ThreadPoolExecutor | None = None
        self._clip_tasks: set[asyncio.Task[None]] = set()
        self._private: list[Detection] = []  # latest boxes of blur classes, for frames not analysed
        self._last_frame: Frame | None = None
        self._warn = RateLimitedLog(log)

    # ------------------------------------------------------------------------------- running

    async def run(self) -> None:
        await self.drift.activate(self.model)
        if self.clips is not None:
            # Chosen (and logged) at start, where the operator reads the log, not at the first alert.
            await asyncio.to_thread(clip_fourcc, self.cfg.clip.codec)
            self._clip_thread = ThreadPoolExecutor(1, thread_name_prefix=f"clip-{self.cfg.name}")
        async with self.source:
            try:
                async for frame in self.source.frames():
                    await self._on_frame(frame)
            finally:
                # End of file, shutdown or a failed camera: open tracks and clips are closed and
                # journalled, so an object seen before a restart is not lost.
                await asyncio.shield(self._finish())

    def health(self) -> dict[str, Any]:
        """The camera's health, its pipeline's counters and its model's latency, JSON-ready."""
        camera = dataclasses.asdict(self.source.health)
        latency = getattr(self.detector, "stats", None)
        return {
            **camera,
            "model": self.model,
            "pipeline": dataclasses.asdict(self.stats),
            "motion": dataclasses.asdict(self.gate.stats),
            "latency_ms": None
            if latency is None
            else {"p50": latency.p50_ms, "p95": latency.p95_ms, "count": latency.count},
            "open_tracks": 0 if self.tracker is None else self.tracker.open_tracks,
            "sampling": self.sampler.status(),
            "drift": {
                **self.drift.status(),
                "measure_us": round(self._measure_ns / self._measured / 1000, 1)
                if self._measured
                else None,
            },
        }

    async def _on_frame(self, raw: Frame) -> None:
        self.stats.frames += 1
        if self._clip_tasks:
            self._reap_clips()
        slot = self.slot
        if slot is not None and slot.detector is not self._slot_detector:
            self._slot_detector = slot.detector
            await self._switch(slot.detector)
        frame = dataclasses.replace(raw, mono_ns=self._clock.at(raw))
        self._last_frame = frame
        if self.tracker is None:
            self.tracker = Tracker(self.cfg.tracking, self.cfg.zones, (frame.width, frame.height))
        detections: list[Detection] | None = None
        if self.gate.check(frame).detect:
            detections = await self._detect(frame)
        else:
            self.stats.skipped_motion += 1
        await self._observe_drift(frame, detections)
        if detections is not None and self.cfg.blur_classes:
            self._private = [d for d in detections if d.label in self.cfg.blur_classes]
        image = self._private_image(frame.image)
        if self.clips is not None:
            for done in self.clips.add(frame.mono_ns, image):
                await self._write_clip(done, frame)
        if detections is None:
            return
        for event in self.tracker.update(detections, frame):
            await self._on_track_event(event, frame, image, detections)
        await self._maybe_sample(frame, image, detections)

    def follow(self, slot: DetectorSlot) -> None:
        """Run whatever `slot` holds from now on, taking up a swap at the next frame, and hand
        its canary's shadow a sample of the frames. (Without, the camera keeps the detector it
        was built with, e.g. a benchmark's timing wrapper.)"""
        self.slot = slot
        self._slot_detector = slot.detector

    async def _switch(self, detector: Detector) -> None:
        """Run `detector` from this frame on: every record of the frame says its name@version."""
        replaced = self.model
        self.detector = detector
        self.model = f"{detector.name}@{detector.version}"
        log.info(
            "camera switched model",
            extra={"fields": {"camera": self.cfg.name, "model": self.model, "was": replaced}},
        )
        await self.drift.activate(self.model)

    async def _detect(self, frame: Frame) -> list[Detection] | None:
        try:
            found = await self.detector.detect(frame.image)
        except InferenceError as exc:
            self.stats.inference_errors += 1
            self._warn.warning(
                "inference", "inference failed", camera=self.cfg.name, error=str(exc)
            )
            return None
        self.stats.analysed += 1
        shadow = None if self.slot is None else self.slot.shadow
        if shadow is not None:
            shadow.offer(frame.image, found)
        if self.classes:
            found = [d for d in found if d.label in self.classes]
        self.stats.detections += len(found)
        return found

    async def _observe_drift(self, frame: Frame, detections: list[Detection] | None) -> None:
        """Brightness and sharpness of one frame in `input_every`; the number of detections and
        the best score of every detector run; then a check when one is due."""
        if self.drift.monitor is None:
            return
        when = self._clock.wall(frame, frame.mono_ns)
        if self.stats.frames % self.cfg.drift.input_every == 0:
            started = time.perf_counter_ns()
            brightness, sharpness = image_statistics(frame.image)
            self._measure_ns += time.perf_counter_ns() - started
            self._measured += 1
            self.drift.observe("brightness", brightness, when)
            self.drift.observe("sharpness", sharpness, when)
        if detections is not None:
            self.drift.observe("detections", len(detections), when)
            if detections:
                self.drift.observe("max_score", max(d.score for d in detections), when)
        await self.drift.check(ts=frame.ts)

    def _private_image(self, image: Image) -> Image:
        if not self._private:
            return image
        return blur_regions(image, self._private, self.cfg.blur_classes)

    # ------------------------------------------------------------------------- track events

    async def _on_track_event(
        self, event: TrackEvent, frame: Frame, image: Image, detections: list[Detection]
    ) -> None:
        if event.keep_frame:
            track_id = event.track.id
            last = self._best_encoded_ns.get(track_id)
            if last is not None and frame.mono_ns - last < _BEST_SNAPSHOT_INTERVAL_NS:
                self._better[track_id] = (frame, image, event.track.best)
            else:
                await self._keep_best(track_id, frame, image, event.track.best)
        if event.kind == "zone_entered" and event.zone is not None:
            await self._zone_entry(event, frame, image, detections)
        elif event.kind == "ended":
            await self._object_ended(event)

    async def _zone_entry(
        self, event: TrackEvent, frame: Frame, image: Image, detections: list[Detection]
    ) -> None:
        assert event.zone is not None
        priority = Priority.from_label(event.zone.priority)
        self.stats.zone_entries += 1
        body: dict[str, Any] = {
            "zone": event.zone.name,
            "track_id": event.track.id,
            "label": event.track.label,
            "score": round(event.track.last.score, 4),
            "box": event.track.last.as_dict()["box"],
            "frame": _frame_info(frame),
            "detections": [d.as_dict() for d in detections],
        }
        snapshot = await self._snapshot(image, [event.track.last], priority)
        record = NewRecord(
            source=self.cfg.name,
            kind="zone_entry",
            priority=priority,
            body=body,
            model=self.model,
            payloads=() if snapshot is None else (snapshot,),
            ts=frame.ts,
        )
        seq = await self.recorder.append_with_payloads(record)
        if self.clips is not None:
            builder = self.clips.alert(frame.mono_ns)
            pending = next((p for p in self._pending_clips if p.builder is builder), None)
            if pending is None:
                pending = _PendingClip(builder, priority)
                self._pending_clips.append(pending)
            pending.priority = min(pending.priority, priority)
            pending.entries.append(
                {"seq": seq, "zone": event.zone.name, "track_id": event.track.id}
            )

    async def _keep_best(self, track_id: int, frame: Frame, image: Image, best: Detection) -> None:
        self._better.pop(track_id, None)
        self._best_encoded_ns[track_id] = frame.mono_ns
        jpeg = await self._encode(image, [best], "snapshot")
        if jpeg is not None:
            self._best[track_id] = (_frame_info(frame), jpeg)

    async def _object_ended(self, event: TrackEvent) -> None:
        track = event.track
        waiting = self._better.get(track.id)
        if waiting is not None:
            await self._keep_best(track.id, *waiting)
        self._best_encoded_ns.pop(track.id, None)
        best = self._best.pop(track.id, None)
        self.stats.objects += 1
        path = [[round(x, 1), round(y, 1)] for x, y in track.path]
        body: dict[str, Any] = {**track.as_dict(), "path": path}
        payloads: tuple[PayloadRef, ...] = ()
        if best is not None:
            body["best_frame"], jpeg = best
            snapshot = await self.recorder.store(jpeg, "image/jpeg", Priority.EVENT)
            payloads = () if snapshot is None else (snapshot,)
        await self.recorder.append_with_payloads(
            NewRecord(
                source=self.cfg.name,
                kind="object",
                priority=Priority.EVENT,
                body=body,
                model=self.model,
                payloads=payloads,
                ts=track.first_ts,
            )
        )

    async def _encode(self, image: Image, boxes: list[Detection] | None, what: str) -> bytes | None:
        try:
            return await asyncio.to_thread(encode_snapshot, image, self.cfg.snapshot, boxes)
        except MediaError as exc:
            self.stats.media_errors += 1
            self._warn.warning(what, f"{what} not kept", camera=self.cfg.name, error=str(exc))
            return None

    async def _snapshot(
        self, image: Image, boxes: list[Detection], priority: Priority
    ) -> PayloadRef | None:
        data = await self._encode(image, boxes, "snapshot")
        return None if data is None else await self.recorder.store(data, "image/jpeg", priority)

    # ---------------------------------------------------------------------- clips, samples

    async def _write_clip(self, builder: ClipBuilder, frame: Frame | None) -> None:
        """Hand a finished clip to the clip thread; its record follows when it is written."""
        pending = next((p for p in self._pending_clips if p.builder is builder), None)
        if pending is not None:
            self._pending_clips.remove(pending)
        frames = builder.frames
        if pending is None or len(frames) < 2:
            return
        while len(self._clip_tasks) >= CLIP_BACKLOG:
            self.stats.clips_waited += 1
            await asyncio.wait(self._clip_tasks, return_when=asyncio.FIRST_COMPLETED)
            self._reap_clips()
        task = asyncio.create_task(
            self._keep_clip(frames, builder.capped, pending, None if frame is None else frame.ts),
            name=f"clip:{self.cfg.name}",
        )
        self._clip_tasks.add(task)

    def _reap_clips(self) -> None:
        """Forget the clip tasks that are done; one that failed (a bug: media and disk errors
        are caught in it) raises here, in the camera's task, where its supervisor sees it."""
        for task in [t for t in self._clip_tasks if t.done()]:
            self._clip_tasks.discard(task)
            task.result()

    async def _keep_clip(
        self, frames: list[TimedImage], capped: bool, pending: _PendingClip, ts: datetime | None
    ) -> None:
        assert self._clip_thread is not None, "clips are written only after run() started"
        path = self.scratch_dir / f"clip-{uuid.uuid4().hex}.mp4"
        try:
            info, data = await asyncio.get_running_loop().run_in_executor(
                self._clip_thread, _encode_clip, frames, path, self.cfg.clip
            )
        except (MediaError, OSError) as exc:
            self.stats.media_errors += 1
            self._warn.warning("clip", "clip not kept", camera=self.cfg.name, error=str(exc))
            return
        self.stats.clip_encode_cpu_s += info.encode_cpu_s
        ref = await self.recorder.store(data, "video/mp4", pending.priority)
        if ref is None:
            return
        self.stats.clips += 1
        await self.recorder.append_with_payloads(
            NewRecord(
                source=self.cfg.name,
                kind="clip",
                priority=pending.priority,
                body={
                    "entries": pending.entries,
                    "frames": info.frames,
                    "width": info.width,
                    "height": info.height,
                    "fps": round(info.fps, 3),
                    "duration_s": round(info.duration_s, 3),
                    "codec": info.fourcc,
                    "capped": capped,
                },
                model=self.model,
                payloads=(ref,),
                ts=ts,
            )
        )

    async def _maybe_sample(self, frame: Frame, image: Image, detections: list[Detection]) -> None:
        ticket = self.sampler.consider(self._clock.wall(frame, frame.mono_ns), detections)
        if ticket is None:
            return
        data = await self._encode(image, None, "sample")
        if data is None:
            self.sampler.cancel(ticket)
            return
        if not self.sampler.commit(ticket, len(data)):
            return
        ref = await self.recorder.store(data, "image/jpeg", Priority.SAMPLE)
        if ref is None:
            return
        width = min(frame.width, self.cfg.snapshot.max_width)
        size = (width, round(frame.height * width / frame.width))
        body = sample_body(detections, ticket.reason, self.model, frame, image_size=size)
        seq = await self.recorder.append_with_payloads(
            NewRecord(
                source=self.cfg.name,
                kind="sample",
                priority=Priority.SAMPLE,
                body=body,
                model=self.model,
                payloads=(ref,),
                ts=frame.ts,
            )
        )
        if seq is not None:
            self.stats.samples += 1

    async def _finish(self) -> None:
        if self.tracker is not None:
            for event in self.tracker.end_all(self._last_frame):
                if event.kind == "ended":
                    await self._object_ended(event)
        if self.clips is not None:
            for done in self.clips.flush():
                await self._write_clip(done, self._last_frame)
        try:
            if self._clip_tasks:
                await asyncio.wait(self._clip_tasks)
                self._reap_clips()
        finally:
            if self._clip_thread is not None:
                self._clip_thread.shutdown(wait=False)


def _encode_clip(
    frames: Sequence[TimedImage], path: Path, settings: ClipSettings
) -> tuple[ClipInfo, bytes]:
    """The clip thread's work: the MP4 written, checked and read into memory, its file gone."""
    try:
        info = write_clip(frames, None, path, settings)
        return info, path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def _frame_info(frame: Frame) -> dict[str, Any]:
    return {
        "index": frame.index,
        "position_s": None if frame.position_s is None else round(frame.position_s, 3),
        "width": frame.width,
        "height": frame.height,
    }
