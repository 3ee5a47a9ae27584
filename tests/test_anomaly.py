"""Tests of inference.anomaly, inference.anomaly_fit and inference.baseline: every method on
synthetic correlated sensors (what each catches, false alarms on held-out healthy data),
debouncing, hysteresis, escalation, the baseline file, the collector."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from config.analysis import AnomalySettings
from inference.anomaly import AnomalyDetector, AnomalyEvent
from inference.anomaly_fit import TAIL_MAX, BaselineCollector, calibrated_threshold, fit_baseline
from inference.baseline import EWMA_SIGMA, Baseline, BaselineError

FloatArray = npt.NDArray[np.float64]
METHODS = ("robust_z", "ewma", "hotelling", "isolation_forest", "autoencoder")
T0 = datetime(2026, 3, 1, tzinfo=UTC)

# Eight channels of one machine: a common load factor (correlation 0.98) plus channel noise.
CHANNELS = 8
RHO = 0.98
MEANS = np.linspace(1.0, 8.0, CHANNELS)
SPREADS = np.linspace(0.1, 0.8, CHANNELS)
NAMES = tuple(f"ch{i}.rms" for i in range(CHANNELS))
BASELINE_WINDOWS = 3600
BASELINE_SEED = 1


def healthy(n: int, rng: np.random.Generator) -> FloatArray:
    load = rng.normal(size=(n, 1))
    noise = rng.normal(size=(n, CHANNELS))
    standard: FloatArray = RHO * load + math.sqrt(1 - RHO**2) * noise
    return MEANS + SPREADS * standard


def shift_one_channel(n: int, rng: np.random.Generator) -> FloatArray:
    rows = healthy(n, rng)
    rows[:, 2] += 8 * SPREADS[2]
    return rows


def shift_all_channels(n: int, rng: np.random.Generator) -> FloatArray:
    """Every channel 6 sigma up together: the correlation holds, the level does not."""
    return healthy(n, rng) + 6 * SPREADS


def variance_increase(n: int, rng: np.random.Generator) -> FloatArray:
    rows = healthy(n, rng)
    for channel in (1, 4):
        rows[:, channel] = MEANS[channel] + 5 * (rows[:, channel] - MEANS[channel])
    return rows


def broken_correlation(n: int, rng: np.random.Generator) -> FloatArray:
    """Channel 5 follows a load of its own: each channel's distribution is unchanged, only the
    relation between channel 5 and the others broke."""
    rows = healthy(n, rng)
    own_load = rng.normal(size=n)
    noise = rng.normal(size=n)
    rows[:, 5] = MEANS[5] + SPREADS[5] * (RHO * own_load + math.sqrt(1 - RHO**2) * noise)
    return rows


Scenario = Callable[[int, np.random.Generator], FloatArray]
SCENARIOS: dict[str, Scenario] = {
    "shift_one_channel": shift_one_channel,
    "shift_all_channels": shift_all_channels,
    "variance_increase": variance_increase,
    "broken_correlation": broken_correlation,
}
# What each method catches on this data (measured, and each gap has a reason):
# - robust_z and ewma look at one feature at a time: a broken correlation leaves every
#   feature's distribution as it was (see test_broken_correlation_is_invisible_to_...).
# - isolation_forest splits one feature at a time: a broken relation stays within each feature's
#   range. A window beyond the baseline's range scores by how far beyond (inference/baseline.py).
# - autoencoder: all channels moving together along their correlation is exactly what it learnt
#   to reproduce, so its reconstruction error stays small.
CATCHES = {
    "robust_z": ("shift_one_channel", "shift_all_channels", "variance_increase"),
    "ewma": ("shift_one_channel", "shift_all_channels", "variance_increase"),
    "hotelling": tuple(SCENARIOS),
    "isolation_forest": ("shift_one_channel", "shift_all_channels", "variance_increase"),
    "autoencoder": ("shift_one_channel", "variance_increase", "broken_correlation"),
}
DETECTION_CASES = [(method, scenario) for method in METHODS for scenario in CATCHES[method]]

HEALTHY_WINDOWS = 2000
MAX_FALSE_ANOMALIES = 1
"""Bound on anomalies started in HEALTHY_WINDOWS held-out healthy windows (the default debounce)."""
MAX_OVER_SHARE = 0.01
"""Bound on the share of held-out healthy windows scoring over the threshold."""
DETECT_WITHIN = 60
"""An injected anomaly must start an anomaly within this many windows (the EWMA takes its time
over two noisier channels at a threshold of one false alarm a day)."""


def settings(method: str = "robust_z", **overrides: Any) -> AnomalySettings:
    return AnomalySettings.model_validate({"method": method, **overrides})


def times(n: int, start: int = 0) -> list[datetime]:
    return [T0 + timedelta(seconds=start + i) for i in range(n)]


def run(
    detector: AnomalyDetector, rows: Sequence[FloatArray] | FloatArray, start: int = 0
) -> list[tuple[int, AnomalyEvent]]:
    """Feed rows as consecutive one-second windows; (row index, event) for every event."""
    events: list[tuple[int, AnomalyEvent]] = []
    for i, (row, ts) in enumerate(zip(rows, times(len(rows), start), strict=True)):
        events.extend((i, event) for event in detector.observe(row, ts))
    return events


class Baselines:
    """Each method fitted once per module (isolation_forest's ONNX export takes seconds)."""

    def __init__(self) -> None:
        self.rows = healthy(BASELINE_WINDOWS, np.random.default_rng(BASELINE_SEED))
        self._fitted: dict[str, Baseline] = {}

    def __getitem__(self, method: str) -> Baseline:
        if method not in self._fitted:
            self._fitted[method] = fit_baseline(settings(method), self.rows, NAMES, seed=0)
        return self._fitted[method]


@pytest.fixture(scope="module")
def baselines() -> Baselines:
    return Baselines()


# -- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "scenario"), DETECTION_CASES)
def test_method_detects_injected_anomaly(baselines: Baselines, method: str, scenario: str) -> None:
    baseline = baselines[method]
    detector = AnomalyDetector(settings(method), baseline)
    lead_in = healthy(50, np.random.default_rng(11))
    assert run(detector, lead_in) == []

    anomalous = SCENARIOS[scenario](300, np.random.default_rng(12))
    events = run(detector, anomalous, start=50)
    starts = [(i, e) for i, e in events if e.kind == "started"]
    assert starts, f"{method} missed {scenario}"
    index, first = starts[0]
    assert index < DETECT_WITHIN
    assert first.started_at >= T0 + timedelta(seconds=50)
    assert first.ratio > 1 and first.score > first.threshold == baseline.threshold
    assert first.windows_over >= settings(method).debounce[0]
    assert first.baseline == baseline.version and first.method == method
    assert len(first.features) == 3
    assert {f.name for f in first.features} <= set(NAMES)
    contributions = [f.value for f in first.features]
    assert contributions == sorted(contributions, reverse=True)


@pytest.mark.parametrize("method", ["robust_z", "ewma", "hotelling", "autoencoder"])
def test_top_feature_names_the_shifted_channel(baselines: Baselines, method: str) -> None:
    detector = AnomalyDetector(settings(method), baselines[method])
    events = run(detector, shift_one_channel(20, np.random.default_rng(13)))
    started = next(e for _, e in events if e.kind == "started")
    assert started.features[0].name == "ch2.rms"


@pytest.mark.parametrize("method", ["hotelling", "autoencoder"])
def test_broken_correlation_is_attributed_to_the_broken_channel(
    baselines: Baselines, method: str
) -> None:
    detector = AnomalyDetector(settings(method), baselines[method])
    events = run(detector, broken_correlation(300, np.random.default_rng(14)))
    started = [e for _, e in events if e.kind == "started"]
    assert started
    # Windows where the two loads happen to agree look healthy; the ones that start an
    # anomaly disagree, and the broken channel is the one that does not fit the rest.
    assert sum(e.features[0].name == "ch5.rms" for e in started) > len(started) / 2


@pytest.mark.parametrize("method", ["robust_z", "ewma"])
def test_broken_correlation_is_invisible_to_univariate_methods(
    baselines: Baselines, method: str
) -> None:
    """The point of hotelling and autoencoder: no single feature shows this fault."""
    baseline = baselines[method]
    rows = broken_correlation(1000, np.random.default_rng(15))
    assert np.mean(baseline.scores(rows) > baseline.threshold) < MAX_OVER_SHARE
    assert run(AnomalyDetector(settings(method), baseline), rows) == []


@pytest.mark.parametrize("method", METHODS)
def test_quiet_on_held_out_healthy_data(baselines: Baselines, method: str) -> None:
    baseline = baselines[method]
    rows = healthy(HEALTHY_WINDOWS, np.random.default_rng(16))
    over = np.mean(baseline.scores(rows) > baseline.threshold)
    assert over < MAX_OVER_SHARE
    events = run(AnomalyDetector(settings(method), baseline), rows)
    assert sum(e.kind == "started" for _, e in events) <= MAX_FALSE_ANOMALIES


@pytest.mark.parametrize("method", METHODS)
def test_threshold_is_calibrated_from_held_out_scores_to_the_false_alarm_rate(
    baselines: Baselines, method: str
) -> None:
    baseline = baselines[method]
    info = baseline.info
    assert info["false_alarms_per_day"] == 1.0 and info["margin"] == 1.0
    assert info["threshold_from"] == "held_out_4_folds_tail_fit"
    assert info["threshold_windows"] == BASELINE_WINDOWS
    # No window length and no data time given: a source's default window, one second.
    assert (info["window_s"], info["window_s_from"]) == (1.0, "assumed")
    assert info["exceedance"] == pytest.approx(1.0 / 86400)
    assert info["tail_peaks"] == TAIL_MAX  # 10% of 3600 held-out scores, capped
    # The threshold lies beyond the bulk of the baseline's own scores, within reach of a fault.
    in_sample = baseline.scores(baselines.rows)
    assert baseline.threshold > np.quantile(in_sample, 0.99)
    assert baseline.threshold > info["tail_from"]


@pytest.mark.parametrize(
    ("window_s", "per_day", "expected"),
    [(1.0, 1.0, 1 / 86400), (60.0, 2.0, 120 / 86400), (3600.0, 100.0, 0.5)],
)
def test_the_exceedance_follows_the_window_and_the_rate(
    window_s: float, per_day: float, expected: float
) -> None:
    rows = healthy(200, np.random.default_rng(27))
    baseline = fit_baseline(
        settings("robust_z", false_alarms_per_day=per_day), rows, NAMES, window_s=window_s
    )
    assert baseline.info["exceedance"] == pytest.approx(expected)


def test_window_length_is_read_from_the_data_time_covered() -> None:
    rows = healthy(121, np.random.default_rng(28))
    covering = (T0, T0 + timedelta(minutes=10))
    baseline = fit_baseline(settings("robust_z"), rows, NAMES, covering=covering)
    assert (baseline.info["window_s"], baseline.info["window_s_from"]) == (5.0, "baseline_span")


@pytest.mark.parametrize(
    ("name", "draw", "quantile"),
    [
        ("exponential", lambda rng, n: rng.exponential(2.0, n), lambda p: -2.0 * math.log(p)),
        (
            "chi2_8",
            lambda rng, n: rng.chisquare(8, n),
            None,
        ),
    ],
)
def test_the_tail_fit_finds_far_quantiles_from_few_scores(
    name: str, draw: Callable[[np.random.Generator, int], FloatArray], quantile: Any
) -> None:
    """Measured, not assumed: from 400 scores, the 1-in-100,000 score of two light-tailed
    distributions (the shapes of a squared error and of T²) is found within 25%, in 40 draws."""
    exceedance = 1e-5
    rng = np.random.default_rng(29)
    if quantile is None:
        truth = float(np.quantile(draw(np.random.default_rng(30), 20_000_000), 1 - exceedance))
    else:
        truth = quantile(exceedance)
    estimates = [calibrated_threshold(draw(rng, 400), exceedance).threshold for _ in range(40)]
    assert np.median(estimates) == pytest.approx(truth, rel=0.25)


@pytest.mark.parametrize("method", ["robust_z", "hotelling"])
def test_false_alarms_a_day_on_healthy_data_are_near_the_target(
    baselines: Baselines, method: str
) -> None:
    """Ten days of one-second healthy windows like the baseline's: the windows over the
    threshold of one false alarm a day number a few a day, not hundreds."""
    baseline = baselines[method]
    days = 10
    rows = healthy(days * 86400, np.random.default_rng(31))
    over_per_day = float(np.sum(baseline.scores(rows) > baseline.threshold)) / days
    assert over_per_day < 10


def test_every_method_can_alarm_on_a_six_sigma_shift() -> None:
    """With every default, each method raises an anomaly when every channel moves six of its
    baseline standard deviations: a method must never ship unable to alarm (the isolation
    forest of earlier versions never did, its scores levelling off under its threshold)."""
    rows = healthy(600, np.random.default_rng(32))
    shifted = healthy(40, np.random.default_rng(33)) + 6 * SPREADS * math.sqrt(1.0)
    for method in METHODS:
        defaults = AnomalySettings(method=method)
        baseline = fit_baseline(defaults, rows, NAMES)
        detector = AnomalyDetector(defaults, baseline)
        assert run(detector, healthy(30, np.random.default_rng(34))) == [], method
        events = run(detector, shifted, start=30)
        assert any(e.kind == "started" for _, e in events), f"{method} cannot alarm"


def test_isolation_forest_onnx_scores_match_scikit_learn(baselines: Baselines) -> None:
    from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]
    from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    baseline = baselines["isolation_forest"]
    fit_rows = baselines.rows
    reference = Pipeline(
        [
            ("scale", StandardScaler()),
            ("forest", IsolationForest(max_samples=baseline.info["max_samples"], random_state=0)),
        ]
    ).fit(fit_rows)
    rows = np.vstack(
        [
            healthy(100, np.random.default_rng(17)),
            shift_all_channels(100, np.random.default_rng(18)),
        ]
    )
    scaler = reference.named_steps["scale"]
    scaled = (rows - scaler.mean_) / scaler.scale_
    reach = np.abs((fit_rows - scaler.mean_) / scaler.scale_).max(axis=0)
    speed = -1.0 / np.log2(-reference.score_samples(rows))
    expected = speed + np.clip(np.abs(scaled) - reach, 0.0, None).max(axis=1)
    # onnxruntime runs the trees in float32, scikit-learn in float64 after a float32 cast.
    np.testing.assert_allclose(baseline.scores(rows), expected, rtol=1e-4)
    # Beyond the baseline's range the score keeps growing with the distance: the forest's own
    # speed levels off there, and a threshold above its ceiling could never be crossed.
    far = shift_all_channels(50, np.random.default_rng(18)) + 6 * SPREADS
    assert baseline.scores(far).min() > baseline.scores(rows[100:]).max()


