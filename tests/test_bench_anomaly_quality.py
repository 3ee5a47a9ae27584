"""bench.anomaly_quality: its scoring functions on intervals with known answers, the synthetic pump
testbed's physics and labels, the public datasets as aeon ships them, settings profiles, and a
--quick run end to end through `appliance replay` that prints one JSON object with the metrics and
its checks (and says which data sets it could not find). The development sets' loaders and a
replay of them are in test_anomaly_datasets.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.anomaly_datasets import (
    DATASETS_ENV,
    DatasetError,
    Fault,
    Group,
    Series,
    aeon_data_dir,
    daphnet_s06r02e0,
    kdd_tsad_135,
    segments,
)
from bench.anomaly_quality import (
    FIT_SAMPLES,
    METHODS,
    PROFILES,
    PUMP_CHANNELS,
    Alarm,
    Confusion,
    Delays,
    Evaluation,
    Outcome,
    Source,
    aggregate,
    alarms_from_events,
    confusion,
    false_alarms,
    method_result,
    outcomes,
    predicted,
    pump_run,
    raised_outside,
    replay_config,
)
from config.analysis import AnomalySettings
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


def faults_of(labels: np.ndarray) -> list[Fault]:
    return [Fault(f"segment {i + 1}", a, b) for i, (a, b) in enumerate(segments(labels))]


def test_detection_delay_is_from_the_fault_start_to_the_first_alarm_raised_in_it() -> None:
    times = np.arange(20, dtype=np.float64)
    labels = mask("00011111000000111100")  # faults [3, 8) and [14, 18)
    everything = np.ones(20, dtype=np.bool_)

    def judge(alarms: list[Alarm]) -> list[Outcome]:
        return outcomes(
            faults_of(labels),
            times,
            alarms,
            period_s=1.0,
            predicted_mask=predicted(times, alarms),
            counted=everything,
        )

    # First alarm: on from 2 but raised at 5, inside the first fault (delay 2). Second: raised
    # at 12 before the second fault and still on through it: that is not a detection of it.
    found = judge([Alarm(2.0, 9.0, 5.0), Alarm(11.0, 19.0, 12.0)])
    assert [(o.detected, o.delay_s) for o in found] == [(True, 2.0), (False, None)]
    assert [o.recall for o in found] == [1.0, 1.0]  # covered, detected or not
    assert Delays.of(found) == Delays((2.0,), missed=1)
    # Raised in the last sample's period still counts (the fault ends at 18, inclusive).
    late = judge([Alarm(3.0, 9.0, 8.0), Alarm(17.0, 19.0, 18.0)])
    assert Delays.of(late) == Delays((5.0, 4.0), 0)
    assert late[1].recall == pytest.approx(1 / 4)
    summary = (Delays((2.0,), 1) + Delays((4.0, 9.0), 0)).to_dict()
    assert summary == {
        "faults": 4,
        "detected": 3,
        "missed": 1,
        "delay_s_mean": 5.0,
        "delay_s_median": 4.0,
        "delay_s_max": 9.0,
    }
    assert Delays((), 2).to_dict()["delay_s_mean"] is None


def test_a_fault_without_an_onset_is_detected_by_any_alarm_covering_it() -> None:
    # Two faults back to back (CWRU's files): an alarm raised in the first and still on through
    # the second detects both; the second has no delay, and its uncounted samples are no recall.
    times = np.arange(10, dtype=np.float64)
    faults = [Fault("a", 2, 5), Fault("b", 5, 8, onset=False)]
    alarms = [Alarm(3.0, 7.0, 4.0)]
    counted = mask("1111110111")
    found = outcomes(
        faults,
        times,
        alarms,
        period_s=1.0,
        predicted_mask=predicted(times, alarms),
        counted=counted,
    )
    assert [(o.detected, o.delay_s) for o in found] == [(True, 2.0), (True, None)]
    assert found[1].recall == pytest.approx(1 / 2)  # samples 5 and 7 counted, 5 covered
    assert Delays.of(found) == Delays((2.0,), missed=0, undelayed=1)
    assert Delays.of(found).to_dict()["detected"] == 2
    quiet = outcomes(
        faults,
        times,
        [Alarm(8.0, 10.0, 9.0)],
        period_s=1.0,
        predicted_mask=predicted(times, [Alarm(8.0, 10.0, 9.0)]),
        counted=counted,
    )
    assert [o.detected for o in quiet] == [False, False]


def test_alarms_raised_outside_every_fault_are_nabs_false_positives() -> None:
    times = np.arange(20, dtype=np.float64)
    faults = [Fault("w1", 5, 10), Fault("w2", 15, 18)]
    alarms = [
        Alarm(1.0, 7.0, 2.0),  # raised before w1 and lasting into it: a false positive
        Alarm(6.0, 8.0, 7.0),  # a hit
        Alarm(9.0, 12.0, 10.0),  # raised in w1's last sample period: inside
        Alarm(12.0, 13.0, 13.0),  # between the windows
        Alarm(17.0, 19.0, 18.0),  # in w2's last sample period
    ]
    assert raised_outside(faults, times, alarms, period_s=1.0) == 2


def test_false_alarms_are_alarms_that_cover_no_labelled_sample() -> None:
    times = np.arange(12, dtype=np.float64)
    labels = mask("000111000000")
    alarms = [Alarm(0.0, 2.0, 1.0), Alarm(2.0, 4.0, 3.0), Alarm(8.0, 12.0, 9.0)]
    assert false_alarms(times, labels, alarms) == 2


def evaluation(counts: Confusion, found: list[tuple[Fault, bool]], outside: int = 0) -> Evaluation:
    return Evaluation(
        counts=counts,
        faults=tuple(Outcome(f, hit, 1.0 if hit else None, None) for f, hit in found),
        alarms=sum(1 for _, hit in found if hit) + outside,
        false_alarms=outside,
        raised_outside=outside,
    )


def test_a_sets_aggregate_sums_its_averaged_groups_and_reports_the_rest_apart() -> None:
    def run(name: str, group: Group) -> Series:
        return Series(name, "tep", ("a",), np.zeros((4, 1)), mask("0011"), 1.0, 2, group=group)

    members = [run("d00", "normal"), run("d01", "detectable"), run("d03", "undetectable")]
    normal = evaluation(Confusion(fp=2, tn=8), [], outside=1)
    scored = {
        "d00": normal,
        "d01": evaluation(Confusion(tp=5, fn=5), [(Fault("IDV 1", 2, 4), True)]),
        "d03": evaluation(Confusion(fn=10), [(Fault("IDV 3", 2, 4, "undetectable"), False)]),
    }
    result = method_result(members, scored)
    total = result["aggregate"]
    assert (total["runs"], total["tp"], total["fp"], total["tn"], total["fn"]) == (2, 5, 2, 8, 5)
    assert total["by_event"] == {
        "hits": 1,
        "missed": 0,
        "false_positives": 1,
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3, abs=1e-4),
    }
    assert list(result["groups"]) == ["undetectable"]
    assert result["groups"]["undetectable"]["missed"] == 1
    # The undetectable fault's miss does not count against the detectable ones.
    assert result["detectable_all_detected"] is True
    assert [(f["series"], f["group"], f["detected"]) for f in result["faults"]] == [
        ("d01", "detectable", True),
        ("d03", "undetectable", False),
    ]
    normal_only = method_result(members[:1], {"d00": normal})
    assert normal_only["detectable_all_detected"] is None
    assert aggregate([normal])["f1"] is None and aggregate([normal])["far"] == 0.2


def test_the_defaults_profile_sets_nothing_and_another_profile_needs_no_other_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert PROFILES["defaults"] == {m: {} for m in METHODS}
    assert PROFILES["temporal"] == {m: {"temporal": ["delta", "residual"]} for m in METHODS}
    monkeypatch.setitem(PROFILES, "wide", {m: {"margin": 2.0} for m in METHODS})
    series = pump_run(0)
    sources = [Source(series, m, p) for m in METHODS for p in PROFILES]
    path = replay_config(
        tmp_path / "c.yaml", tmp_path, sources, {series.name: tmp_path / "x.csv"}, 5
    )
    sensors = yaml.safe_load(path.read_text())["sensors"]
    assert len(sensors) == 15
    extra = {"wide": ["margin"], "temporal": ["temporal"], "defaults": []}
    for sensor in sensors:
        settings = AnomalySettings.model_validate(sensor["anomaly"])
        profile = sensor["name"].rpartition(".")[2]
        assert sensor["anomaly"].keys() == {"method", "baseline", *extra[profile]}
        wide = profile == "wide"
        assert settings.margin == (2.0 if wide else AnomalySettings.model_fields["margin"].default)
        assert sensor["anomaly"]["baseline"] == pytest.approx((80 - 1.5) * 5)
        assert sensor["sample_rate"] == series.rate_hz


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


def run_bench(
    *args: str, timeout: float = 100, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.anomaly_quality", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_a_quick_run_replays_scores_and_prints_one_json_object(tmp_path: Path) -> None:
    # The development sets are pointed at an empty folder: the bench says so and runs the rest.
    nowhere = tmp_path / "no-datasets"
    nowhere.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = run_bench(
        "--quick",
        f"--tmp-dir={scratch}",
        "--datasets",
        "synthetic_pump",
        "threew_oilwell",
        env={DATASETS_ENV: str(nowhere)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["benchmark"] == "anomaly_quality" and result["quick"] is True
    assert result["checks"] == {
        "one_baseline_per_source_fitted_on_the_fit_part": True,
        "every_later_window_scored_with_it": True,
        "failed_replays": [],
    }
    assert result["ok"] is True
    # Real sets first, the synthetic one last; the missing one says why.
    assert list(result["datasets"]) == ["threew_oilwell", "synthetic_pump"]
    assert "threew_oilwell is missing" in result["datasets"]["threew_oilwell"]["skipped"]
    assert "threew_oilwell: skipped" in done.stderr
    pump = result["datasets"]["synthetic_pump"]
    assert pump["synthetic"] is True and list(pump["series"]) == ["pump-01"]
    hotelling = pump["results"]["defaults"]["hotelling"]
    total = hotelling["aggregate"]
    for key in ("precision", "recall", "f1", "far", "mar", "delay_s_mean", "missed"):
        assert key in total
    assert total["tp"] + total["fp"] + total["tn"] + total["fn"] == 1200 - FIT_SAMPLES
    assert total["faults"] == 1
    # The fault is big enough that any working replay raises an alarm during it.
    assert total["tp"] > 0 and total["detected"] == 1
    assert hotelling["detectable_all_detected"] is True
    (fault,) = hotelling["faults"]
    assert fault["series"] == "pump-01" and fault["detected"] is True and fault["delay_s"] >= 0
    assert hotelling["runs"]["pump-01"]["f1"] == total["f1"]
    verdict = result["pass"]["defaults"]["hotelling"]
    assert verdict["f1"] == total["f1"] and verdict["far"] == total["far"]
    assert verdict["pass"] == (total["f1"] >= 0.80 and total["far"] <= 0.15)
    assert result["targets"]["f1_min"] == 0.80 and result["targets"]["far_max"] == 0.15
    shipped = AnomalySettings(method="hotelling").model_dump(mode="json")
    reported = result["settings"]["profiles"]["defaults"]["hotelling"]
    assert reported == {k: v for k, v in shipped.items() if k not in ("method", "baseline")}
    line = result["summary"]["synthetic_pump"]["defaults"]["hotelling"]
    assert line["f1"] == total["f1"] and line["faults_detected"] == "1/1"
    assert "synthetic_pump (SYNTHETIC)" in done.stderr
    assert list(scratch.iterdir()) == []  # the data dir is removed


def test_a_window_that_cannot_split_the_fitting_part_is_refused() -> None:
    done = run_bench("--quick", "--window", "3", timeout=60)
    assert done.returncode == 2
    assert "--window must be at least 2 samples, divide 400" in done.stderr
    assert done.stdout == ""
