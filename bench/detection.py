"""Benchmark: the camera pipeline. Detection throughput of `appliance replay` against a bare
onnxruntime loop, motion gating on a still scene, and the CPU and memory a camera costs the
running daemon.

  throughput  vtest.avi (pedestrians, 795 frames, 768x576, 10 fps; --quick: its first 150 frames,
              re-encoded mp4v) with the built-in YOLOv3-tiny.
              baseline: one thread, no asyncio: cv2 decode (same FFmpeg backend) + the project's
              letterbox + InferenceSession.run on the same ONNX file with ModelSession's options
              (intra-op threads = DetectorModel().threads, inter-op 1, sequential, no spinning);
              no postprocessing. Run before the pipeline and after each pipeline run
              (--rounds); a pipeline run is compared with the mean of the two either side.
              pipeline: the daemon in replay mode, in this process (Daemon(cfg, mode="replay"),
              what `appliance replay -c CONFIG` runs), one camera at fps 120 (every frame of the
              file), motion gating off, classes unrestricted, everything else default.
              Both rates are (frames - 1) / (time of the last frame's inference - time of the
              first's), so start-up and model loading are outside both windows.
              detector (context): OnnxDetector.detect_blocking on the same frames in one thread:
              what the postprocessing (decode of the heads, NMS) adds to the baseline. Its
              detections must equal the pipeline's frame by frame.
  motion      a clip built from vtest: frame S held still for N s, the real frames S.. for M s,
              then the last of them held still for N s (mp4v, 10 fps). Replayed twice at the
              camera defaults (fps 5), motion gating on (defaults) and off. Detector calls per
              frame on the still segments (target <= 0.2), and every person track of the moving
              segment found without gating must be found with it (same label, overlapping span
              in file time; target: none missed).
  resources   `appliance run` as a subprocess with 0, 1 and 2 cameras looping builtin:vtest at
              realtime pace, fps 5, the default model, everything else default. After a warm-up,
              psutil samples the process's CPU time and RSS for the window; per camera = 1 camera
              - 0 cameras, marginal = 2 cameras - 1 camera. Dropped frames and analysed frames
              come from the daemon's own health records.

The replays run in this process through a CameraPipeline subclass (patched in as
appliance.daemon.CameraPipeline for the run) that writes down each motion-gate decision and the
start and end of each detect() call, and changes nothing else. A sampler thread reads every
thread's CPU time (psutil) so the JSON splits CPU per frame by thread: event loop, model executor,
onnxruntime's pool, camera reader, to_thread workers (JPEG encodes), journal.

Each phase checks itself (frames counted, analysed == frames, no errors) and reports `ok`.

Prints one JSON object on stdout; progress on stderr. `python -m bench.detection [--quick]`."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import hashlib
import io
import itertools
import json
import math
import os
import pstats
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
import psutil
import yaml
from pydantic import ValidationError

from appliance.daemon import Daemon
from appliance.runtime.logs import setup_logging
from appliance.stages.recorder import Recorder
from appliance.stages.vision import CameraPipeline
from bench.common import (
    base_parser,
    emit,
    machine,
    make_data_root,
    peak_rss_mib,
    percentile,
    progress,
    source_fingerprint,
)
from config import Camera, DetectorModel, load_config
from config.cameras import BUILTIN_DETECTOR, MotionSettings
from inference.builtin import builtin_model_path
from inference.detect import open_detector
from inference.detections import Detection, Detector
from inference.motion import MotionDecision, MotionGate
from inference.preprocess import letterbox
from sensors.base import Frame
from sensors.camera import CameraSource, builtin_footage
from sync.reader import JournalReader

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("throughput", "motion", "resources")
TARGET_RATIO = 0.9
TARGET_STILL_CALLS = 0.2
TARGET_MISSED = 0
FILE_FPS = 10.0  # vtest.avi's rate; the clips written here use it too
MIB = 1024 * 1024
Image = npt.NDArray[np.uint8]


def rounded(value: Any, digits: int = 2) -> Any:
    """Floats in a JSON-ready structure rounded (latency stats come with 15 digits)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def code_fingerprint(model: Path | None) -> dict[str, str]:
    """bench.common's journal fingerprint plus the camera pipeline's files and the model's."""
    out = source_fingerprint(
        "appliance/stages/vision.py",
        "appliance/daemon.py",
        "appliance/stages/recorder.py",
        "inference/detect.py",
        "inference/decode.py",
        "inference/preprocess.py",
        "inference/session.py",
        "inference/motion.py",
        "inference/tracking.py",
        "inference/sampling.py",
        "inference/media.py",
        "inference/builtin.py",
        "sensors/camera.py",
        "sensors/camera_reader.py",
        "sensors/capture.py",
    )
    if model is not None:
        out[BUILTIN_DETECTOR] = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    return out


# ---------------------------------------------------------------------------------- footage


