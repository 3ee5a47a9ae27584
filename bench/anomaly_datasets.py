"""Owns the labelled real series that `bench.anomaly_quality` replays: where each data set is
found, how its files are read and checked, and how its README's protocol splits it into a
fitting part, scored samples and labelled faults.

The development sets live in `../shared/datasets/` beside the repository (or where the
APPLIANCE_DATASETS environment variable points). They are read in place and never copied into
the repository: the CWRU set carries no license. Each folder's README.md states its protocol;
the loaders below follow it, and `Series.info` says how, per series.

  threew_oilwell  22 real runs of offshore oil wells (Petrobras 3W), 8 channels at 1 Hz, missing
              values as empty fields (kept as NaN). Per run, from the first row with any value:
              fitted on the first half of the normal prefix (whole windows of 5 samples), scored
              from there on: the second half of the prefix gives false alarms, the fault from its
              onset to the end of the run detection and delay. Strict variant: the rows the
              source left unlabelled (`class == -1`, at the phase boundaries) are left out of the
              per-sample counts; the fault still begins at the manifest's onset.
  tep_braatz  the Tennessee Eastman benchmark (simulated), 52 channels every 3 minutes, 22 test
              runs. Each run fitted on its samples 0-159 (windows of 4 samples, 40 fitting
              windows) and scored on 160-959, where faults IDV 1-21 are on; run d00 (normal)
              scored the same way gives the false-alarm rate. IDV 3, 9 and 15 are undetectable
              by design and IDV 21 drifts slowly: the README asks for them to be reported apart,
              so they are their own groups, outside the averaged (`detectable`) scores.
  nab_temperature  two real univariate temperatures (Numenta NAB): the machine (every 5 minutes,
              fitted on samples 0-1999) and the office ambient (hourly, fitted on 0-2999), with
              the sample index as the clock (NAB's timestamps step back once and have gaps).
              Windows of 5 samples; NAB's wide windows are the faults, scored by event (the first
              alarm raised inside a window is a hit, an alarm raised outside every window is a
              false positive) as well as per sample.
  cwru_bearing  real drive-end vibration at 48 kHz (Case Western Reserve University Bearing
              Data Center), windows of 2048 samples. One series, so that the replay parses the
              normal recording once: the normal file's first 59 windows (fit), its next 60
              windows (held out: false alarms), then the 11 fault files one after another, each
              cut to whole windows so that no window mixes two recordings. The first fault file
              follows healthy running: its detection and delay are the usual ones; the others
              follow another fault, so a file counts as detected when an alarm covers any of its
              samples (one raised before it and still on included) and has no delay.

The public aeon series (KDD-TSAD_135, Daphnet_S06R02E0) are loaded here too: aeon's wheel
bundles them."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DATASETS_ENV = "APPLIANCE_DATASETS"
ROOT = Path(__file__).resolve().parent.parent

Group = Literal["detectable", "undetectable", "slow_drift", "normal"]
AVERAGED_GROUPS: tuple[Group, ...] = ("detectable", "normal")
"""Series whose counts are summed into a data set's aggregate; the others are reported apart."""

THREEW_WINDOW = 5
TEP_WINDOW = 4
TEP_FIT = 160
TEP_UNDETECTABLE = frozenset({3, 9, 15})
TEP_SLOW_DRIFT = frozenset({21})
NAB_WINDOW = 5
NAB_SERIES: dict[str, tuple[float, int]] = {
    "machine_temperature": (300.0, 2000),
    "ambient_temperature": (3600.0, 3000),
}
"""File stem -> (nominal sample period in seconds, samples fitted)."""
CWRU_RATE_HZ = 48000.0
CWRU_WINDOW = 2048
CWRU_FIT_WINDOWS = 59
CWRU_HELD_OUT_WINDOWS = 60
DAPHNET_FIT_S = 60
"""Daphnet's fitting part in seconds: 400 samples of a 64 Hz accelerometer are six seconds of
gait, no baseline at all, so it gets its own protocol (one-second windows, a minute's fit)."""

QUICK_SUBSETS: dict[str, tuple[str, ...]] = {
    "threew_oilwell": ("3w-w11-20140530100015", "3w-w04-20171031193025"),
    "tep_braatz": ("tep-d00", "tep-d01"),
    "nab_temperature": ("nab-ambient",),
    "cwru_bearing": ("ir_007",),
}
"""What `--quick` replays of each real set: the two shortest 3W runs (one per event type), the
normal TEP run and fault 1, the shorter NAB series, and the normal CWRU file with one fault."""