def test_ewma_accumulates_a_small_persistent_shift(baselines: Baselines) -> None:
    """A 2.5 sigma shift is lost in robust_z's noise; the EWMA adds it up (to 2.5 / 0.333 = 7.5
    of its own sigmas) and crosses its threshold."""
    rows = healthy(200, np.random.default_rng(19)) + 2.5 * SPREADS * np.eye(CHANNELS)[3]
    robust = baselines["robust_z"]
    ewma = baselines["ewma"]
    assert np.mean(robust.scores(rows) > robust.threshold) < 0.05
    assert np.mean(ewma.scores(rows)[50:] > ewma.threshold) > 0.3
    assert pytest.approx(1 / 3) == EWMA_SIGMA


def test_a_single_feature_autoencoder_works(tmp_path: Path) -> None:
    """scikit-learn fits a one-column target as a flat vector and skl2onnx exports it so."""
    rng = np.random.default_rng(31)
    baseline = fit_baseline(settings("autoencoder"), rng.normal(size=(200, 1)), ["only.rms"])
    rows = np.vstack([rng.normal(size=(50, 1)), [[6.0]]])
    scores = baseline.scores(rows)
    assert scores.shape == (51,)
    assert scores[-1] > baseline.threshold > np.median(scores[:50])
    loaded = Baseline.load(baseline.save(tmp_path / "one.npz"))
    np.testing.assert_array_equal(loaded.scores(rows), scores)


