"""Owns online anomaly detection: scoring window feature vectors against a `Baseline` and
debouncing them into `AnomalyEvent`s (k of n windows to start, hysteresis to end, escalation).

A pure library: vectors in, scores and `AnomalyEvent`s out. The pipeline turns a window summary
into a vector (in `Baseline.names` order) and events into records.

The baseline itself (its methods, file and scoring) is `inference.baseline`; fitting it and
collecting the windows to fit on is `inference.anomaly_fit`. Their public names are re-exported
here (in `__all__`), so `from inference.anomaly import Baseline, fit_baseline` still works.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

from config.analysis import AnomalySettings
from inference.anomaly_fit import BaselineCollector, fit_baseline
from inference.baseline import Baseline, BaselineError, FloatArray, Scorer

Priority = Literal["event", "alert"]
EventKind = Literal["started", "escalated", "ended"]

TOP_FEATURES = 3


# -- detection -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureContribution:
    name: str
    value: float


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    """A change of an anomaly's state.

    `score`, `ratio` (score / threshold) and `at` are the window that caused it; `peak_ratio` the
    highest ratio so far; `features` the top contributors: of that window for `started` and
    `escalated`, of the peak window for `ended`. Contributions are |z| (robust_z), |EWMA| in
    sigmas (ewma), the feature's term of T² (hotelling), standardised |deviation|
    (isolation_forest), squared reconstruction error (autoencoder). `windows` counts the scored
    windows since the anomaly's first window over the threshold, `windows_over` those over it.
    """

    kind: EventKind
    priority: Priority
    score: float
    threshold: float
    ratio: float
    peak_ratio: float
    started_at: datetime
    at: datetime
    features: tuple[FeatureContribution, ...]
    windows_over: int
    windows: int
    baseline: str
    method: str

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "priority": self.priority,
            "score": self.score,
            "threshold": self.threshold,
            "ratio": round(self.ratio, 4),
            "peak_ratio": round(self.peak_ratio, 4),
            "started_at": self.started_at.isoformat(),
            "at": self.at.isoformat(),
            "features": [{"name": f.name, "value": f.value} for f in self.features],
            "windows_over": self.windows_over,
            "windows": self.windows,
            "baseline": self.baseline,
            "method": self.method,
        }


@dataclass(slots=True)
class _Window:
    at: datetime
    score: float
    ratio: float
    over: bool
    contributions: FloatArray


@dataclass(slots=True)
class _Anomaly:
    started_at: datetime
    priority: Priority
    peak: _Window
    windows: int
    windows_over: int
    quiet: int = 0


class AnomalyDetector:
    """Scores windows against a baseline and debounces them into anomalies.

    An anomaly starts when k of the last n scored windows (`settings.debounce`) are over the
    threshold and ends when n scored windows in a row are under threshold x hysteresis. It is an
    `alert` once score / threshold reaches `critical` at any window of it (an `event` that gets
    there is `escalated`), else an `event`. A non-finite vector is not scored and changes no
    state (counted in `skipped`). Scoring is synchronous and takes microseconds (numpy) to tens
    of microseconds (onnxruntime), fine on the event loop at window rates. A vector is scored
    on the baseline's model features (`Baseline.feature_map`): its excluded features may be
    anything, even NaN; a window whose temporal features have no history yet is skipped.
    """

    def __init__(self, settings: AnomalySettings, baseline: Baseline) -> None:
        if settings.method != baseline.method:
            raise ValueError(
                f"the baseline {baseline.version} was fitted with {baseline.method}, the settings "
                f"ask for {settings.method}: fit the baseline again"
            )
        if settings.features and tuple(settings.features) != baseline.names:
            raise ValueError(
                f"the baseline {baseline.version} was fitted on features {list(baseline.names)}, "
                f"the settings list {settings.features}: fit the baseline again"
            )
        self.settings = settings
        self.baseline = baseline
        self.threshold = baseline.threshold
        self._map = baseline.feature_map()
        self._scorer = baseline.scorer()
        self._k, self._n = settings.debounce
        self._recent: deque[_Window] = deque(maxlen=self._n)
        self._anomaly: _Anomaly | None = None
        self.last_score: float | None = None
        self.last_ratio: float | None = None
        self.scored = 0
        self.skipped = 0
        self.anomalies = 0

    @property
    def active(self) -> bool:
        return self._anomaly is not None

    def describe(self) -> dict[str, object]:
        return {
            "baseline": self.baseline.version,
            "method": self.baseline.method,
            "threshold": self.threshold,
            "scored": self.scored,
            "skipped": self.skipped,
            "anomalies": self.anomalies,
            "active": self.active,
            "last_score": self.last_score,
        }

    def observe(self, vector: npt.ArrayLike, ts: datetime) -> list[AnomalyEvent]:
        """Score one window's feature vector (in `baseline.names` order); the state changes it
        causes, in order (at most a start, or an escalation and/or an end)."""
        values = np.asarray(vector, dtype=np.float64).reshape(-1)
        if values.size != self.baseline.dimensions:
            raise ValueError(
                f"feature vector has {values.size} values, the baseline "
                f"{self.baseline.dimensions} ({', '.join(self.baseline.names)})"
            )
        mapped = self._map.map(values)
        if not np.isfinite(mapped).all():
            self.skipped += 1
            return []
        score, contributions = self._scorer.score(mapped)
        ratio = score / self.threshold
        self.scored += 1
        self.last_score, self.last_ratio = score, ratio
        window = _Window(ts, score, ratio, score > self.threshold, contributions)
        if self._anomaly is None:
            return self._maybe_start(window)
        return self._continue(self._anomaly, window)

    def _maybe_start(self, window: _Window) -> list[AnomalyEvent]:
        self._recent.append(window)
        if sum(w.over for w in self._recent) < self._k:
            return []
        recent = list(self._recent)
        first = next(i for i, w in enumerate(recent) if w.over)
        since = recent[first:]
        peak = max(since, key=lambda w: w.ratio)
        anomaly = _Anomaly(
            started_at=since[0].at,
            priority="alert" if peak.ratio >= self.settings.critical else "event",
            peak=peak,
            windows=len(since),
            windows_over=sum(w.over for w in since),
        )
        self._anomaly = anomaly
        self._recent.clear()
        self.anomalies += 1
        return [self._event("started", anomaly, window, window)]

    def _continue(self, anomaly: _Anomaly, window: _Window) -> list[AnomalyEvent]:
        anomaly.windows += 1
        anomaly.windows_over += window.over
        if window.ratio > anomaly.peak.ratio:
            anomaly.peak = window
        events = []
        if anomaly.priority == "event" and window.ratio >= self.settings.critical:
            anomaly.priority = "alert"
            events.append(self._event("escalated", anomaly, window, window))
        if window.score < self.threshold * self.settings.hysteresis:
            anomaly.quiet += 1
        else:
            anomaly.quiet = 0
        if anomaly.quiet >= self._n:
            events.append(self._event("ended", anomaly, window, anomaly.peak))
            self._anomaly = None
        return events

    def _event(
        self, kind: EventKind, anomaly: _Anomaly, window: _Window, explained: _Window
    ) -> AnomalyEvent:
        order = np.argsort(-explained.contributions, kind="stable")[:TOP_FEATURES]
        return AnomalyEvent(
            kind=kind,
            priority=anomaly.priority,
            score=window.score,
            threshold=self.threshold,
            ratio=window.ratio,
            peak_ratio=anomaly.peak.ratio,
            started_at=anomaly.started_at,
            at=window.at,
            features=tuple(
                FeatureContribution(self.baseline.model_names[i], float(explained.contributions[i]))
                for i in order
            ),
            windows_over=anomaly.windows_over,
            windows=anomaly.windows,
            baseline=self.baseline.version,
            method=self.baseline.method,
        )


__all__ = [
    "AnomalyDetector",
    "AnomalyEvent",
    "Baseline",
    "BaselineCollector",
    "BaselineError",
    "FeatureContribution",
    "Scorer",
    "fit_baseline",
]
