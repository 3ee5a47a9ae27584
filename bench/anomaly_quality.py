"""Benchmark: anomaly detection quality. Labelled series replayed through `appliance replay`, and
the alarms in its journal scored against the labels: precision, recall, F1, false-alarm rate,
missed-alarm rate, detection delay and false alarms, per data set and method, with a table of
every labelled fault (detected or missed, and how late).

Datasets, reported in this order (the real ones first; bench/anomaly_datasets.py loads them and
says how each README's protocol is followed)
  threew_oilwell, tep_braatz, cwru_bearing, nab_temperature  the development sets in
              `../shared/datasets/` (or APPLIANCE_DATASETS): real oil wells (3W), the Tennessee
              Eastman simulator, real bearing vibration (CWRU) and real temperatures (NAB). Each
              with its README's fit/score split and its own window (a property of its rate: 5
              samples at 1 Hz, 4 TEP samples of 3 minutes, 2048 samples at 48 kHz, 5 NAB
              samples). A set whose folder is missing is reported as skipped; the rest run.
  KDD-TSAD_135  public, labelled (aeon's wheel ships it): UCR anomaly archive series 135
              (InternalBleeding16), univariate, 7501 samples, one labelled anomaly (samples
              4187-4198). It has no clock: a synthetic 1 Hz one. Fitted on the dataset's own TRAIN
              split (the first 1200 samples; the TRAIN file holds exactly those), scored on the
              rest.
  Daphnet_S06R02E0  public (aeon's wheel): 9 accelerometer channels at 64 Hz (the file's clock,
              replaced by an exact 64 Hz one so windows hold whole samples); this excerpt has no
              labelled anomaly, so it gives only the false-alarm rate. Windows of one second (64
              samples), fitted on the first 60 s, scored on the remaining 50 s.
  synthetic_pump  SYNTHETIC, generated here with numpy (seeded, the same every run), reported
              last: a water pump testbed in the shape of SKAB (Skoltech Anomaly Benchmark). 8
              channels at 1 Hz (Accelerometer1RMS, Accelerometer2RMS, Current, Pressure,
              Temperature, Thermocouple, Voltage, VolumeFlowRateRMS), physically coupled: flow
              follows the pump speed and the valve, pressure the speed squared and the system's
              resistance, current the hydraulic load, voltage sags with current, the motor
              (Temperature) and fluid (Thermocouple) temperatures follow load with first-order lags
              of 250 s and 400 s under a common slowly wandering ambient, the vibration RMS the
              speed squared; white sensor noise on every channel and an AR(1) wander of the speed.
              Each run is 1200 s: at least 480 s healthy, then one labelled fault of 250-400 s
              (valve closure: pressure up, flow and current down; cavitation: both vibration RMS
              up and noisier, flow a little down; leak: pressure down, flow and current up; rotor
              imbalance: vibration RMS up, mostly on the drive end), ramped in and out over 5-20 s,
              then healthy again to the end. The label covers the fault from its first second to
              its last; what the lagging temperatures do after it is not labelled. Fitted on the
              first 400 samples, windows of `--window` samples (default 5).

Protocol (one configuration per method and settings profile for every data set and run; nothing
is tuned per run or per data set)
  Each series becomes two CSV files (timestamps in epoch seconds from 2024-01-01T00:00:00Z on the
  series' own clock; a missing value is written `nan`): its fitting part and the rest. Per data
  set, one config holds one `csv` source (pace fast) per series x method x settings profile,
  features unset (every feature of every channel). `appliance replay` runs the fitting parts:
  each source's baseline is fitted on exactly those windows (`baseline` is the span of their
  start times) and saved. A second `appliance replay` on the same data directory runs the rest:
  each source scores with its saved baseline from its first window, as after a restart. Two
  replays rather than one so that each baseline is fitted on exactly the fitting part, whatever
  the data time the collector counts.
  Profiles (PROFILES): `defaults`, every AnomalySettings default for every method. A profile is a
  mapping method -> AnomalySettings fields set on top of the defaults; add one there and it runs.

Scoring (per sample, as SKAB scores, and per fault)
  An alarm is an `anomaly` record with body.kind `started` (escalated is ignored) until the
  source's next `ended` one; one still open at the end runs to the end of the data. A sample is
  predicted anomalous when it lies in an alarm, i.e. from the start of the window that raised it
  to the start of the window that ended it (the state after each window is judged). Per-sample
  counts cover the samples after the fitting part, less those a set leaves uncounted (3W's
  unlabelled rows): precision, recall, F1, FAR = FP / (FP + TN), MAR = FN / (FN + TP).
  Each labelled fault (a run of labelled samples, or what the set's loader names) is detected by
  the first alarm raised inside it (raised = the end of the window that started it: when the
  appliance could have said so); its delay is from its first sample to then. An alarm already on
  when the fault begins does not detect it: it was raised for something else (CWRU's later files,
  which follow another fault directly, are detected by any alarm covering them). False alarms:
  alarms (events, not samples) that cover no labelled sample. By event, as NAB scores: hits are
  detected faults, false positives alarms raised outside every fault. Runs are aggregated by
  summing their confusion counts (as SKAB's leaderboard does), delays over all detected faults.
  A set's aggregate sums its `detectable` runs and its normal-only runs; faults its README calls
  undetectable (TEP IDV 3, 9, 15) or a slow drift (TEP IDV 21) are reported in their own groups.
  `detectable_all_detected`: every detectable fault of the set was detected.

Targets: issue 18's on the development sets, every method alarms on every fault the set's README
calls detectable (`detectable_all_detected`), FAR reported. The synthetic testbed keeps SKAB's
bar (F1 >= 0.80 with FAR <= 0.15, aggregated per method), judged in `pass`.

Prints one JSON object on stdout; progress on stderr. Exits 1 when a replay failed (the JSON still
says which).
`python -m bench.anomaly_quality [--quick] [--datasets D ...] [--methods M ...] [--runs N]
[--window W] [--profiles P ...]`; `--quick`: hotelling, 1 synthetic run, and of each real set
named with --datasets a small subset (anomaly_datasets.QUICK_SUBSETS)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import yaml

from bench.anomaly_datasets import (
    AVERAGED_GROUPS,
    REAL_SETS,
    DatasetError,
    Fault,
    Series,
    aeon_data_dir,
    daphnet_s06r02e0,
    kdd_tsad_135,
    load_real_set,
)
from bench.common import (
    base_parser,
    emit,
    machine,
    make_data_root,
    peak_rss_mib,
    progress,
    source_fingerprint,
)
from config.analysis import AnomalySettings
from sync.reader import JournalReader
from sync.records import parse_ts

ROOT = Path(__file__).resolve().parent.parent
Method = Literal["robust_z", "ewma", "hotelling", "isolation_forest", "autoencoder"]
METHODS: tuple[Method, ...] = get_args(Method)
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

SYNTHETIC = "synthetic_pump"
PUBLIC_SETS = ("KDD-TSAD_135", "Daphnet_S06R02E0")
DATASETS: tuple[str, ...] = (*REAL_SETS, *PUBLIC_SETS, SYNTHETIC)
"""Every data set, in the order they are reported: the real ones first, the synthetic last."""

TARGET_F1 = 0.80
TARGET_FAR = 0.15
FIT_SAMPLES = 400
DEFAULT_WINDOW = 5
DEFAULT_RUNS = 8
RUN_SAMPLES = 1200
SEED = 20240101
EPOCH_S = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
"""Where every replayed series' clock starts (the replayed series keep none of their own)."""
REPLAY_TIMEOUT_S = 1800

