"""Owns a staged detector's shadow run and what it is judged on: comparing two models'
detections on one frame, the canary limits, the sampled frames a shadow run takes from the
cameras (a bounded queue whose overflow is counted, never the camera's frames) and its figures,
and the figures of the watch after an activation. The lifecycle around them is `canary.py`'s."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.stages.vision import DetectorPool
from config.cameras import CanarySettings
from inference.detect import OnnxDetector
from inference.detections import Detection
from inference.package_manifest import CanaryLimits
from inference.session import ModelError
from sync.records import format_ts

MATCH_IOU = 0.5  # two detections of one class agree when they overlap at least this much
# How often a shadow run looks whether it can be judged, and a watch whether the model behaves.
CHECK_INTERVAL_S = 0.5

Image = npt.NDArray[np.uint8]


# -- comparing two models' detections ------------------------------------------------------------


def frame_agreement(
    active: Sequence[Detection], shadow: Sequence[Detection], *, min_iou: float = MATCH_IOU
) -> float:
    """How far the shadow's detections in one frame agree with the active model's: F1 of one to
    one matches (same label, IoU >= `min_iou`, best overlaps first), 2 * matched / (n_active +
    n_shadow); a frame where both find nothing agrees fully."""
    if not active and not shadow:
        return 1.0
    if not active or not shadow:
        return 0.0
    a = np.array([(d.x1, d.y1, d.x2, d.y2) for d in active], dtype=np.float64)
    s = np.array([(d.x1, d.y1, d.x2, d.y2) for d in shadow], dtype=np.float64)
    width = np.minimum(a[:, None, 2], s[None, :, 2]) - np.maximum(a[:, None, 0], s[None, :, 0])
    height = np.minimum(a[:, None, 3], s[None, :, 3]) - np.maximum(a[:, None, 1], s[None, :, 1])
    inter = width.clip(0) * height.clip(0)
    area_a = ((a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0))[:, None]
    area_s = ((s[:, 2] - s[:, 0]).clip(0) * (s[:, 3] - s[:, 1]).clip(0))[None, :]
    union = area_a + area_s - inter
    overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    same = np.array([[x.label == y.label for y in shadow] for x in active], dtype=bool)
    overlap[~same] = 0.0
    rows, cols = np.nonzero(overlap >= min_iou)
    order = np.argsort(-overlap[rows, cols], kind="stable")
    used_active: set[int] = set()
    used_shadow: set[int] = set()
    for i, j in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        if i not in used_active and j not in used_shadow:
            used_active.add(i)
            used_shadow.add(j)
    return 2 * len(used_active) / (len(active) + len(shadow))


def _shadow_frame(detector: OnnxDetector, image: Image, found: Sequence[Detection]) -> float:
    """On the shadow model's own executor thread: its detections on `image` and their agreement
    with the active model's `found`."""
    return frame_agreement(found, detector.detect_blocking(image))