def test_hotelling_works_on_collinear_sensors() -> None:
    """Channel 1 duplicates channel 0 and channel 2 is their sum: a singular covariance."""
    rng = np.random.default_rng(20)
    base = rng.normal(size=(500, 2))

    def collinear(rows: FloatArray) -> FloatArray:
        return np.column_stack([rows[:, 0], rows[:, 0], rows[:, 0] + rows[:, 1], rows[:, 1]])

    baseline = fit_baseline(settings("hotelling"), collinear(base), ["a", "a_copy", "sum", "b"])
    assert np.isfinite(baseline.parameters["precision"]).all()
    assert math.isfinite(baseline.threshold)
    fresh = collinear(rng.normal(size=(1000, 2)))
    assert np.mean(baseline.scores(fresh) > baseline.threshold) < MAX_OVER_SHARE
    broken = fresh.copy()
    # The copy drifts off by one sigma. (The correlation is shrunk a little towards none, about
    # 1% here: a perfectly collinear direction counts as 1% of a feature's variance.)
    broken[:, 1] += 1.0
    assert np.mean(baseline.scores(broken) > baseline.threshold) > 0.99


# -- debounce, hysteresis, severity ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_baseline() -> Baseline:
    rows = healthy(400, np.random.default_rng(21))
    return fit_baseline(settings("robust_z"), rows, NAMES)