def open_video(path: Path) -> cv2.VideoCapture:
    """The capture the camera source uses for files (OpenCV's FFmpeg backend)."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise RuntimeError(f"OpenCV cannot open {path}")
    return capture


def count_frames(path: Path) -> int:
    """Frames a sequential decode of the file yields (what the camera source will deliver)."""
    capture = open_video(path)
    try:
        frames = 0
        while capture.grab():
            frames += 1
    finally:
        capture.release()
    return frames


class ClipWriter:
    """An mp4v file at FILE_FPS, the codec tests/test_vision.py writes its still clips with."""

    def __init__(self, path: Path, size: tuple[int, int]) -> None:
        self.path = path
        self.frames = 0
        self._writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FILE_FPS, size)
        if not self._writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write an mp4v file at {path}")

    def write(self, image: Image) -> None:
        self._writer.write(image)
        self.frames += 1

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.release()


def trimmed_copy(source: Path, target: Path, frames: int) -> Path:
    """The first `frames` frames of `source` re-encoded (the pipeline cannot stop a file early)."""
    capture = open_video(source)
    try:
        writer: ClipWriter | None = None
        try:
            while writer is None or writer.frames < frames:
                ok, image = capture.read()
                if not ok:
                    break
                if writer is None:
                    writer = ClipWriter(target, (image.shape[1], image.shape[0]))
                writer.write(np.asarray(image, dtype=np.uint8))
        finally:
            if writer is not None:
                writer.__exit__()
    finally:
        capture.release()
    return target


@dataclass(frozen=True)
class StillMotionClip:
    """still (frame `start` held) | moving (frames start.. in order) | still (last one held)."""

    path: Path
    still_s: float
    moving_s: float
    start: int

    @property
    def moving_from_s(self) -> float:
        return self.still_s

    @property
    def moving_to_s(self) -> float:
        return self.still_s + self.moving_s

    def segment(self, position_s: float) -> str:
        # Half a file frame of slack: a position is a frame's nominal time, plus float noise.
        slack = 0.5 / FILE_FPS
        if position_s < self.moving_from_s - slack:
            return "still_before"
        if position_s < self.moving_to_s - slack:
            return "moving"
        return "still_after"


def still_motion_clip(
    source: Path, target: Path, *, still_s: float, moving_s: float, start: int
) -> StillMotionClip:
    still_n = round(still_s * FILE_FPS)
    moving_n = round(moving_s * FILE_FPS)
    if moving_n < 1 or still_n < 1:
        raise ValueError("the still and moving segments must each last at least one frame")
    capture = open_video(source)
    try:
        moving: list[Image] = []
        index = 0
        while len(moving) < moving_n:
            ok, image = capture.read()
            if not ok:
                raise ValueError(
                    f"{source} has {index} frames; the moving segment needs frames "
                    f"{start}..{start + moving_n - 1} (lower --moving-seconds or --moving-start)"
                )
            if index >= start:
                moving.append(np.asarray(image, dtype=np.uint8))
            index += 1
    finally:
        capture.release()
    height, width = moving[0].shape[:2]
    with ClipWriter(target, (width, height)) as writer:
        for _ in range(still_n):
            writer.write(moving[0])
        for image in moving:
            writer.write(image)
        for _ in range(still_n):
            writer.write(moving[-1])
    return StillMotionClip(target, still_n / FILE_FPS, moving_n / FILE_FPS, start)


# ---------------------------------------------------------------------------- instrumentation


@dataclass
class FrameLog:
    """What one instrumented camera pipeline did: every gate decision (frame wall time as the
    tracker stamps it, position in the file, detect or not, why) and every detector return."""

    gate: list[tuple[str, float | None, bool, str]] = field(default_factory=list)
    done: list[tuple[float, float]] = field(default_factory=list)  # perf_counter, process CPU
    called: list[float] = field(default_factory=list)  # perf_counter as each call began
    found: list[list[Detection]] = field(default_factory=list)


class RecordingGate(MotionGate):
    """The pipeline's own MotionGate; it only writes each decision down."""

    def __init__(self, cfg: MotionSettings, log: FrameLog) -> None:
        super().__init__(cfg)
        self.log = log

    def check(self, frame: Frame) -> MotionDecision:
        decision = super().check(frame)
        self.log.gate.append(
            (frame.ts.isoformat(), frame.position_s, decision.detect, decision.reason)
        )
        return decision


class TimedDetector:
    """The pipeline's detector, noting when each call returned to the event loop."""

    def __init__(self, inner: Detector, log: FrameLog) -> None:
        self.inner = inner
        self.log = log
        self.name = inner.name
        self.version = inner.version
        self.labels = inner.labels

    @property
    def stats(self) -> Any:  # the pipeline's health() reads it when the detector has one
        return getattr(self.inner, "stats", None)

    async def detect(self, image: Image) -> list[Detection]:
        self.log.called.append(time.perf_counter())
        found = await self.inner.detect(image)
        self.log.done.append((time.perf_counter(), time.process_time()))
        self.log.found.append(found)
        return found


@contextlib.contextmanager
def instrumented(logs: dict[str, FrameLog]) -> Iterator[None]:
    """While inside, the daemon builds its camera pipelines with a recording gate and a timed
    detector (a subclass that changes nothing else), filling `logs` by camera name."""

    class InstrumentedPipeline(CameraPipeline):
        def __init__(
            self,
            cfg: Camera,
            source: CameraSource,
            detector: Detector,
            recorder: Recorder,
            *,
            scratch_dir: Path,
        ) -> None:
            log = logs.setdefault(cfg.name, FrameLog())
            timed = TimedDetector(detector, log)
            super().__init__(cfg, source, timed, recorder, scratch_dir=scratch_dir)
            self.gate = RecordingGate(cfg.motion, log)

    # The name the daemon looks up when a camera starts; patched only for this benchmark's runs.
    with mock.patch("appliance.daemon.CameraPipeline", InstrumentedPipeline):
        yield
    if not logs:
        raise RuntimeError(
            "the replay built no instrumented camera pipeline: appliance.daemon no longer "
            "creates cameras through its CameraPipeline name (see bench.detection.instrumented)"
        )


