"""Owns the anomaly baseline artefact: `Baseline` (a fitted method's parameters, threshold,
version), its one-file format (save, load, validation) and its scoring (a `Scorer` per method).

Methods (`AnomalySettings.method`), each scoring one vector, higher = more anomalous:

- `robust_z`: per feature median and MAD (x 1.4826, the normal-consistent scale); the score is
  the largest |z| over the features.
- `ewma`: per feature median and MAD-based spread (as robust_z, so that one step during the
  baseline does not inflate the spread every later shift is measured in); an exponentially
  weighted moving average (lambda 0.2) of the standardised features carried from window to
  window, so a small shift
  that persists adds up. The score is the largest |EWMA| over the features divided by the
  EWMA's asymptotic standard deviation sqrt(lambda / (2 - lambda)), i.e. in the same "sigmas"
  as robust_z. Scoring is stateful: a detector keeps one running EWMA.
- `hotelling`: Hotelling's T² = (x - mu)^T S^-1 (x - mu). The features are standardised by
  median and MAD (as robust_z); S is their correlation (second moments about the median),
  shrunk towards the identity by the Ledoit-Wolf intensity, plus a small ridge, so collinear
  sensors (a singular covariance) and baselines with about as many features as windows work.
  It sees a broken correlation between channels that no single feature shows.
- `isolation_forest`: scikit-learn StandardScaler + IsolationForest, exported with skl2onnx and
  scored with onnxruntime. The score is the isolation speed c(psi) / E[h(x)] = -1 / log2(s),
  s = -score_samples: how many times faster than an average point the forest isolates x (1 for
  an ordinary point, more for outliers), plus how far the window lies beyond the range the
  forest was fitted on, in the baseline's standard deviations (`reach`: each feature's largest
  |standardised| value in the fit). The second term is there because a forest alone cannot score
  a point beyond the baseline's range as more isolated than the baseline's most extreme window:
  its speed levels off near 1.3 to 2.4 times the ordinary, and a threshold above that ceiling
  can never be crossed (the shipped forest of earlier versions never alarmed with its defaults).
  With it, a window twice as far out scores higher, as for every other method. The trees
  subsample up to 4096 windows rather than the usual 256 (deeper trees separate the tail better).
  Isolation forests split one feature at a time, so they miss a broken correlation between
  channels whose values each stay in range: use hotelling or autoencoder for that.
- `autoencoder`: StandardScaler + an MLPRegressor with a bottleneck trained to reproduce its
  input, exported the same way; the score is the mean squared reconstruction error in scaled
  units, plus the mean squared distance beyond the fitted range (`reach`, as for the forest):
  a network extrapolates outside the range it was trained on, and a whole machine moving out
  of its range along the correlations it learnt would otherwise be reproduced, and missed.

Input and model features: `names` is the vector the source hands in (`channel.feature`, in the
stage's order). Features that were missing or frozen during the baseline (`info["excluded"]`)
are left out, and the temporal features of `info["temporal"]` (inference/temporal.py) are
appended; the method's parameters are over those `model_names`. A `FeatureMap` does that, window
by window, and is stateful like the EWMA.

Scoring always runs from a `Baseline` (numpy for the first three methods, onnxruntime for the
scikit-learn ones), so a baseline loaded from its file scores exactly like the one just fitted.
Fitting a baseline is `inference.anomaly_fit`; the debounced detector is `inference.anomaly`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]

from inference.session import InferenceError, ModelError
from inference.temporal import TemporalMap, temporal_names

FloatArray = npt.NDArray[np.float64]
Method = Literal["robust_z", "ewma", "hotelling", "isolation_forest", "autoencoder"]

FORMAT = "edge-appliance/anomaly-baseline"
FORMAT_VERSION = 1
VERSION_HEX_DIGITS = 12
"""48 bits of sha256: unique among the baselines one site will ever fit, short enough to read."""

EWMA_LAMBDA = 0.2
EWMA_SIGMA = math.sqrt(EWMA_LAMBDA / (2.0 - EWMA_LAMBDA))
"""Asymptotic standard deviation of the EWMA of unit-variance independent inputs."""

_PARAMETERS: dict[str, tuple[str, ...]] = {
    "robust_z": ("median", "scale"),
    "ewma": ("mean", "std"),
    "hotelling": ("mean", "std", "precision"),
    "isolation_forest": ("center", "scale"),
    "autoencoder": ("center", "scale"),
}
_OPTIONAL_PARAMETERS: dict[str, tuple[str, ...]] = {
    "isolation_forest": ("reach",),
    "autoencoder": ("reach",),
}
"""Parameters a baseline may lack: those fitted by an earlier version of this code."""
_ONNX_METHODS = frozenset({"isolation_forest", "autoencoder"})


def model_names(names: Sequence[str], info: Mapping[str, Any]) -> tuple[str, ...]:
    """The features a method is fitted on: `names` less `info["excluded"]`, then the temporal
    features of `info["temporal"]` derived from those."""
    excluded = info.get("excluded") or {}
    used = tuple(name for name in names if name not in excluded)
    return used + temporal_names(used, list(info.get("temporal") or ()))


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
        unknown = sorted(self.info.get("excluded") or {})
        unknown = [name for name in unknown if name not in self.names]
        if unknown:
            raise ValueError(f"excluded feature(s) {unknown} are not among the names")
        if len(self.info.get("excluded") or {}) >= len(self.names):
            raise ValueError("every feature is excluded: nothing left to score")
        _check_shapes(self.method, len(model_names(self.names, self.info)), self.parameters)
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
        """Features of the input vector (`names`)."""
        return len(self.names)

    @cached_property
    def model_names(self) -> tuple[str, ...]:
        """Features the method scores: the used inputs, then the temporal ones."""
        return model_names(self.names, self.info)

    @property
    def excluded(self) -> dict[str, str]:
        """Input features left out of the fit and the score, with why (`missing`, `frozen`)."""
        return dict(self.info.get("excluded") or {})

    def feature_map(self) -> FeatureMap:
        """A fresh map from input vectors to model vectors (stateful: feed windows in order)."""
        return FeatureMap(self)

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
            "excluded": self.excluded,
            "temporal": list(self.info.get("temporal") or ()),
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
            _check_shapes(method, len(model_names(names, meta.get("info") or {})), parameters)
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
        if len(inputs) != 1 or (inputs[0].shape or [None])[-1] not in (len(self.model_names), None):
            found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise BaselineError(
                Path(self.origin),
                f"its ONNX model takes {found}, not one [N, {len(self.model_names)}] feature input",
            )
        return session

    def scorer(self) -> Scorer:
        """A fresh scorer (for ewma, with its own running average starting at zero)."""
        factory: Callable[[Baseline], Scorer] = _SCORERS[self.method]
        return factory(self)

    def scores(self, vectors: npt.ArrayLike) -> FloatArray:
        """Scores of the rows of `vectors` (windows x input features, in time order), from a
        fresh feature map and scorer; NaN for a window that cannot be scored (a used feature not
        a number, or no history yet for a temporal one)."""
        mapped = self.feature_map().map_many(as_matrix(vectors, self.dimensions))
        finite = np.isfinite(mapped).all(axis=1)
        out = np.full(mapped.shape[0], np.nan)
        if finite.any():
            out[finite] = self.scorer().score_many(mapped[finite])
        return out


def _check_shapes(method: str, dims: int, parameters: Mapping[str, npt.NDArray[Any]]) -> None:
    for key in _PARAMETERS[method]:
        if key not in parameters:
            raise ValueError(f"parameter {key!r} is missing")
    for key in _PARAMETERS[method] + _OPTIONAL_PARAMETERS.get(method, ()):
        if key not in parameters:
            continue
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


def as_matrix(vectors: npt.ArrayLike, dims: int | None = None) -> FloatArray:
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


class FeatureMap:
    """Input vectors (a source's `names`) to model vectors (`model_names`): the excluded
    features dropped, the temporal ones appended. Stateful; one per stream of windows."""

    def __init__(self, baseline: Baseline) -> None:
        excluded = baseline.info.get("excluded") or {}
        self.used = np.array(
            [i for i, name in enumerate(baseline.names) if name not in excluded], dtype=np.intp
        )
        used_names = [baseline.names[i] for i in self.used]
        self.temporal = TemporalMap(used_names, list(baseline.info.get("temporal") or ()))

    def map(self, vector: FloatArray) -> FloatArray:
        """One window's model vector: not finite where it cannot be scored."""
        return self.temporal.step(vector[self.used])

    def map_many(self, matrix: FloatArray) -> FloatArray:
        return self.temporal.map_many(matrix[:, self.used])


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
        self.average = np.zeros(len(baseline.model_names))

    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        z = (vector - self.parameters["mean"]) / self.parameters["std"]
        self.average = EWMA_LAMBDA * z + (1.0 - EWMA_LAMBDA) * self.average
        scaled = np.abs(self.average) / EWMA_SIGMA
        return float(scaled.max()), scaled


def hotelling_scores(parameters: Mapping[str, FloatArray], matrix: FloatArray) -> FloatArray:
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
        return hotelling_scores(self.parameters, matrix)


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


def isolation_scores(
    anomaly_score: FloatArray, scaled: FloatArray, reach: FloatArray | None
) -> FloatArray:
    """The isolation_forest score from scikit-learn's s (= -score_samples) and the standardised
    features: the isolation speed plus the distance beyond the fitted range (module docstring)."""
    # -log2(s) = E[h(x)] / c(psi), the mean path length in units of an average one; a point
    # isolated at the root of every tree (s -> 1) gets a large but finite speed.
    relative_depth = np.maximum(-np.log2(np.clip(anomaly_score, 1e-300, 1.0)), 1e-6)
    speed: FloatArray = 1.0 / relative_depth
    if reach is not None:
        speed = speed + np.clip(np.abs(scaled) - reach, 0.0, None).max(axis=1)
    return speed


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
        return isolation_scores(anomaly_score, self._scaled(matrix), self.parameters.get("reach"))

    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        score = float(self.score_many(vector.reshape(1, -1))[0])
        return score, np.abs(self._scaled(vector))


def autoencoder_terms(
    errors: FloatArray, scaled: FloatArray, reach: FloatArray | None
) -> FloatArray:
    """Per feature: the squared reconstruction error plus the squared distance beyond the
    fitted range; the autoencoder's score is their mean (module docstring)."""
    if reach is None:
        return errors
    terms: FloatArray = errors + np.square(np.clip(np.abs(scaled) - reach, 0.0, None))
    return terms


class _Autoencoder(_Onnx):
    def _errors(self, matrix: FloatArray) -> FloatArray:
        reconstruction = self._run(matrix)[0].astype(np.float64)
        # A single-feature MLPRegressor reconstructs a flat [n] vector; otherwise [n, d].
        reconstruction = reconstruction.reshape(matrix.shape[0], matrix.shape[1])
        scaled = self._scaled(matrix).astype(np.float32).astype(np.float64)
        return np.square(scaled - reconstruction)

    def _terms(self, matrix: FloatArray) -> FloatArray:
        return autoencoder_terms(
            self._errors(matrix), self._scaled(matrix), self.parameters.get("reach")
        )

    def score_many(self, matrix: FloatArray) -> FloatArray:
        scores: FloatArray = self._terms(matrix).mean(axis=1)
        return scores

    def score(self, vector: FloatArray) -> tuple[float, FloatArray]:
        # A feature's squared reconstruction error (and distance beyond range): the score is
        # their mean, and a feature whose relation to the others broke is reconstructed badly
        # even when its value alone looks ordinary.
        terms = self._terms(vector.reshape(1, -1))[0]
        return float(terms.mean()), terms


_SCORERS: dict[str, Callable[[Baseline], Scorer]] = {
    "robust_z": _RobustZ,
    "ewma": _Ewma,
    "hotelling": _Hotelling,
    "isolation_forest": _IsolationForest,
    "autoencoder": _Autoencoder,
}


__all__ = ["Baseline", "BaselineError", "Scorer"]