def at_ratio(baseline: Baseline, ratio: float) -> FloatArray:
    """A vector whose robust_z score is `ratio` x threshold (channel 0 off, the rest at median)."""
    vector = np.array(baseline.parameters["median"])
    vector[0] += ratio * baseline.threshold * baseline.parameters["scale"][0]
    return vector


def feed(
    detector: AnomalyDetector, baseline: Baseline, ratios: Sequence[float], start: int = 0
) -> list[tuple[int, AnomalyEvent]]:
    return run(detector, [at_ratio(baseline, r) for r in ratios], start)


def test_a_single_spike_does_not_start_an_anomaly(small_baseline: Baseline) -> None:
    detector = AnomalyDetector(settings(), small_baseline)
    assert feed(detector, small_baseline, [0.1, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1]) == []
    assert detector.last_score == pytest.approx(0.1 * small_baseline.threshold)
    assert not detector.active


def test_k_of_n_starts_an_anomaly(small_baseline: Baseline) -> None:
    detector = AnomalyDetector(settings(debounce=(3, 5)), small_baseline)
    events = feed(detector, small_baseline, [0.1, 1.3, 0.1, 1.4, 0.1, 1.2, 0.1])
    assert [(i, e.kind) for i, e in events] == [(5, "started")]
    started = events[0][1]
    assert started.started_at == T0 + timedelta(seconds=1)  # the first window over
    assert started.at == T0 + timedelta(seconds=5)
    assert (started.windows_over, started.windows) == (3, 5)
    assert started.priority == "event"
    assert started.peak_ratio == pytest.approx(1.4)
    assert started.features[0].name == "ch0.rms"
    assert detector.active


