"""Owns fitting anomaly baselines: each method's fitter (the scikit-learn ones exported to
ONNX), the threshold, `fit_baseline`, and `BaselineCollector`, which gathers the healthy windows
to fit on.

What each method fits and how it scores: the docstring of `inference.baseline`.

Thresholds: `quantile` of the baseline's scores times `margin`. The scores come from windows the
parameters were not fitted on wherever in-sample scores would be optimistic: isolation_forest and
autoencoder are fitted on the first 75% of the baseline windows and the threshold is taken on the
last 25% (so the model never sees those windows; a slow drift during the baseline makes this
conservative, not optimistic); hotelling is scored by 4-fold cross-fitting over contiguous blocks
(with few windows per feature the in-sample T² are bounded far below fresh ones) and its final
parameters use every window. robust_z (median/MAD barely move when one window is left out) and
ewma (a smoothed statistic) use their in-sample scores.
"""

from __future__ import annotations

import dataclasses
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
from inference.baseline import EWMA_LAMBDA, Baseline, FloatArray, as_matrix, hotelling_scores

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

ISOLATION_MAX_SAMPLES = 4096
"""Windows each isolation tree subsamples (all of them for smaller baselines); see
`inference.baseline`'s docstring for why not the usual 256."""

HELD_OUT_SHARE = 0.25
"""Share of the baseline windows (the latest ones) kept out of fitting isolation_forest and
autoencoder to set their threshold."""

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
    threshold_rows: FloatArray | None = None
    """Rows to score with the fitted baseline for the threshold; None: `threshold_scores`."""
    threshold_scores: FloatArray | None = None
    threshold_from: str = "in_sample"


def _floored(spread: FloatArray, centre: FloatArray) -> FloatArray:
    floor = np.maximum(SCALE_FLOOR_RELATIVE * np.abs(centre), SCALE_FLOOR_ABSOLUTE)
    return np.maximum(spread, floor)


def _fit_robust_z(rows: FloatArray, seed: int) -> _Fitted:
    median = np.median(rows, axis=0)
    deviation = np.abs(rows - median)
    spread = MAD_TO_SIGMA * np.median(deviation, axis=0)
    spread = np.where(spread > 0, spread, MEAN_AD_TO_SIGMA * deviation.mean(axis=0))
    return _Fitted({"median": median, "scale": _floored(spread, median)}, threshold_rows=rows)


def _fit_ewma(rows: FloatArray, seed: int) -> _Fitted:
    mean = rows.mean(axis=0)
    std = _floored(rows.std(axis=0, ddof=1), mean)
    return _Fitted({"mean": mean, "std": std}, info={"lambda": EWMA_LAMBDA}, threshold_rows=rows)


def _hotelling_parameters(rows: FloatArray) -> dict[str, FloatArray]:
    mean = rows.mean(axis=0)
    std = _floored(rows.std(axis=0, ddof=1), mean)
    z = (rows - mean) / std
    correlation = np.atleast_2d(z.T @ z / (rows.shape[0] - 1))
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    eigenvalues = np.clip(eigenvalues, 0.0, None) + HOTELLING_RIDGE
    precision = (eigenvectors / eigenvalues) @ eigenvectors.T
    return {"mean": mean, "std": std, "precision": (precision + precision.T) / 2.0}


def _fit_hotelling(rows: FloatArray, seed: int) -> _Fitted:
    folds = np.array_split(np.arange(rows.shape[0]), CROSS_FIT_FOLDS)
    held_out = []
    for fold in folds:
        rest = np.setdiff1d(np.arange(rows.shape[0]), fold)
        held_out.append(hotelling_scores(_hotelling_parameters(rows[rest]), rows[fold]))
    return _Fitted(
        _hotelling_parameters(rows),
        info={"ridge": HOTELLING_RIDGE, "folds": CROSS_FIT_FOLDS},
        threshold_scores=np.concatenate(held_out),
        threshold_from=f"cross_fitted_{CROSS_FIT_FOLDS}_folds",
    )


def _split_held_out(rows: FloatArray) -> tuple[FloatArray, FloatArray]:
    held = max(1, math.ceil(rows.shape[0] * HELD_OUT_SHARE))
    return rows[:-held], rows[-held:]


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