PROFILES: dict[str, dict[Method, dict[str, Any]]] = {
    "defaults": {method: {} for method in METHODS},
    "temporal": {method: {"temporal": ["delta", "residual"]} for method in METHODS},
}
"""AnomalySettings fields set on top of the defaults per profile and method, the same for every
data set and run (`method` and `baseline` are the protocol's). `temporal` measures the temporal
features (off by default) on the same runs."""

_EPS_S = 1e-6
"""Sample and record times are exact to the microsecond (format_ts); this absorbs float noise."""


# ------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm, in seconds from the series' first sample: on from `start_s` (the start of the
    window that raised it) to `end_s` (the start of the window that ended it, or the end of the
    data); `raised_s` is when it could be raised (the end of the raising window)."""

    start_s: float
    end_s: float
    raised_s: float


def alarms_from_events(
    events: Iterable[tuple[str, float]], *, window_s: float, data_end_s: float
) -> list[Alarm]:
    """Alarms from a source's anomaly events in journal order: (body.kind, the record's window
    start in seconds). `started` opens one, `ended` closes it, `escalated` changes nothing; an
    alarm still open at the end runs to `data_end_s`. A `started` while one is open closes the
    open one there (the detector never does that; a journal cut between two runs could)."""
    alarms: list[Alarm] = []
    opened: float | None = None
    for kind, at_s in events:
        if kind == "started":
            if opened is not None:
                alarms.append(Alarm(opened, at_s, opened + window_s))
            opened = at_s
        elif kind == "ended" and opened is not None:
            alarms.append(Alarm(opened, at_s, opened + window_s))
            opened = None
    if opened is not None:
        alarms.append(Alarm(opened, max(data_end_s, opened), opened + window_s))
    return alarms


def _span(times_s: FloatArray, alarm: Alarm) -> slice:
    """The samples an alarm covers (start inclusive, end exclusive); times ascending."""
    first = int(np.searchsorted(times_s, alarm.start_s - _EPS_S, side="left"))
    stop = int(np.searchsorted(times_s, alarm.end_s - _EPS_S, side="left"))
    return slice(first, max(first, stop))


def predicted(times_s: FloatArray, alarms: Sequence[Alarm]) -> BoolArray:
    """Per sample (times ascending): whether it lies in an alarm (start inclusive, end
    exclusive)."""
    mask = np.zeros(times_s.shape, dtype=np.bool_)
    for alarm in alarms:
        mask[_span(times_s, alarm)] = True
    return mask


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _f1(hits: int, false_positives: int, misses: int) -> float | None:
    # 2TP / (2TP + FP + FN): 0 when something was to be found and nothing was raised (where
    # precision is undefined); undefined, like recall, when nothing was to be found.
    if hits + misses == 0:
        return None
    return _ratio(2 * hits, 2 * hits + false_positives + misses)


@dataclass(frozen=True, slots=True)
class Confusion:
    """Per-sample counts; the rates are None where their denominator is zero."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn
        )

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        return _f1(self.tp, self.fp, self.fn)

    @property
    def far(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def mar(self) -> float | None:
        return _ratio(self.fn, self.fn + self.tp)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": _round(self.precision),
            "recall": _round(self.recall),
            "f1": _round(self.f1),
            "far": _round(self.far),
            "mar": _round(self.mar),
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
        }


