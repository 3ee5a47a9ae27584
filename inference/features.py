"""Window features (rms, peak, mean, min, max per channel) over the finite samples of a window."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sensors.base import SampleWindow

FEATURES = ("rms", "peak", "mean", "min", "max")

Summary = dict[str, dict[str, float | int | None]]

SIGNIFICANT_DIGITS = 7
"""Features are rounded to float32 precision (what raw samples are kept at): no sensor resolves
more, and the noise digits past it nearly double a telemetry record's gzip size on the wire
(bench/sync_backlog.py measured 102 -> 56 bytes a record at 6 digits)."""


def _rounded(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def summarise(window: SampleWindow) -> Summary:
    """Per channel: `n` (finite samples) and every feature in FEATURES over those samples.

    NaN and ±inf samples are left out; a channel with no finite sample gets None for each feature.
    """
    values = np.asarray(window.values, dtype=np.float64)
    if values.ndim != 2:
        values = values.reshape(len(window.channels), -1)
    finite = np.isfinite(values)
    n = np.count_nonzero(finite, axis=1)
    has = n > 0
    absolute = np.abs(np.where(finite, values, 0.0))
    peak = absolute.max(axis=1, initial=0.0)
    lowest = np.where(finite, values, np.inf).min(axis=1, initial=np.inf)
    highest = np.where(finite, values, -np.inf).max(axis=1, initial=-np.inf)
    # Scaling by the peak keeps sums of squares of huge values from overflowing to inf.
    scale = np.where(peak > 0.0, peak, 1.0)
    scaled = np.where(finite, values, 0.0) / scale[:, None]
    count = np.maximum(n, 1)
    mean = scale * scaled.sum(axis=1) / count
    rms = scale * np.sqrt(np.square(scaled).sum(axis=1) / count)
    columns: dict[str, npt.NDArray[np.float64]] = {
        "rms": rms,
        "peak": peak,
        "mean": mean,
        "min": lowest,
        "max": highest,
    }
    summary: Summary = {}
    for i, channel in enumerate(window.channels):
        entry: dict[str, float | int | None] = {"n": int(n[i])}
        for feature in FEATURES:
            entry[feature] = _rounded(float(columns[feature][i])) if has[i] else None
        summary[channel] = entry
    return summary
