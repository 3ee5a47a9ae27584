"""Benchmark: are shape features worth their CPU for a short anomaly? KDD-TSAD_135 (UCR anomaly
archive 135, aeon's wheel: one 12-sample anomaly in 6,300 scored samples of a univariate 1 Hz
series) in windows of 5 samples, each method at its defaults, with the slow features (rms, peak,
mean, min, max, slope) against the shape features of `features.kind: vibration` (crest,
kurtosis, skewness, spectral centroid and octave bands on top), each with and without the
temporal features. Per variant: whether an anomaly started inside the labelled segment (or the
window after it), anomalies started elsewhere, the share of healthy windows in an alarm, and the
CPU of summarising a window (the cost of the features; the same run measures both kinds, so the
ratio holds on a noisy machine).

Windows are summarised by the appliance's own feature code and scored by its detector, in
process: what `appliance replay` does per window, without the journal (bench.anomaly_quality
replays the same series through the appliance).

Prints one JSON object on stdout; progress on stderr.
`python -m bench.anomaly_shape [--quick]` (--quick: hotelling only)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from appliance.stages.anomalies import feature_names_of
from bench.anomaly_datasets import Series, aeon_data_dir, kdd_tsad_135
from bench.common import base_parser, emit, machine, make_data_root, progress, source_fingerprint
from config.analysis import AnomalySettings, FeatureSettings, TemporalKind
from inference.anomaly import AnomalyDetector, fit_baseline
from inference.features import feature_vector, summarise
from sensors.base import SampleWindow

FloatArray = npt.NDArray[np.float64]
WINDOW = 5
T0 = datetime(2024, 1, 1, tzinfo=UTC)
METHODS = ("robust_z", "ewma", "hotelling", "isolation_forest", "autoencoder")
KINDS: tuple[Literal["slow", "vibration"], ...] = ("slow", "vibration")
TEMPORAL: dict[str, list[TemporalKind]] = {"off": [], "on": ["delta", "residual"]}


def vectors(
    series: Series, kind: Literal["slow", "vibration"]
) -> tuple[list[str], FloatArray, float]:
    """Every window's feature vector, and the CPU seconds per window that summarising took."""
    settings = FeatureSettings(kind=kind)
    names: list[str] | None = None
    rows = []
    started = time.process_time()
    for index in range(series.samples // WINDOW):
        values = series.values[index * WINDOW : (index + 1) * WINDOW].T
        window = SampleWindow(
            source=series.name,
            channels=series.channels,
            values=np.ascontiguousarray(values),
            ts=T0 + timedelta(seconds=index * WINDOW),
            mono_ns=index,
            duration_s=WINDOW / series.rate_hz,
            sample_rate=series.rate_hz,
        )
        summary = summarise(window, settings=settings)
        names = names or feature_names_of(summary, [])
        rows.append(feature_vector(summary, names))
    cpu = (time.process_time() - started) / len(rows)
    assert names is not None
    return names, np.array(rows), cpu


def score(
    series: Series, names: list[str], rows: FloatArray, method: str, temporal: list[TemporalKind]
) -> dict[str, Any]:
    settings = AnomalySettings.model_validate({"method": method, "temporal": temporal})
    fit = series.fit_samples // WINDOW
    window_s = WINDOW / series.rate_hz
    baseline = fit_baseline(settings, rows[:fit], names, window_s=window_s)
    detector = AnomalyDetector(settings, baseline)
    labelled = np.asarray(
        series.labels[: rows.shape[0] * WINDOW].reshape(-1, WINDOW).any(axis=1), dtype=np.bool_
    )
    first, last = (int(i) for i in np.flatnonzero(labelled)[[0, -1]])
    state, starts = [], []
    for index in range(fit, rows.shape[0]):
        events = detector.observe(rows[index], T0 + timedelta(seconds=index * window_s))
        starts += [index for event in events if event.kind == "started"]
        state.append(detector.active)
    alarm = np.array(state, dtype=np.bool_)
    healthy = ~labelled[fit:]
    inside = [i for i in starts if first <= i <= last + 1]
    return {
        "detected": bool(inside),
        "delay_windows": inside[0] - first if inside else None,
        "anomalies_elsewhere": len(starts) - len(inside),
        "healthy_windows_in_alarm": round(float(alarm[healthy].mean()), 4),
        "threshold": baseline.threshold,
    }


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    args = parser.parse_args()
    folder = aeon_data_dir()
    if folder is None:
        parser.error("aeon's bundled data (KDD-TSAD_135) is not installed: make test installs it")
    series = kdd_tsad_135(folder)
    methods = ("hotelling",) if args.quick else METHODS
    results: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    features: dict[str, int] = {}
    for kind in KINDS:
        names, rows, per_window = vectors(series, kind)
        cpu[kind] = per_window
        features[kind] = len(names)
        for label, temporal in TEMPORAL.items():
            for method in methods:
                progress(f"{kind} features, temporal {label}: {method}")
                results.setdefault(kind, {}).setdefault(label, {})[method] = score(
                    series, names, rows, method, temporal
                )
    detected = {
        kind: {
            label: sum(r["detected"] for r in by_method.values())
            for label, by_method in by_temporal.items()
        }
        for kind, by_temporal in results.items()
    }
    emit(
        {
            "benchmark": "anomaly_shape",
            "quick": args.quick,
            "machine": machine(make_data_root(args.tmp_dir, "bench-shape-")),
            "source": source_fingerprint("inference/features.py", "inference/anomaly_fit.py"),
            "series": {
                "name": "KDD-TSAD_135",
                "samples": series.samples,
                "fit_samples": series.fit_samples,
                "labelled": [int(i) for i in np.flatnonzero(series.labels)[[0, -1]]],
                "window_samples": WINDOW,
            },
            "features_per_window": features,
            "summarise_us_per_window": {k: round(v * 1e6, 1) for k, v in cpu.items()},
            "shape_cpu_ratio": round(cpu["vibration"] / cpu["slow"], 3),
            "methods_detecting": detected,
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