def confusion(labels: BoolArray, predicted_mask: BoolArray) -> Confusion:
    if labels.shape != predicted_mask.shape:
        raise ValueError(f"{labels.shape[0]} labels but {predicted_mask.shape[0]} predictions")
    truth = labels.astype(np.bool_)
    guess = predicted_mask.astype(np.bool_)
    return Confusion(
        tp=int(np.sum(truth & guess)),
        fp=int(np.sum(~truth & guess)),
        tn=int(np.sum(~truth & ~guess)),
        fn=int(np.sum(truth & ~guess)),
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one labelled fault: detected or not, how late (None without an onset or
    when missed) and the share of its counted samples predicted anomalous."""

    fault: Fault
    detected: bool
    delay_s: float | None
    recall: float | None


def outcomes(
    faults: Sequence[Fault],
    times_s: FloatArray,
    alarms: Sequence[Alarm],
    *,
    period_s: float,
    predicted_mask: BoolArray,
    counted: BoolArray,
) -> list[Outcome]:
    """A fault with an onset runs from its first sample to the end of its last one (+ one
    sample period); the first alarm raised in that span detects it. One without an onset (it
    follows another fault) is detected by any alarm covering one of its samples."""
    raised = np.array(sorted(alarm.raised_s for alarm in alarms), dtype=np.float64)
    out: list[Outcome] = []
    for fault in faults:
        span = slice(fault.first, fault.stop)
        inside_counted = counted[span]
        hits = predicted_mask[span][inside_counted]
        recall = float(hits.mean()) if hits.size else None
        if fault.onset:
            begin = float(times_s[fault.first])
            end = float(times_s[fault.stop - 1]) + period_s
            at = int(np.searchsorted(raised, begin - _EPS_S, side="left"))
            if at < len(raised) and raised[at] <= end + _EPS_S:
                out.append(Outcome(fault, True, max(0.0, float(raised[at]) - begin), recall))
            else:
                out.append(Outcome(fault, False, None, recall))
        else:
            out.append(Outcome(fault, bool(predicted_mask[span].any()), None, recall))
    return out


@dataclass(frozen=True, slots=True)
class Delays:
    """Seconds from each detected fault's first sample to the first alarm raised inside it;
    how many faults were detected without a delay (no onset) and how many were missed."""

    delays_s: tuple[float, ...] = ()
    missed: int = 0
    undelayed: int = 0

    def __add__(self, other: Delays) -> Delays:
        return Delays(
            self.delays_s + other.delays_s,
            self.missed + other.missed,
            self.undelayed + other.undelayed,
        )

    @classmethod
    def of(cls, found: Iterable[Outcome]) -> Delays:
        found = list(found)
        return cls(
            tuple(o.delay_s for o in found if o.delay_s is not None),
            sum(1 for o in found if not o.detected),
            sum(1 for o in found if o.detected and o.delay_s is None),
        )

    def to_dict(self) -> dict[str, Any]:
        values = sorted(self.delays_s)
        return {
            "faults": len(values) + self.undelayed + self.missed,
            "detected": len(values) + self.undelayed,
            "missed": self.missed,
            "delay_s_mean": _round(sum(values) / len(values), 2) if values else None,
            "delay_s_median": _round(float(np.median(values)), 2) if values else None,
            "delay_s_max": _round(values[-1], 2) if values else None,
        }


def false_alarms(times_s: FloatArray, labels: BoolArray, alarms: Sequence[Alarm]) -> int:
    """Alarms (events, not samples: a long one counts once) that cover no labelled sample."""
    return sum(1 for alarm in alarms if not bool(np.any(labels[_span(times_s, alarm)])))


def raised_outside(
    faults: Sequence[Fault], times_s: FloatArray, alarms: Sequence[Alarm], period_s: float
) -> int:
    """Alarms raised outside every fault's span (NAB's false positives: a detection before a
    window opens is one, even when the alarm lasts into it)."""
    spans = [
        (float(times_s[f.first]) - _EPS_S, float(times_s[f.stop - 1]) + period_s + _EPS_S)
        for f in faults
    ]
    return sum(1 for alarm in alarms if not any(lo <= alarm.raised_s <= hi for lo, hi in spans))


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------ the synthetic testbed


PUMP_CHANNELS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "VolumeFlowRateRMS",
)
FaultKind = Literal["valve_closure", "cavitation", "leak", "rotor_imbalance"]
FAULT_CYCLE: tuple[FaultKind, ...] = (
    "valve_closure",
    "cavitation",
    "leak",
    "rotor_imbalance",
    "valve_closure",
    "leak",
    "cavitation",
    "valve_closure",
)
"""Run i gets FAULT_CYCLE[i % 8]: SKAB's runs are mostly valve operations."""
FAULT_MAGNITUDE: dict[FaultKind, tuple[float, float]] = {
    "valve_closure": (0.10, 0.30),  # share of the valve closed
    "cavitation": (0.15, 0.40),  # relative rise of the vibration RMS
    "leak": (0.06, 0.15),  # share of the flow lost through the leak
    "rotor_imbalance": (0.20, 0.50),  # relative rise of the drive-end vibration RMS
}
HEALTHY_START_S = (480, 650)
FAULT_LENGTH_S = (250, 400)
HEALTHY_END_S = 100
"""Healthy running after the fault: an alarm that outlasts the fault costs false alarms here."""


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> FloatArray:
    """A stationary AR(1) series with marginal standard deviation `sd` (slow wander)."""
    innovations = rng.normal(0.0, sd * math.sqrt(1.0 - phi * phi), n)
    out = np.empty(n)
    out[0] = rng.normal(0.0, sd)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + innovations[i]
    return out


