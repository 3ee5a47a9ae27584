"""Motion gating: decides, cheaply and per frame, whether a camera frame is worth a detector run.

The gate shrinks each frame to a small grey image, compares it with a running-average background and
passes the frame when enough of it changed. A frame also passes when the detector has not run for
`keepalive` seconds (so still objects stay tracked), on the first frame, after the picture size
changes, and always when the gate is disabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from config.cameras import MotionSettings
from sensors.base import Frame

Reason = Literal["disabled", "first", "motion", "global", "keepalive", "still"]
"""Why the gate decided as it did: `first` (first frame, or the picture size changed), `motion`,
`global` (nearly the whole picture changed: lights, exposure, a camera knocked; the background is
re-learnt), `keepalive`, `disabled`; `still` is the only reason that skips the detector."""

Region = tuple[float, float, float, float]
"""A changed area as (x1, y1, x2, y2), normalised to 0..1 of the frame's width and height."""

DEFAULT_ALPHA = 0.1
"""Background learning rate per frame. At 5 fps an object that stops melts into the background in
a few seconds (then keepalives take over), while sensor noise is averaged over ~10 frames."""

GLOBAL_CHANGE = 0.75
"""Share of changed pixels above which the change is taken as global rather than an object."""

MAX_REGIONS = 16
"""Most regions reported per frame (largest first); more would only be noise for the caller."""

_BLUR = (5, 5)
_DILATE = np.ones((3, 3), dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class MotionDecision:
    """The gate's verdict on one frame."""

    detect: bool
    reason: Reason
    changed: float  # share of the shrunk frame whose grey level moved past pixel_threshold
    regions: tuple[Region, ...] = ()  # where it changed (only when reason is motion or global)

    @property
    def motion(self) -> bool:
        """Whether the picture itself changed (as opposed to a keepalive or first-frame pass)."""
        return self.reason in ("motion", "global")


@dataclass(slots=True)
class MotionStats:
    """Counters for health and status: every frame seen is either passed or skipped."""

    seen: int = 0
    passed: int = 0
    skipped: int = 0
    keepalives: int = 0  # passes without motion, to keep still objects tracked
    resets: int = 0  # background re-learnt after a global change or a picture size change


class MotionGate:
    """Per-camera motion gate. Not thread-safe: one camera's frames, in order, from one task."""

    def __init__(self, cfg: MotionSettings, *, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"motion background alpha must be in (0, 1], got {alpha}")
        self.cfg = cfg
        self.alpha = alpha
        self.stats = MotionStats()
        self._keepalive_ns = round(cfg.keepalive * 1e9)
        self._background: npt.NDArray[np.float32] | None = None
        self._frame_shape: tuple[int, ...] | None = None
        self._small_size: tuple[int, int] = (0, 0)
        self._last_pass_ns: int | None = None

    def should_detect(self, frame: Frame) -> bool:
        """Shorthand for `check(frame).detect`."""
        return self.check(frame).detect

    def check(self, frame: Frame) -> MotionDecision:
        """Decide whether `frame` goes to the detector, and learn it into the background."""
        image = frame.image
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"camera {frame.source!r} frame {frame.index}: expected a BGR uint8 image of "
                f"shape (height, width, 3), got dtype {image.dtype} shape {image.shape}"
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"camera {frame.source!r} frame {frame.index}: empty image")
        self.stats.seen += 1
        if not self.cfg.enabled:
            return self._pass(frame, MotionDecision(True, "disabled", 0.0))
        if image.shape != self._frame_shape:
            # First frame, or the stream came back at another resolution: nothing to compare with.
            if self._frame_shape is not None:
                self.stats.resets += 1
            self._frame_shape = image.shape
            self._small_size = _small_size(image.shape[1], image.shape[0], self.cfg.width)
            self._background = self._shrink(image).astype(np.float32)
            return self._pass(frame, MotionDecision(True, "first", 1.0))
        assert self._background is not None
        grey = self._shrink(image)
        background = cv2.convertScaleAbs(self._background)
        diff = cv2.absdiff(grey, background)
        # THRESH_BINARY keeps values strictly above the threshold; the setting means "at least".
        _, thresholded = cv2.threshold(diff, self.cfg.pixel_threshold - 1, 255, cv2.THRESH_BINARY)
        mask: npt.NDArray[np.uint8] = np.asarray(thresholded, dtype=np.uint8)
        changed = cv2.countNonZero(mask) / mask.size
        if changed >= GLOBAL_CHANGE:
            # Re-learn at once: averaging a new exposure in would keep firing for many frames.
            self._background = grey.astype(np.float32)
            self.stats.resets += 1
            return self._pass(
                frame, MotionDecision(True, "global", changed, ((0.0, 0.0, 1.0, 1.0),))
            )
        cv2.accumulateWeighted(grey, self._background, self.alpha)
        if changed >= self.cfg.min_area:
            return self._pass(frame, MotionDecision(True, "motion", changed, _regions(mask)))
        if self._last_pass_ns is None or frame.mono_ns - self._last_pass_ns >= self._keepalive_ns:
            self.stats.keepalives += 1
            return self._pass(frame, MotionDecision(True, "keepalive", changed))
        if frame.mono_ns < self._last_pass_ns:
            # The clock went backwards (a restarted source reusing old stamps): start the keepalive
            # period afresh rather than waiting for the old stamp to come round again.
            self._last_pass_ns = frame.mono_ns
        self.stats.skipped += 1
        return MotionDecision(False, "still", changed)

    def reset(self) -> None:
        """Forget the background (e.g. after a reconnect): the next frame passes as `first`."""
        self._background = None
        self._frame_shape = None
        self._last_pass_ns = None

    def _pass(self, frame: Frame, decision: MotionDecision) -> MotionDecision:
        self.stats.passed += 1
        self._last_pass_ns = frame.mono_ns
        return decision

    def _shrink(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        width, height = self._small_size
        if image.shape[1] > 2 * width:
            # INTER_AREA straight from 1080p costs milliseconds; a bilinear step to twice the size
            # first is ~20x cheaper and the final area step still averages the sensor noise.
            image = np.asarray(
                cv2.resize(image, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR),
                dtype=np.uint8,
            )
        small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        return np.asarray(cv2.GaussianBlur(grey, _BLUR, 0), dtype=np.uint8)


def _small_size(width: int, height: int, target: int) -> tuple[int, int]:
    """The shrunk size: `target` wide (never wider than the frame), aspect kept."""
    small_w = min(target, width)
    small_h = max(1, round(height * small_w / width))
    return small_w, small_h


def _regions(mask: npt.NDArray[np.uint8]) -> tuple[Region, ...]:
    """Bounding boxes of the changed areas, largest first, normalised to 0..1."""
    # Dilating joins the fragments one moving object leaves (its edges, its limbs) into one region.
    joined = cv2.dilate(mask, _DILATE, iterations=2)
    contours, _ = cv2.findContours(joined, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    boxes = sorted((cv2.boundingRect(c) for c in contours), key=lambda b: b[2] * b[3], reverse=True)
    height, width = mask.shape
    return tuple(
        (x / width, y / height, (x + w) / width, (y + h) / height)
        for x, y, w, h in boxes[:MAX_REGIONS]
    )