def _fit_isolation_forest(rows: FloatArray, seed: int) -> _Fitted:
    from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]
    from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    fit_rows, tail = _split_held_out(rows)
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
    return _Fitted(
        {"center": scaler.mean_, "scale": scaler.scale_},
        onnx_model=_to_onnx(pipeline, rows.shape[1]),
        info={
            "offset": float(pipeline.named_steps["forest"].offset_),
            "max_samples": int(pipeline.named_steps["forest"].max_samples_),
            "fit_windows": int(fit_rows.shape[0]),
            "libraries": _library_versions("scikit-learn", "skl2onnx"),
        },
        threshold_rows=tail,
        threshold_from="held_out_tail",
    )


def _fit_autoencoder(rows: FloatArray, seed: int) -> _Fitted:
    from sklearn.neural_network import MLPRegressor  # type: ignore[import-untyped]
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    fit_rows, tail = _split_held_out(rows)
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
    return _Fitted(
        {"center": scaler.mean_, "scale": scaler.scale_},
        onnx_model=_to_onnx(pipeline, dims),
        info={
            "hidden": max(2, dims // 2),
            "epochs": trained,
            "loss": float(network.loss_),
            "fit_windows": int(fit_rows.shape[0]),
            "libraries": _library_versions("scikit-learn", "skl2onnx"),
        },
        threshold_rows=tail,
        threshold_from="held_out_tail",
    )


_FITTERS: dict[str, Callable[[FloatArray, int], _Fitted]] = {
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


def fit_baseline(
    settings: AnomalySettings,
    vectors: npt.ArrayLike,
    names: Sequence[str],
    *,
    seed: int = 0,
    dropped: int = 0,
    covering: tuple[datetime, datetime] | None = None,
) -> Baseline:
    """Fit `settings.method` on healthy `vectors` (windows x features, columns in `names`
    order) and set its threshold.

    Rows with any non-finite value are dropped (counted in `Baseline.dropped`, plus `dropped`
    rows the caller already left out); fewer than `settings.min_windows` clean rows is a
    ValueError. `covering` is the data time the windows span (recorded in `info`). Blocking
    (seconds for the scikit-learn methods): from the event loop run it via `asyncio.to_thread`.
    """
    matrix = as_matrix(vectors)
    names = _check_names(names, matrix.shape[1])
    finite = np.isfinite(matrix).all(axis=1)
    rows = matrix[finite]
    dropped_here = int(matrix.shape[0] - rows.shape[0])
    if rows.shape[0] < settings.min_windows:
        raise ValueError(
            f"{rows.shape[0]} clean baseline windows ({dropped_here} dropped for a non-finite "
            f"value), fewer than min_windows={settings.min_windows}"
        )
    fitted = _FITTERS[settings.method](rows, seed)
    info = {
        **fitted.info,
        "quantile": settings.quantile,
        "margin": settings.margin,
        "seed": seed,
        "threshold_from": fitted.threshold_from,
    }
    if covering is not None:
        info["data_from"], info["data_to"] = (ts.isoformat() for ts in covering)
    provisional = Baseline(
        method=settings.method,
        names=names,
        parameters=fitted.parameters,
        onnx_model=fitted.onnx_model,
        threshold=1.0,
        windows=int(rows.shape[0]),
        dropped=dropped_here + dropped,
        fitted_at=datetime.now(UTC),
        info=info,
    )
    scores = fitted.threshold_scores
    if scores is None:
        assert fitted.threshold_rows is not None
        # Scored by a Baseline like every later window (for the ONNX methods: by onnxruntime,
        # float32), so the threshold and the live scores are computed the same way.
        scores = provisional.scores(fitted.threshold_rows)
    level = float(np.quantile(scores, settings.quantile))
    info |= {"threshold_windows": int(scores.size), "score_quantile": level}
    # A baseline that scored exactly 0 everywhere (all features constant) still needs a positive
    # threshold: then any change at all is over it.
    threshold = max(level * settings.margin, np.finfo(np.float64).tiny)
    baseline = dataclasses.replace(provisional, threshold=threshold, info=info)
    log.info(
        "anomaly baseline %s fitted: %s on %d windows x %d features, threshold %.4g",
        baseline.version,
        baseline.method,
        baseline.windows,
        baseline.dimensions,
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
        """Windows not kept: a non-finite value."""
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
            if not np.isfinite(values).all():
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
