"""Owns fitting anomaly baselines: each method's fitter (the scikit-learn ones exported to
ONNX), the threshold, `fit_baseline`, and `BaselineCollector`, which gathers the healthy windows
to fit on.

What each method fits and how it scores: the docstring of `inference.baseline`.

Features: an input feature that was not a number in more than `MISSING_SHARE` of the baseline's
windows is `missing`, one that never changed is `frozen`; both are left out of the fit and the
score (`Baseline.excluded`; the stage journals a data-quality record naming them) rather than
fitted as normal: a dead sensor's flat line is not what the machine does. The temporal features
of `settings.temporal` are then derived, window by window (inference/temporal.py).

Thresholds, the same way for every method (`calibrated_threshold`): every baseline window is
scored by a model that did not see it (`CROSS_FIT_FOLDS` contiguous blocks: each block scored by
the method fitted on the others; a drift during the baseline shows as it will in live scores),
a generalised Pareto tail is fitted to the highest of those scores (peaks over threshold), and
the threshold is the score it puts at the per-window exceedance probability
`false_alarms_per_day x window / 1 day`, times `margin`. An operator states how many false
alarms a day of running like the baseline may give; the tail fit turns that into each method's
own scale, where a fixed "quantile x margin" meant something different to every score.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import numpy.typing as npt

from config.analysis import AnomalySettings
from inference.baseline import (
    EWMA_LAMBDA,
    Baseline,
    FloatArray,
    as_matrix,
    autoencoder_terms,
    isolation_scores,
    model_names,
)

log = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826
"""MAD x this estimates the standard deviation of normally distributed data."""
MEAN_AD_TO_SIGMA = math.sqrt(math.pi / 2)
"""Mean absolute deviation x this estimates the standard deviation of normal data. Used where
the MAD is zero but the feature still moves (more than half the windows share one value, e.g. a
quantised sensor): a zero MAD there would score its ordinary steps as infinitely far."""
SCALE_FLOOR_RELATIVE = 1e-4
"""Smallest spread of a feature, relative to its centre's magnitude. Features are kept to float32
precision (about 1e-7); a feature that did not move at all during the baseline would otherwise
score the next flicker in its last digit as millions of sigmas. At this floor a 1% change of a
constant feature is 100 sigmas: still an anomaly, as it should be for a channel that never moved."""
SCALE_FLOOR_ABSOLUTE = 1e-9
"""The same floor for a constant feature whose centre is 0."""

HOTELLING_RIDGE = 1e-3
"""Added to the eigenvalues of the correlation matrix: a direction with no variance in the
baseline (collinear sensors) is scored as if it had 0.1% of a feature's variance, so it stays
invertible and a break of that collinearity is still scored very high."""
CROSS_FIT_FOLDS = 4
"""Contiguous blocks the baseline is split into for the held-out scores."""

ISOLATION_MAX_SAMPLES = 4096
"""Windows each isolation tree subsamples (all of them for smaller baselines); see
`inference.baseline`'s docstring for why not the usual 256."""

MISSING_SHARE = 0.5
"""An input feature that is not a number in more than this share of the baseline's windows is
`missing` and left out: a dead or unwired sensor. Less often (a dropout): those windows are
dropped from the fit and skipped when scored, and the sensor stays in."""

TAIL_SHARE = 0.1
TAIL_MIN = 5
TAIL_MAX = 200
"""The tail fit uses the highest TAIL_SHARE of the held-out scores, at least TAIL_MIN and at most
TAIL_MAX of them."""
TAIL_SHAPE_MIN_PEAKS = 30
"""With fewer peaks than this the tail's shape is not estimated but taken as exponential (shape
0: the tail of T², of a squared error and of the largest of several normal |z|); estimated from
20 peaks it would be noise, and a heavy-tailed guess multiplies the threshold."""
TAIL_SHAPE_LIMIT = 0.3
"""Bound on the estimated shape, either way."""
DEFAULT_WINDOW_S = 1.0
"""Window length assumed when the fit is given neither it nor the data time covered (a source's
default window)."""
DAY_S = 86400.0

