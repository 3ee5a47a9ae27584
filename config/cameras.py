"""Detector models, signed model packages and their canary, and cameras with their settings."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from config.analysis import DriftSettings
from config.base import ByteSize, Duration, KeyPath, Name, Problem, Strict, raise_problems
from config.checks import labels_problem, repeated
from config.names import VERSION_PATTERN
from config.words import did_you_mean, listing

BUILTIN_DETECTOR = "builtin:yolov3-tiny"
# The built-in detector's classes: darknet's coco.names spelling (inference/detect.py uses this
# list as COCO_LABELS for any 80-class model that ships no labels).
BUILTIN_LABELS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


class DetectorModel(Strict):
    path: str = Field(
        default=BUILTIN_DETECTOR,
        min_length=1,
        description="`builtin:yolov3-tiny` (the default detector, converted from darknet at "
        "setup), `package:NAME` (the active version of a signed model package installed with "
        "`appliance models import` / `activate`, verified again at every load; its manifest gives "
        "the labels, thresholds and version that are not set here) or the path of an ONNX file "
        "(YOLO darknet-style heads, YOLOv5, YOLOv8/v11 or SSD-style outputs).",
    )
    version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="Version stamped on records as name@version; null: from the model's "
        "metadata, else the first 12 hex digits of its sha256.",
    )
    labels_file: Path | None = Field(
        default=None,
        description="Class names, one a line; null: from the model's metadata (or COCO for "
        "80-class models without any).",
    )
    layout: Literal["auto", "darknet", "yolov5", "yolov8", "ssd"] = Field(
        default="auto", description="Output layout; `auto` recognises it from the outputs."
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="onnxruntime execution providers, in order of preference.",
    )
    threads: int = Field(
        default=2, ge=1, le=64, description="Threads of one inference (intra-op parallelism)."
    )
    score_threshold: float = Field(
        default=0.35, gt=0, lt=1, description="Detections scoring below it are dropped."
    )
    nms_iou: float = Field(
        default=0.45, gt=0, le=1, description="Overlap (IoU) above which NMS keeps one box."
    )

    def known_labels(self) -> tuple[str, ...] | None:
        """The classes this detector reports, when the config alone tells (the built-in one);
        None where they come from a file, an ONNX model's metadata or a package's manifest."""
        if self.path == BUILTIN_DETECTOR and self.labels_file is None:
            return BUILTIN_LABELS
        return None


def _looks_like_public_key(text: str) -> str:
    """The key text's shape only (PEM, or base64 of 32 bytes); the key itself is parsed where
    packages are verified."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN PUBLIC KEY-----"):
        return text
    try:
        raw = base64.b64decode(stripped, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            "a trusted key is a PEM public key (-----BEGIN PUBLIC KEY-----) or the base64 of an "
            "Ed25519 public key's 32 bytes, as `appliance models keygen` prints it"
        )
    return text


class CanarySettings(Strict):
    enabled: bool = Field(
        default=True,
        description="Try each staged version of a `package:NAME` detector that cameras use in "
        "shadow beside the active one, activate it by itself when it passes and watch it after; "
        "false: staged versions wait for `appliance models activate`.",
    )
    sample_every: int = Field(
        default=5,
        ge=1,
        le=10_000,
        description="The shadow model runs on every Nth frame the active model analyses.",
    )
    queue: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Sampled frames waiting for the shadow model; when full, further samples "
        "are dropped and counted (the camera's own frames never wait for the shadow).",
    )
    duration: Duration = Field(
        default=1800.0, gt=0, description="Shortest shadow run before it is judged."
    )
    min_frames: int = Field(
        default=100,
        ge=1,
        description="Sampled frames a shadow run needs before it is judged; also the runs a "
        "newly activated model makes before its watch judges its latency and error rate.",
    )
    max_duration: Duration = Field(
        default=14400.0,
        gt=0,
        description="A shadow run that has not seen `min_frames` by then is refused for too "
        "few frames.",
    )
    min_agreement: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Least agreement with the active model (per frame: detections matched by "
        "class at IoU >= 0.5, F1, averaged) when the manifest sets none.",
    )
    max_latency_ratio: float = Field(
        default=2.0,
        gt=0,
        description="Most shadow p95 latency over the active model's when the manifest sets none.",
    )
    max_error_rate: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Most share of failed shadow runs when the manifest sets none; also the "
        "watch's limit for the activated model.",
    )
    watch: Duration = Field(
        default=3600.0,
        ge=0,
        description="How long a model activated by its canary is watched: a load error, p95 "
        "latency over budget or an error rate over the limit rolls it back by itself. 0: no "
        "watch.",
    )
    latency_budget_ratio: float | None = Field(
        default=None,
        gt=0,
        description="Watch: p95 latency above the previous model's p95 times this rolls the new "
        "model back; null: the canary's max_latency_ratio (manifest, else this section's).",
    )

    @model_validator(mode="after")
    def _max_after_min(self) -> CanarySettings:
        if self.max_duration < self.duration:
            raise_problems([(("max_duration",), "max_duration must be at least duration")])
        return self


