"""Tests of sensors.csv_replay: windows by data time, bad input, header errors, pacing."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config.sensors import CsvSensor
from inference.features import summarise
from sensors import CsvSource, QualityReport, Reading, SampleWindow, SourceError, open_source


def _cfg(path: Path, **overrides: Any) -> CsvSensor:
    raw: dict[str, Any] = {"name": "replay", "type": "csv", "path": path, "window": "1s"}
    raw.update(overrides)
    return CsvSensor.model_validate(raw)


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


async def _collect(cfg: CsvSensor) -> tuple[list[Reading], CsvSource]:
    source = CsvSource(cfg)
    async with source:
        readings = [reading async for reading in source.readings()]
    return readings, source


def _windows(readings: list[Reading]) -> list[SampleWindow]:
    return [r for r in readings if isinstance(r, SampleWindow)]


def _reports(readings: list[Reading]) -> list[QualityReport]:
    return [r for r in readings if isinstance(r, QualityReport)]


GOOD = """timestamp,a,b
2024-01-01T00:00:00,1.0,10
2024-01-01T00:00:00.5,-3.0,20
2024-01-01T00:00:01,2.0,30
2024-01-01T00:00:01.25,4.0,40
2024-01-01T00:00:01.75,-2.0,50
2024-01-01T00:00:04.5,7.0,60
"""


async def test_good_file_windows_and_features(tmp_path: Path) -> None:
    readings, source = await _collect(_cfg(_write(tmp_path, GOOD)))
    assert _reports(readings) == []
    windows = _windows(readings)
    assert len(windows) == 3
    first, second, third = windows
    assert first.channels == ("a", "b")
    assert first.ts == datetime(2024, 1, 1, tzinfo=UTC)
    assert first.sample_rate is None
    assert first.duration_s == 1.0
    np.testing.assert_array_equal(first.values, [[1.0, -3.0], [10.0, 20.0]])
    # The row at exactly 1s closes the first window and opens the next.
    assert second.ts == datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC)
    np.testing.assert_array_equal(second.values, [[2.0, 4.0, -2.0], [30.0, 40.0, 50.0]])
    # After a gap, the window is aligned on the grid of the first one, not at the row.
    assert third.ts == datetime(2024, 1, 1, 0, 0, 4, tzinfo=UTC)
    np.testing.assert_array_equal(third.values, [[7.0], [60.0]])
    # Each row's own time, for slopes of irregular data.
    assert first.times_s is not None and second.times_s is not None and third.times_s is not None
    np.testing.assert_allclose(first.times_s, [0.0, 0.5])
    np.testing.assert_allclose(second.times_s, [0.0, 0.25, 0.75])
    np.testing.assert_allclose(third.times_s, [0.5])

    features = summarise(second)["a"]
    assert features["n"] == 3
    assert features["mean"] == pytest.approx((2.0 + 4.0 - 2.0) / 3)
    assert features["rms"] == pytest.approx(math.sqrt((4.0 + 16.0 + 4.0) / 3))
    assert features["peak"] == 4.0
    assert features["min"] == -2.0
    assert features["max"] == 4.0

    assert source.finite
    assert source.health.state == "finished"
    assert source.health.windows == 3
    assert source.health.bad_values == 0


async def test_configured_columns_pick_and_order_channels(tmp_path: Path) -> None:
    cfg = _cfg(_write(tmp_path, GOOD), columns=["b"])
    windows = _windows((await _collect(cfg))[0])
    assert windows[0].channels == ("b",)
    np.testing.assert_array_equal(windows[0].values, [[10.0, 20.0]])


async def test_bad_values_become_nan_and_are_reported(tmp_path: Path) -> None:
    text = """timestamp,a,b