def test_k_over_windows_spread_wider_than_n_do_not_start(small_baseline: Baseline) -> None:
    detector = AnomalyDetector(settings(debounce=(3, 5)), small_baseline)
    ratios = [1.5, 0.1, 0.1, 0.1, 0.1, 1.5, 0.1, 0.1, 0.1, 0.1, 1.5, 0.1]
    assert feed(detector, small_baseline, ratios) == []


def test_ending_needs_n_windows_in_a_row_under_hysteresis(small_baseline: Baseline) -> None:
    detector = AnomalyDetector(settings(debounce=(3, 5), hysteresis=0.8), small_baseline)
    assert [e.kind for _, e in feed(detector, small_baseline, [1.5, 1.5, 1.5])] == ["started"]
    # Under the threshold but above threshold x 0.8: still the same anomaly.
    assert feed(detector, small_baseline, [0.9] * 20, start=3) == []
    # Four quiet windows, then one that is not quiet: the count starts again.
    assert feed(detector, small_baseline, [0.5] * 4 + [0.85], start=23) == []
    events = feed(detector, small_baseline, [0.5] * 5, start=28)
    assert [(i, e.kind) for i, e in events] == [(4, "ended")]
    ended = events[0][1]
    assert ended.started_at == T0
    assert ended.at == T0 + timedelta(seconds=32)
    assert ended.windows == 33 and ended.windows_over == 3
    assert ended.peak_ratio == pytest.approx(1.5)
    assert not detector.active
    # A new anomaly needs k fresh windows over.
    assert feed(detector, small_baseline, [1.5, 1.5], start=33) == []
    assert [e.kind for _, e in feed(detector, small_baseline, [1.5], start=35)] == ["started"]


def test_an_event_escalates_to_an_alert_once(small_baseline: Baseline) -> None:
    detector = AnomalyDetector(
        settings(critical=2.0, debounce=(3, 5), hysteresis=0.8), small_baseline
    )
    events = feed(detector, small_baseline, [1.2, 1.2, 1.2, 1.5, 2.5, 3.0, 1.1] + [0.1] * 5)
    assert [(i, e.kind, e.priority) for i, e in events] == [
        (2, "started", "event"),
        (4, "escalated", "alert"),
        (11, "ended", "alert"),
    ]
    escalated = events[1][1]
    assert escalated.ratio == pytest.approx(2.5)
    assert events[2][1].peak_ratio == pytest.approx(3.0)


def test_an_anomaly_critical_from_the_start_is_an_alert(small_baseline: Baseline) -> None:
    detector = AnomalyDetector(
        settings(critical=2.0, debounce=(3, 5), hysteresis=0.8), small_baseline
    )
    events = feed(detector, small_baseline, [2.5, 1.2, 1.2, 4.0] + [0.1] * 5)
    assert [(i, e.kind, e.priority) for i, e in events] == [
        (2, "started", "alert"),
        (8, "ended", "alert"),
    ]


def test_non_finite_vectors_are_skipped_and_change_no_state(small_baseline: Baseline) -> None:
    detector = AnomalyDetector(settings(debounce=(3, 3)), small_baseline)
    nan = at_ratio(small_baseline, 1.5)
    nan[3] = np.nan
    inf = at_ratio(small_baseline, 1.5)
    inf[0] = np.inf
    over = at_ratio(small_baseline, 1.5)
    events = run(detector, [over, nan, over, inf, nan, over])
    # The skipped windows neither count towards k of n nor break the run.
    assert [(i, e.kind) for i, e in events] == [(5, "started")]
    assert detector.skipped == 3 and detector.scored == 3
    assert detector.observe(nan, T0) == []
    assert detector.last_score == pytest.approx(1.5 * small_baseline.threshold)