class ModelPackagesSection(Strict):
    trusted_keys: dict[Name, Annotated[str, AfterValidator(_looks_like_public_key)]] = Field(
        default_factory=dict,
        description="Ed25519 public keys whose signatures model packages may carry, by a label "
        "(or the key id `appliance models keygen` prints): PEM or base64 of the 32-byte key, "
        "or `${file:PATH}`. A package signed by any other key is refused; removing a key here "
        "also stops installed packages it signed from loading. Empty: no package is accepted.",
    )
    group: Name | None = Field(
        default=None,
        description="This appliance's group: a package addressed to `group:NAME` is accepted "
        "only where NAME matches (packages addressed to nobody in particular go anywhere).",
    )
    keep: int = Field(
        default=3,
        ge=2,
        le=100,
        description="Versions kept per package name under DATA_DIR/models/packages; older ones "
        "are pruned, but never the active one, the previous one or the newest import.",
    )
    pull_interval: Duration = Field(
        default=900.0,
        gt=0,
        description="How often model packages are looked for on destinations with `models: "
        "true` while they are reachable (also right after each drain); new ones are downloaded, "
        "verified and staged.",
    )
    canary: CanarySettings = Field(
        default_factory=CanarySettings,
        description="Shadow canary, activation and watch of staged detector versions.",
    )


class MotionSettings(Strict):
    enabled: bool = Field(
        default=True, description="Run the detector only on frames with motion (plus keepalives)."
    )
    width: int = Field(
        default=160, ge=16, le=1920, description="Width the frame is shrunk to for differencing."
    )
    pixel_threshold: int = Field(
        default=25, ge=1, le=255, description="Grey-level change that counts a pixel as moved."
    )
    min_area: float = Field(
        default=0.002,
        gt=0,
        le=1,
        description="Share of the frame that must move for the detector to run.",
    )
    keepalive: Duration = Field(
        default=10.0,
        gt=0,
        description="Run the detector at least this often anyway, so still objects stay tracked.",
    )


class TrackingSettings(Strict):
    iou_threshold: float = Field(
        default=0.3, gt=0, le=1, description="Overlap that matches a detection to a track."
    )
    max_missed: Duration = Field(
        default=2.0, gt=0, description="A track unseen for this long has ended (its event closes)."
    )
    min_hits: int = Field(
        default=2, ge=1, description="Detections before a track counts (filters one-frame noise)."
    )


def _normalised_point(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= v <= 1.0 for v in value):
        raise ValueError(
            f"polygon point {list(value)} is outside 0..1 (coordinates are normalised)"
        )
    return value


class Zone(Strict):
    name: Name = Field(description="Zone name, stamped on the records it causes.")
    polygon: list[Annotated[tuple[float, float], AfterValidator(_normalised_point)]] = Field(
        min_length=3, description="Corners as [x, y] in 0..1 of the frame's width and height."
    )
    classes: list[str] = Field(
        default_factory=list, description="Classes the zone cares about; empty: all the camera's."
    )
    priority: Literal["alert", "event"] = Field(
        default="alert", description="Priority of the record when an object enters the zone."
    )


class SnapshotSettings(Strict):
    max_width: int = Field(default=640, ge=64, le=4096, description="Snapshots are shrunk to it.")
    quality: int = Field(default=80, ge=10, le=100, description="JPEG quality to start from.")
    max_bytes: ByteSize = Field(
        default=200 * 1024,
        ge=8 * 1024,
        description="Largest snapshot; quality and size step down until it fits.",
    )


class ClipSettings(Strict):
    enabled: bool = Field(default=True, description="Keep an MP4 clip for every alert.")
    pre: Duration = Field(default=5.0, ge=0, le=60, description="Seconds before the alert.")
    post: Duration = Field(default=5.0, ge=0, le=60, description="Seconds after the alert.")
    max_width: int = Field(default=640, ge=64, le=1920, description="Clips are shrunk to it.")
    codec: Literal["h264", "mp4v"] = Field(
        default="h264",
        description="`h264`: H.264 by libx264 (through PyAV), which browsers and the status page "
        "play; `mp4v`: OpenCV's MPEG-4 Part 2, which VLC and ffmpeg play but browsers do not, "
        "in two to four times the bytes at the same quality. `h264` falls back to `mp4v`, with one warning in the "
        "log, where PyAV or its libx264 is missing.",
    )
    crf: int = Field(
        default=28,
        ge=0,
        le=51,
        description="H.264 quality (x264's constant rate factor): 0 is lossless, 51 the worst; "
        "6 more roughly halves the bytes. `mp4v` ignores it.",
    )
    preset: Literal[
        "ultrafast",
        "superfast",
        "veryfast",
        "faster",
        "fast",
        "medium",
        "slow",
        "slower",
        "veryslow",
    ] = Field(
        default="faster",
        description="x264's speed preset: a slower one saves bytes at the same quality for more "
        "CPU per clip. `mp4v` ignores it.",
    )
    threads: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Threads encoding one H.264 clip. Clips are encoded in their own thread "
        "beside the camera's frames, so 1 leaves the other cores to detection.",
    )