def _lag(target: FloatArray, tau_s: float) -> FloatArray:
    """First-order lag at 1 Hz starting settled at target[0] (a warmed-up machine)."""
    alpha = 1.0 - math.exp(-1.0 / tau_s)
    out = np.empty_like(target)
    out[0] = target[0]
    for i in range(1, len(target)):
        out[i] = out[i - 1] + alpha * (target[i] - out[i - 1])
    return out


def pump_run(index: int, *, samples: int = RUN_SAMPLES, seed: int = SEED) -> Series:
    """Synthetic run `index` of the pump testbed (see the module docstring); deterministic."""
    rng = np.random.default_rng([seed, index])
    kind = FAULT_CYCLE[index % len(FAULT_CYCLE)]
    t = np.arange(samples, dtype=np.float64)
    start = int(rng.integers(HEALTHY_START_S[0], HEALTHY_START_S[1] + 1))
    stop = min(start + int(rng.integers(FAULT_LENGTH_S[0], FAULT_LENGTH_S[1] + 1)), samples)
    stop = min(stop, samples - HEALTHY_END_S)
    ramp_s = float(rng.uniform(5.0, 20.0))
    magnitude = float(rng.uniform(*FAULT_MAGNITUDE[kind]))
    # 0 -> 1 over ramp_s from the fault's start, back to 0 over ramp_s before its stop.
    envelope = np.clip((t - start) / ramp_s, 0.0, 1.0) * np.clip((stop - t) / ramp_s, 0.0, 1.0)
    fault = magnitude * envelope
    closed = fault if kind == "valve_closure" else np.zeros(samples)
    cavitation = fault if kind == "cavitation" else np.zeros(samples)
    leak = fault if kind == "leak" else np.zeros(samples)
    imbalance = fault if kind == "rotor_imbalance" else np.zeros(samples)

    speed = float(rng.uniform(0.97, 1.03)) * (1.0 + _ar1(rng, samples, 0.995, 0.004))
    flow_share = (1.0 - 0.55 * closed) * (1.0 + 0.6 * leak) * (1.0 - 0.08 * cavitation)
    flow = 32.0 * speed * flow_share
    pressure = (
        0.9 * speed**2 * (1.0 + 1.1 * closed) * (1.0 - 1.3 * leak) * (1.0 - 0.05 * cavitation)
    )
    pressure += _ar1(rng, samples, 0.999, 0.004)  # the transducer's zero wanders
    current = 2.4 * speed * (0.4 + 0.6 * flow_share) * (1.0 + 0.03 * imbalance)
    voltage = 230.0 + _ar1(rng, samples, 0.9, 0.4) - 1.5 * (current - 2.4)
    ambient = _ar1(rng, samples, 0.999, 0.3)
    motor = _lag(58.0 + 14.0 * (current / 2.4) ** 2, 250.0) + ambient
    fluid = _lag(26.0 + 3.0 * (1.0 - flow_share) + 0.5 * cavitation, 400.0) + 0.6 * ambient
    recirculation = 0.15 * closed  # a throttled pump runs rougher
    drive_end = 0.21 * speed**2 * (1.0 + imbalance + 0.9 * cavitation + recirculation)
    non_drive_end = 0.27 * speed**2 * (1.0 + 0.5 * imbalance + 0.9 * cavitation + recirculation)
    vibration_noise = 0.025 * (1.0 + 2.0 * cavitation)

    def noisy(level: FloatArray, relative: float | FloatArray = 0.0, absolute: float = 0.0) -> Any:
        sd = np.abs(level) * relative + absolute
        return level + rng.normal(0.0, 1.0, samples) * sd

    values = np.column_stack(
        [
            noisy(drive_end, vibration_noise),
            noisy(non_drive_end, vibration_noise),
            noisy(current, 0.012),
            noisy(pressure, 0.015),
            noisy(motor, absolute=0.08),
            noisy(fluid, absolute=0.05),
            noisy(voltage, absolute=0.5),
            noisy(flow, 0.01),
        ]
    ).astype(np.float64)
    labels = (t >= start) & (t < stop)
    return Series(
        name=f"pump-{index + 1:02d}",
        dataset="synthetic_pump",
        channels=PUMP_CHANNELS,
        values=values,
        labels=labels,
        rate_hz=1.0,
        fit_samples=FIT_SAMPLES,
        info={
            "fault": kind,
            "magnitude": round(magnitude, 3),
            "fault_start_s": start,
            "fault_end_s": stop,
            "ramp_s": round(ramp_s, 1),
            "samples": samples,
        },
    )


# ------------------------------------------------------------------------------------- replays


@dataclass(frozen=True)
class Source:
    """One csv source of the replays: a series scored by one method under one profile."""

    series: Series
    method: Method
    profile: str

    @property
    def name(self) -> str:
        return f"{self.series.name}.{self.method}.{self.profile}"


def samples_per_window(series: Series, window: int) -> int:
    """The series' own window, or the run's."""
    return series.window if series.window is not None else window


def window_seconds(series: Series, window: int) -> float:
    return samples_per_window(series, window) / series.rate_hz


def settings_of(profile: str, method: Method) -> AnomalySettings:
    """A profile's settings for a method (raises, naming the field, for a bad profile)."""
    return AnomalySettings.model_validate({"method": method, **PROFILES[profile][method]})


