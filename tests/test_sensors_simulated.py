"""Tests of sensors.simulated: signals, injected faults, windows, pacing and health."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pytest

from config.sensors import SimulatedSensor
from inference.features import summarise
from sensors import QualityReport, Reading, SampleWindow, SimulatedSource, open_source


def _cfg(**overrides: Any) -> SimulatedSensor:
    raw: dict[str, Any] = {
        "name": "gearbox",
        "type": "simulated",
        "sample_rate": 2000,
        "window": "1s",
        "pace": "fast",
        "duration": "6s",
        "seed": 7,
        "channels": [
            {"name": "vib", "signal": "vibration", "amplitude": 0.5, "frequency": 24.5},
            {"name": "temp", "signal": "temperature", "base": 60.0, "amplitude": 1.5},
        ],
    }
    raw.update(overrides)
    return SimulatedSensor.model_validate(raw)


async def _collect(cfg: SimulatedSensor) -> tuple[list[Reading], SimulatedSource]:
    source = SimulatedSource(cfg)
    async with source:
        readings = [reading async for reading in source.readings()]
    return readings, source


def _windows(readings: list[Reading]) -> list[SampleWindow]:
    return [r for r in readings if isinstance(r, SampleWindow)]


def _feature(window: SampleWindow, channel: str, feature: str) -> float:
    value = summarise(window)[channel][feature]
    assert isinstance(value, float)
    return value


async def test_finite_duration_window_count_and_shape() -> None:
    readings, source = await _collect(_cfg(duration="2.5s", window="500ms"))
    windows = _windows(readings)
    assert len(windows) == 5
    assert all(w.values.shape == (2, 1000) for w in windows)
    assert windows[0].channels == ("vib", "temp")
    assert windows[0].sample_rate == 2000
    assert windows[0].duration_s == 0.5
    assert (windows[1].ts - windows[0].ts).total_seconds() == pytest.approx(0.5)
    assert [w.mono_ns for w in windows] == sorted(w.mono_ns for w in windows)
    assert source.finite
    assert source.health.state == "finished"
    assert source.health.windows == 5
    assert source.health.last_reading_mono_ns == windows[-1].mono_ns


async def test_duration_not_a_multiple_gives_a_last_full_window() -> None:
    windows = _windows((await _collect(_cfg(duration="2.2s")))[0])
    assert len(windows) == 3
    assert windows[-1].values.shape == (2, 2000)


async def test_signal_is_continuous_across_windows() -> None:
    cfg = _cfg(
        duration="2s",
        channels=[{"name": "vib", "signal": "vibration", "frequency": 3.3, "noise": 0.0}],
    )
    windows = _windows((await _collect(cfg))[0])
    joined = np.concatenate([w.values[0] for w in windows])
    t = np.arange(joined.size) / 2000
    w = 2 * np.pi * 3.3 * t
    np.testing.assert_allclose(joined, np.sin(w) + 0.3 * np.sin(2 * w), atol=1e-9)


async def test_seed_makes_signals_repeatable() -> None:
    first = _windows((await _collect(_cfg()))[0])
    second = _windows((await _collect(_cfg()))[0])
    other = _windows((await _collect(_cfg(seed=8)))[0])
    np.testing.assert_array_equal(first[3].values, second[3].values)
    assert not np.array_equal(first[3].values, other[3].values)


async def test_healthy_temperature_stays_near_base() -> None:
    windows = _windows((await _collect(_cfg()))[0])
    for window in windows:
        assert _feature(window, "temp", "mean") == pytest.approx(60.0, abs=0.1)
        assert _feature(window, "vib", "rms") == pytest.approx(0.5 * np.sqrt(1.09 / 2), rel=0.05)


async def test_imbalance_raises_rms() -> None:
    fault = {"kind": "imbalance", "channel": "vib", "start": "3s", "magnitude": 1.0}
    windows = _windows((await _collect(_cfg(faults=[fault])))[0])
    healthy = _feature(windows[1], "vib", "rms")
    faulty = _feature(windows[4], "vib", "rms")
    assert faulty > 2 * healthy


async def test_bearing_raises_peak_and_crest() -> None:
    fault = {"kind": "bearing", "channel": "vib", "start": "2s", "duration": "2s", "magnitude": 3.0}
    windows = _windows((await _collect(_cfg(faults=[fault])))[0])

    def crest(window: SampleWindow) -> float:
        return _feature(window, "vib", "peak") / _feature(window, "vib", "rms")

    assert _feature(windows[1], "vib", "peak") < 1.0
    assert _feature(windows[2], "vib", "peak") > 2.5
    assert _feature(windows[3], "vib", "peak") > 2.5
    assert crest(windows[2]) > 1.5 * crest(windows[1])
    assert _feature(windows[5], "vib", "peak") < 1.0  # gone once the fault's duration is over


async def test_drift_raises_mean_over_windows() -> None:
    fault = {"kind": "drift", "channel": "temp", "start": "1s", "magnitude": 60.0}
    windows = _windows((await _collect(_cfg(faults=[fault])))[0])
    means = [_feature(w, "temp", "mean") for w in windows]
    assert means[0] == pytest.approx(60.0, abs=0.1)
    assert all(later > earlier + 0.5 for earlier, later in pairwise(means[1:]))
    assert means[-1] == pytest.approx(60.0 + 4.5, abs=0.1)


async def test_stuck_freezes_the_channel() -> None:
    fault = {"kind": "stuck", "channel": "vib", "start": "2.5s"}
    windows = _windows((await _collect(_cfg(faults=[fault])))[0])
    assert _feature(windows[1], "vib", "min") < _feature(windows[1], "vib", "max")
    frozen = windows[2].values[0, 1000]
    for window in windows[3:]:
        assert _feature(window, "vib", "min") == _feature(window, "vib", "max")
        assert _feature(window, "vib", "max") == pytest.approx(frozen, rel=1e-6)
    assert np.all(windows[2].values[0, 1000:] == frozen)
    assert np.unique(windows[2].values[0, :1000]).size == 1000
    assert _feature(windows[3], "temp", "min") < _feature(windows[3], "temp", "max")


async def test_dropout_yields_nans_and_quality_reports() -> None:
    fault = {
        "kind": "dropout",
        "channel": "vib",
        "start": "2s",
        "duration": "2s",
        "magnitude": 0.25,
    }
    readings, source = await _collect(_cfg(faults=[fault]))
    windows = _windows(readings)
    reports = [r for r in readings if isinstance(r, QualityReport)]
    assert len(reports) == 2
    for index in (2, 3):
        window = windows[index]
        missing = int(np.isnan(window.values[0]).sum())
        assert 300 < missing < 700
        assert not np.isnan(window.values[1]).any()
        position = next(i for i, r in enumerate(readings) if r is window)
        report = readings[position + 1]
        assert isinstance(report, QualityReport)
        assert report.counts == {"missing": missing}
        assert report.source == "gearbox"
    assert not any(np.isnan(w.values).any() for w in windows[:2] + windows[4:])
    assert source.health.bad_values == sum(r.counts["missing"] for r in reports)


async def test_realtime_pace_yields_windows() -> None:
    cfg = _cfg(pace="realtime", window="50ms", duration="150ms", sample_rate=1000)
    source = open_source(cfg)
    async with source:
        windows = _windows([r async for r in source.readings()])
    assert len(windows) == 3
    assert all(w.values.shape == (2, 50) for w in windows)
    # Realtime pacing means the windows are spread out in time, not produced in one burst.
    assert windows[-1].mono_ns - windows[0].mono_ns >= 50_000_000


async def test_endless_source_keeps_going() -> None:
    source = open_source(_cfg(duration=None, window="10ms"))
    assert not source.finite
    count = 0
    async with source:
        async for reading in source.readings():
            assert isinstance(reading, SampleWindow)
            count += 1
            if count == 50:
                break
    assert source.health.windows == 50
    assert source.health.state == "finished"


async def test_error_in_consumer_marks_failed() -> None:
    source = SimulatedSource(_cfg())
    with pytest.raises(RuntimeError):
        async with source:
            async for _ in source.readings():
                raise RuntimeError("consumer broke")
    assert source.health.state == "failed"
    assert source.health.error == "consumer broke"
