"""Owns the temporal features of an anomaly baseline: features derived from consecutive windows
that see change, which a single window's statistics cannot.

- `delta`: this window's value minus the previous window's. A step (a valve closing, a choke
  restricted) is a large delta in the window it happens in, however the level compares with the
  baseline's range.
- `residual`: this window's value minus a short-term forecast of it, the exponentially weighted
  moving average (`RESIDUAL_ALPHA`) of the windows before. A level that moves faster than the
  machine's usual wander stands out even while the level itself is still inside the baseline's
  range; a slow drift is followed by the forecast and leaves the residual small.

They are derived from the `mean` features of the vector (the level of each channel: what a fault
moves) or, where the vector has no `mean` feature, from every feature. The derived names are the
base name with `_delta` / `_residual` appended to its feature (`pump.mean_delta`).

A `TemporalMap` is stateful, like a running EWMA: it is fed every window in order, and the first
window (nothing before it) gets NaN derived values, as does a window after one whose value was
not a number. Callers score only finite vectors, so those windows are skipped, not scored as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np
import numpy.typing as npt

from config.analysis import TemporalKind

FloatArray = npt.NDArray[np.float64]
TEMPORAL_KINDS: tuple[TemporalKind, ...] = get_args(TemporalKind)

RESIDUAL_ALPHA = 0.3
"""Weight of the newest window in the forecast: about the last three windows count. Slower, and
the forecast lags a drifting operating point (its residual then looks like a fault); faster, and
a fault developing over a few windows is absorbed before it stands out."""

LEVEL_FEATURE = "mean"


def derived_from(names: Sequence[str]) -> tuple[int, ...]:
    """Indices of the features the temporal ones are derived from: the `mean` features, or every
    feature when there is none."""
    levels = tuple(i for i, name in enumerate(names) if name.rpartition(".")[2] == LEVEL_FEATURE)
    return levels or tuple(range(len(names)))


def temporal_names(names: Sequence[str], kinds: Sequence[TemporalKind]) -> tuple[str, ...]:
    """The derived feature names, kind by kind, in the order `TemporalMap` appends them."""
    sources = derived_from(names)
    return tuple(f"{names[i]}_{kind}" for kind in _ordered(kinds) for i in sources)


def _ordered(kinds: Sequence[TemporalKind]) -> tuple[TemporalKind, ...]:
    unknown = sorted(set(kinds) - set(TEMPORAL_KINDS))
    if unknown:
        raise ValueError(f"unknown temporal feature(s) {unknown}: use {list(TEMPORAL_KINDS)}")
    return tuple(kind for kind in TEMPORAL_KINDS if kind in kinds)


class TemporalMap:
    """Appends the temporal features to each vector of a stream of windows, in order."""

    def __init__(self, names: Sequence[str], kinds: Sequence[TemporalKind]) -> None:
        self.kinds = _ordered(kinds)
        self.dimensions = len(names)
        self._sources = np.array(derived_from(names), dtype=np.intp)
        self._previous: FloatArray | None = None
        self._forecast: FloatArray | None = None

    @property
    def output_dimensions(self) -> int:
        return self.dimensions + len(self.kinds) * int(self._sources.size)

    def step(self, vector: FloatArray) -> FloatArray:
        """`vector` with its temporal features appended (NaN where there is no history yet)."""
        if not self.kinds:
            return vector
        level = vector[self._sources]
        parts = [vector]
        nan = np.full(level.shape, np.nan)
        for kind in self.kinds:
            if kind == "delta":
                parts.append(level - self._previous if self._previous is not None else nan)
            else:
                parts.append(level - self._forecast if self._forecast is not None else nan)
        self._previous = level.copy()
        if self._forecast is None or not np.isfinite(self._forecast).all():
            # (Re)start the forecast at the level: a NaN would otherwise stick forever.
            self._forecast = level.copy()
        else:
            self._forecast = RESIDUAL_ALPHA * level + (1.0 - RESIDUAL_ALPHA) * self._forecast
        return np.concatenate(parts)

    def map_many(self, matrix: FloatArray) -> FloatArray:
        """Every row of `matrix` (windows in order) through `step`, from this map's state."""
        if not self.kinds:
            return matrix
        out = np.empty((matrix.shape[0], self.output_dimensions), dtype=np.float64)
        for index, row in enumerate(matrix):
            out[index] = self.step(row)
        return out


__all__ = ["TEMPORAL_KINDS", "TemporalKind", "TemporalMap", "temporal_names"]