def test_ewma_state_is_not_touched_by_skipped_windows(baselines: Baselines) -> None:
    baseline = baselines["ewma"]
    rows = shift_one_channel(10, np.random.default_rng(22))
    with_gaps = AnomalyDetector(settings("ewma"), baseline)
    plain = AnomalyDetector(settings("ewma"), baseline)
    gap = np.full(CHANNELS, np.nan)
    for row, ts in zip(rows, times(10), strict=True):
        with_gaps.observe(gap, ts)
        with_gaps.observe(row, ts)
        plain.observe(row, ts)
        assert with_gaps.last_score == plain.last_score


def test_detector_rejects_a_mismatched_baseline_or_vector(small_baseline: Baseline) -> None:
    with pytest.raises(ValueError, match="fitted with robust_z, the settings ask for hotelling"):
        AnomalyDetector(settings("hotelling"), small_baseline)
    with pytest.raises(ValueError, match="fitted on features"):
        AnomalyDetector(settings(features=["a.rms"]), small_baseline)
    detector = AnomalyDetector(settings(features=list(NAMES)), small_baseline)
    with pytest.raises(ValueError, match="has 3 values, the baseline 8"):
        detector.observe([1.0, 2.0, 3.0], T0)


# -- fitting input -----------------------------------------------------------------------------------


def test_non_finite_rows_are_dropped_from_fitting_and_counted() -> None:
    rows = healthy(100, np.random.default_rng(23))
    dirty = rows.copy()
    dirty[[3, 40, 41], 2] = np.nan
    dirty[77, 0] = np.inf
    dirty[90, 7] = -np.inf
    clean = np.delete(rows, [3, 40, 41, 77, 90], axis=0)
    baseline = fit_baseline(settings(), dirty, NAMES)
    reference = fit_baseline(settings(), clean, NAMES)
    assert (baseline.windows, baseline.dropped) == (95, 5)
    np.testing.assert_array_equal(baseline.parameters["median"], reference.parameters["median"])
    np.testing.assert_array_equal(baseline.parameters["scale"], reference.parameters["scale"])
    assert baseline.threshold == reference.threshold


def test_too_few_clean_rows_is_a_clear_error() -> None:
    rows = healthy(40, np.random.default_rng(24))
    # Each of four features is not a number in four windows: 10% of them, a dropout rather than
    # a dead sensor, so those 16 windows are dropped.
    for feature in range(4):
        rows[4 * feature : 4 * feature + 4, feature] = np.nan
    with pytest.raises(
        ValueError, match=r"24 clean baseline windows \(16 dropped .*min_windows=30"
    ):
        fit_baseline(settings(), rows, NAMES)


def test_bad_fitting_input_is_a_clear_error() -> None:
    rows = healthy(40, np.random.default_rng(25))
    with pytest.raises(ValueError, match="7 feature names for vectors of 8 features"):
        fit_baseline(settings(), rows, NAMES[:7])
    with pytest.raises(ValueError, match="duplicate feature names"):
        fit_baseline(settings(), rows, ("x",) * CHANNELS)
    with pytest.raises(ValueError, match="2-D array"):
        fit_baseline(settings(), rows[0], NAMES)


def test_a_quantised_feature_gets_a_spread_not_a_zero_scale() -> None:
    rows = healthy(100, np.random.default_rng(26))
    rows[:, 1] = np.where(np.arange(100) % 10 == 0, 3.0, 2.0)  # quantised: MAD 0, still moves
    baseline = fit_baseline(settings(), rows, NAMES)
    scale = baseline.parameters["scale"]
    assert scale[1] == pytest.approx(math.sqrt(math.pi / 2) * 0.1)  # mean |deviation| fallback
    assert np.isfinite(baseline.scores(rows)).all()


@pytest.mark.parametrize("method", METHODS)
def test_missing_and_frozen_features_are_left_out_of_fit_and_score(method: str) -> None:
    """A dead sensor (no value) and a frozen one (the same value in every window) are not the
    machine: they are named, left out, and do not stop the rest from scoring."""
    rows = healthy(300, np.random.default_rng(35))
    rows[:, 0] = 25.0  # frozen
    rows[np.arange(300) % 3 != 0, 3] = np.nan  # missing in two windows of three
    baseline = fit_baseline(settings(method), rows, NAMES)
    assert baseline.excluded == {"ch0.rms": "frozen", "ch3.rms": "missing"}
    assert baseline.model_names == tuple(n for n in NAMES if n not in ("ch0.rms", "ch3.rms"))
    assert baseline.windows == 300 and baseline.dropped == 0
    detector = AnomalyDetector(settings(method), baseline)
    live = healthy(30, np.random.default_rng(36))
    live[:, 0] = 99.0  # the frozen sensor comes back elsewhere: not an anomaly of the machine
    live[:, 3] = np.nan
    assert run(detector, live) == []
    assert detector.scored == 30 and detector.skipped == 0
    shifted = live + 6 * SPREADS
    shifted[:, 3] = np.nan
    events = run(detector, shifted, start=30)
    assert any(e.kind == "started" for _, e in events)
    assert all(f.name not in ("ch0.rms", "ch3.rms") for _, e in events for f in e.features)