class SamplingSettings(Strict):
    uncertain: tuple[float, float] | None = Field(
        default=(0.25, 0.5),
        description="Keep frames with a detection scoring in [low, high): the model was unsure. "
        "Null: off.",
    )
    classes: list[str] = Field(
        default_factory=list, description="Keep frames showing any of these classes."
    )
    random: float = Field(
        default=0.002,
        ge=0,
        le=1,
        description="Share of analysed frames kept at random, for drift checks.",
    )
    per_hour: int = Field(default=20, ge=0, description="Most samples kept per hour.")
    per_day: int = Field(default=200, ge=0, description="Most samples kept per UTC day.")
    daily_bytes: ByteSize = Field(
        default=50 * 1024 * 1024, ge=0, description="Most sample payload bytes per UTC day."
    )

    @model_validator(mode="after")
    def _band_is_ordered(self) -> SamplingSettings:
        if self.uncertain is not None and not 0 <= self.uncertain[0] < self.uncertain[1] <= 1:
            raise_problems(
                [(("uncertain",), "uncertain must be [low, high] with 0 <= low < high <= 1")]
            )
        return self


class Camera(Strict):
    name: Name = Field(description="Camera name, stamped on its records.")
    url: str = Field(
        min_length=1,
        description="rtsp:// or http(s):// stream, a video file path, or a USB device index "
        "(digits, e.g. `0`).",
    )
    loop: bool = Field(default=False, description="Start a video file over at its end.")
    pace: Literal["realtime", "fast"] = Field(
        default="realtime",
        description="Video files: `realtime` at the file's frame rate, `fast` as fast as the "
        "pipeline takes frames (replay, benchmarks); streams are always realtime.",
    )
    fps: float = Field(
        default=5.0, gt=0, le=120, description="Most frames a second taken from the camera."
    )
    model: str = Field(default="detector", description="Key of the detector in `models`.")
    classes: list[str] = Field(
        default_factory=list, description="Classes to report; empty: every label of the model."
    )
    queue: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Frames waiting for the detector; when full the newest wins (drops counted).",
    )
    open_timeout: Duration = Field(
        default=10.0, gt=0, description="Give up opening a stream after this long (then retry)."
    )
    read_timeout: Duration = Field(
        default=10.0, gt=0, description="A stream that delivers no frame this long is reopened."
    )
    reconnect_max: Duration = Field(
        default=30.0, gt=0, description="Longest wait between reconnect attempts (jittered)."
    )
    motion: MotionSettings = Field(default_factory=MotionSettings, description="Motion gating.")
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="Tracking detections into objects."
    )
    zones: list[Zone] = Field(
        default_factory=list, description="Restricted areas; entering one is an alert or event."
    )
    snapshot: SnapshotSettings = Field(
        default_factory=SnapshotSettings, description="The JPEG kept for every event."
    )
    clip: ClipSettings = Field(default_factory=ClipSettings, description="MP4 clips of alerts.")
    blur_classes: list[str] = Field(
        default_factory=list,
        description="Classes blurred in every snapshot, clip and sample (e.g. [person]).",
    )
    sampling: SamplingSettings = Field(
        default_factory=SamplingSettings, description="Frames kept for retraining."
    )
    drift: DriftSettings = Field(
        default_factory=DriftSettings,
        description="Drift checks of brightness, sharpness and detections against a reference.",
    )

    @model_validator(mode="after")
    def _zones_fit(self) -> Camera:
        # A zone's name is what its alerts say; two zones of one name could not be told apart.
        zones = ((("zones", i, "name"), zone.name) for i, zone in enumerate(self.zones))
        # Labels unknown here (the model is the root's): only zones against `classes`.
        raise_problems([*repeated(zones, "zones"), *self.class_problems(None)])
        return self

    def class_problems(self, labels: Sequence[str] | None) -> list[Problem]:
        """The classes this camera names checked against its detector's labels (None: not
        known without running the model), and its zones' classes against its own `classes`
        (a zone class the camera filters out can never enter). Paths relative to the camera."""
        problems: list[Problem] = []
        named: list[tuple[KeyPath, str]] = [
            *((("classes", i), name) for i, name in enumerate(self.classes)),
            *((("blur_classes", i), name) for i, name in enumerate(self.blur_classes)),
            *((("sampling", "classes", i), name) for i, name in enumerate(self.sampling.classes)),
        ]
        for z, zone in enumerate(self.zones):
            for index, name in enumerate(zone.classes):
                path: KeyPath = ("zones", z, "classes", index)
                if self.classes and name not in self.classes:
                    problems.append(
                        (
                            path,
                            f"zone {zone.name!r} watches class {name!r}, which this camera's "
                            f"`classes` ({listing(self.classes, last='and')}) leaves out, so "
                            f"nothing of it can enter{did_you_mean(name, self.classes)}",
                        )
                    )
                else:
                    named.append((path, name))
        if labels is not None:
            problems += [
                (path, labels_problem(name, labels, self.model))
                for path, name in named
                if name not in labels
            ]
        return problems