class DatasetError(Exception):
    """A data set file that is missing or not in the layout its README describes."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One labelled fault of a series, the unit of detection: samples [first, stop)."""

    name: str
    first: int
    stop: int
    group: Group = "detectable"
    onset: bool = True
    """True: it begins after healthy running, and the first alarm raised inside it detects it
    (its delay is from `first`). False: it follows another fault directly (CWRU's files joined
    one after another); an alarm covering any of its samples detects it, without a delay."""


@dataclass(frozen=True)
class Series:
    """One labelled multichannel series and how it is split into fitting and scoring."""

    name: str
    dataset: str
    channels: tuple[str, ...]
    values: FloatArray
    """samples x channels; NaN where the source had no value."""
    labels: BoolArray
    rate_hz: float
    fit_samples: int
    info: Mapping[str, Any] = field(default_factory=dict)
    window: int | None = None
    """Samples per window when the series needs its own (a property of its rate); None: the
    run's `--window`."""
    faults: tuple[Fault, ...] | None = None
    """The labelled faults; None: each run of labelled samples is one, in the series' group."""
    ignored: BoolArray | None = None
    """Samples left out of the per-sample counts (3W's unlabelled rows); None: none."""
    group: Group = "detectable"

    @property
    def samples(self) -> int:
        return int(self.values.shape[0])

    @property
    def period_s(self) -> float:
        return 1.0 / self.rate_hz

    def times_s(self) -> FloatArray:
        return np.arange(self.samples, dtype=np.float64) / self.rate_hz

    def labelled_faults(self) -> tuple[Fault, ...]:
        if self.faults is not None:
            return self.faults
        return tuple(
            Fault(f"segment {i + 1}", first, stop, self.group)
            for i, (first, stop) in enumerate(segments(self.labels))
        )

    def counted(self) -> BoolArray:
        """Per sample: whether it enters the per-sample counts (scored and not ignored)."""
        mask = np.zeros(self.samples, dtype=np.bool_)
        mask[self.fit_samples :] = True
        if self.ignored is not None:
            mask &= ~self.ignored
        return mask


