"""bench.anomaly_quality: its scoring functions on intervals with known answers, the synthetic pump
testbed's physics and labels, the public datasets as aeon ships them, and a --quick run end to
end through `appliance replay` that prints one JSON object with the metrics and its checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.anomaly_quality import (
    FIT_SAMPLES,
    PUMP_CHANNELS,
    Alarm,
    Confusion,
    DatasetError,
    Delays,
    aeon_data_dir,
    alarms_from_events,
    confusion,
    daphnet_s06r02e0,
    detection_delays,
    false_alarms,
    kdd_tsad_135,
    predicted,
    pump_run,
    segments,
)
from tests.helpers import component_missing

ROOT = Path(__file__).resolve().parents[1]


def mask(text: str) -> np.ndarray:
    """'0011' -> [False, False, True, True]: labels and predictions written as they read."""
    return np.array([c == "1" for c in text], dtype=np.bool_)


# ----------------------------------------------------------------------------------- metrics


def test_alarms_run_from_started_to_ended_and_an_open_one_to_the_end() -> None:
    events = [
        ("started", 10.0),
        ("escalated", 12.0),
        ("ended", 20.0),
        ("ended", 21.0),  # a stray end with nothing open changes nothing
        ("started", 30.0),
    ]
    assert alarms_from_events(events, window_s=2.0, data_end_s=50.0) == [
        Alarm(start_s=10.0, end_s=20.0, raised_s=12.0),
        Alarm(start_s=30.0, end_s=50.0, raised_s=32.0),
    ]
    # A second start while one is open closes the first there.
    assert alarms_from_events(
        [("started", 1.0), ("started", 4.0), ("ended", 6.0)], window_s=1.0, data_end_s=9.0
    ) == [Alarm(1.0, 4.0, 2.0), Alarm(4.0, 6.0, 5.0)]
    assert alarms_from_events([], window_s=1.0, data_end_s=9.0) == []


def test_a_sample_is_predicted_from_the_alarm_start_up_to_but_not_at_its_end() -> None:
    times = np.arange(10, dtype=np.float64)
    alarms = [Alarm(2.0, 5.0, 3.0), Alarm(8.0, 10.0, 9.0)]
    assert predicted(times, alarms).tolist() == mask("0011100011").tolist()
    assert not predicted(times, []).any()


def test_segments_are_the_runs_of_labelled_samples() -> None:
    assert segments(mask("0110001111")) == [(1, 3), (6, 10)]
    assert segments(mask("1")) == [(0, 1)]
    assert segments(mask("000")) == []


def test_confusion_counts_and_rates_on_known_samples() -> None:
    counts = confusion(mask("0011110000"), mask("0111000011"))
    assert counts == Confusion(tp=2, fp=3, tn=3, fn=2)
    assert counts.precision == pytest.approx(2 / 5)
    assert counts.recall == pytest.approx(2 / 4)
    assert counts.f1 == pytest.approx(2 * 2 / (2 * 2 + 3 + 2))
    assert counts.far == pytest.approx(3 / 6)
    assert counts.mar == pytest.approx(2 / 4)
    assert counts.to_dict()["f1"] == 0.4444
    # Summing runs sums their counts, so the aggregate is SKAB's (not a mean of ratios).
    assert counts + Confusion(tp=1, tn=4) == Confusion(tp=3, fp=3, tn=7, fn=2)
    with pytest.raises(ValueError, match="4 labels but 3 predictions"):
        confusion(mask("0101"), mask("010"))


def test_rates_without_a_denominator_are_none_not_zero() -> None:
    normal_only = confusion(mask("000000"), mask("001100"))
    assert normal_only.far == pytest.approx(2 / 6)
    assert normal_only.recall is None and normal_only.f1 is None and normal_only.mar is None
    assert normal_only.precision == 0.0
    silent = confusion(mask("0110"), mask("0000"))
    assert silent.precision is None  # nothing raised
    assert silent.f1 == 0.0 and silent.recall == 0.0 and silent.mar == 1.0
    assert silent.far == 0.0


def test_detection_delay_is_from_the_segment_start_to_the_first_alarm_raised_in_it() -> None:
    times = np.arange(20, dtype=np.float64)
    labels = mask("00011111000000111100")  # segments [3, 8) and [14, 18)
    # First alarm: on from 2 but raised at 5, inside the first segment (delay 2). Second: raised
    # at 12 before the second segment and still on through it: that is not a detection of it.
    alarms = [Alarm(2.0, 9.0, 5.0), Alarm(11.0, 19.0, 12.0)]
    assert detection_delays(times, labels, alarms, period_s=1.0) == Delays((2.0,), missed=1)
    # Raised in the last sample's period still counts (the segment ends at 18, inclusive).
    late = [Alarm(3.0, 9.0, 8.0), Alarm(17.0, 19.0, 18.0)]
    assert detection_delays(times, labels, late, period_s=1.0) == Delays((5.0, 4.0), 0)
    summary = (Delays((2.0,), 1) + Delays((4.0, 9.0), 0)).to_dict()
    assert summary == {
        "segments": 4,
        "detected": 3,
        "missed": 1,
        "delay_s_mean": 5.0,
        "delay_s_median": 4.0,
        "delay_s_max": 9.0,
    }
    assert Delays((), 2).to_dict()["delay_s_mean"] is None


def test_false_alarms_are_alarms_that_cover_no_labelled_sample() -> None:
    times = np.arange(12, dtype=np.float64)
    labels = mask("000111000000")
    alarms = [Alarm(0.0, 2.0, 1.0), Alarm(2.0, 4.0, 3.0), Alarm(8.0, 12.0, 9.0)]
    assert false_alarms(times, labels, alarms) == 2


# --------------------------------------------------------------------------------- the data


def test_the_synthetic_pump_runs_are_repeatable_and_labelled_as_designed() -> None:
    first, again = pump_run(0), pump_run(0)
    assert np.array_equal(first.values, again.values)
    assert first.channels == PUMP_CHANNELS and first.values.shape == (1200, 8)
    assert first.rate_hz == 1.0 and first.fit_samples == FIT_SAMPLES
    for index in range(8):
        run = pump_run(index)
        ((start, stop),) = segments(run.labels)
        assert start == run.info["fault_start_s"] >= 480 and stop == run.info["fault_end_s"]
        assert run.samples - stop >= 100  # healthy running after the fault
        assert np.isfinite(run.values).all()
    assert not np.array_equal(pump_run(1).values, first.values)


@pytest.mark.parametrize(
    ("index", "rises", "falls"),
    [
        (0, ["Pressure"], ["VolumeFlowRateRMS", "Current"]),  # valve closure
        (1, ["Accelerometer1RMS", "Accelerometer2RMS"], ["VolumeFlowRateRMS"]),  # cavitation
        (2, ["VolumeFlowRateRMS", "Current"], ["Pressure"]),  # leak
        (3, ["Accelerometer1RMS"], []),  # rotor imbalance
    ],
)
def test_each_fault_moves_the_channels_its_physics_says(
    index: int, rises: list[str], falls: list[str]
) -> None:
    run = pump_run(index)
    healthy = run.values[:FIT_SAMPLES].mean(axis=0)
    spread = run.values[:FIT_SAMPLES].std(axis=0)
    faulty = run.values[run.labels].mean(axis=0)
    shift = {name: (faulty[i] - healthy[i]) / spread[i] for i, name in enumerate(run.channels)}
    for name in rises:
        assert shift[name] > 2, (run.info, shift)
    for name in falls:
        assert shift[name] < -1, (run.info, shift)
    assert abs(shift["Voltage"]) < 1.5  # mains voltage barely notices the pump


def aeon_folder() -> Path:
    folder = aeon_data_dir()
    if folder is None:
        component_missing("the aeon wheel (its bundled anomaly datasets)")
    return folder


def test_kdd_tsad_135_is_fitted_on_its_train_split_with_aeons_labels() -> None:
    series = kdd_tsad_135(aeon_folder())
    assert series.samples == 7501 and series.channels == ("value",)
    assert series.fit_samples == 1200
    assert segments(series.labels) == [(4187, 4199)]


def test_daphnet_is_64_hz_nine_channels_and_has_no_labelled_sample() -> None:
    series = daphnet_s06r02e0(aeon_folder())
    assert series.rate_hz == 64.0 and len(series.channels) == 9
    assert series.samples == 7040 and not series.labels.any()


def test_a_malformed_dataset_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        kdd_tsad_135(tmp_path)
    folder = tmp_path / "Daphnet_S06R02E0"
    folder.mkdir()
    bad = folder / "S06R02E0.csv"
    bad.write_text("timestamp,a,is_anomaly\n1970-01-01 00:00:00.000,1,0\n1970-01-01,2\n")
    with pytest.raises(DatasetError, match="line 3: 2 fields, the header has 3"):
        daphnet_s06r02e0(tmp_path)
    bad.write_text("timestamp,a,is_anomaly\nyesterday,1,0\ntoday,2,0\n")
    with pytest.raises(DatasetError, match="not ISO 8601"):
        daphnet_s06r02e0(tmp_path)
    bad.write_text("timestamp,a,is_anomaly\n1970-01-01 00:00:00,1,0\n1970-01-01 00:00:01,x,0\n")
    with pytest.raises(DatasetError, match="column 'a' is not numeric"):
        daphnet_s06r02e0(tmp_path)


# ------------------------------------------------------------------------------- end to end


def run_bench(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.anomaly_quality", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_quick_run_replays_scores_and_prints_one_json_object(tmp_path: Path) -> None:
    done = run_bench("--quick", f"--tmp-dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["benchmark"] == "anomaly_quality" and result["quick"] is True
    assert result["checks"] == {
        "one_baseline_per_source_fitted_on_the_fit_part": True,
        "every_later_window_scored_with_it": True,
    }
    assert result["ok"] is True
    pump = result["datasets"]["synthetic_pump"]
    assert pump["synthetic"] is True and list(pump["series"]) == ["pump-01"]
    hotelling = pump["results"]["defaults"]["hotelling"]
    total = hotelling["aggregate"]
    for key in ("precision", "recall", "f1", "far", "mar", "delay_s_mean", "missed"):
        assert key in total
    assert total["tp"] + total["fp"] + total["tn"] + total["fn"] == 1200 - FIT_SAMPLES
    assert total["segments"] == 1
    # The fault is big enough that any working replay raises an alarm during it.
    assert total["tp"] > 0 and total["detected"] == 1
    assert hotelling["runs"]["pump-01"]["f1"] == total["f1"]
    verdict = result["pass"]["defaults"]["hotelling"]
    assert verdict["f1"] == total["f1"] and verdict["far"] == total["far"]
    assert verdict["pass"] == (total["f1"] >= 0.80 and total["far"] <= 0.15)
    assert result["targets"]["f1_min"] == 0.80 and result["targets"]["far_max"] == 0.15
    assert result["settings"]["profiles"]["defaults"]["hotelling"]["margin"] == 1.5
    assert "synthetic_pump (SYNTHETIC)" in done.stderr
    assert list(tmp_path.iterdir()) == []  # the data dir is removed


def test_a_window_that_cannot_split_the_fitting_part_is_refused() -> None:
    done = run_bench("--quick", "--window", "3", timeout=60)
    assert done.returncode == 2
    assert "--window must be at least 2 samples, divide 400" in done.stderr
    assert done.stdout == ""