AUTOENCODER_MAX_EPOCHS = 200
AUTOENCODER_MIN_EPOCHS = 20
AUTOENCODER_SAMPLE_EPOCHS = 720_000
"""Bound on windows x epochs: 3600 windows get 200 epochs (a couple of seconds at 64 features),
a ten-hour baseline gets 20 rather than ten times the time."""
AUTOENCODER_PATIENCE = 10
AUTOENCODER_TOLERANCE = 1e-4
"""Training stops once the loss has not improved by this (relative) for PATIENCE epochs."""

ONNX_OPSETS = {"": 15, "ai.onnx.ml": 3}
"""Pinned rather than skl2onnx's newest: the IsolationForest converter needs ai.onnx.ml 3 (its
tree and label-encoder ops), and a pinned opset keeps a baseline loadable by an older
onnxruntime on the appliance (checked with skl2onnx 1.20, onnxruntime 1.32)."""
ONNX_INPUT = "features"


# -- fitting -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fitted:
    parameters: dict[str, FloatArray]
    onnx_model: bytes | None = None
    info: dict[str, Any] = field(default_factory=dict)
    scores: Callable[[FloatArray], FloatArray] | None = None
    """For the scikit-learn methods fitted without their ONNX export (the held-out folds):
    scores computed by scikit-learn itself, the same formula as the ONNX scorer's."""


def _floored(spread: FloatArray, centre: FloatArray) -> FloatArray:
    floor = np.maximum(SCALE_FLOOR_RELATIVE * np.abs(centre), SCALE_FLOOR_ABSOLUTE)
    return np.maximum(spread, floor)


def _fit_robust_z(rows: FloatArray, seed: int, export: bool = True) -> _Fitted:
    median = np.median(rows, axis=0)
    deviation = np.abs(rows - median)
    spread = MAD_TO_SIGMA * np.median(deviation, axis=0)
    spread = np.where(spread > 0, spread, MEAN_AD_TO_SIGMA * deviation.mean(axis=0))
    return _Fitted({"median": median, "scale": _floored(spread, median)})


def _fit_ewma(rows: FloatArray, seed: int, export: bool = True) -> _Fitted:
    # Centred and scaled like robust_z (median, MAD): a baseline with one step in it (a valve
    # operated once) would otherwise inflate the standard deviation that every shift is
    # measured in, and hide the next step.
    robust = _fit_robust_z(rows, seed)
    return _Fitted(
        {"mean": robust.parameters["median"], "std": robust.parameters["scale"]},
        info={"lambda": EWMA_LAMBDA, "centre": "median", "spread": "mad"},
    )


def _hotelling_parameters(rows: FloatArray) -> dict[str, FloatArray]:
    # Centred and scaled by median and MAD, as the EWMA: one step during the baseline would
    # otherwise inflate the spread (and drag the centre) that every later window is judged by.
    robust = _fit_robust_z(rows, 0).parameters
    mean, std = robust["median"], robust["scale"]
    z = (rows - mean) / std
    correlation = np.atleast_2d(z.T @ z / (rows.shape[0] - 1))
    # Shrunk towards the identity by the Ledoit-Wolf intensity: with about as many features as
    # windows (a minute's baseline of 50 channels) the sample correlation is singular and its
    # smallest eigenvalues are noise, which T² would divide by; shrinkage keeps fresh windows'
    # T² in proportion to the baseline's. With many windows per feature it is near 0.
    shrinkage = _ledoit_wolf_shrinkage(z)
    correlation = (1.0 - shrinkage) * correlation + shrinkage * np.eye(correlation.shape[0])
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    eigenvalues = np.clip(eigenvalues, 0.0, None) + HOTELLING_RIDGE
    precision = (eigenvectors / eigenvalues) @ eigenvectors.T
    return {
        "mean": mean,
        "std": std,
        "precision": (precision + precision.T) / 2.0,
        "shrinkage": np.array([shrinkage]),
    }


def _ledoit_wolf_shrinkage(z: FloatArray) -> float:
    from sklearn.covariance import ledoit_wolf_shrinkage  # type: ignore[import-untyped]

    if z.shape[1] < 2:
        return 0.0
    return float(ledoit_wolf_shrinkage(z, assume_centered=True))


def _fit_hotelling(rows: FloatArray, seed: int, export: bool = True) -> _Fitted:
    parameters = _hotelling_parameters(rows)
    shrinkage = float(parameters.pop("shrinkage")[0])
    return _Fitted(parameters, info={"ridge": HOTELLING_RIDGE, "shrinkage": shrinkage})