def anomaly_settings(source: Source, window: int) -> dict[str, Any]:
    """The `anomaly:` section: the profile over the defaults, and a `baseline` that is complete
    exactly at the fitting part's last window. The collector is ready once its windows' start
    times span `baseline`; k windows span (k - 1) windows, so half a window less than that makes
    the k-th window the one, whatever the float rounding of the times."""
    fit_windows = source.series.fit_samples // samples_per_window(source.series, window)
    span_s = (fit_windows - 1.5) * window_seconds(source.series, window)
    doc: dict[str, Any] = {"method": source.method, **PROFILES[source.profile][source.method]}
    doc["baseline"] = round(span_s, 6)
    AnomalySettings.model_validate(doc)  # a bad profile fails here, naming the field
    return doc


def write_series_csv(path: Path, series: Series, first: int, stop: int) -> Path:
    """Rows [first, stop) of the series with epoch-second timestamps on its exact clock."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", *series.channels])
        for i in range(first, stop):
            # repr: the shortest text that reads back as the same double, so the source sees
            # exactly the clock and the values loaded (a missing value is `nan`).
            stamp = EPOCH_S + i / series.rate_hz
            writer.writerow([repr(stamp), *(repr(float(v)) for v in series.values[i])])
    return path


def replay_config(
    path: Path, data_dir: Path, sources: Sequence[Source], csv_of: Mapping[str, Path], window: int
) -> Path:
    doc = {
        "appliance": {"id": "bench-anomaly", "data_dir": str(data_dir), "health_interval": "1h"},
        "sensors": [
            {
                "name": source.name,
                "type": "csv",
                "path": str(csv_of[source.series.name]),
                "timestamp_format": "epoch_s",
                "window": window_seconds(source.series, window),
                # Every series here is regularly sampled: at 100 Hz and more (CWRU) the windows
                # get the vibration features (kurtosis, crest, bands) as a live source's would.
                "sample_rate": source.series.rate_hz,
                "pace": "fast",
                "anomaly": anomaly_settings(source, window),
            }
            for source in sources
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def replay(config: Path, log_path: Path) -> float:
    """`appliance replay -c config` as a subprocess; its wall seconds. Its log goes to a file
    (quoted when it fails): stderr is for this benchmark's progress."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE")}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "appliance", "replay", "-c", str(config)]
    started = time.perf_counter()
    with log_path.open("wb") as log:
        try:
            done = subprocess.run(
                [*command, "--log-level", "warning"],
                stdout=log,
                stderr=log,
                env=env,
                cwd=ROOT,
                timeout=REPLAY_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"appliance replay -c {config} ran past {REPLAY_TIMEOUT_S} s; see {log_path}"
            ) from None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"appliance replay -c {config} exited {done.returncode}:\n{tail}")
    return seconds


@dataclass
class Journalled:
    """What one source left in the journal."""

    anomalies: list[tuple[str, float]] = field(default_factory=list)
    """(body.kind, record time in seconds from the series' start), in journal order."""
    baselines: list[dict[str, Any]] = field(default_factory=list)
    readings_by_model: dict[str | None, int] = field(default_factory=dict)
    """Readings of the scoring part, by the model (baseline) stamped on them."""


def read_journal(data_dir: Path, sources: Sequence[Source]) -> dict[str, Journalled]:
    by_name = {source.name: source for source in sources}
    out = {name: Journalled() for name in by_name}
    with JournalReader.open(data_dir) as reader:
        for record in reader.iter_records(kind="anomaly"):
            if record.source in out:
                at = parse_ts(record.ts).timestamp() - EPOCH_S
                out[record.source].anomalies.append((str(record.body["kind"]), at))
        for record in reader.iter_records(kind="baseline"):
            if record.source in out:
                out[record.source].baselines.append(dict(record.body))
        rows = reader.conn.execute(
            "SELECT source, model, ts FROM records WHERE kind = 'reading'"
        ).fetchall()
    for name, model, ts in rows:
        source = by_name.get(name)
        if source is None:
            continue
        start_s = source.series.fit_samples / source.series.rate_hz
        if parse_ts(ts).timestamp() - EPOCH_S >= start_s - _EPS_S:
            counts = out[name].readings_by_model
            counts[model] = counts.get(model, 0) + 1
    return out


def run_protocol(
    root: Path, sources: Sequence[Source], window: int
) -> tuple[dict[str, Journalled], dict[str, float]]:
    """Both replays on one data directory; what each source journalled, and their wall times."""
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    fit_csv: dict[str, Path] = {}
    score_csv: dict[str, Path] = {}
    for series in {source.series.name: source.series for source in sources}.values():
        fit_csv[series.name] = write_series_csv(
            root / f"{series.name}-fit.csv", series, 0, series.fit_samples
        )
        score_csv[series.name] = write_series_csv(
            root / f"{series.name}-score.csv", series, series.fit_samples, series.samples
        )
    walls: dict[str, float] = {}
    for phase, csv_of in (("fit", fit_csv), ("score", score_csv)):
        progress(f"  appliance replay: {phase} part of {len(sources)} source(s)")
        config = replay_config(root / f"{phase}.yaml", data_dir, sources, csv_of, window)
        walls[phase] = round(replay(config, root / f"{phase}.log"), 2)
        progress(f"    {walls[phase]:.1f} s")
    return read_journal(data_dir, sources), walls


# ---------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """One source scored against its labels, over the samples after the fitting part."""

    counts: Confusion
    faults: tuple[Outcome, ...]
    alarms: int
    false_alarms: int
    raised_outside: int

    @property
    def delays(self) -> Delays:
        return Delays.of(self.faults)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.counts.to_dict(),
            **self.delays.to_dict(),
            "alarms": self.alarms,
            "false_alarms": self.false_alarms,
            "alarms_raised_outside_faults": self.raised_outside,
        }