2024-01-01T00:00:00,1.0,NaN
2024-01-01T00:00:00.2,inf,2.0
2024-01-01T00:00:00.4,,oops
2024-01-01T00:00:00.6,-inf,3.0
2024-01-01T00:00:01.0,5.0,6.0
"""
    readings, source = await _collect(_cfg(_write(tmp_path, text)))
    assert [type(r) for r in readings] == [SampleWindow, QualityReport, SampleWindow]
    window = readings[0]
    assert isinstance(window, SampleWindow)
    assert np.isnan(window.values).sum() == 5
    assert window.values[0, 0] == 1.0
    assert window.values[1, 1] == 2.0
    assert window.values[1, 3] == 3.0
    report = readings[1]
    assert isinstance(report, QualityReport)
    assert report.counts == {"nan": 1, "inf": 2, "unparseable": 2}
    assert len(report.examples) == 5
    assert [issue.line for issue in report.examples] == [2, 3, 4, 4, 5]
    assert "oops" in report.examples[3].detail
    assert source.health.bad_values == 5


async def test_garbage_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    text = (
        "timestamp,a\n"
        "garbage with no delimiter at all\n"
        "2024-01-01T00:00:00,1.0\n"
        "1,2,3,4\n"
        "not-a-time,2.0\n"
        "\x00\x01\x02,\xff\n"
        "2024-01-01T00:00:00.5,3.0\n"
    )
    readings, _ = await _collect(_cfg(_write(tmp_path, text)))
    windows = _windows(readings)
    assert len(windows) == 1
    np.testing.assert_array_equal(windows[0].values, [[1.0, 3.0]])
    (report,) = _reports(readings)
    assert report.counts == {"wrong_field_count": 2, "bad_timestamp": 2}
    assert [issue.line for issue in report.examples] == [2, 4, 5, 6]


async def test_more_than_five_issues_keep_five_examples(tmp_path: Path) -> None:
    rows = "".join(f"2024-01-01T00:00:0{i},x\n" for i in range(8))
    readings, _ = await _collect(_cfg(_write(tmp_path, "timestamp,a\n" + rows), window="1m"))
    (report,) = _reports(readings)
    assert report.counts == {"unparseable": 8}
    assert len(report.examples) == 5


async def test_garbage_only_file_still_reports(tmp_path: Path) -> None:
    text = "timestamp,a\nfoo\nbar,baz\n"
    readings, _ = await _collect(_cfg(_write(tmp_path, text)))
    assert _windows(readings) == []
    (report,) = readings
    assert isinstance(report, QualityReport)
    assert report.counts == {"wrong_field_count": 1, "bad_timestamp": 1}


@pytest.mark.parametrize("text", ["", "timestamp,a,b\n", "timestamp,a,b", "\n\n"])
async def test_empty_or_header_only_file(tmp_path: Path, text: str) -> None:
    readings, source = await _collect(_cfg(_write(tmp_path, text)))
    (report,) = readings
    assert isinstance(report, QualityReport)
    assert report.counts == {"empty_file": 1}
    assert source.health.state == "finished"


async def test_bad_rows_of_a_window_are_reported_after_it(tmp_path: Path) -> None:
    text = """timestamp,a
2024-01-01T00:00:00,1.0
2024-01-01T00:00:00.5,nan
2024-01-01T00:00:01,2.0
2024-01-01T00:00:02,3.0
2024-01-01T00:00:02.5,bad
"""
    readings, _ = await _collect(_cfg(_write(tmp_path, text)))
    kinds = [type(r).__name__ for r in readings]
    assert kinds == [
        "SampleWindow",
        "QualityReport",
        "SampleWindow",
        "SampleWindow",
        "QualityReport",
    ]
    first_report, trailing_report = _reports(readings)
    assert first_report.counts == {"nan": 1}
    assert trailing_report.counts == {"unparseable": 1}
    assert trailing_report.examples[0].line == 6


async def test_wrong_delimiter_is_a_clear_permanent_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp;a;b\n2024-01-01T00:00:00;1;2\n")
    with pytest.raises(SourceError) as caught:
        await _collect(_cfg(path))
    assert not caught.value.retryable
    message = str(caught.value)
    assert "is the delimiter ';'?" in message
    assert "timestamp;a;b" in message


async def test_semicolon_file_reads_with_its_delimiter(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp;a;b\n2024-01-01T00:00:00;1;2\n")
    windows = _windows((await _collect(_cfg(path, delimiter=";")))[0])
    np.testing.assert_array_equal(windows[0].values, [[1.0], [2.0]])


async def test_missing_timestamp_column_names_the_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, "time,a\n2024-01-01T00:00:00,1\n")
    with pytest.raises(SourceError) as caught:
        await _collect(_cfg(path))
    assert not caught.value.retryable
    assert "['time', 'a']" in str(caught.value)
    assert "delimiter" not in str(caught.value)


async def test_missing_configured_column_is_permanent(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    with pytest.raises(SourceError) as caught:
        await _collect(_cfg(path, columns=["a", "speed", "torque"]))
    assert not caught.value.retryable
    assert "['speed', 'torque']" in str(caught.value)


async def test_missing_file_is_retryable(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"
    source = open_source(_cfg(path))
    with pytest.raises(SourceError) as caught:
        async with source:
            async for _ in source.readings():
                pass
    assert caught.value.retryable
    assert f"cannot open {path}: No such file or directory" in str(caught.value)
    assert source.health.state == "failed"


async def test_directory_instead_of_file_is_retryable(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as caught:
        await _collect(_cfg(tmp_path))
    assert caught.value.retryable
    assert "cannot open" in str(caught.value)


@pytest.mark.parametrize(
    ("fmt", "scale"), [("epoch_s", 1.0), ("epoch_ms", 1000.0)], ids=["epoch_s", "epoch_ms"]
)
async def test_epoch_timestamps(tmp_path: Path, fmt: str, scale: float) -> None:
    base = 1_700_000_000.0
    lines = [f"{(base + t) * scale:.3f},{v}" for t, v in [(0, 1), (0.5, 2), (1.0, 3), (2.25, 4)]]
    path = _write(tmp_path, "ts,v\n" + "\n".join(lines) + "\n")
    cfg = _cfg(path, timestamp_column="ts", timestamp_format=fmt)
    readings, _ = await _collect(cfg)
    assert _reports(readings) == []
    windows = _windows(readings)
    assert [w.ts.timestamp() for w in windows] == [base, base + 1, base + 2]
    assert [w.values.tolist() for w in windows] == [[[1.0, 2.0]], [[3.0]], [[4.0]]]


async def test_iso_timestamps_with_offsets_are_utc(tmp_path: Path) -> None:
    text = "timestamp,a\n2024-01-01T02:00:00+02:00,1\n2024-01-01T00:00:00.5Z,2\n"
    windows = _windows((await _collect(_cfg(_write(tmp_path, text))))[0])
    assert len(windows) == 1
    assert windows[0].ts == datetime(2024, 1, 1, tzinfo=UTC)


async def test_out_of_order_rows_stay_in_the_window(tmp_path: Path) -> None:
    text = """timestamp,a