def test_a_baseline_with_no_usable_feature_is_a_clear_error() -> None:
    rows = np.full((60, 2), 4.0)
    rows[:, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"no usable feature.*a\.rms \(frozen\), b\.rms \(missing\)"
    ):
        fit_baseline(settings(), rows, ["a.rms", "b.rms"])


# -- the baseline file ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_scores_identically(
    baselines: Baselines, method: str, tmp_path: Path
) -> None:
    fresh = baselines[method]
    path = fresh.save(tmp_path / "pump.baseline")
    assert path == tmp_path / "pump.baseline" and path.is_file()  # no .npz appended
    loaded = Baseline.load(path)
    assert loaded.version == fresh.version
    assert loaded.describe() == fresh.describe()
    assert loaded.names == fresh.names and loaded.info == fresh.info
    rows = np.vstack(
        [
            healthy(100, np.random.default_rng(27)),
            broken_correlation(100, np.random.default_rng(28)),
        ]
    )
    np.testing.assert_array_equal(loaded.scores(rows), fresh.scores(rows))
    events_fresh = run(AnomalyDetector(settings(method), fresh), rows)
    events_loaded = run(AnomalyDetector(settings(method), loaded), rows)
    assert events_loaded == events_fresh


def test_version_follows_the_content(baselines: Baselines, tmp_path: Path) -> None:
    baseline = baselines["robust_z"]
    assert len(baseline.version) == 12
    assert Baseline.load(baseline.save(tmp_path / "a")).version == baseline.version
    assert dataclasses.replace(baseline).version == baseline.version
    assert dataclasses.replace(baseline, threshold=baseline.threshold * 2).version != (
        baseline.version
    )
    other = fit_baseline(settings(), baselines.rows[:-1], NAMES)
    assert other.version != baseline.version
    moved = dict(baseline.parameters) | {"median": baseline.parameters["median"] + 1e-9}
    assert dataclasses.replace(baseline, parameters=moved).version != baseline.version