def evaluate(source: Source, journalled: Journalled, window: int) -> Evaluation:
    series = source.series
    alarms = alarms_from_events(
        journalled.anomalies,
        window_s=window_seconds(series, window),
        data_end_s=series.samples / series.rate_hz,
    )
    times = series.times_s()
    guess = predicted(times, alarms)
    counted = series.counted()
    scored = slice(series.fit_samples, None)
    faults = series.labelled_faults()
    return Evaluation(
        counts=confusion(series.labels[counted], guess[counted]),
        faults=tuple(
            outcomes(
                faults,
                times,
                alarms,
                period_s=series.period_s,
                predicted_mask=guess,
                counted=counted,
            )
        ),
        alarms=len(alarms),
        false_alarms=false_alarms(times[scored], series.labels[scored], alarms),
        raised_outside=raised_outside(faults, times, alarms, series.period_s),
    )


def aggregate(evaluations: Sequence[Evaluation]) -> dict[str, Any]:
    """Confusion counts summed over the runs (SKAB's way), delays over every detected fault, the
    faults scored by event (NAB's way); the mean of the per-run F1 beside it, for how evenly the
    runs went."""
    counts = sum((e.counts for e in evaluations), Confusion())
    delays = sum((e.delays for e in evaluations), Delays())
    per_run_f1 = [e.counts.f1 for e in evaluations if e.counts.f1 is not None]
    hits = sum(1 for e in evaluations for o in e.faults if o.detected)
    misses = sum(1 for e in evaluations for o in e.faults if not o.detected)
    outside = sum(e.raised_outside for e in evaluations)
    return {
        "runs": len(evaluations),
        **counts.to_dict(),
        **delays.to_dict(),
        "alarms": sum(e.alarms for e in evaluations),
        "false_alarms": sum(e.false_alarms for e in evaluations),
        "by_event": {
            "hits": hits,
            "missed": misses,
            "false_positives": outside,
            "precision": _round(_ratio(hits, hits + outside)),
            "recall": _round(_ratio(hits, hits + misses)),
            "f1": _round(_f1(hits, outside, misses)),
        },
        "f1_mean_of_runs": _round(sum(per_run_f1) / len(per_run_f1)) if per_run_f1 else None,
    }


def fault_table(
    members: Sequence[Series], scored: Mapping[str, Evaluation]
) -> list[dict[str, Any]]:
    """Every labelled fault of a data set: detected or missed, its delay and recall."""
    return [
        {
            "series": series.name,
            "fault": outcome.fault.name,
            "group": outcome.fault.group,
            "detected": outcome.detected,
            "delay_s": _round(outcome.delay_s, 2),
            "delay_samples": None
            if outcome.delay_s is None
            else round(outcome.delay_s * series.rate_hz),
            "recall": _round(outcome.recall),
        }
        for series in members
        for outcome in scored[series.name].faults
    ]


def method_result(members: Sequence[Series], scored: Mapping[str, Evaluation]) -> dict[str, Any]:
    """One method on one data set: the aggregate of its averaged groups, the other groups apart,
    every fault, and whether every detectable fault was detected (None: the set has none)."""
    groups = dict.fromkeys(s.group for s in members)
    averaged = [scored[s.name] for s in members if s.group in AVERAGED_GROUPS]
    detectable = [
        outcome.detected
        for evaluation in scored.values()
        for outcome in evaluation.faults
        if outcome.fault.group == "detectable"
    ]
    return {
        "aggregate": aggregate(averaged),
        "groups": {
            group: aggregate([scored[s.name] for s in members if s.group == group])
            for group in groups
            if group not in AVERAGED_GROUPS
        },
        "detectable_all_detected": all(detectable) if detectable else None,
        "faults": fault_table(members, scored),
        "runs": {name: e.to_dict() for name, e in scored.items()},
    }


def dataset_result(
    dataset: str,
    members: Sequence[Series],
    evaluations: Mapping[str, Evaluation],
    profiles: Sequence[str],
    methods: Sequence[Method],
    window: int,
    fitted: Collection[str],
) -> dict[str, Any]:
    """Per profile and method: the aggregate over the set's series, each fault and each run, and
    how many of its sources had a baseline at all (`fitted`: their names); a source without one
    never alarms, which its figures alone would not tell from a quiet detector."""
    results: dict[str, Any] = {}
    for profile in profiles:
        results[profile] = {}
        for method in methods:
            scored = {s.name: evaluations[Source(s, method, profile).name] for s in members}
            with_baseline = sum(1 for s in members if Source(s, method, profile).name in fitted)
            results[profile][method] = {
                "baselines_fitted": f"{with_baseline}/{len(members)}",
                **method_result(members, scored),
            }
    fits = {s.name: s.fit_samples for s in members}
    return {
        "synthetic": dataset == SYNTHETIC,
        "series": {s.name: dict(s.info) for s in members},
        "channels": list(members[0].channels),
        "rate_hz": members[0].rate_hz,
        "window_samples": samples_per_window(members[0], window),
        "fit_samples": fits[members[0].name] if len(set(fits.values())) == 1 else fits,
        "results": results,
    }