def _library_versions(*names: str) -> dict[str, str]:
    return {name: importlib_metadata.version(name) for name in names}


def _to_onnx(model: Any, dims: int) -> bytes:
    from skl2onnx import to_onnx  # type: ignore[import-untyped]
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]

    # model_optim=False: skl2onnx's identity-removal pass is quadratic in the node count and
    # takes most of the conversion time of a 100-tree forest; onnxruntime drops those Identity
    # nodes itself when it loads the graph.
    onnx_model = to_onnx(
        model,
        initial_types=[(ONNX_INPUT, FloatTensorType([None, dims]))],
        target_opset=ONNX_OPSETS,
        model_optim=False,
    )
    serialised: bytes = onnx_model.SerializeToString()
    return serialised


def _fit_isolation_forest(rows: FloatArray, seed: int, export: bool = True) -> _Fitted:
    from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]
    from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    fit_rows = rows
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "forest",
                IsolationForest(
                    max_samples=min(ISOLATION_MAX_SAMPLES, fit_rows.shape[0]), random_state=seed
                ),
            ),
        ]
    ).fit(fit_rows)
    scaler = pipeline.named_steps["scale"]
    reach = np.abs((fit_rows - scaler.mean_) / scaler.scale_).max(axis=0)

    def scores(matrix: FloatArray) -> FloatArray:
        scaled = (matrix - scaler.mean_) / scaler.scale_
        return isolation_scores(-pipeline.score_samples(matrix), scaled, reach)

    return _Fitted(
        {"center": scaler.mean_, "scale": scaler.scale_, "reach": reach},
        onnx_model=_to_onnx(pipeline, rows.shape[1]) if export else None,
        scores=scores,
        info={
            "offset": float(pipeline.named_steps["forest"].offset_),
            "max_samples": int(pipeline.named_steps["forest"].max_samples_),
            "fit_windows": int(fit_rows.shape[0]),
            "libraries": _library_versions("scikit-learn", "skl2onnx"),
        },
    )