class ThreadSampler:
    """A thread that reads every thread's CPU time of this process every `interval` seconds
    (psutil, /proc), so CPU can be split by who spent it: Python threads by name, the rest
    (onnxruntime's intra-op pool) as `native`. Threads that end keep their last reading."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._process = psutil.Process()

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        own = threading.get_native_id()
        while True:
            names = {t.native_id: t.name for t in threading.enumerate()}
            now = time.perf_counter()
            reading = {
                t.id: (names.get(t.id, "native"), t.user_time + t.system_time)
                for t in self._process.threads()
                if t.id != own
            }
            self.samples.append((now, reading))
            if self._stop.wait(self.interval):
                return

    def split(self, start: float, end: float, frames: int) -> dict[str, float]:
        """CPU ms per frame by thread group between two perf_counter times."""

        def at(when: float) -> dict[int, tuple[str, float]]:
            seen: dict[int, tuple[str, float]] = {}
            for moment, reading in self.samples:
                if moment > when:
                    break
                seen.update(reading)
            return seen

        first, last = at(start), at(end)
        groups: dict[str, float] = {}
        for tid, (name, cpu) in last.items():
            spent = cpu - first.get(tid, (name, 0.0))[1]
            group = _thread_group(name)
            groups[group] = groups.get(group, 0.0) + spent
        n = max(frames, 1)
        ordered = sorted(groups.items(), key=lambda kv: -kv[1])
        return {k: round(v / n * 1000, 2) for k, v in ordered if v > 0}


def _thread_group(name: str) -> str:
    for prefix, group in (
        ("MainThread", "event_loop_or_main"),
        ("model-", "model_executor"),
        ("camera:", "camera_reader"),
        ("journal-", "journal"),
        ("asyncio_", "to_thread_workers"),
        ("native", "native_onnxruntime_pool"),
    ):
        if name.startswith(prefix):
            return group
    return name


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def replay_config(
    path: Path, data_dir: Path, camera: dict[str, Any], health_interval: str = "1h"
) -> Path:
    return write_yaml(
        path,
        {
            "appliance": {
                "id": "bench-detection",
                "data_dir": str(data_dir),
                "health_interval": health_interval,
            },
            "cameras": [camera],
        },
    )


@dataclass
class Replay:
    code: int
    wall_s: float
    logs: dict[str, FrameLog]
    health: dict[str, dict[str, Any]]
    restarts: dict[str, int]
    profile: str | None = None


async def _replay(config: Path, profiler: cProfile.Profile | None) -> Replay:
    # environ={}: the file alone decides (no APPLIANCE_* overrides from this shell).
    cfg = load_config(config, environ={})
    logs: dict[str, FrameLog] = {}
    with instrumented(logs):
        daemon = Daemon(cfg, mode="replay")
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            code = await daemon.run()
        finally:
            if profiler is not None:
                profiler.disable()
        wall = time.perf_counter() - start
    health = {name: pipeline.health() for name, pipeline in daemon.cameras.items()}
    restarts: dict[str, int] = {}
    if daemon.monitor is not None:
        restarts = {n: c.restarts for n, c in daemon.monitor.components.items()}
    return Replay(code, wall, logs, health, restarts)


def replay(config: Path, *, profile_to: Path | None = None) -> Replay:
    """`appliance replay -c CONFIG`, in this process, instrumented. With `profile_to`, the event
    loop's thread runs under cProfile (the model's executor and the reader thread do not)."""
    profiler = cProfile.Profile() if profile_to is not None else None
    result = asyncio.run(_replay(config, profiler))
    if profiler is not None and profile_to is not None:
        profiler.dump_stats(profile_to)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result.profile = text.getvalue()
    return result


# --------------------------------------------------------------------------------- throughput


def bare_session(model: Path, threads: int) -> Any:
    """An InferenceSession with the options inference.session.ModelSession sets."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )


@dataclass
class Loop:
    """One single-threaded pass over a file: per-stage seconds and when each frame was done."""

    name: str
    frames: int = 0
    decode_s: float = 0.0
    work_s: float = 0.0  # detector only: detect_blocking
    preprocess_s: float = 0.0  # baseline only
    inference_s: float = 0.0  # baseline only
    done: list[tuple[float, float]] = field(default_factory=list)
    found: list[list[Detection]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"frames": self.frames, **window(self.done)}
        n = max(self.frames, 1)
        out["decode_ms"] = round(self.decode_s / n * 1000, 2)
        if self.name == "baseline":
            out["preprocess_ms"] = round(self.preprocess_s / n * 1000, 2)
            out["inference_ms"] = round(self.inference_s / n * 1000, 2)
        else:
            out["detect_ms"] = round(self.work_s / n * 1000, 2)
        return out


