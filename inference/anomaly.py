"""Anomaly models over window feature vectors: fitting a baseline on healthy running, its one-file
artefact (save, load, version), scoring, and the debounced anomaly state machine.

A pure library: vectors in, scores and `AnomalyEvent`s out. The pipeline turns a window summary
into a vector (in `Baseline.names` order) and events into records.

Methods (`AnomalySettings.method`), each scoring one vector, higher = more anomalous:

- `robust_z`: per feature median and MAD (x 1.4826, the normal-consistent scale); the score is
  the largest |z| over the features.
- `ewma`: per feature mean and standard deviation; an exponentially weighted moving average
  (lambda 0.2) of the standardised features carried from window to window, so a small shift
  that persists adds up. The score is the largest |EWMA| over the features divided by the
  EWMA's asymptotic standard deviation sqrt(lambda / (2 - lambda)), i.e. in the same "sigmas"
  as robust_z. Scoring is stateful: a detector keeps one running EWMA.
- `hotelling`: Hotelling's T² = (x - mu)^T S^-1 (x - mu). S is the correlation matrix of the
  standardised features plus a small ridge, so collinear sensors (a singular covariance) work.
  It sees a broken correlation between channels that no single feature shows.
- `isolation_forest`: scikit-learn StandardScaler + IsolationForest, exported with skl2onnx and
  scored with onnxruntime. The score is the isolation speed c(psi) / E[h(x)] = -1 / log2(s),
  s = -score_samples: how many times faster than an average point the forest isolates x (1 for
  an ordinary point, more for outliers). scikit-learn's s itself (0.5 ordinary, at most 1) does
  not suit a threshold of quantile x margin: the baseline's 99% quantile is already about 0.6 to
  0.7, so x1.5 would need a score no point can reach. The trees subsample up to 4096 windows
  rather than the usual 256: a forest cannot score a point beyond the baseline's range as more
  isolated than the baseline's most extreme window, and with depth-8 trees (256) that ceiling is
  only about 1.3x the 99% quantile, under the default margin; deeper trees leave room to ~2.4x
  (measured on 8 correlated channels, all shifted out of range together).
  Isolation forests split one feature at a time, so they miss a broken correlation between
  channels whose values each stay in range: use hotelling or autoencoder for that.
- `autoencoder`: StandardScaler + an MLPRegressor with a bottleneck trained to reproduce its
  input, exported the same way; the score is the mean squared reconstruction error in scaled
  units.

Thresholds: `quantile` of the baseline's scores times `margin`. The scores come from windows the
parameters were not fitted on wherever in-sample scores would be optimistic: isolation_forest and
autoencoder are fitted on the first 75% of the baseline windows and the threshold is taken on the
last 25% (so the model never sees those windows; a slow drift during the baseline makes this
conservative, not optimistic); hotelling is scored by 4-fold cross-fitting over contiguous blocks
(with few windows per feature the in-sample T² are bounded far below fresh ones) and its final
parameters use every window. robust_z (median/MAD barely move when one window is left out) and
ewma (a smoothed statistic) use their in-sample scores.

Scoring always runs from a `Baseline` (numpy for the first three methods, onnxruntime for the
scikit-learn ones), so a baseline loaded from its file scores exactly like the one just fitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]

from config.models import AnomalySettings
from inference.session import InferenceError, ModelError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Method = Literal["robust_z", "ewma", "hotelling", "isolation_forest", "autoencoder"]
Priority = Literal["event", "alert"]
EventKind = Literal["started", "escalated", "ended"]

FORMAT = "edge-appliance/anomaly-baseline"
FORMAT_VERSION = 1
VERSION_HEX_DIGITS = 12
"""48 bits of sha256: unique among the baselines one site will ever fit, short enough to read."""

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

EWMA_LAMBDA = 0.2
EWMA_SIGMA = math.sqrt(EWMA_LAMBDA / (2.0 - EWMA_LAMBDA))
"""Asymptotic standard deviation of the EWMA of unit-variance independent inputs."""

HOTELLING_RIDGE = 1e-3
"""Added to the eigenvalues of the correlation matrix: a direction with no variance in the
baseline (collinear sensors) is scored as if it had 0.1% of a feature's variance, so it stays
invertible and a break of that collinearity is still scored very high."""
CROSS_FIT_FOLDS = 4

ISOLATION_MAX_SAMPLES = 4096
"""Windows each isolation tree subsamples (all of them for smaller baselines); see the module
docstring for why not the usual 256."""

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

TOP_FEATURES = 3

_PARAMETERS: dict[str, tuple[str, ...]] = {
    "robust_z": ("median", "scale"),
    "ewma": ("mean", "std"),
    "hotelling": ("mean", "std", "precision"),
    "isolation_forest": ("center", "scale"),
    "autoencoder": ("center", "scale"),
}
_ONNX_METHODS = frozenset({"isolation_forest", "autoencoder"})


class BaselineError(ModelError):
    """A baseline file that cannot be used: missing, truncated, corrupt, altered, or not a
    baseline at all. Permanent: fit the baseline again. `path` is the file, `reason` the rest."""


# -- the artefact -------------------------------------------------------------------------------


def _frozen(array: npt.ArrayLike) -> FloatArray:
    copy = np.array(array, dtype=np.float64, copy=True)
    copy.setflags(write=False)
    return copy


def _content_version(meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> str:
    """Short sha256 over the metadata (canonical JSON, without `version`) and every array's name,
    dtype, shape and bytes in name order."""
    digest = hashlib.sha256()
    content = {key: value for key, value in meta.items() if key != "version"}
    digest.update(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:VERSION_HEX_DIGITS]


@dataclass(frozen=True, eq=False)
class Baseline:
    """A fitted anomaly model: what it was fitted on, its parameters, its threshold, its version.

    `parameters` are the numpy arrays of the method (see `_PARAMETERS`); `onnx_model` the
    serialised ONNX graph of the scikit-learn methods (None for the others); `windows` the clean
    baseline windows, `dropped` those left out for a non-finite value; `info` the rest of what
    was decided at fitting (quantile, margin, seed, how the threshold was set, library versions).
    `version` is computed from all of it: two baselines with the same version are the same
    artefact.
    """

    method: Method
    names: tuple[str, ...]
    parameters: Mapping[str, FloatArray]
    onnx_model: bytes | None
    threshold: float
    windows: int
    dropped: int
    fitted_at: datetime
    info: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "fitted in memory"
    """Where it came from (the file it was loaded from), for error messages."""
    version: str = field(init=False)
    """Short sha256 of the serialised content (metadata and arrays)."""

    def __post_init__(self) -> None:
        if self.method not in _PARAMETERS:
            raise ValueError(f"unknown anomaly method {self.method!r}")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(
            self, "parameters", {key: _frozen(value) for key, value in self.parameters.items()}
        )
        object.__setattr__(self, "info", json.loads(json.dumps(dict(self.info))))
        missing = [key for key in _PARAMETERS[self.method] if key not in self.parameters]
        if missing:
            raise ValueError(f"{self.method} baseline lacks parameter(s) {missing}")
        if (self.onnx_model is None) == (self.method in _ONNX_METHODS):
            raise ValueError(
                f"{self.method} baseline "
                + ("needs an ONNX model" if self.onnx_model is None else "takes no ONNX model")
            )
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive finite number, got {self.threshold}")
        if self.fitted_at.tzinfo is None:
            raise ValueError("fitted_at must be timezone-aware")
        object.__setattr__(self, "version", _content_version(self._metadata(), self._arrays()))

    @property
    def dimensions(self) -> int:
        return len(self.names)

    def _metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "names": list(self.names),
            "threshold": self.threshold,
            "windows": self.windows,
            "dropped": self.dropped,
            "fitted_at": self.fitted_at.isoformat(),
            "parameters": sorted(self.parameters),
            "info": dict(self.info),
        }

    def _arrays(self) -> dict[str, npt.NDArray[Any]]:
        arrays: dict[str, npt.NDArray[Any]] = {
            f"param.{key}": value for key, value in self.parameters.items()
        }
        if self.onnx_model is not None:
            arrays["onnx"] = np.frombuffer(self.onnx_model, dtype=np.uint8)
        return arrays

    def describe(self) -> dict[str, object]:
        """What the status page and the lifecycle records show about the baseline."""
        return {
            "method": self.method,
            "version": self.version,
            "features": len(self.names),
            "windows": self.windows,
            "dropped": self.dropped,
            "threshold": self.threshold,
            "fitted_at": self.fitted_at.isoformat(),
            "threshold_from": self.info.get("threshold_from"),
        }

    # -- one file ------------------------------------------------------------------------------

    def save(self, path: Path | str) -> Path:
        """Write the baseline to `path` as one .npz file (atomically: a reader sees the old file
        or the new one). The name is kept as given (numpy would append .npz)."""
        path = Path(path)
        meta = self._metadata() | {"version": self.version}
        arrays = self._arrays()
        arrays["metadata"] = np.array(json.dumps(meta, sort_keys=True))
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as handle:
                # Compressed: the forest's node tables shrink about five-fold.
                np.savez_compressed(handle, allow_pickle=False, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path | str) -> Baseline:
        """Read a baseline written by `save`; `BaselineError` naming the file and what is wrong
        for a missing, truncated, corrupt, altered (version mismatch) or foreign file."""
        path = Path(path)
        if not path.exists():
            raise BaselineError(path, "no such baseline file")
        if not path.is_file():
            raise BaselineError(path, "not a file (a baseline .npz file is expected)")
        try:
            # Our own handle: np.load leaves the one it opens unclosed when the archive is bad.
            with path.open("rb") as handle:
                archive = np.load(handle, allow_pickle=False)
                if not isinstance(archive, np.lib.npyio.NpzFile):
                    raise BaselineError(path, "holds a single numpy array, not an anomaly baseline")
                with archive:
                    arrays = {name: np.asarray(archive[name]) for name in archive.files}
        except BaselineError:
            raise
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            # np.load says "pickled data" for any bytes that are neither .npy nor a zip archive.
            raise BaselineError(
                path,
                f"not a readable baseline archive: truncated, corrupt or another kind of file "
                f"({type(exc).__name__}: {exc})",
            ) from exc
        return cls._from_arrays(path, arrays)

    @classmethod
    def _from_arrays(cls, path: Path, arrays: dict[str, npt.NDArray[Any]]) -> Baseline:
        raw = arrays.pop("metadata", None)
        if raw is None:
            raise BaselineError(
                path,
                f"not an anomaly baseline: no metadata entry (it holds {sorted(arrays) or 'nothing'})",
            )
        if raw.dtype.kind != "U" or raw.shape != ():
            raise BaselineError(path, "not an anomaly baseline: its metadata is not a JSON string")
        try:
            meta = json.loads(str(raw))
        except json.JSONDecodeError as exc:
            raise BaselineError(path, f"its metadata is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise BaselineError(path, f"not an anomaly baseline (format {found!r}, not {FORMAT!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise BaselineError(
                path,
                f"baseline format version {meta.get('format_version')!r} is not supported "
                f"(this appliance reads version {FORMAT_VERSION}); fit the baseline again",
            )
        expected = meta.get("version")
        actual = _content_version(meta, arrays)
        if expected != actual:
            raise BaselineError(
                path,
                f"content does not match its version (recorded {expected!r}, content hashes to "
                f"{actual!r}): the file was altered or corrupted",
            )
        try:
            method = meta["method"]
            names = meta["names"]
            if method not in _PARAMETERS:
                raise ValueError(f"unknown method {method!r}")
            if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise ValueError("names must be a non-empty list of strings")
            parameters = {key: arrays.pop(f"param.{key}") for key in meta["parameters"]}
            _check_shapes(method, len(names), parameters)
            onnx_raw = arrays.pop("onnx", None)
            baseline = cls(
                method=method,
                names=tuple(names),
                parameters=parameters,
                onnx_model=None if onnx_raw is None else onnx_raw.astype(np.uint8).tobytes(),
                threshold=float(meta["threshold"]),
                windows=int(meta["windows"]),
                dropped=int(meta["dropped"]),
                fitted_at=datetime.fromisoformat(meta["fitted_at"]),
                info=meta.get("info", {}),
                origin=str(path),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise BaselineError(path, f"inconsistent baseline content: {exc}") from exc
        if baseline.version != expected:
            raise BaselineError(
                path, f"re-read content hashes to {baseline.version!r}, not {expected!r}"
            )
        try:
            baseline.scorer()  # opens the ONNX session now: a broken model is a load error
        except BaselineError:
            raise
        except ModelError as exc:
            raise BaselineError(path, exc.reason) from exc
        return baseline

    # -- scoring ---------------------------------------------------------------------------------

    @cached_property
    def _onnx_session(self) -> Any:
        if self.onnx_model is None:
            raise ValueError(f"{self.method} baseline has no ONNX model")
        session = _open_onnx(self.onnx_model, self.origin)
        inputs = session.get_inputs()
        if len(inputs) != 1 or (inputs[0].shape or [None])[-1] not in (self.dimensions, None):
            found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise BaselineError(
                Path(self.origin),
                f"its ONNX model takes {found}, not one [N, {self.dimensions}] feature input",
            )
        return session

    def scorer(self) -> Scorer:
        """A fresh scorer (for ewma, with its own running average starting at zero)."""
        factory: Callable[[Baseline], Scorer] = _SCORERS[self.method]
        return factory(self)

    def scores(self, vectors: npt.ArrayLike) -> FloatArray:
        """Scores of the rows of `vectors` (n x features, finite) in order, from a fresh
        scorer."""
        return self.scorer().score_many(_matrix(vectors, self.dimensions))


def _check_shapes(method: str, dims: int, parameters: Mapping[str, npt.NDArray[Any]]) -> None:
    for key in _PARAMETERS[method]:
        if key not in parameters:
            raise ValueError(f"parameter {key!r} is missing")
        expected = (dims, dims) if key == "precision" else (dims,)
        if parameters[key].shape != expected:
            raise ValueError(
                f"parameter {key!r} has shape {parameters[key].shape}, expected {expected}"
            )


def _open_onnx(model: bytes, origin: str) -> Any:
    options = ort.SessionOptions()
    # One window per run: one thread, no spinning (the same choices as ModelSession: the edge
    # box's few cores belong to decoding, the journal and the image models).
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... (no common base)
        raise ModelError(
            origin, f"onnxruntime cannot load its ONNX model ({type(exc).__name__}): {exc}"
        ) from exc


def _matrix(vectors: npt.ArrayLike, dims: int | None = None) -> FloatArray:
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim == 1 and dims is not None and matrix.size == dims:
        matrix = matrix.reshape(1, dims)
    if matrix.ndim != 2:
        raise ValueError(
            f"feature vectors must be a 2-D array (windows x features), got shape {matrix.shape}"
        )
    if dims is not None and matrix.shape[1] != dims:
        raise ValueError(f"feature vectors have {matrix.shape[1]} features, the baseline {dims}")
    return matrix


# -- scorers ----------------------------------------------------------------------------------


class Scorer(ABC):
    """Scores vectors of one baseline: the score and each feature's contribution to it."""

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline
        self.parameters = baseline.parameters

    @abstractmethod
    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        """(score, per-feature contributions) of one finite vector."""

    def score_many(self, matrix: FloatArray) -> FloatArray:
        return np.array([self.score(row)[0] for row in matrix], dtype=np.float64)