def _fit_autoencoder(rows: FloatArray, seed: int, export: bool = True) -> _Fitted:
    from sklearn.neural_network import MLPRegressor  # type: ignore[import-untyped]
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    fit_rows = rows
    dims = rows.shape[1]
    scaler = StandardScaler().fit(fit_rows)
    scaled = scaler.transform(fit_rows)
    target = scaled[:, 0] if dims == 1 else scaled
    network = MLPRegressor(hidden_layer_sizes=(max(2, dims // 2),), random_state=seed)
    epochs = min(
        AUTOENCODER_MAX_EPOCHS,
        max(AUTOENCODER_MIN_EPOCHS, AUTOENCODER_SAMPLE_EPOCHS // fit_rows.shape[0]),
    )
    # One partial_fit per epoch: the epoch bound is ours (fit(max_iter=...) would warn that it
    # did not converge, and a warning filter is process-wide, not safe in a worker thread).
    best, stale, trained = math.inf, 0, 0
    for _ in range(epochs):
        network.partial_fit(scaled, target)
        trained += 1
        loss = float(network.loss_)
        if loss < best * (1.0 - AUTOENCODER_TOLERANCE):
            best, stale = loss, 0
        else:
            stale += 1
            if stale >= AUTOENCODER_PATIENCE:
                break
    pipeline = Pipeline([("scale", scaler), ("autoencoder", network)])

    reach = np.abs(scaled).max(axis=0)

    def scores(matrix: FloatArray) -> FloatArray:
        reconstruction = np.asarray(pipeline.predict(matrix), dtype=np.float64)
        standardised = scaler.transform(matrix)
        errors = np.square(standardised - reconstruction.reshape(matrix.shape))
        mean: FloatArray = autoencoder_terms(errors, standardised, reach).mean(axis=1)
        return mean

    return _Fitted(
        {"center": scaler.mean_, "scale": scaler.scale_, "reach": reach},
        onnx_model=_to_onnx(pipeline, dims) if export else None,
        scores=scores,
        info={
            "hidden": max(2, dims // 2),
            "epochs": trained,
            "loss": float(network.loss_),
            "fit_windows": int(fit_rows.shape[0]),
            "libraries": _library_versions("scikit-learn", "skl2onnx"),
        },
    )


_FITTERS: dict[str, Callable[[FloatArray, int, bool], _Fitted]] = {
    "robust_z": _fit_robust_z,
    "ewma": _fit_ewma,
    "hotelling": _fit_hotelling,
    "isolation_forest": _fit_isolation_forest,
    "autoencoder": _fit_autoencoder,
}


def _check_names(names: Sequence[str], dims: int) -> tuple[str, ...]:
    names = tuple(names)
    if len(names) != dims:
        raise ValueError(f"{len(names)} feature names for vectors of {dims} features")
    if not names:
        raise ValueError("a baseline needs at least one feature")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate feature names {duplicates}")
    return names


def unusable_features(matrix: FloatArray, names: Sequence[str]) -> dict[str, str]:
    """Input features to leave out of a baseline: `missing` (not a number in more than
    MISSING_SHARE of the windows) or `frozen` (the same value in every window that has one)."""
    finite = np.isfinite(matrix)
    out: dict[str, str] = {}
    for index, name in enumerate(names):
        column = matrix[finite[:, index], index]
        if column.size < (1.0 - MISSING_SHARE) * matrix.shape[0] or column.size == 0:
            out[name] = "missing"
        elif column.min() == column.max():
            out[name] = "frozen"
    return out


@dataclass(frozen=True, slots=True)
class Calibration:
    """How a threshold was set from held-out scores (see `calibrated_threshold`)."""

    threshold: float
    exceedance: float
    """Per-window probability the threshold stands for."""
    peaks: int
    peak_floor: float
    shape: float
    scale: float
    method: str

    def as_info(self) -> dict[str, Any]:
        return {
            "exceedance": self.exceedance,
            "tail_peaks": self.peaks,
            "tail_from": self.peak_floor,
            "tail_shape": self.shape,
            "tail_scale": self.scale,
            "tail_method": self.method,
        }


def calibrated_threshold(scores: FloatArray, exceedance: float) -> Calibration:
    """The score that windows like these exceed with probability `exceedance`, by a peaks-over-
    threshold fit: the highest TAIL_SHARE of `scores` (held-out, finite) over the next one, u,
    follow a generalised Pareto distribution (shape xi, scale sigma), so P(score > x) =
    t (1 + xi (x - u) / sigma)^(-1/xi) with t the share of peaks. The shape is estimated by
    probability-weighted moments (Hosking and Wallis, 1987) from TAIL_SHAPE_MIN_PEAKS peaks on,
    bounded by TAIL_SHAPE_LIMIT; with fewer it is 0 (exponential tail, sigma = median excess /
    ln 2). An
    exceedance at or above t is read off the scores themselves (an empirical quantile)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = int(ordered.size)
    if n < TAIL_MIN + 1:
        raise ValueError(f"{n} held-out scores are too few to calibrate a threshold")
    peaks = min(max(round(TAIL_SHARE * n), TAIL_MIN), TAIL_MAX, n - 1)
    share = peaks / n
    floor = float(ordered[n - peaks - 1])
    if exceedance >= share:
        level = float(np.quantile(ordered, 1.0 - exceedance))
        return Calibration(level, exceedance, peaks, floor, 0.0, 0.0, "empirical")
    excess = ordered[n - peaks :] - floor
    mean_excess = float(excess.mean())
    shape = 0.0
    method = "exponential"
    if peaks >= TAIL_SHAPE_MIN_PEAKS and mean_excess > 0:
        ranks = np.arange(peaks, dtype=np.float64)
        b1 = float(np.mean(excess * ranks / (peaks - 1)))
        denominator = mean_excess - 2.0 * b1
        if denominator > 0:
            estimated = 2.0 - mean_excess / denominator
            shape = float(np.clip(estimated, -TAIL_SHAPE_LIMIT, TAIL_SHAPE_LIMIT))
            method = "pareto_pwm"
    if method == "exponential":
        # From the median excess (sigma ln 2 for an exponential tail), not the mean: one block of
        # the baseline with a step in it (a valve operated once) gives a few peaks far above the
        # rest, and the mean would carry the threshold up to them.
        scale = float(np.median(excess)) / math.log(2.0)
    else:
        # The scale that keeps the tail's mean excess, mean = sigma / (1 - xi).
        scale = mean_excess * (1.0 - shape)
    ratio = share / exceedance
    if shape == 0.0:
        level = floor + scale * math.log(ratio)
    else:
        level = floor + scale / shape * (ratio**shape - 1.0)
    return Calibration(level, exceedance, peaks, floor, shape, scale, method)


def _window_seconds(
    window_s: float | None, covering: tuple[datetime, datetime] | None, windows: int
) -> tuple[float, str]:
    if window_s is not None:
        return window_s, "given"
    if covering is not None and windows > 1:
        span = (covering[1] - covering[0]).total_seconds()
        if span > 0:
            return span / (windows - 1), "baseline_span"
    return DEFAULT_WINDOW_S, "assumed"


def _held_out_scores(
    method: str, rows: FloatArray, names: tuple[str, ...], seed: int
) -> FloatArray:
    """Each window's score by the method fitted on the other CROSS_FIT_FOLDS - 1 blocks. The
    whole sequence is scored in order (a stateful score such as the EWMA sees the windows before
    the block, as live), and the block's own scores are kept."""
    folds = np.array_split(np.arange(rows.shape[0]), CROSS_FIT_FOLDS)
    out = np.empty(rows.shape[0])
    for fold in folds:
        rest = np.setdiff1d(np.arange(rows.shape[0]), fold)
        fitted = _FITTERS[method](rows[rest], seed, False)
        if fitted.scores is not None:
            out[fold] = fitted.scores(rows[fold])
            continue
        model = Baseline(
            method=method,  # type: ignore[arg-type]
            names=names,
            parameters=fitted.parameters,
            onnx_model=fitted.onnx_model,
            threshold=1.0,
            windows=int(rest.size),
            dropped=0,
            fitted_at=datetime.now(UTC),
            info=fitted.info,
        )
        out[fold] = model.scorer().score_many(rows)[fold]
    return out


def fit_baseline(
    settings: AnomalySettings,
    vectors: npt.ArrayLike,
    names: Sequence[str],
    *,
    seed: int = 0,
    dropped: int = 0,
    covering: tuple[datetime, datetime] | None = None,
    window_s: float | None = None,
) -> Baseline:
    """Fit `settings.method` on healthy `vectors` (windows x features in time order, columns in
    `names` order) and calibrate its threshold.

    Missing and frozen features are left out (`unusable_features`); the temporal features are
    derived; then windows with any non-finite model value are dropped (counted in
    `Baseline.dropped`, plus `dropped` windows the caller already left out). Fewer than
    `settings.min_windows` left is a ValueError, as is a baseline with no usable feature.
    `window_s` is the windows' length (default: from `covering`, the data time the windows span,
    which is also recorded). Blocking (seconds for the scikit-learn methods): from the event
    loop run it via `asyncio.to_thread`.
    """
    matrix = as_matrix(vectors)
    names = _check_names(names, matrix.shape[1])
    excluded = unusable_features(matrix, names)
    if len(excluded) == len(names):
        listed = ", ".join(f"{name} ({why})" for name, why in excluded.items())
        raise ValueError(f"no usable feature: every one is missing or frozen ({listed})")
    layout = {"excluded": excluded, "temporal": list(settings.temporal)}
    fitted_names = model_names(names, layout)
    probe = Baseline(
        method="robust_z",
        names=names,
        parameters={"median": np.zeros(len(fitted_names)), "scale": np.ones(len(fitted_names))},
        onnx_model=None,
        threshold=1.0,
        windows=0,
        dropped=0,
        fitted_at=datetime.now(UTC),
        info=layout,
    )
    mapped = probe.feature_map().map_many(matrix)
    finite = np.isfinite(mapped).all(axis=1)
    rows = mapped[finite]
    dropped_here = int(matrix.shape[0] - rows.shape[0])
    if rows.shape[0] < settings.min_windows:
        raise ValueError(
            f"{rows.shape[0]} clean baseline windows ({dropped_here} dropped for a non-finite "
            f"value), fewer than min_windows={settings.min_windows}"
        )
    window, window_from = _window_seconds(window_s, covering, matrix.shape[0])
    # More false alarms a day than half the windows a day would be no threshold at all.
    exceedance = min(settings.false_alarms_per_day * window / DAY_S, 0.5)
    held_out = _held_out_scores(settings.method, rows, fitted_names, seed)
    calibration = calibrated_threshold(held_out, exceedance)
    fitted = _FITTERS[settings.method](rows, seed, True)
    info = {
        **fitted.info,
        **layout,
        "false_alarms_per_day": settings.false_alarms_per_day,
        "margin": settings.margin,
        "window_s": window,
        "window_s_from": window_from,
        "seed": seed,
        "threshold_from": f"held_out_{CROSS_FIT_FOLDS}_folds_tail_fit",
        "threshold_windows": int(held_out.size),
        "held_out_max": float(held_out.max()),
        **calibration.as_info(),
    }
    if covering is not None:
        info["data_from"], info["data_to"] = (ts.isoformat() for ts in covering)
    # A baseline that scored exactly 0 everywhere (all features constant) still needs a positive
    # threshold: then any change at all is over it.
    threshold = max(calibration.threshold * settings.margin, np.finfo(np.float64).tiny)
    baseline = Baseline(
        method=settings.method,
        names=names,
        parameters=fitted.parameters,
        onnx_model=fitted.onnx_model,
        threshold=threshold,
        windows=int(rows.shape[0]),
        dropped=dropped_here + dropped,
        fitted_at=datetime.now(UTC),
        info=info,
    )
    log.info(
        "anomaly baseline %s fitted: %s on %d windows x %d features (%d left out), threshold %.4g",
        baseline.version,
        baseline.method,
        baseline.windows,
        len(baseline.model_names),
        len(excluded),
        baseline.threshold,
    )
    return baseline


# -- collecting the baseline -------------------------------------------------------------------


class BaselineCollector:
    """Gathers clean feature vectors from healthy running until they span `settings.baseline`
    seconds of data time (first to last window timestamp) and number at least `min_windows`.

    `add` is called from the event loop; `fit` blocks for seconds (scikit-learn methods), so the
    caller runs it with `await asyncio.to_thread(collector.fit)`. Once ready, further windows are
    not kept (memory stays bounded while the fit runs); `add` and `fit` may overlap safely.
    """

    def __init__(self, settings: AnomalySettings, names: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.names = tuple(settings.features if names is None else names)
        if not self.names:
            raise ValueError("a baseline needs feature names (settings.features or names)")
        _check_names(self.names, len(self.names))
        self._lock = threading.Lock()
        self._vectors: list[FloatArray] = []
        self._first: datetime | None = None
        self._last: datetime | None = None
        self.skipped = 0
        """Windows not kept: no feature was a number. (A window with some features not a number
        is kept: the fit leaves out features that are missing too often, then windows.)"""
        self.out_of_order = 0
        """Windows not kept: a timestamp before the previous window's."""

    @property
    def windows(self) -> int:
        return len(self._vectors)

    @property
    def span_s(self) -> float:
        if self._first is None or self._last is None:
            return 0.0
        return (self._last - self._first).total_seconds()

    def ready(self) -> bool:
        return self.span_s >= self.settings.baseline and self.windows >= self.settings.min_windows

    def add(self, vector: npt.ArrayLike, ts: datetime) -> bool:
        """Keep one window's vector (in `names` order); whether it was kept."""
        values = np.asarray(vector, dtype=np.float64).reshape(-1)
        if values.size != len(self.names):
            raise ValueError(
                f"feature vector has {values.size} values, expected {len(self.names)} "
                f"({', '.join(self.names)})"
            )
        with self._lock:
            if self.ready():
                return False
            if not np.isfinite(values).any():
                self.skipped += 1
                return False
            if self._last is not None and ts < self._last:
                self.out_of_order += 1
                return False
            self._vectors.append(values.copy())
            self._first = self._first or ts
            self._last = ts
            return True

    def fit(self, *, seed: int = 0) -> Baseline:
        """Fit the baseline on what was collected (ValueError before `ready()`). Blocking."""
        with self._lock:
            if not self.ready():
                raise ValueError(
                    f"baseline not complete: {self.windows} windows over {self.span_s:.0f} s, "
                    f"needs {self.settings.min_windows} windows over {self.settings.baseline:.0f} s"
                )
            matrix = np.vstack(self._vectors)
            assert self._first is not None and self._last is not None
            covering = (self._first, self._last)
            dropped = self.skipped
        return fit_baseline(
            self.settings, matrix, self.names, seed=seed, dropped=dropped, covering=covering
        )


__all__ = ["BaselineCollector", "fit_baseline"]