def window(done: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Rate and CPU between the first and the last frame done (the first is the start line)."""
    if len(done) < 2:
        return {
            "frames_per_s": None,
            "seconds": None,
            "interval_ms_p50": None,
            "interval_ms_p90": None,
            "cpu_ms_per_frame": None,
        }
    seconds = done[-1][0] - done[0][0]
    cpu = done[-1][1] - done[0][1]
    n = len(done) - 1
    gaps = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(done)]
    return {
        "frames_per_s": round(n / seconds, 3),
        "seconds": round(seconds, 3),
        # Time from one frame done to the next: the median shrugs off bursts of load from
        # other processes that the mean rate takes in full.
        "interval_ms_p50": round(percentile(gaps, 50), 2),
        "interval_ms_p90": round(percentile(gaps, 90), 2),
        # Process CPU, all threads: above 1000 / frames_per_s means more than one core busy.
        "cpu_ms_per_frame": round(cpu / n * 1000, 1),
    }


def by_thread(sampler: ThreadSampler, done: Sequence[tuple[float, float]]) -> dict[str, float]:
    if len(done) < 2:
        return {}
    return sampler.split(done[0][0], done[-1][0], len(done) - 1)


def detector_duty(log: FrameLog) -> dict[str, Any]:
    """How a frame's time splits in the pipeline: inside `detect()` (executor hand-off,
    preprocessing, inference, postprocessing) and between one call's return and the next call
    (tracking, snapshots, records, waiting for the next frame): the detector is idle then."""
    inside = [(d[0] - c) * 1000 for c, d in zip(log.called, log.done, strict=False)]
    between = [(c - d[0]) * 1000 for d, c in zip(log.done, log.called[1:], strict=False)]
    return {
        "in_detect_ms_mean": round(sum(inside) / len(inside), 2) if inside else None,
        "in_detect_ms_p50": round(percentile(inside, 50), 2) if inside else None,
        "between_detects_ms_mean": round(sum(between) / len(between), 2) if between else None,
        "between_detects_ms_p50": round(percentile(between, 50), 2) if between else None,
        "between_detects_ms_p99": round(percentile(between, 99), 2) if between else None,
    }


def baseline_loop(path: Path, session: Any) -> Loop:
    info = session.get_inputs()[0]
    height, width = int(info.shape[2]), int(info.shape[3])
    zeros = np.zeros((1, 3, height, width), dtype=np.float32)
    session.run(None, {info.name: zeros})  # warm-up, as ModelSession does
    loop = Loop("baseline")
    capture = open_video(path)
    try:
        while True:
            t0 = time.perf_counter()
            ok, image = capture.read()
            if not ok:
                break
            t1 = time.perf_counter()
            tensor, _, _, _ = letterbox(np.asarray(image, dtype=np.uint8), width, height)
            t2 = time.perf_counter()
            session.run(None, {info.name: tensor})
            t3 = time.perf_counter()
            loop.frames += 1
            loop.decode_s += t1 - t0
            loop.preprocess_s += t2 - t1
            loop.inference_s += t3 - t2
            loop.done.append((t3, time.process_time()))
    finally:
        capture.release()
    return loop


def detector_loop(path: Path) -> Loop:
    detector = open_detector(DetectorModel(), "detector")
    loop = Loop("detector")
    capture = open_video(path)
    try:
        while True:
            t0 = time.perf_counter()
            ok, image = capture.read()
            if not ok:
                break
            t1 = time.perf_counter()
            found = detector.detect_blocking(np.asarray(image, dtype=np.uint8))
            t2 = time.perf_counter()
            loop.frames += 1
            loop.decode_s += t1 - t0
            loop.work_s += t2 - t1
            loop.done.append((t2, time.process_time()))
            loop.found.append(found)
    finally:
        capture.release()
        detector.close()
    return loop


def same_detections(a: Sequence[Detection], b: Sequence[Detection]) -> bool:
    """Equal up to float noise (onnxruntime need not be bit-identical between sessions)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.label != y.label or abs(x.score - y.score) > 1e-3:
            return False
        if max(abs(p - q) for p, q in zip(_box(x), _box(y), strict=True)) > 0.5:
            return False
    return True


def _box(d: Detection) -> tuple[float, float, float, float]:
    return d.x1, d.y1, d.x2, d.y2


def measured_baseline(clip: Path, session: Any) -> dict[str, Any]:
    progress("baseline: cv2 decode + letterbox + session.run, one thread")
    with ThreadSampler() as sampler:
        loop = baseline_loop(clip, session)
    out = {**loop.to_dict(), "cpu_ms_per_frame_by_thread": by_thread(sampler, loop.done)}
    progress(f"  {out['frames_per_s']} frames/s")
    return out


def measured_pipeline(
    root: Path, clip: Path, number: int, profile_to: Path | None
) -> tuple[dict[str, Any], Replay]:
    progress("pipeline: appliance replay in-process, motion off, fps 120")
    config = replay_config(
        root / f"throughput-{number}.yaml",
        root / f"throughput-{number}",
        {"name": "cam", "url": str(clip), "fps": 120, "motion": {"enabled": False}},
    )
    with ThreadSampler() as sampler:
        run = replay(config, profile_to=profile_to)
    log = run.logs.get("cam", FrameLog())
    health = run.health.get("cam", {})
    stats = health.get("pipeline", {})
    out = {
        **window(log.done),
        "cpu_ms_per_frame_by_thread": by_thread(sampler, log.done),
        **detector_duty(log),
        "frames": stats.get("frames"),
        "analysed": stats.get("analysed"),
        "detections": stats.get("detections"),
        "objects": stats.get("objects"),
        "samples": stats.get("samples"),
        "replay_wall_s": round(run.wall_s, 2),
        "detect_latency_ms": rounded(health.get("latency_ms")),
    }
    progress(f"  {out['frames_per_s']} frames/s (whole replay {run.wall_s:.1f} s)")
    if run.profile:
        progress("cProfile of the event-loop thread (tottime):\n" + run.profile)
    return out, run


def pipeline_checks(run: Replay, expected: int, alone: Loop) -> dict[str, bool]:
    log = run.logs.get("cam", FrameLog())
    health = run.health.get("cam", {})
    stats = health.get("pipeline", {})
    differing = sum(
        1 for a, b in zip(log.found, alone.found, strict=False) if not same_detections(a, b)
    )
    return {
        "replay_exit_0": run.code == 0,
        "every_frame_analysed": stats.get("frames") == expected
        and stats.get("analysed") == expected,
        "no_inference_errors": stats.get("inference_errors") == 0,
        "none_skipped_dropped_or_corrupt": health.get("frames_skipped") == 0
        and health.get("frames_dropped") == 0
        and health.get("corrupt_frames") == 0,
        "gate_passed_every_frame": len(log.gate) == expected and all(g[2] for g in log.gate),
        "no_restarts": not any(run.restarts.values()),
        "detections_equal_detector_alone": len(log.found) == len(alone.found) == expected
        and differing == 0,
    }