class _RobustZ(Scorer):
    def _z(self, matrix: FloatArray) -> FloatArray:
        return np.abs(matrix - self.parameters["median"]) / self.parameters["scale"]

    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        z = self._z(vector)
        return float(z.max()), z

    def score_many(self, matrix: FloatArray) -> FloatArray:
        scores: FloatArray = self._z(matrix).max(axis=1)
        return scores


class _Ewma(Scorer):
    def __init__(self, baseline: Baseline) -> None:
        super().__init__(baseline)
        self.average = np.zeros(baseline.dimensions)

    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        z = (vector - self.parameters["mean"]) / self.parameters["std"]
        self.average = EWMA_LAMBDA * z + (1.0 - EWMA_LAMBDA) * self.average
        scaled = np.abs(self.average) / EWMA_SIGMA
        return float(scaled.max()), scaled


def _hotelling_scores(parameters: Mapping[str, FloatArray], matrix: FloatArray) -> FloatArray:
    z = (matrix - parameters["mean"]) / parameters["std"]
    scores: FloatArray = np.einsum("ij,jk,ik->i", z, parameters["precision"], z)
    return scores


class _Hotelling(Scorer):
    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        z = (vector - self.parameters["mean"]) / self.parameters["std"]
        # Each feature's term of T² (they sum to it): z_i (S^-1 z)_i. Unlike z_i² alone it
        # points at the channels whose relation broke, which is what T² sees beyond robust_z.
        terms = z * (self.parameters["precision"] @ z)
        return float(terms.sum()), terms

    def score_many(self, matrix: FloatArray) -> FloatArray:
        return _hotelling_scores(self.parameters, matrix)


