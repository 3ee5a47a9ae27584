"""bench.anomaly_datasets: the development sets read in place from ../shared/datasets (each
README's protocol: shapes, labels, onsets, fitting splits, missing values as NaN, 3W's empty
leading rows dropped), and one quick replay of a small real subset through bench.anomaly_quality.
A missing datasets folder skips these tests locally and fails them under CI=true."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.anomaly_datasets import (
    CWRU_WINDOW,
    DATASETS_ENV,
    THREEW_CHANNELS,
    DatasetError,
    Fault,
    Series,
    cwru_bearing,
    datasets_dir,
    load_real_set,
    nab_temperature,
    tep_braatz,
    threew_oilwell,
)
from tests.helpers import component_missing

ROOT = Path(__file__).resolve().parents[1]


def dataset(name: str) -> Path:
    root = datasets_dir()
    if root is None or not (root / name).is_dir():
        component_missing(f"the development data set {name} (../shared/datasets or {DATASETS_ENV})")
    return root / name


def manifest(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


# ---------------------------------------------------------------------------------- finding


def test_the_datasets_folder_is_the_env_var_or_the_shared_one_beside_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path))
    assert datasets_dir() == tmp_path
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path / "absent"))
    assert datasets_dir() is None
    with pytest.raises(DatasetError, match="development data sets are not here"):
        load_real_set("tep_braatz")
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path))
    with pytest.raises(DatasetError, match="tep_braatz is missing"):
        load_real_set("tep_braatz")
    monkeypatch.delenv(DATASETS_ENV)
    beside = ROOT.parent / "shared" / "datasets"
    assert datasets_dir() == (beside if beside.is_dir() else None)


def test_labelled_faults_default_to_the_label_runs_and_counted_skips_fit_and_ignored() -> None:
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0], dtype=np.bool_)
    ignored = np.array([0, 0, 0, 0, 0, 1, 0, 0], dtype=np.bool_)
    series = Series("s", "d", ("a",), np.zeros((8, 1)), labels, 1.0, 2, ignored=ignored)
    assert series.labelled_faults() == (
        Fault("segment 1", 3, 5, "detectable"),
        Fault("segment 2", 6, 7, "detectable"),
    )
    assert series.counted().tolist() == [False, False, True, True, True, False, True, True]


# --------------------------------------------------------------------------------------- 3W


def test_threew_runs_follow_the_readme_protocol() -> None:
    folder = dataset("threew_oilwell")
    runs = threew_oilwell(folder)
    entries = manifest(folder)
    assert len(runs) == 22 == len(entries) and len({r.name for r in runs}) == 22
    assert sum(r.samples for r in runs) == 139_376 - 616  # less the empty leading rows
    for run, entry in zip(runs, entries.values(), strict=True):
        assert run.channels == THREEW_CHANNELS and run.values.shape == (run.samples, 8)
        assert run.rate_hz == 1.0 and run.window == 5
        ((fault),) = run.labelled_faults()
        onset = fault.first
        assert (
            onset
            == int(entry["first_anomalous_sample"]) - run.info["leading_rows_without_value_dropped"]
        )
        assert fault.stop == run.samples and fault.onset and fault.group == "detectable"
        assert not run.labels[:onset].any() and run.labels[onset:].all()
        # Fitted on the first half of the normal prefix, in whole windows; the rest is scored.
        assert run.fit_samples % 5 == 0 and onset // 2 - 5 < run.fit_samples <= onset // 2
        assert run.fit_samples // 5 >= 30  # enough windows for the default min_windows
        # Missing values are NaN; the channels the manifest calls missing have none at all.
        assert run.info["channels_without_any_value"] == entry["missing_channels"].split()
        for i, channel in enumerate(THREEW_CHANNELS):
            empty = bool(np.isnan(run.values[:, i]).all())
            assert empty == (channel in entry["missing_channels"].split())
        assert not np.isnan(run.values[0]).all()  # starts at the first row with a value
        assert np.isfinite(run.values[~np.isnan(run.values)]).all()
        # Strict variant: the unlabelled rows are left out of the counts, and only those.
        assert run.ignored is not None
        assert int(run.ignored.sum()) == int(entry["n_label_uncertain"])
        assert not run.ignored[:onset].any()


def test_threew_drops_the_leading_rows_without_any_value() -> None:
    folder = dataset("threew_oilwell")
    (run,) = threew_oilwell(folder, only={"3w-w11-20140515110134"})
    assert run.info["leading_rows_without_value_dropped"] == 616
    assert run.samples == 21_484 - 616
    assert run.labelled_faults()[0].first == 1206 - 616 == run.info["onset"]
    assert run.fit_samples == 295  # half of the 590 normal samples left
    assert not np.isnan(run.values[0, :3]).any()
    assert np.isnan(run.values[:, 3:]).all()  # 5 channels this well never reports


# -------------------------------------------------------------------------------------- TEP


def test_tep_runs_fit_on_160_samples_and_group_the_faults_as_the_readme_says() -> None:
    runs = tep_braatz(dataset("tep_braatz"))
    assert [r.name for r in runs] == [f"tep-d{i:02d}" for i in range(22)]
    groups = {r.name: r.group for r in runs}
    assert groups["tep-d00"] == "normal"
    assert {n for n, g in groups.items() if g == "undetectable"} == {
        "tep-d03",
        "tep-d09",
        "tep-d15",
    }
    assert {n for n, g in groups.items() if g == "slow_drift"} == {"tep-d21"}
    assert sum(1 for g in groups.values() if g == "detectable") == 17
    for run in runs:
        assert run.values.shape == (960, 52) and np.isfinite(run.values).all()
        assert run.fit_samples == 160 and run.window == 4 and run.fit_samples // 4 == 40
        assert run.rate_hz == pytest.approx(1 / 180)
        if run.name == "tep-d00":
            assert not run.labels.any() and run.labelled_faults() == ()
        else:
            ((fault),) = run.labelled_faults()
            assert (fault.first, fault.stop, fault.group) == (160, 960, run.group)
            assert not run.labels[:160].any() and run.labels[160:].all()


# -------------------------------------------------------------------------------------- NAB


def test_nab_series_use_the_sample_clock_and_nabs_windows_as_faults() -> None:
    machine, ambient = nab_temperature(dataset("nab_temperature"))
    assert machine.samples == 22_695 and machine.rate_hz == pytest.approx(1 / 300)
    assert ambient.samples == 7_267 and ambient.rate_hz == pytest.approx(1 / 3600)
    assert (machine.fit_samples, ambient.fit_samples) == (2000, 3000)
    assert [f.first for f in machine.labelled_faults()] == [2126, 3703, 16057, 19232]
    assert [f.first for f in ambient.labelled_faults()] == [3540, 5999]
    for series in (machine, ambient):
        assert series.window == 5 and series.channels == ("value",)
        assert not series.labels[: series.fit_samples].any()
        assert np.isfinite(series.values).all()
        for fault, point in zip(
            series.labelled_faults(), series.info["labelled_points"], strict=True
        ):
            assert fault.first < point < fault.stop and fault.onset


# ------------------------------------------------------------------------------------- CWRU


def test_cwru_is_one_series_fit_held_out_normal_then_every_fault_file_in_whole_windows() -> None:
    (series,) = cwru_bearing(dataset("cwru_bearing"))
    assert series.rate_hz == 48_000 and series.window == CWRU_WINDOW
    assert series.fit_samples == 59 * CWRU_WINDOW
    normal_end = (59 + 60) * CWRU_WINDOW
    assert not series.labels[:normal_end].any() and series.labels[normal_end:].all()
    faults = series.labelled_faults()
    assert len(faults) == 11 and faults[0].first == normal_end
    assert faults[-1].stop == series.samples
    assert [f.onset for f in faults] == [True] + [False] * 10  # only the first follows normal
    for before, after in itertools.pairwise(faults):
        assert before.stop == after.first
    for fault in faults:
        windows = (fault.stop - fault.first) / CWRU_WINDOW
        assert windows == (31 if fault.name == "ir_014" else 46)
    assert np.isfinite(series.values).all()
    (quick,) = load_real_set("cwru_bearing", quick=True)
    assert [f.name for f in quick.labelled_faults()] == ["ir_007"]
    assert np.array_equal(quick.values[:normal_end], series.values[:normal_end])


def test_a_file_not_as_its_readme_says_is_a_clear_error(tmp_path: Path) -> None:
    source = dataset("threew_oilwell")
    (tmp_path / "runs").mkdir()
    name = "runs/event6_WELL-00004_20171031193025.csv"
    header, *rows = (source / name).read_text().splitlines()
    (tmp_path / "manifest.csv").write_text(
        "\n".join(
            line
            for line in (source / "manifest.csv").read_text().splitlines()
            if line.startswith(("file,", name))
        )
    )
    # The label switched back to normal after the onset.
    rows[-1] = rows[-1][: rows[-1].rindex(",")] + ",0"
    (tmp_path / name).write_text("\n".join([header, *rows]))
    with pytest.raises(DatasetError, match="anomaly is not 0 before sample 414 and 1 after"):
        threew_oilwell(tmp_path)
    with pytest.raises(DatasetError, match="no 3W runs named"):
        threew_oilwell(tmp_path, only={"3w-w99-20990101000000"})


# ------------------------------------------------------------------------------- end to end


def test_a_quick_replay_of_a_real_subset_reports_every_figure_in_range(tmp_path: Path) -> None:
    dataset("threew_oilwell"), dataset("tep_braatz"), dataset("cwru_bearing")
    sets = ["threew_oilwell", "tep_braatz", "cwru_bearing"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.anomaly_quality",
            "--quick",
            f"--tmp-dir={tmp_path}",
            "--datasets",
            *sets,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env={**os.environ, DATASETS_ENV: str(datasets_dir())},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert list(result["datasets"]) == sets == list(result["summary"])
    expected_faults = {"threew_oilwell": 2, "tep_braatz": 1, "cwru_bearing": 1}
    for name in sets:
        entry = result["datasets"][name]
        assert entry["synthetic"] is False
        assert set(entry["checks"]) >= {"one_baseline_per_source_fitted_on_the_fit_part"}
        outcome = entry["results"]["defaults"]["hotelling"]
        total = outcome["aggregate"]
        counted = sum(
            run["tp"] + run["fp"] + run["tn"] + run["fn"] for run in outcome["runs"].values()
        )
        assert total["tp"] + total["fp"] + total["tn"] + total["fn"] == counted > 0
        for key in ("precision", "recall", "f1", "far", "mar"):
            assert total[key] is None or 0.0 <= total[key] <= 1.0, (name, key, total[key])
        assert total["far"] is not None and total["mar"] is not None
        assert len(outcome["faults"]) == expected_faults[name] == total["faults"]
        for fault in outcome["faults"]:
            assert isinstance(fault["detected"], bool)
            delay = fault["delay_s"]
            assert delay is None or (math.isfinite(delay) and delay >= 0)
            assert fault["delay_s"] is not None or not fault["detected"] or name == "cwru_bearing"
            assert fault["recall"] is None or 0.0 <= fault["recall"] <= 1.0
        assert isinstance(outcome["detectable_all_detected"], bool)
        assert outcome["detectable_all_detected"] == all(f["detected"] for f in outcome["faults"])
        assert total["false_alarms"] >= 0 and total["alarms"] >= total["false_alarms"]
        line = result["summary"][name]["defaults"]["hotelling"]
        assert line["f1"] == total["f1"] and line["far"] == total["far"]
    tep = result["datasets"]["tep_braatz"]
    assert set(tep["series"]) == {"tep-d00", "tep-d01"}
    assert tep["window_samples"] == 4 and tep["fit_samples"] == 160
    threew = result["datasets"]["threew_oilwell"]["series"]
    assert all(info["unlabelled_rows_not_counted"] > 0 for info in threew.values())
    assert list(tmp_path.iterdir()) == []  # the data dir is removed