def throughput_phase(
    root: Path, model: Path, *, frames: int | None, rounds: int, profile_to: Path | None
) -> dict[str, Any]:
    source = builtin_footage("vtest")
    total = count_frames(source)
    if frames is None or frames >= total:
        clip = source
    else:
        progress(f"throughput: writing the first {frames} frames of {source.name} (mp4v)")
        clip = trimmed_copy(source, root / f"vtest-{frames}.mp4", frames)
    expected = count_frames(clip)
    threads = DetectorModel().threads
    progress(
        f"throughput: {expected} frames of {clip.name}, {threads} intra-op threads, "
        f"{rounds} round(s)"
    )

    # baseline, then per round: pipeline, baseline. Each pipeline run is compared with the
    # mean of the baselines either side of it, so drift in the box's load shows up.
    session = bare_session(model, threads)
    baselines = [measured_baseline(clip, session)]
    pipelines: list[dict[str, Any]] = []
    runs: list[Replay] = []
    for number in range(rounds):
        piped, run = measured_pipeline(root, clip, number, profile_to if number == 0 else None)
        pipelines.append(piped)
        runs.append(run)
        baselines.append(measured_baseline(clip, session))
    del session

    progress("detector: OnnxDetector.detect_blocking, one thread (context)")
    with ThreadSampler() as sampler:
        alone = detector_loop(clip)
    alone_threads = by_thread(sampler, alone.done)
    progress(f"  {window(alone.done)['frames_per_s']} frames/s")

    per_round: list[dict[str, Any]] = []
    for number, piped in enumerate(pipelines):
        either_side = baselines[number : number + 2]
        reference = sum(b["frames_per_s"] for b in either_side) / 2
        median_gap = sum(b["interval_ms_p50"] for b in either_side) / 2
        per_round.append(
            {
                "baseline_frames_per_s": round(reference, 3),
                "pipeline_frames_per_s": piped["frames_per_s"],
                "ratio": round(piped["frames_per_s"] / reference, 3),
                # Context, not the target: the same comparison on median frame intervals,
                # which a burst of load from another process moves less than the mean rate.
                "ratio_of_median_intervals": round(median_gap / piped["interval_ms_p50"], 3),
            }
        )
    # The round with the median ratio speaks for the run (the only one when rounds is 1).
    middle = sorted(range(rounds), key=lambda i: per_round[i]["ratio"])[rounds // 2]
    all_checks = [pipeline_checks(run, expected, alone) for run in runs]
    checks = {key: all(c[key] for c in all_checks) for key in all_checks[0]}
    checks["baselines_saw_every_frame"] = all(b["frames"] == expected for b in baselines)
    return {
        "clip": {"file": clip.name, "frames": expected, "source_frames": total},
        "threads": threads,
        **per_round[middle],
        "rounds": per_round,
        "baselines": baselines,
        "pipeline": pipelines[middle],
        "detector_alone": {
            **alone.to_dict(),
            "cpu_ms_per_frame_by_thread": alone_threads,
            "frames_with_different_detections": sum(
                1
                for a, b in zip(
                    runs[middle].logs.get("cam", FrameLog()).found, alone.found, strict=False
                )
                if not same_detections(a, b)
            ),
        },
        "checks": checks,
        "ok": all(checks.values()),
    }


# ------------------------------------------------------------------------------------ motion


def spans(data_dir: Path, position_of: dict[str, float | None]) -> tuple[list[dict[str, Any]], int]:
    """Object tracks from the journal as {label, first, last (file seconds), path, height};
    and how many could not be placed in the file."""
    out: list[dict[str, Any]] = []
    unplaced = 0
    with JournalReader.open(data_dir) as reader:
        for record in reader.iter_records(kind="object"):
            body = record.to_dict()["body"]
            first = position_of.get(body["first_ts"])
            last = position_of.get(body["last_ts"])
            if first is None or last is None:
                unplaced += 1
                continue
            box = body["best"]["box"]
            out.append(
                {
                    "track_id": body["track_id"],
                    "label": body["label"],
                    "first": first,
                    "last": last,
                    "path": [tuple(p) for p in body.get("path", [])],
                    "height": float(box[3] - box[1]),
                }
            )
    return out, unplaced


def _near(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Some point of one path within half the first's box height of some point of the other."""
    limit = max(a["height"] / 2, 8.0)
    return any(math.hypot(p[0] - q[0], p[1] - q[1]) <= limit for p in a["path"] for q in b["path"])


def gate_summary(log: FrameLog, clip: StillMotionClip) -> dict[str, Any]:
    by_segment: dict[str, dict[str, Any]] = {}
    for _, position, detect, reason in log.gate:
        segment = clip.segment(position or 0.0)
        entry = by_segment.setdefault(
            segment, {"frames": 0, "detector_calls": 0, "reasons": Counter()}
        )
        entry["frames"] += 1
        entry["detector_calls"] += int(detect)
        entry["reasons"][reason] += 1
    out: dict[str, Any] = {}
    for name in ("still_before", "moving", "still_after"):
        entry = by_segment.get(name, {"frames": 0, "detector_calls": 0, "reasons": Counter()})
        frames, calls = entry["frames"], entry["detector_calls"]
        out[name] = {
            "frames": frames,
            "detector_calls": calls,
            "calls_per_frame": round(calls / frames, 4) if frames else None,
            "reasons": dict(sorted(entry["reasons"].items())),
        }
    still_frames = out["still_before"]["frames"] + out["still_after"]["frames"]
    still_calls = out["still_before"]["detector_calls"] + out["still_after"]["detector_calls"]
    frames = len(log.gate)
    calls = sum(1 for g in log.gate if g[2])
    out["still"] = {
        "frames": still_frames,
        "detector_calls": still_calls,
        "calls_per_frame": round(still_calls / still_frames, 4) if still_frames else None,
    }
    out["overall"] = {
        "frames": frames,
        "detector_calls": calls,
        "calls_per_frame": round(calls / frames, 4) if frames else None,
    }
    return out


def motion_phase(
    root: Path, *, still_s: float, moving_s: float, start: int, fps: float
) -> dict[str, Any]:
    clip = still_motion_clip(
        builtin_footage("vtest"),
        root / "still-motion.mp4",
        still_s=still_s,
        moving_s=moving_s,
        start=start,
    )
    file_frames = count_frames(clip.path)
    progress(
        f"motion: clip of {file_frames} frames: {clip.still_s:g} s still, {clip.moving_s:g} s of "
        f"vtest from frame {start}, {clip.still_s:g} s still; camera fps {fps:g}"
    )
    runs: dict[str, Replay] = {}
    tracks: dict[str, list[dict[str, Any]]] = {}
    unplaced: dict[str, int] = {}
    for name, enabled in (("gated", True), ("ungated", False)):
        progress(f"{name}: replay with motion gating {'on' if enabled else 'off'}")
        camera: dict[str, Any] = {"name": "cam", "url": str(clip.path), "fps": fps}
        if not enabled:
            camera["motion"] = {"enabled": False}
        data_dir = root / f"motion-{name}"
        run = replay(replay_config(root / f"motion-{name}.yaml", data_dir, camera))
        runs[name] = run
        log = run.logs.get("cam", FrameLog())
        position_of = {ts: pos for ts, pos, _, _ in log.gate}
        tracks[name], unplaced[name] = spans(data_dir, position_of)
        calls = sum(1 for g in log.gate if g[2])
        progress(f"  {calls} detector calls for {len(log.gate)} frames")

    def person_tracks_of_moving(name: str) -> list[dict[str, Any]]:
        return [
            t
            for t in tracks[name]
            if t["label"] == "person"
            and t["last"] >= clip.moving_from_s
            and t["first"] <= clip.moving_to_s
        ]

    def found(track: dict[str, Any], among: list[dict[str, Any]], *, spatial: bool) -> bool:
        return any(
            g["label"] == track["label"]
            and g["first"] <= track["last"]
            and track["first"] <= g["last"]
            and (not spatial or _near(track, g))
            for g in among
        )

    reference = person_tracks_of_moving("ungated")
    gated_people = [t for t in tracks["gated"] if t["label"] == "person"]
    missed = [t for t in reference if not found(t, gated_people, spatial=False)]
    missed_near = [t for t in reference if not found(t, gated_people, spatial=True)]
    # Context: the still segments too, where gating runs the detector only at keepalives.
    ungated_people = [t for t in tracks["ungated"] if t["label"] == "person"]
    missed_anywhere = [t for t in ungated_people if not found(t, gated_people, spatial=False)]
    summaries = {
        name: gate_summary(run.logs.get("cam", FrameLog()), clip) for name, run in runs.items()
    }
    gated_stats = runs["gated"].health.get("cam", {}).get("pipeline", {})
    ungated_stats = runs["ungated"].health.get("cam", {}).get("pipeline", {})
    delivered = {name: len(run.logs.get("cam", FrameLog()).gate) for name, run in runs.items()}
    checks = {
        "replays_exit_0": all(run.code == 0 for run in runs.values()),
        "same_frames_both_runs": delivered["gated"] == delivered["ungated"] > 0
        and gated_stats.get("frames") == delivered["gated"],
        "ungated_analysed_every_frame": ungated_stats.get("analysed")
        == ungated_stats.get("frames")
        == delivered["ungated"],
        "gate_log_matches_stats": summaries["gated"]["overall"]["detector_calls"]
        == gated_stats.get("analysed", -1) + gated_stats.get("inference_errors", 0),
        "every_track_placed_in_the_file": not any(unplaced.values()),
        "no_restarts": not any(v for run in runs.values() for v in run.restarts.values()),
        "moving_segment_has_people": len(reference) > 0,
    }
    still = summaries["gated"]["still"]["calls_per_frame"]
    return {
        "clip": {
            "frames": file_frames,
            "file_fps": FILE_FPS,
            "still_seconds": clip.still_s,
            "moving_seconds": clip.moving_s,
            "moving_from_frame": start,
            "camera_fps": fps,
        },
        "still_calls_per_frame": still,
        "overall_calls_per_frame": summaries["gated"]["overall"]["calls_per_frame"],
        "gated": summaries["gated"],
        "ungated": summaries["ungated"],
        "tracks": {
            "ungated_person_tracks_in_moving_segment": len(reference),
            "gated_person_tracks": len(gated_people),
            "missed": len(missed),
            "missed_with_spatial_check": len(missed_near),
            "missed_tracks": [{k: t[k] for k in ("track_id", "first", "last")} for t in missed],
            "missed_with_spatial_check_tracks": [
                {k: t[k] for k in ("track_id", "first", "last")} for t in missed_near
            ],
            "ungated_person_tracks_whole_clip": len(ungated_people),
            "missed_whole_clip": len(missed_anywhere),
            "objects_by_label": {
                name: dict(sorted(Counter(t["label"] for t in tracks[name]).items()))
                for name in tracks
            },
        },
        "replay_wall_s": {name: round(run.wall_s, 2) for name, run in runs.items()},
        "checks": checks,
        "ok": all(checks.values()),
    }


# --------------------------------------------------------------------------------- resources


def log_messages(path: Path) -> list[dict[str, Any]]:
    """The daemon's JSON log lines so far (a half-written last line is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE")}
    if "APPLIANCE_MODEL_CACHE" in os.environ:  # the model this process checked
        env["APPLIANCE_MODEL_CACHE"] = os.environ["APPLIANCE_MODEL_CACHE"]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path, cameras: int, timeout: float) -> None:
    """Until the daemon logged `started` and, with cameras, `model loaded`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the daemon exited with {proc.returncode} at start:\n{tail}")
        messages = {m.get("msg") for m in log_messages(log_path)}
        if "started" in messages and (cameras == 0 or "model loaded" in messages):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the daemon was not ready within {timeout:g} s; see {log_path}")


def health_window(
    data_dir: Path, start: float, end: float, cameras: Sequence[str]
) -> dict[str, Any]:
    """Per camera: totals of the last health record, and deltas between the first health
    record at or after `start` and the last at or before `end` (wall clock, epoch seconds)."""
    records: list[tuple[float, dict[str, Any]]] = []
    with JournalReader.open(data_dir) as reader:
        for record in reader.iter_records(kind="health"):
            item = record.to_dict()
            when = datetime.fromisoformat(item["ts"]).timestamp()
            records.append((when, item["body"]))
    out: dict[str, Any] = {}
    inside = [r for r in records if start <= r[0] <= end]
    for name in cameras:
        final = records[-1][1]["cameras"].get(name, {}) if records else {}
        entry: dict[str, Any] = {
            "state": final.get("state"),
            "frames_read": final.get("frames_read"),
            "frames_skipped": final.get("frames_skipped"),
            "frames_dropped": final.get("frames_dropped"),
            "frames": final.get("pipeline", {}).get("frames"),
            "analysed": final.get("pipeline", {}).get("analysed"),
            "inference_errors": final.get("pipeline", {}).get("inference_errors"),
            "detect_latency_ms": rounded(final.get("latency_ms")),
        }
        if len(inside) >= 2:
            first, last = inside[0], inside[-1]
            a, b = first[1]["cameras"].get(name, {}), last[1]["cameras"].get(name, {})
            seconds = last[0] - first[0]
            entry["state_in_window"] = b.get("state")

            def delta(key: str, sub: str | None = None, a: Any = a, b: Any = b) -> int:
                if sub is not None:
                    return int(b.get(sub, {}).get(key, 0)) - int(a.get(sub, {}).get(key, 0))
                return int(b.get(key, 0)) - int(a.get(key, 0))

            frames = delta("frames", "pipeline")
            entry["window"] = {
                "seconds": round(seconds, 1),
                "frames_per_s": round(frames / seconds, 2) if seconds > 0 else None,
                "analysed_per_s": round(delta("analysed", "pipeline") / seconds, 2)
                if seconds > 0
                else None,
                "frames_dropped": delta("frames_dropped"),
            }
        out[name] = entry
    return out


def measure_daemon(
    root: Path, cameras: int, *, duration: float, warmup: float, interval: float
) -> dict[str, Any]:
    data_dir = root / f"run-{cameras}"
    names = [f"cam{i + 1}" for i in range(cameras)]
    config = write_yaml(
        root / f"run-{cameras}.yaml",
        {
            "appliance": {
                "id": "bench-detection",
                "data_dir": str(data_dir),
                "health_interval": "5s",
            },
            "cameras": [{"name": n, "url": "builtin:vtest", "loop": True, "fps": 5} for n in names],
        },
    )
    log_path = root / f"run-{cameras}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "-c", str(config)],
            stdout=log,
            stderr=log,
            env=daemon_env(),
            cwd=ROOT,
        )
    try:
        started = time.monotonic()
        wait_ready(proc, log_path, cameras, timeout=180)
        ready_s = time.monotonic() - started
        time.sleep(warmup)
        process = psutil.Process(proc.pid)
        rss: list[float] = []
        threads: list[int] = []
        t0_wall, t0 = time.time(), time.perf_counter()
        cpu0 = process.cpu_times()
        deadline = t0 + duration
        while True:
            info = process.memory_info()
            rss.append(info.rss / MIB)
            threads.append(process.num_threads())
            now = time.perf_counter()
            if now >= deadline:
                break
            time.sleep(min(interval, deadline - now))
        cpu1 = process.cpu_times()
        t1_wall, t1 = time.time(), time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    health = health_window(data_dir, t0_wall, t1_wall, names)
    result = {
        "cameras": cameras,
        "ready_s": round(ready_s, 2),
        "window_s": round(t1 - t0, 2),
        "cpu_percent": round(cpu_s / (t1 - t0) * 100, 1),
        "rss_mib_mean": round(sum(rss) / len(rss), 1),
        "rss_mib_max": round(max(rss), 1),
        "rss_mib_p50": round(percentile(rss, 50), 1),
        "threads_max": max(threads),
        "exit_code": code,
        "health": health,
    }
    with contextlib.suppress(OSError):
        shutil.rmtree(data_dir)
    return result


def resources_phase(
    root: Path, *, duration: float, warmup: float, interval: float
) -> dict[str, Any]:
    runs: dict[int, dict[str, Any]] = {}
    for cameras in (0, 1, 2):
        progress(f"resources: appliance run, {cameras} camera(s), {warmup:g} s + {duration:g} s")
        runs[cameras] = measure_daemon(
            root, cameras, duration=duration, warmup=warmup, interval=interval
        )
        r = runs[cameras]
        dropped = {n: h.get("frames_dropped") for n, h in r["health"].items()}
        progress(f"  CPU {r['cpu_percent']}%, RSS {r['rss_mib_mean']} MiB, dropped {dropped}")

    def diff(key: str, a: int, b: int) -> float:
        return round(float(runs[b][key]) - float(runs[a][key]), 1)

    cams = [h for r in runs.values() for h in r["health"].values()]
    dropped_total = sum(int(h.get("frames_dropped") or 0) for h in cams)
    checks = {
        "exit_0_on_sigterm": all(r["exit_code"] == 0 for r in runs.values()),
        "every_camera_analysed_frames": all((h.get("analysed") or 0) > 0 for h in cams),
        "no_inference_errors": all(h.get("inference_errors") == 0 for h in cams),
        "health_windows_found": all("window" in h for h in cams),
        "cameras_running_in_window": all(h.get("state_in_window") == "running" for h in cams),
    }
    return {
        "camera_fps": 5,
        "by_cameras": {str(k): v for k, v in runs.items()},
        "cpu_percent_first_camera": diff("cpu_percent", 0, 1),
        "cpu_percent_second_camera": diff("cpu_percent", 1, 2),
        "rss_mib_first_camera": diff("rss_mib_mean", 0, 1),
        "rss_mib_second_camera": diff("rss_mib_mean", 1, 2),
        "frames_dropped_total": dropped_total,
        # Frames each camera's detector took per second in the window: 5 when it keeps up.
        "analysed_per_s": {
            str(k): {n: h.get("window", {}).get("analysed_per_s") for n, h in r["health"].items()}
            for k, r in runs.items()
            if k
        },
        "checks": checks,
        "ok": all(checks.values()),
    }


# -------------------------------------------------------------------------------------- main


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    parser.add_argument(
        "--frames", type=int, help="throughput: first N frames of vtest (default all; quick 150)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="throughput: pipeline runs, each between two baseline runs; the median ratio "
        "counts (more rounds for a busy machine)",
    )
    parser.add_argument(
        "--still-seconds", type=float, help="motion: each still segment (default 30; quick 10)"
    )
    parser.add_argument(
        "--moving-seconds", type=float, help="motion: the moving segment (default 30; quick 10)"
    )
    parser.add_argument(
        "--moving-start", type=int, default=0, help="motion: first vtest frame of the motion"
    )
    parser.add_argument(
        "--motion-fps",
        type=float,
        default=Camera.model_fields["fps"].default,
        help="motion: the camera's fps cap (default: the Camera default, 5)",
    )
    parser.add_argument(
        "--duration", type=float, help="resources: measured seconds per run (default 60; quick 15)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="resources: seconds after the model loaded (default 10; quick 5)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="throughput: cProfile the replay's event-loop thread into this pstats file",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.frames is not None and args.frames < 2:
        parser.error(f"--frames must be at least 2 (a rate needs two frames), got {args.frames}")
    for option in ("still_seconds", "moving_seconds", "duration", "motion_fps"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {value}")
    try:  # the camera config's own bounds on fps
        Camera(name="check", url="check", fps=args.motion_fps)
    except ValidationError as exc:
        parser.error(f"--motion-fps {args.motion_fps}: {exc.errors()[0]['msg']}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must not be negative, got {args.warmup}")
    if args.moving_start < 0:
        parser.error(f"--moving-start must not be negative, got {args.moving_start}")
    phases = args.only or list(PHASES)
    frames = args.frames if args.frames is not None else (150 if args.quick else None)
    still_s = args.still_seconds or (10.0 if args.quick else 30.0)
    moving_s = args.moving_seconds or (10.0 if args.quick else 30.0)
    duration = args.duration or (15.0 if args.quick else 60.0)
    warmup = args.warmup if args.warmup is not None else (5.0 if args.quick else 10.0)
    # The daemon logs to stderr beside our progress lines; only its warnings are worth showing.
    setup_logging("warning")
    model = builtin_model_path(BUILTIN_DETECTOR)  # converts once, before any clock starts
    root = make_data_root(args.tmp_dir, "bench-detection-")
    results: dict[str, Any] = {}
    try:
        box = machine(root)
        progress(f"data dir {root}, load {box['load_average_at_start']}")
        if "throughput" in phases:
            results["throughput"] = throughput_phase(
                root, model, frames=frames, rounds=args.rounds, profile_to=args.profile
            )
        if "motion" in phases:
            results["motion"] = motion_phase(
                root,
                still_s=still_s,
                moving_s=moving_s,
                start=args.moving_start,
                fps=args.motion_fps,
            )
        if "resources" in phases:
            results["resources"] = resources_phase(
                root, duration=duration, warmup=warmup, interval=1.0
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    passed: dict[str, bool] = {}
    if "throughput" in results:
        ratio = results["throughput"]["ratio"]
        passed["throughput_ratio"] = ratio is not None and ratio >= TARGET_RATIO
    if "motion" in results:
        still = results["motion"]["still_calls_per_frame"]
        passed["still_calls_per_frame"] = still is not None and still <= TARGET_STILL_CALLS
        passed["no_missed_tracks"] = results["motion"]["tracks"]["missed"] <= TARGET_MISSED
    if "resources" in results:
        passed["no_dropped_frames_at_5fps"] = results["resources"]["frames_dropped_total"] == 0
    emit(
        {
            "benchmark": "detection",
            "quick": args.quick,
            "machine": box,
            "source": code_fingerprint(model),
            "settings": {
                "model": BUILTIN_DETECTOR,
                "threads": DetectorModel().threads,
                "frames": frames,
                "rounds": args.rounds,
                "still_seconds": still_s,
                "moving_seconds": moving_s,
                "motion_fps": args.motion_fps,
                "resources_seconds": duration,
                "resources_warmup_seconds": warmup,
                "onnxruntime": ort.__version__,
                "opencv": cv2.__version__,
            },
            **results,
            "load_average_at_end": load_average(),
            "peak_rss_mib": peak_rss_mib(),
            "targets": {
                "throughput_ratio_min": TARGET_RATIO,
                "still_calls_per_frame_max": TARGET_STILL_CALLS,
                "missed_tracks_max": TARGET_MISSED,
                "dropped_frames_max": 0,
            },
            "pass": {**passed, "all": all(passed.values())},
            "ok": all(r["ok"] for r in results.values()),
        }
    )


if __name__ == "__main__":
    main()