def source_checks(
    sources: Sequence[Source], journal: Mapping[str, Journalled], window: int
) -> dict[str, Any]:
    """The replays did what the protocol says: one baseline per source, fitted on the fitting
    part's windows (those the detector leaves out, such as a first window without the history
    its temporal features need or one with a missing value, are counted by source), and every
    window after it scored with that baseline; the sources that did not, by name."""
    not_fitted: list[str] = []
    not_scored: list[str] = []
    left_out: dict[str, int] = {}
    for source in sources:
        found = journal[source.name]
        per_window = samples_per_window(source.series, window)
        fit_windows = source.series.fit_samples // per_window
        used = found.baselines[0].get("windows") if len(found.baselines) == 1 else None
        if not isinstance(used, int) or not 0 < used <= fit_windows:
            not_fitted.append(source.name)
            continue
        if used < fit_windows:
            left_out[source.name] = fit_windows - used
        model = f"{source.name}-baseline@{found.baselines[0].get('version')}"
        scoring_windows = math.ceil(
            (source.series.samples - source.series.fit_samples) / per_window
        )
        if found.readings_by_model != {model: scoring_windows}:
            not_scored.append(source.name)
    return {
        "one_baseline_per_source_fitted_on_the_fit_part": not not_fitted,
        "every_later_window_scored_with_it": not not_fitted and not not_scored,
        "not_fitted_as_the_protocol_says": not_fitted,
        "not_scored_with_it": not_scored,
        "fit_windows_left_out": left_out,
    }


# ---------------------------------------------------------------------------------------- main


def code_fingerprint() -> dict[str, str]:
    """bench.common's journal fingerprint plus the files that decide what is detected."""
    return source_fingerprint(
        "inference/anomaly.py",
        "inference/anomaly_fit.py",
        "inference/baseline.py",
        "inference/features.py",
        "inference/temporal.py",
        "appliance/stages/anomalies.py",
        "appliance/stages/pipeline.py",
        "sensors/csv_replay.py",
        "config/analysis.py",
        "config/sensors.py",
        "bench/anomaly_datasets.py",
    )


def load_dataset(dataset: str, *, runs: int, quick: bool) -> list[Series]:
    """One data set's series; DatasetError (with why) when it cannot be loaded."""
    if dataset == SYNTHETIC:
        return [pump_run(i) for i in range(runs)]
    if dataset in REAL_SETS:
        return load_real_set(dataset, quick=quick)
    folder = aeon_data_dir()
    if folder is None:
        raise DatasetError("the aeon wheel is not installed (make installs it, --no-deps)")
    return [kdd_tsad_135(folder) if dataset == "KDD-TSAD_135" else daphnet_s06r02e0(folder)]