class _Onnx(Scorer):
    def __init__(self, baseline: Baseline) -> None:
        super().__init__(baseline)
        self.session = baseline._onnx_session

    def _run(self, matrix: FloatArray) -> list[npt.NDArray[Any]]:
        feed = {self.session.get_inputs()[0].name: matrix.astype(np.float32)}
        try:
            return [np.asarray(out) for out in self.session.run(None, feed)]
        except Exception as exc:  # onnxruntime's errors have no common base
            raise InferenceError(
                self.baseline.origin, f"anomaly model run failed ({type(exc).__name__}): {exc}"
            ) from exc

    def _scaled(self, matrix: FloatArray) -> FloatArray:
        return (matrix - self.parameters["center"]) / self.parameters["scale"]


class _IsolationForest(_Onnx):
    def __init__(self, baseline: Baseline) -> None:
        super().__init__(baseline)
        names = [output.name for output in self.session.get_outputs()]
        # skl2onnx names them (label, scores); fall back to the last output if that changes.
        self._scores_output = names.index("scores") if "scores" in names else len(names) - 1

    def score_many(self, matrix: FloatArray) -> FloatArray:
        outputs = self._run(matrix)
        # scores = decision_function = score_samples - offset_, as [n, 1] or flattened
        # depending on the skl2onnx version.
        decision = outputs[self._scores_output].astype(np.float64).reshape(-1)
        anomaly_score = -(decision + float(self.baseline.info["offset"]))
        # -log2(s) = E[h(x)] / c(psi), the mean path length in units of an average one; a point
        # isolated at the root of every tree (s -> 1) gets a large but finite speed.
        relative_depth = np.maximum(-np.log2(np.clip(anomaly_score, 1e-300, 1.0)), 1e-6)
        speed: FloatArray = 1.0 / relative_depth
        return speed

    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        score = float(self.score_many(vector.reshape(1, -1))[0])
        return score, np.abs(self._scaled(vector))


