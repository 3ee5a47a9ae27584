"""What a detector reports for one frame: boxes in the frame's pixels, a score and a class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Detection:
    """One object in one frame. Box corners are in pixels of the original frame, clipped to it."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    label: str

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, rounded to a tenth of a pixel and 4 digits of score (records stay small)."""
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(self.score, 4),
            "box": [round(v, 1) for v in (self.x1, self.y1, self.x2, self.y2)],
        }


def iou(a: Detection, b: Detection) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (a.area + b.area - inter)


class Detector(Protocol):
    """A loaded detection model: `name@version` for records, labels, and inference off the loop."""

    name: str
    version: str
    labels: tuple[str, ...]

    async def detect(self, image: npt.NDArray[np.uint8]) -> list[Detection]:
        """Detections in one BGR frame (score threshold, class filter and NMS applied)."""
        ...