def verdicts(synthetic: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """SKAB's bar judged on the synthetic testbed's aggregate, per profile and method."""
    out: dict[str, dict[str, Any]] = {}
    for profile, by_method in synthetic.items():
        out[profile] = {}
        for method, result in by_method.items():
            f1, far = result["aggregate"]["f1"], result["aggregate"]["far"]
            passed = f1 is not None and far is not None and f1 >= TARGET_F1 and far <= TARGET_FAR
            out[profile][method] = {"f1": f1, "far": far, "pass": passed}
    return out


def summary(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The headline figures per data set, profile and method (the full ones are under
    `datasets`)."""
    out: dict[str, Any] = {}
    for dataset, entry in datasets.items():
        if "results" not in entry:
            out[dataset] = {"skipped": entry.get("skipped") or entry.get("error")}
            continue
        out[dataset] = {}
        rate = float(entry["rate_hz"])
        for profile, by_method in entry["results"].items():
            out[dataset][profile] = {}
            for method, result in by_method.items():
                total = result["aggregate"]
                line = {
                    key: total[key]
                    for key in ("f1", "far", "mar", "precision", "recall", "delay_s_mean")
                }
                delay = total["delay_s_mean"]
                line["delay_samples_mean"] = None if delay is None else round(delay * rate, 1)
                line["false_alarms"] = total["false_alarms"]
                line["faults_detected"] = f"{total['detected']}/{total['faults']}"
                line["detectable_all_detected"] = result["detectable_all_detected"]
                line["baselines_fitted"] = result["baselines_fitted"]
                for group, apart in result["groups"].items():
                    line[f"{group}_detected"] = f"{apart['detected']}/{apart['faults']}"
                out[dataset][profile][method] = line
    return out


def summary_line(name: str, result: Mapping[str, Any]) -> str:
    def show(key: str) -> str:
        value = result.get(key)
        return "-" if value is None else f"{value:.3f}"

    delay = result.get("delay_s_mean")
    return (
        f"    {name:<28} F1 {show('f1')}  FAR {show('far')}  MAR {show('mar')}  "
        f"delay {'-' if delay is None else f'{delay:.0f} s'}  "
        f"detected {result.get('detected', 0)}/{result.get('faults', 0)}  "
        f"false alarms {result.get('false_alarms', 0)}"
    )


def report_progress(dataset: str, entry: Mapping[str, Any]) -> None:
    progress(f"{dataset}{' (SYNTHETIC)' if entry['synthetic'] else ''}:")
    for profile, by_method in entry["results"].items():
        for method, result in by_method.items():
            progress(summary_line(f"{profile} {method}", result["aggregate"]))
            fitted, series = (int(n) for n in result["baselines_fitted"].split("/"))
            if fitted < series:
                progress(f"      NO BASELINE fitted for {series - fitted} of {series} series")
            missed = [
                f"{f['series']} {f['fault']}"
                for f in result["faults"]
                if f["group"] == "detectable" and not f["detected"]
            ]
            if missed:
                shown = ", ".join(missed[:6]) + (
                    f" and {len(missed) - 6} more" if len(missed) > 6 else ""
                )
                progress(f"      missed: {shown}")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        help="data sets to replay (default: all; quick: synthetic_pump)",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="methods to score (default: all five)"
    )
    parser.add_argument(
        "--runs", type=int, help=f"synthetic pump runs (default {DEFAULT_RUNS}; quick 1)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"samples per window of synthetic_pump and KDD-TSAD_135 (default {DEFAULT_WINDOW});"
        " the other sets have their own",
    )
    parser.add_argument(
        "--profiles",
        nargs="+",
        choices=sorted(PROFILES),
        help="settings profiles (default: all; quick: defaults)",
    )
    args = parser.parse_args()
    runs = args.runs if args.runs is not None else (1 if args.quick else DEFAULT_RUNS)
    if not 1 <= runs <= 99:
        parser.error(f"--runs must be 1..99, got {runs}")
    methods: list[Method] = list(args.methods or (["hotelling"] if args.quick else METHODS))
    profiles: list[str] = list(args.profiles or (["defaults"] if args.quick else PROFILES))
    chosen = set(args.datasets or ([SYNTHETIC] if args.quick else DATASETS))
    selected = [d for d in DATASETS if d in chosen]
    window: int = args.window
    min_windows = max(settings_of(p, m).min_windows for m in methods for p in profiles)
    # Slope needs two samples; the fitting part must split into whole windows, enough of them.
    if window < 2 or FIT_SAMPLES % window or FIT_SAMPLES // window < min_windows:
        parser.error(
            f"--window must be at least 2 samples, divide {FIT_SAMPLES} and leave at least "
            f"min_windows ({min_windows}) windows in it; got {window}"
        )

    loaded: dict[str, list[Series]] = {}
    datasets: dict[str, dict[str, Any]] = {}
    for dataset in selected:
        try:
            loaded[dataset] = load_dataset(dataset, runs=runs, quick=args.quick)
        except DatasetError as exc:
            progress(f"{dataset}: skipped: {exc}")
            datasets[dataset] = {"skipped": str(exc)}
    for members in loaded.values():
        for item in members:
            per_window = samples_per_window(item, window)
            if item.fit_samples % per_window or item.fit_samples // per_window < min_windows:
                parser.error(
                    f"{item.name}: its {item.fit_samples} fitting samples do not split into at "
                    f"least min_windows ({min_windows}) whole windows of {per_window} samples"
                )

    root = make_data_root(args.tmp_dir, "bench-anomaly-")
    walls: dict[str, dict[str, float]] = {}
    checks: dict[str, dict[str, Any]] = {}
    try:
        box = machine(root)
        progress(f"data dir {root}, load {box['load_average_at_start']}")
        for dataset, members in loaded.items():
            sources = [Source(s, m, p) for s in members for m in methods for p in profiles]
            progress(f"{dataset}: {len(members)} series x {len(methods)} method(s)")
            started = time.perf_counter()
            try:
                journal, walls[dataset] = run_protocol(root / dataset, sources, window)
            except RuntimeError as exc:
                progress(f"{dataset}: FAILED: {exc}")
                datasets[dataset] = {"error": str(exc)}
                continue
            finally:
                shutil.rmtree(root / dataset, ignore_errors=True)
            evaluations = {s.name: evaluate(s, journal[s.name], window) for s in sources}
            walls[dataset]["total"] = round(time.perf_counter() - started, 2)
            checks[dataset] = source_checks(sources, journal, window)
            fitted = {s.name for s in sources if journal[s.name].baselines}
            datasets[dataset] = {
                **dataset_result(dataset, members, evaluations, profiles, methods, window, fitted),
                "checks": checks[dataset],
            }
            report_progress(dataset, datasets[dataset])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ordered = {d: datasets[d] for d in selected}
    failed = [d for d, entry in ordered.items() if "error" in entry]
    all_checks = {
        key: all(c[key] for c in checks.values())
        for key in (
            "one_baseline_per_source_fitted_on_the_fit_part",
            "every_later_window_scored_with_it",
        )
    }
    emit(
        {
            "benchmark": "anomaly_quality",
            "quick": args.quick,
            "machine": box,
            "source": code_fingerprint(),
            "settings": {
                "datasets": selected,
                "window_samples": window,
                "synthetic_fit_samples": FIT_SAMPLES,
                "methods": methods,
                "profiles": {
                    p: {
                        m: settings_of(p, m).model_dump(mode="json", exclude={"method", "baseline"})
                        for m in methods
                    }
                    for p in profiles
                },
                "baseline": "the span of the fitting part's window start times (see the module "
                "docstring)",
                "features": "every feature of every channel (AnomalySettings.features unset)",
                "epoch": datetime.fromtimestamp(EPOCH_S, UTC).isoformat(),
                "synthetic_seed": SEED,
            },
            "summary": summary(ordered),
            "datasets": ordered,
            "targets": {
                "development_sets": "every method detects every fault the set's README calls "
                "detectable (detectable_all_detected), FAR reported (issue 18)",
                "f1_min": TARGET_F1,
                "far_max": TARGET_FAR,
                "applies_to": "synthetic_pump, aggregated per method (SKAB's bar)",
            },
            "pass": verdicts(ordered[SYNTHETIC]["results"])
            if "results" in ordered.get(SYNTHETIC, {})
            else {},
            "replay_wall_s": walls,
            "checks": {**all_checks, "failed_replays": failed},
            "ok": all(all_checks.values()) and not failed,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_mib": peak_rss_mib(),
        }
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