2024-01-01T00:00:00.0,1
2024-01-01T00:00:00.6,2
2024-01-01T00:00:00.3,3
2024-01-01T00:00:00.8,4
2024-01-01T00:00:01.1,5
"""
    readings, _ = await _collect(_cfg(_write(tmp_path, text)))
    windows = _windows(readings)
    np.testing.assert_array_equal(windows[0].values, [[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(windows[1].values, [[5.0]])
    (report,) = _reports(readings)
    assert report.counts == {"out_of_order": 1}
    assert report.examples[0].line == 4


async def test_large_file_is_read_in_batches(tmp_path: Path) -> None:
    rows = "".join(f"{i / 100:.2f},{i}\n" for i in range(10_000))
    path = _write(tmp_path, "timestamp,a\n" + rows)
    cfg = _cfg(path, timestamp_format="epoch_s")
    readings, source = await _collect(cfg)
    windows = _windows(readings)
    assert len(windows) == 100
    assert all(w.values.shape == (1, 100) for w in windows)
    assert np.concatenate([w.values[0] for w in windows]).tolist() == list(range(10_000))
    assert source.health.windows == 100


async def test_original_pace_yields_windows(tmp_path: Path) -> None:
    rows = "".join(f"{i * 0.01:.2f},{i}\n" for i in range(12))
    path = _write(tmp_path, "timestamp,a\n" + rows)
    cfg = _cfg(path, timestamp_format="epoch_s", window="50ms", pace="original")
    windows = _windows((await _collect(cfg))[0])
    assert [w.values.shape[1] for w in windows] == [5, 5, 2]
    # Paced by data time: the last window cannot come out before its data end (100ms) is due.
    assert windows[-1].mono_ns - windows[0].mono_ns >= 50_000_000


async def test_a_recorded_accelerometer_with_its_sample_rate_gets_vibration_features(
    tmp_path: Path,
) -> None:
    """A regularly sampled recording (the CWRU bearing files are at 48 kHz) replays with the
    features a live vibration source would get: kurtosis, crest, the octave bands."""
    rate = 2000.0
    t = np.arange(4000) / rate
    signal = np.sin(2 * np.pi * 100.0 * t)
    lines = ["timestamp,accel"] + [
        f"{1.7e9 + ti:.6f},{v:.6f}" for ti, v in zip(t, signal, strict=True)
    ]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    cfg = _cfg(path, timestamp_format="epoch_s", sample_rate=rate, window="0.5s")
    readings, _ = await _collect(cfg)
    window = _windows(readings)[0]
    assert window.sample_rate == rate
    features = summarise(window, settings=cfg.features)["accel"]
    assert features["kurtosis"] == pytest.approx(1.5, abs=0.01)  # a sine
    assert "band_62p5_125" in features
    assert features["band_62p5_125"] == pytest.approx(0.5, rel=0.02)  # all of the sine's power
    without = _windows((await _collect(_cfg(path, timestamp_format="epoch_s", window="0.5s")))[0])[
        0
    ]
    assert "kurtosis" not in summarise(without, settings=cfg.features)["accel"]