class _Autoencoder(_Onnx):
    def _errors(self, matrix: FloatArray) -> FloatArray:
        reconstruction = self._run(matrix)[0].astype(np.float64)
        # A single-feature MLPRegressor reconstructs a flat [n] vector; otherwise [n, d].
        reconstruction = reconstruction.reshape(matrix.shape[0], self.baseline.dimensions)
        scaled = self._scaled(matrix).astype(np.float32).astype(np.float64)
        return np.square(scaled - reconstruction)

    def score_many(self, matrix: FloatArray) -> FloatArray:
        scores: FloatArray = self._errors(matrix).mean(axis=1)
        return scores

    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        # A feature's squared reconstruction error: the score is their mean, and a feature
        # whose relation to the others broke is reconstructed badly even when its value alone
        # looks ordinary.
        errors = self._errors(vector.reshape(1, -1))[0]
        return float(errors.mean()), errors


_SCORERS: dict[str, Callable[[Baseline], Scorer]] = {
    "robust_z": _RobustZ,
    "ewma": _Ewma,
    "hotelling": _Hotelling,
    "isolation_forest": _IsolationForest,
    "autoencoder": _Autoencoder,
}


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
        held_out.append(_hotelling_scores(_hotelling_parameters(rows[rest]), rows[fold]))
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
    matrix = _matrix(vectors)
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
    of microseconds (onnxruntime), fine on the event loop at window rates.
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
        if not np.isfinite(values).all():
            self.skipped += 1
            return []
        score, contributions = self._scorer.score(values)
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
                FeatureContribution(self.baseline.names[i], float(explained.contributions[i]))
                for i in order
            ),
            windows_over=anomaly.windows_over,
            windows=anomaly.windows,
            baseline=self.baseline.version,
            method=self.baseline.method,
        )


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