def segments(labels: BoolArray) -> list[tuple[int, int]]:
    """Runs of consecutive labelled samples as [first, stop) index pairs."""
    padded = np.concatenate(([False], labels.astype(np.bool_), [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(edges[i]), int(edges[i + 1])) for i in range(0, len(edges), 2)]


# ------------------------------------------------------------------------------- reading files


def datasets_dir() -> Path | None:
    """The development data sets: APPLIANCE_DATASETS when set, else `../shared/datasets` beside
    the repository; None when that folder is not there."""
    configured = os.environ.get(DATASETS_ENV)
    folder = Path(configured) if configured else ROOT.parent / "shared" / "datasets"
    return folder if folder.is_dir() else None


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file; a clear error for a missing or empty one."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(rows) < 2:
        raise DatasetError(f"{path} has no data rows")
    header = [name.strip() for name in rows[0]]
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DatasetError(
                f"{path} line {number}: {len(row)} fields, the header has {len(header)}"
            )
    return header, rows[1:]


def numbers(
    path: Path, rows: list[list[str]], column: int, name: str, *, empty_is_nan: bool = False
) -> FloatArray:
    """One column as floats; with `empty_is_nan`, an empty field is a missing value (NaN)."""
    try:
        if empty_is_nan:
            return np.array(
                [float(row[column]) if row[column] else math.nan for row in rows],
                dtype=np.float64,
            )
        return np.array([float(row[column]) for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"{path}: column {name!r} is not numeric ({exc})") from exc


def _columns(header: list[str], path: Path, names: Sequence[str]) -> list[int]:
    missing = [name for name in names if name not in header]
    if missing:
        raise DatasetError(f"{path}: no column {missing[0]!r} (header: {header})")
    return [header.index(name) for name in names]


def _manifest(folder: Path) -> list[dict[str, str]]:
    header, rows = read_table(folder / "manifest.csv")
    return [dict(zip(header, row, strict=True)) for row in rows]


def _is_prefix_then_rest(labels: BoolArray, onset: int) -> bool:
    """0 ... 0 then 1 ... 1, switching at `onset`."""
    return not labels[:onset].any() and bool(labels[onset:].all())


# ------------------------------------------------------------------------------ the real sets


def _wanted(name: str, only: Collection[str] | None) -> bool:
    return only is None or name in only


def threew_oilwell(folder: Path, *, only: Collection[str] | None = None) -> list[Series]:
    """The 3W runs in manifest order (see the module docstring); `only`: these series names."""
    out: list[Series] = []
    for entry in _manifest(folder):
        stem = Path(entry["file"]).stem  # event2_WELL-00011_20140515110134
        _, well, started = stem.split("_")
        name = f"3w-w{well.removeprefix('WELL-')[-2:]}-{started}"
        if _wanted(name, only):
            out.append(_threew_run(folder, entry, name))
    if only is not None and len(out) != len(only):
        raise DatasetError(
            f"{folder}: no 3W runs named {sorted(set(only) - {s.name for s in out})}"
        )
    return out


THREEW_CHANNELS = (
    "p_pdg_pa",
    "p_tpt_pa",
    "t_tpt_c",
    "p_mon_ckp_pa",
    "t_jus_ckp_c",
    "p_jus_ckgl_pa",
    "t_jus_ckgl_c",
    "qgl_m3s",
)


def _threew_run(folder: Path, entry: Mapping[str, str], name: str) -> Series:
    path = folder / entry["file"]
    header, rows = read_table(path)
    indexes = _columns(header, path, [*THREEW_CHANNELS, "class", "anomaly"])
    values = np.column_stack(
        [
            numbers(path, rows, index, channel, empty_is_nan=True)
            for index, channel in zip(indexes[:-2], THREEW_CHANNELS, strict=True)
        ]
    )
    classes = numbers(path, rows, indexes[-2], "class").astype(np.int64)
    labels = numbers(path, rows, indexes[-1], "anomaly") > 0
    onset_in_file = int(entry["first_anomalous_sample"])
    if not _is_prefix_then_rest(labels, onset_in_file):
        raise DatasetError(f"{path}: anomaly is not 0 before sample {onset_in_file} and 1 after")
    with_any = np.flatnonzero(~np.isnan(values).all(axis=1))
    if len(with_any) == 0 or with_any[0] >= onset_in_file:
        raise DatasetError(f"{path}: no value before the onset at sample {onset_in_file}")
    leading = int(with_any[0])
    if leading != int(entry["leading_rows_all_missing"] or 0):
        raise DatasetError(
            f"{path}: {leading} leading rows without a value, the manifest says "
            f"{entry['leading_rows_all_missing']}"
        )
    values, labels, classes = values[leading:], labels[leading:], classes[leading:]
    onset = onset_in_file - leading
    fit = (onset // 2) // THREEW_WINDOW * THREEW_WINDOW
    empty = [c for i, c in enumerate(THREEW_CHANNELS) if np.isnan(values[:, i]).all()]
    event = int(entry["event_class"])
    return Series(
        name=name,
        dataset="threew_oilwell",
        channels=THREEW_CHANNELS,
        values=values,
        labels=labels,
        rate_hz=1.0,
        fit_samples=fit,
        window=THREEW_WINDOW,
        faults=(Fault(f"event {event}", onset, len(labels)),),
        ignored=classes == -1,
        info={
            "file": entry["file"],
            "event": f"{event}: {entry['event']}",
            "samples": len(labels),
            "leading_rows_without_value_dropped": leading,
            "onset": onset,
            "onset_in_file": onset_in_file,
            "fit": f"samples 0-{fit - 1} (the first half of the {onset}-sample normal prefix, "
            f"whole windows of {THREEW_WINDOW})",
            "held_out_normal": onset - fit,
            "unlabelled_rows_not_counted": int(np.sum(classes == -1)),
            "channels_without_any_value": empty,
            "frozen_in_prefix": entry["frozen_in_prefix"].split(),
        },
    )


def tep_braatz(folder: Path, *, only: Collection[str] | None = None) -> list[Series]:
    """The 22 TEP test runs (d00 normal, d01-d21 faulty) in manifest order."""
    out: list[Series] = []
    for entry in _manifest(folder):
        if not entry["file"].startswith("runs/"):
            continue  # normal_train_d00: protocol 2's longer fit, not this one
        fault_id = int(entry["fault_id"])
        name = f"tep-d{fault_id:02d}"
        if _wanted(name, only):
            out.append(_tep_run(folder, entry, name, fault_id))
    if only is not None and len(out) != len(only):
        raise DatasetError(
            f"{folder}: no TEP runs named {sorted(set(only) - {s.name for s in out})}"
        )
    return out


def _tep_run(folder: Path, entry: Mapping[str, str], name: str, fault_id: int) -> Series:
    path = folder / entry["file"]
    header, rows = read_table(path)
    channels = tuple(h for h in header if h.startswith(("xmeas_", "xmv_")))
    if len(channels) != 52 or len(rows) != 960:
        raise DatasetError(
            f"{path}: expected 960 rows of 52 channels, got {len(rows)} x {len(channels)}"
        )
    indexes = _columns(header, path, [*channels, "anomaly"])
    values = np.column_stack(
        [numbers(path, rows, i, c) for i, c in zip(indexes[:-1], channels, strict=True)]
    )
    labels = numbers(path, rows, indexes[-1], "anomaly") > 0
    if fault_id == 0:
        if labels.any():
            raise DatasetError(f"{path}: the normal run has labelled samples")
        group: Group = "normal"
        faults: tuple[Fault, ...] = ()
    else:
        if not _is_prefix_then_rest(labels, TEP_FIT):
            raise DatasetError(f"{path}: anomaly is not 0 before sample {TEP_FIT} and 1 after")
        group = (
            "undetectable"
            if fault_id in TEP_UNDETECTABLE
            else "slow_drift"
            if fault_id in TEP_SLOW_DRIFT
            else "detectable"
        )
        faults = (Fault(f"IDV {fault_id} ({entry['fault_type']})", TEP_FIT, len(labels), group),)
    return Series(
        name=name,
        dataset="tep_braatz",
        channels=channels,
        values=values,
        labels=labels,
        rate_hz=1.0 / 180.0,
        fit_samples=TEP_FIT,
        window=TEP_WINDOW,
        faults=faults,
        group=group,
        info={
            "file": entry["file"],
            "fault": f"IDV {fault_id}: {entry['fault_type']}, {entry['fault_description']}"
            if fault_id
            else "none (normal run: false alarms only)",
            "group": group,
            "samples": len(labels),
            "fit": f"samples 0-{TEP_FIT - 1} ({TEP_FIT // TEP_WINDOW} windows of "
            f"{TEP_WINDOW} samples, 12 minutes each)",
        },
    )


def nab_temperature(folder: Path, *, only: Collection[str] | None = None) -> list[Series]:
    """The machine and ambient temperatures, NAB's windows as the faults."""
    out: list[Series] = []
    for stem, (period_s, fit) in NAB_SERIES.items():
        name = f"nab-{stem.removesuffix('_temperature')}"
        if not _wanted(name, only):
            continue
        path = folder / f"{stem}.csv"
        header, rows = read_table(path)
        value, anomaly, point = _columns(header, path, ["value", "anomaly", "anomaly_point"])
        labels = numbers(path, rows, anomaly, "anomaly") > 0
        points = np.flatnonzero(numbers(path, rows, point, "anomaly_point") > 0)
        windows = segments(labels)
        if not windows or windows[0][0] < fit or len(points) != len(windows):
            raise DatasetError(
                f"{path}: expected one labelled point per window, every window after the "
                f"{fit}-sample fit; got windows {windows} and points {points.tolist()}"
            )
        out.append(
            Series(
                name=name,
                dataset="nab_temperature",
                channels=("value",),
                values=numbers(path, rows, value, "value").reshape(-1, 1),
                labels=labels,
                rate_hz=1.0 / period_s,
                fit_samples=fit,
                window=NAB_WINDOW,
                faults=tuple(
                    Fault(f"window {i + 1} (samples {a}-{b - 1})", a, b)
                    for i, (a, b) in enumerate(windows)
                ),
                info={
                    "file": path.name,
                    "samples": len(labels),
                    "clock": f"the sample index, one every {period_s:.0f} s (nominal; the "
                    "file's timestamps step back once or have gaps)",
                    "fit": f"samples 0-{fit - 1}",
                    "windows": [[a, b - 1] for a, b in windows],
                    "labelled_points": points.tolist(),
                },
            )
        )
    return out


def cwru_bearing(folder: Path, *, only: Collection[str] | None = None) -> list[Series]:
    """The one CWRU series (see the module docstring); `only`: these fault files (e.g.
    "ir_007"), in manifest order."""
    manifest = _manifest(folder)
    normal_path = folder / "normal.csv"
    normal = _cwru_file(normal_path, expect_fault=False)
    needed = (CWRU_FIT_WINDOWS + CWRU_HELD_OUT_WINDOWS) * CWRU_WINDOW
    if len(normal) < needed:
        raise DatasetError(f"{normal_path}: {len(normal)} samples, fewer than {needed}")
    parts = [normal[:needed]]
    faults: list[Fault] = []
    files: list[dict[str, Any]] = []
    at = needed
    for entry in manifest:
        stem = Path(entry["file"]).stem
        if stem == "normal" or not _wanted(stem.removeprefix("fault_"), only):
            continue
        path = folder / entry["file"]
        samples = _cwru_file(path, expect_fault=True)
        kept = len(samples) // CWRU_WINDOW * CWRU_WINDOW
        parts.append(samples[:kept])
        faults.append(
            Fault(stem.removeprefix("fault_"), at, at + kept, onset=not faults),
        )
        files.append(
            {
                "file": entry["file"],
                "condition": entry["condition"],
                "diameter_in": float(entry["fault_diameter_in"]),
                "position": entry["outer_race_position"] or None,
                "samples": [at, at + kept - 1],
                "windows": kept // CWRU_WINDOW,
            }
        )
        at += kept
    if only is not None and len(faults) != len(only):
        raise DatasetError(f"{folder}: no fault files for {sorted(only)} (wanted {len(only)})")
    values = np.concatenate(parts).reshape(-1, 1)
    labels = np.zeros(len(values), dtype=np.bool_)
    labels[needed:] = True
    fit = CWRU_FIT_WINDOWS * CWRU_WINDOW
    return [
        Series(
            name="cwru",
            dataset="cwru_bearing",
            channels=("de_accel",),
            values=values,
            labels=labels,
            rate_hz=CWRU_RATE_HZ,
            fit_samples=fit,
            window=CWRU_WINDOW,
            faults=tuple(faults),
            info={
                "layout": f"normal.csv samples 0-{fit - 1} (fit, {CWRU_FIT_WINDOWS} windows), "
                f"{fit}-{needed - 1} (held out, {CWRU_HELD_OUT_WINDOWS} windows), then each "
                "fault file cut to whole windows, one after another",
                "samples": len(values),
                "fault_files": files,
                "detection": "the first fault file follows healthy running: detected by an alarm "
                "raised inside it; each later one follows another fault: detected when an alarm "
                "covers any of its samples, no delay",
            },
        )
    ]


def _cwru_file(path: Path, *, expect_fault: bool) -> FloatArray:
    header, rows = read_table(path)
    accel, anomaly = _columns(header, path, ["de_accel", "anomaly"])
    labels = numbers(path, rows, anomaly, "anomaly") > 0
    if not (labels.all() if expect_fault else not labels.any()):
        raise DatasetError(f"{path}: anomaly is not {int(expect_fault)} on every row")
    return numbers(path, rows, accel, "de_accel")


# ----------------------------------------------------------------------- aeon's public series


def aeon_data_dir() -> Path | None:
    """aeon's bundled data folder, found without importing aeon (its dependencies are absent)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "datasets" / "data"
        if folder.is_dir():
            return folder
    return None


def kdd_tsad_135(folder: Path) -> Series:
    """UCR series 135 with aeon's labels; fitted on its TRAIN split."""
    base = folder / "KDD-TSAD_135"
    test_path = base / "135_UCR_Anomaly_InternalBleeding16_TEST.csv"
    train_path = base / "135_UCR_Anomaly_InternalBleeding16_TRAIN.csv"
    header, rows = read_table(test_path)
    train_header, train_rows = read_table(train_path)
    if header != ["timestamp", "value", "is_anomaly"] or train_header != header:
        raise DatasetError(f"{test_path}: expected columns timestamp,value,is_anomaly: {header}")
    values = numbers(test_path, rows, 1, "value")
    labels = numbers(test_path, rows, 2, "is_anomaly") > 0
    train = numbers(train_path, train_rows, 1, "value")
    train_labels = numbers(train_path, train_rows, 2, "is_anomaly") > 0
    prefix = len(train) <= len(values) and bool(np.array_equal(train, values[: len(train)]))
    if not prefix or train_labels.any():
        # The UCR convention: the training part is the normal start of the same series.
        raise DatasetError(f"{train_path} is not a label-free prefix of {test_path.name}")
    return Series(
        name="kdd135",
        dataset="KDD-TSAD_135",
        channels=("value",),
        values=values.reshape(-1, 1),
        labels=labels,
        rate_hz=1.0,
        fit_samples=len(train),
        info={
            "source": "aeon wheel, datasets/data/KDD-TSAD_135 (UCR anomaly archive 135, "
            "InternalBleeding16)",
            "samples": len(values),
            "labelled_samples": int(labels.sum()),
            "labelled_segments": [[a, b - 1] for a, b in segments(labels)],
            "fit": f"the TRAIN split: the first {len(train)} samples (the TRAIN file holds "
            "exactly the TEST file's first rows, no labels)",
            "clock": "none in the data: a synthetic 1 Hz clock",
        },
    )


def daphnet_s06r02e0(folder: Path) -> Series:
    """The Daphnet excerpt: 9 accelerometer channels; normal-only (no labelled sample)."""
    path = folder / "Daphnet_S06R02E0" / "S06R02E0.csv"
    header, rows = read_table(path)
    if header[0] != "timestamp" or header[-1] != "is_anomaly" or len(header) < 3:
        raise DatasetError(f"{path}: expected timestamp, channels..., is_anomaly: {header}")
    try:
        stamps = np.array(
            [datetime.fromisoformat(row[0]).timestamp() for row in rows], dtype=np.float64
        )
    except ValueError as exc:
        raise DatasetError(f"{path}: a timestamp is not ISO 8601 ({exc})") from exc
    # The stamps are written to the millisecond (15, 16, 15, 16 ms apart): the mean step over
    # the whole file is the real period.
    span_s = float(stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    if span_s <= 0:
        raise DatasetError(f"{path}: timestamps do not advance")
    step_s = span_s / (len(stamps) - 1)
    rate = round(1.0 / step_s)
    channels = tuple(header[1:-1])
    values = np.column_stack([numbers(path, rows, i + 1, name) for i, name in enumerate(channels)])
    labels = numbers(path, rows, len(header) - 1, "is_anomaly") > 0
    return Series(
        name="daphnet",
        dataset="Daphnet_S06R02E0",
        channels=channels,
        values=values,
        labels=labels,
        rate_hz=float(rate),
        fit_samples=DAPHNET_FIT_S * rate,
        window=rate,
        group="normal",
        info={
            "source": "aeon wheel, datasets/data/Daphnet_S06R02E0 (Daphnet freezing of gait, "
            "subject 6 run 2 excerpt)",
            "samples": len(values),
            "labelled_samples": int(labels.sum()),
            "fit": f"the first {DAPHNET_FIT_S} s ({DAPHNET_FIT_S * rate} samples), windows of 1 s",
            "clock": f"{rate} Hz (the file's mean step, {step_s * 1e3:.3f} ms; its stamps are "
            "written to the millisecond), replaced by an exact one",
            "note": "normal-only: no labelled anomaly, so only the false-alarm rate means anything",
        },
    )


REAL_SETS = {
    "threew_oilwell": threew_oilwell,
    "tep_braatz": tep_braatz,
    "cwru_bearing": cwru_bearing,
    "nab_temperature": nab_temperature,
}
"""The development sets by folder name, in the order they are reported."""


def load_real_set(name: str, *, quick: bool = False) -> list[Series]:
    """One development set from `datasets_dir()`; DatasetError when it is not there or not as
    its README says. `quick`: the small subset QUICK_SUBSETS names."""
    root = datasets_dir()
    if root is None:
        raise DatasetError(
            f"the development data sets are not here: set {DATASETS_ENV} or put them in "
            f"{ROOT.parent / 'shared' / 'datasets'}"
        )
    folder = root / name
    if not folder.is_dir():
        raise DatasetError(f"{folder} is missing")
    return REAL_SETS[name](folder, only=QUICK_SUBSETS[name] if quick else None)