# -- limits and figures ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What a shadow run must meet: the manifest's `canary` limits, the config's where it has
    none."""

    min_agreement: float
    max_latency_ratio: float
    max_error_rate: float

    @classmethod
    def resolve(cls, manifest: CanaryLimits | None, settings: CanarySettings) -> Limits:
        given = manifest or CanaryLimits()
        return cls(
            min_agreement=settings.min_agreement
            if given.min_agreement is None
            else given.min_agreement,
            max_latency_ratio=settings.max_latency_ratio
            if given.max_latency_ratio is None
            else given.max_latency_ratio,
            max_error_rate=settings.max_error_rate
            if given.max_error_rate is None
            else given.max_error_rate,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "min_agreement": self.min_agreement,
            "max_latency_ratio": self.max_latency_ratio,
            "max_error_rate": self.max_error_rate,
        }


@dataclass
class ShadowMetrics:
    """What a shadow run saw: frames handed to it, compared, failed, dropped (queue full)."""

    sampled: int = 0
    compared: int = 0
    errors: int = 0
    dropped: int = 0
    agreement_sum: float = 0.0
    last_error: str | None = None

    @property
    def tried(self) -> int:
        return self.compared + self.errors

    @property
    def agreement(self) -> float | None:
        return self.agreement_sum / self.compared if self.compared else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.tried if self.tried else None


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def utc_now() -> str:
    return format_ts(datetime.now(UTC))


def utc_in(seconds: float) -> str:
    return format_ts(datetime.now(UTC) + timedelta(seconds=seconds))


# -- a shadow run ------------------------------------------------------------------------------------


class ShadowTap:
    """The `ShadowSink` of one model key: every `every`th frame its cameras analyse goes to the
    run's queue. Called on the camera's hot path: a counter and, now and then, a put_nowait."""

    def __init__(self, run: ShadowRun, key: str, every: int) -> None:
        self._run = run
        self._key = key
        self._every = every
        self._seen = 0

    def offer(self, image: Image, found: Sequence[Detection]) -> None:
        self._seen += 1
        if self._seen % self._every == 0:
            self._run.submit(self._key, image, tuple(found))


class ShadowRun:
    """One staged version tried beside the active one: its shadow detector per model key, the
    bounded queue of sampled frames and what came of them."""

    def __init__(
        self,
        name: str,
        version: str,
        previous: str,
        shadows: dict[str, OnnxDetector],
        limits: Limits,
        settings: CanarySettings,
    ) -> None:
        self.name = name
        self.version = version
        self.previous = previous
        self.shadows = shadows
        self.limits = limits
        self.settings = settings
        self.metrics = ShadowMetrics()
        self.queue: asyncio.Queue[tuple[str, Image, tuple[Detection, ...]]] = asyncio.Queue(
            settings.queue
        )
        self.taps = {key: ShadowTap(self, key, settings.sample_every) for key in shadows}
        self.started_mono = time.monotonic()
        self.started_at = utc_now()
        self.ends_at = utc_in(settings.duration)

    def submit(self, key: str, image: Image, found: tuple[Detection, ...]) -> None:
        self.metrics.sampled += 1
        try:
            self.queue.put_nowait((key, image, found))
        except asyncio.QueueFull:
            self.metrics.dropped += (
                1  # the shadow is behind: its sample thins, the camera is untouched
            )

    async def work(self) -> None:
        """Run the shadow on each queued frame, one at a time, on the shadow's own thread."""
        while True:
            key, image, found = await self.queue.get()
            detector = self.shadows[key]
            try:
                agreement = await detector.session.call(_shadow_frame, detector, image, found)
            except (ModelError, ValueError) as exc:
                self.metrics.errors += 1
                self.metrics.last_error = str(exc)
                continue
            self.metrics.compared += 1
            self.metrics.agreement_sum += agreement

    def latency(self, pool: DetectorPool) -> tuple[float | None, float | None, float | None]:
        """(ratio, shadow p95 ms, active p95 ms) of the model key where the shadow is slowest
        relative to the detector that key runs now."""
        worst: tuple[float | None, float | None, float | None] = (None, None, None)
        for key, shadow in self.shadows.items():
            active = pool.current(key)
            shadow_p95 = shadow.stats.p95_ms
            active_p95 = None if active is None else active.stats.p95_ms
            if shadow_p95 is None or not active_p95:
                continue
            ratio = shadow_p95 / active_p95
            if worst[0] is None or ratio > worst[0]:
                worst = (ratio, shadow_p95, active_p95)
        return worst

    def figures(self, pool: DetectorPool) -> dict[str, Any]:
        ratio, shadow_p95, active_p95 = self.latency(pool)
        m = self.metrics
        return {
            "frames": m.compared,
            "sampled": m.sampled,
            "errors": m.errors,
            "dropped": m.dropped,
            "agreement": rounded(m.agreement),
            "latency_ratio": rounded(ratio, 3),
            "error_rate": rounded(m.error_rate),
            "shadow_p95_ms": rounded(shadow_p95, 3),
            "active_p95_ms": rounded(active_p95, 3),
        }

    def failures(self, pool: DetectorPool, *, too_few: bool) -> list[dict[str, Any]]:
        """Each limit the run did not meet: metric, value, limit, threshold and a sentence."""
        limits, m = self.limits, self.metrics
        found: list[dict[str, Any]] = []

        def failed(metric: str, value: float | int | None, limit: str, threshold: float) -> None:
            shown = "none" if value is None else f"{value:.3f}"
            relation = ">" if limit.startswith("max_") else "<"
            found.append(
                {
                    "metric": metric,
                    "value": rounded(None if value is None else float(value)),
                    "limit": limit,
                    "threshold": threshold,
                    "text": f"{metric} {shown} {relation} {limit} {threshold:g}",
                }
            )

        if too_few:
            failed("frames", m.tried, "min_frames", self.settings.min_frames)
            found[-1]["text"] = (
                f"frames {m.tried} < min_frames {self.settings.min_frames} within max_duration "
                f"{self.settings.max_duration:g}s"
            )
        agreement = m.agreement
        if agreement is None or agreement < limits.min_agreement:
            failed("agreement", agreement, "min_agreement", limits.min_agreement)
        ratio = self.latency(pool)[0]
        if ratio is not None and ratio > limits.max_latency_ratio:
            failed("latency_ratio", ratio, "max_latency_ratio", limits.max_latency_ratio)
        error_rate = m.error_rate
        if error_rate is not None and error_rate > limits.max_error_rate:
            failed("error_rate", error_rate, "max_error_rate", limits.max_error_rate)
        return found

    async def aclose(self) -> None:
        for shadow in self.shadows.values():
            await shadow.aclose()


# -- the watch after an activation ---------------------------------------------------------------


@dataclass
class DetectorWatch:
    """A version activated by its canary, watched until `until_mono`: the detectors it replaced
    stay open meanwhile, so a rollback is a swap back, not a reload."""

    name: str
    version: str
    previous: str
    limits: Limits
    until_mono: float
    until: str
    watched: dict[str, OnnxDetector]
    retired: dict[str, OnnxDetector | None]
    budget_ms: dict[str, float | None]
    # Per key: (runs tried, errors) at each check, trimmed to the last `min_frames` runs.
    history: dict[str, deque[tuple[int, int]]] = field(default_factory=dict)
    load_errors: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        by_key = {}
        for key, detector in self.watched.items():
            stats = detector.stats
            by_key[key] = {
                "p95_ms": rounded(stats.p95_ms, 3),
                "budget_ms": rounded(self.budget_ms.get(key), 3),
                "runs": stats.count,
                "errors": stats.errors,
            }
        return {"models": by_key, "load_errors": list(self.load_errors)}


__all__ = [
    "CHECK_INTERVAL_S",
    "MATCH_IOU",
    "DetectorWatch",
    "Limits",
    "ShadowMetrics",
    "ShadowRun",
    "ShadowTap",
    "frame_agreement",
]