def rewrite(path: Path, change: Callable[[dict[str, Any], dict[str, FloatArray]], None]) -> None:
    """Rewrite a saved baseline with its metadata and arrays changed but its version kept."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: np.array(archive[name]) for name in archive.files}
    meta = json.loads(str(arrays.pop("metadata")))
    change(meta, arrays)
    with path.open("wb") as handle:
        np.savez(handle, allow_pickle=False, metadata=np.array(json.dumps(meta)), **arrays)


def test_altered_content_fails_the_version_check(baselines: Baselines, tmp_path: Path) -> None:
    path = baselines["hotelling"].save(tmp_path / "h.npz")

    def nudge_mean(meta: dict[str, Any], arrays: dict[str, FloatArray]) -> None:
        arrays["param.mean"] = arrays["param.mean"] + 0.5

    rewrite(path, nudge_mean)
    with pytest.raises(BaselineError, match="does not match its version") as error:
        Baseline.load(path)
    assert str(path) in str(error.value)

    path = baselines["robust_z"].save(tmp_path / "r.npz")

    def lower_threshold(meta: dict[str, Any], arrays: dict[str, FloatArray]) -> None:
        meta["threshold"] = 0.5

    rewrite(path, lower_threshold)
    with pytest.raises(BaselineError, match="does not match its version"):
        Baseline.load(path)


def test_unsupported_format_version_says_so(baselines: Baselines, tmp_path: Path) -> None:
    path = baselines["robust_z"].save(tmp_path / "r.npz")

    def from_the_future(meta: dict[str, Any], arrays: dict[str, FloatArray]) -> None:
        meta["format_version"] = 99

    rewrite(path, from_the_future)
    with pytest.raises(BaselineError, match="format version 99 is not supported"):
        Baseline.load(path)


@pytest.fixture
def saved_forest(baselines: Baselines, tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    path = baselines["isolation_forest"].save(tmp_path / "forest.npz")
    yield path, path.read_bytes()


def test_truncated_file_is_a_clear_error(saved_forest: tuple[Path, bytes]) -> None:
    path, data = saved_forest
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BaselineError, match="truncated, corrupt or another kind of file") as error:
        Baseline.load(path)
    assert str(path) in str(error.value)


def test_corrupted_bytes_are_a_clear_error(saved_forest: tuple[Path, bytes]) -> None:
    path, data = saved_forest
    damaged = bytearray(data)
    for offset in range(len(data) // 3, len(data) // 3 + 64):
        damaged[offset] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(BaselineError, match=r"forest\.npz") as error:
        Baseline.load(path)
    assert "truncated, corrupt" in str(error.value) or "does not match its version" in str(
        error.value
    )


def test_a_model_onnxruntime_cannot_load_is_a_clear_error(
    baselines: Baselines, tmp_path: Path
) -> None:
    """Consistent content (the version matches) whose ONNX bytes are not a model."""
    garbage = dataclasses.replace(baselines["autoencoder"], onnx_model=b"not an onnx graph")
    path = garbage.save(tmp_path / "ae.npz")
    with pytest.raises(BaselineError, match=r"ae\.npz: onnxruntime cannot load its ONNX model"):
        Baseline.load(path)


def test_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a baseline\n" * 20)
    with pytest.raises(BaselineError, match=r"notes\.txt: not a readable baseline archive"):
        Baseline.load(text)

    other_npz = tmp_path / "weights.npz"
    with other_npz.open("wb") as handle:
        np.savez(handle, weights=np.zeros(3), bias=np.ones(1))
    with pytest.raises(BaselineError, match=r"not an anomaly baseline: no metadata .*'bias'"):
        Baseline.load(other_npz)

    tagged = tmp_path / "tagged.npz"
    with tagged.open("wb") as handle:
        np.savez(handle, metadata=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(BaselineError, match="format 'something-else'"):
        Baseline.load(tagged)

    single = tmp_path / "array.npy"
    np.save(single, np.arange(4.0))
    with pytest.raises(BaselineError, match="single numpy array"):
        Baseline.load(single)

    with pytest.raises(BaselineError, match="no such baseline file"):
        Baseline.load(tmp_path / "missing.npz")
    with pytest.raises(BaselineError, match="not a file"):
        Baseline.load(tmp_path)


# -- collecting ------------------------------------------------------------------------------------


async def test_collector_fits_after_the_baseline_duration_in_a_worker_thread() -> None:
    anomaly = settings("hotelling", baseline="60s", min_windows=30)
    collector = BaselineCollector(anomaly, NAMES)
    rows = healthy(80, np.random.default_rng(29))
    stamps = times(80)
    assert collector.add(np.full(CHANNELS, np.nan), stamps[0]) is False
    for row, ts in zip(rows[:60], stamps[:60], strict=True):
        assert collector.add(row, ts)
    assert collector.windows == 60 and collector.span_s == 59.0
    assert not collector.ready()
    with pytest.raises(ValueError, match="baseline not complete: 60 windows over 59 s"):
        collector.fit()
    assert collector.add(rows[60], stamps[30]) is False  # the clock went backwards
    assert collector.add(rows[60], stamps[60])
    assert collector.ready()
    assert collector.add(rows[61], stamps[61]) is False  # complete: kept out
    assert (collector.skipped, collector.out_of_order) == (1, 1)

    baseline = await asyncio.to_thread(collector.fit)
    assert baseline.method == "hotelling" and baseline.names == NAMES
    assert (baseline.windows, baseline.dropped) == (61, 1)
    assert baseline.info["data_from"] == stamps[0].isoformat()
    assert baseline.info["data_to"] == stamps[60].isoformat()
    reference = fit_baseline(anomaly, rows[:61], NAMES)
    np.testing.assert_array_equal(baseline.parameters["mean"], reference.parameters["mean"])


def test_collector_waits_for_min_windows_too() -> None:
    collector = BaselineCollector(settings(baseline="10s", min_windows=30), NAMES)
    rows = healthy(30, np.random.default_rng(30))
    for i, row in enumerate(rows[:29]):
        collector.add(row, T0 + timedelta(seconds=10 * i))
    assert collector.span_s > 10 and not collector.ready()
    collector.add(rows[29], T0 + timedelta(seconds=290))
    assert collector.ready()


def test_collector_needs_feature_names() -> None:
    with pytest.raises(ValueError, match="needs feature names"):
        BaselineCollector(settings())
    named = BaselineCollector(settings(features=["a.rms", "b.rms"]))
    assert named.names == ("a.rms", "b.rms")
    with pytest.raises(ValueError, match="has 3 values, expected 2"):
        named.add([1.0, 2.0, 3.0], T0)
