"""Tests of inference.features: window features against hand-computed values."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from inference.features import FEATURES, summarise
from sensors.base import SampleWindow


def _window(channels: tuple[str, ...], values: list[list[float]]) -> SampleWindow:
    return SampleWindow(
        source="test",
        channels=channels,
        values=np.array(values, dtype=np.float64).reshape(len(channels), -1),
        ts=datetime(2024, 1, 1, tzinfo=UTC),
        mono_ns=0,
        duration_s=1.0,
        sample_rate=None,
    )


def test_known_values() -> None:
    summary = summarise(_window(("a", "b"), [[3.0, -4.0], [1.0, 1.0]]))
    assert summary["a"] == {
        "n": 2,
        "rms": pytest.approx(math.sqrt(12.5)),
        "peak": 4.0,
        "mean": pytest.approx(-0.5),
        "min": -4.0,
        "max": 3.0,
    }
    assert summary["b"] == {"n": 2, "rms": 1.0, "peak": 1.0, "mean": 1.0, "min": 1.0, "max": 1.0}
    assert list(summary) == ["a", "b"]
    assert set(summary["a"]) == {"n", *FEATURES}


def test_non_finite_samples_are_left_out() -> None:
    summary = summarise(_window(("a",), [[2.0, math.nan, math.inf, -math.inf, -1.0]]))
    assert summary["a"]["n"] == 2
    assert summary["a"]["mean"] == pytest.approx(0.5)
    assert summary["a"]["rms"] == pytest.approx(math.sqrt(2.5))
    assert summary["a"]["peak"] == 2.0
    assert summary["a"]["min"] == -1.0
    assert summary["a"]["max"] == 2.0


def test_all_nan_channel_gives_none_without_warnings() -> None:
    # filterwarnings=error turns any numpy RuntimeWarning into a failure here.
    summary = summarise(_window(("dead", "live"), [[math.nan, math.nan], [1.0, -3.0]]))
    assert summary["dead"] == {"n": 0, **dict.fromkeys(FEATURES)}
    assert summary["live"]["peak"] == 3.0


def test_empty_window() -> None:
    window = SampleWindow(
        source="test",
        channels=("a",),
        values=np.empty((1, 0)),
        ts=datetime(2024, 1, 1, tzinfo=UTC),
        mono_ns=0,
        duration_s=1.0,
        sample_rate=None,
    )
    assert summarise(window) == {"a": {"n": 0, **dict.fromkeys(FEATURES)}}


def test_huge_values_do_not_overflow() -> None:
    summary = summarise(_window(("a",), [[1e300, -1e300, 1e300]]))
    assert summary["a"]["rms"] == pytest.approx(1e300)
    assert summary["a"]["mean"] == pytest.approx(1e300 / 3)


def test_matches_numpy_on_random_data() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(2.0, 5.0, size=(3, 1000))
    summary = summarise(_window(("x", "y", "z"), values.tolist()))
    for i, name in enumerate(("x", "y", "z")):
        row = values[i]
        assert summary[name]["rms"] == pytest.approx(float(np.sqrt(np.mean(row**2))))
        assert summary[name]["mean"] == pytest.approx(float(row.mean()))
        assert summary[name]["peak"] == pytest.approx(float(np.abs(row).max()))
        # Rounded to 7 significant digits (SIGNIFICANT_DIGITS), like every feature.
        assert summary[name]["min"] == float(f"{row.min():.7g}")
        assert summary[name]["max"] == float(f"{row.max():.7g}")
