"""Tests of inference.features: window features against hand-computed values."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pytest

from config.analysis import FeatureSettings
from inference import features as features_module
from inference.features import (
    FEATURES,
    SIGNIFICANT_DIGITS,
    band_name,
    default_bands,
    feature_names,
    feature_vector,
    resolve_kind,
    summarise,
)
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


# ------------------------------------------------------------------------ settings and kinds

RATE = 10_000.0
VIBRATION = FeatureSettings(kind="vibration")
SLOW = FeatureSettings(kind="slow")


def _signal_window(
    values: npt.ArrayLike,
    *,
    channels: tuple[str, ...] | None = None,
    sample_rate: float | None = RATE,
    times_s: npt.ArrayLike | None = None,
) -> SampleWindow:
    array = np.atleast_2d(np.asarray(values, dtype=np.float64))
    names = channels or tuple(f"c{i}" for i in range(array.shape[0]))
    return SampleWindow(
        source="test",
        channels=names,
        values=array,
        ts=datetime(2024, 1, 1, tzinfo=UTC),
        mono_ns=0,
        duration_s=array.shape[1] / sample_rate if sample_rate else 1.0,
        sample_rate=sample_rate,
        times_s=None if times_s is None else np.asarray(times_s, dtype=np.float64),
    )


def _seconds(samples: int = 10_000, rate: float = RATE) -> npt.NDArray[np.float64]:
    return np.arange(samples) / rate


def _number(value: float | int | None) -> float:
    assert isinstance(value, float | int), value
    return float(value)


def _reference_spectrum(
    row: npt.NDArray[np.float64], rate: float, bands: list[tuple[float, float]]
) -> tuple[float, list[float]]:
    """Centroid and band energies the long way: the two-sided FFT, each band's power over the
    positive and negative frequencies in it, scaled to the variance of the finite samples."""
    finite = np.isfinite(row)
    filled = np.where(finite, row, row[finite].mean())
    deviation = filled - filled.mean()
    samples = row.shape[0]
    hann = np.sin(np.pi * np.arange(samples) / samples) ** 2
    power = np.abs(np.fft.fft(deviation * hann)) ** 2
    freqs = np.abs(np.fft.fftfreq(samples, d=1.0 / rate))
    variance = float(np.var(row[finite]))
    centroid = float((power * freqs).sum() / power.sum())
    energies = []
    for low, high in bands:
        inside = (freqs >= low) & ((freqs < high) | (high >= rate / 2))
        energies.append(variance * float(power[inside].sum() / power.sum()))
    return centroid, energies


def test_without_settings_only_the_base_features() -> None:
    summary = summarise(_signal_window(np.sin(2 * np.pi * 50 * _seconds())))
    assert set(summary["c0"]) == {"n", *FEATURES}


def test_auto_kind_follows_the_sample_rate() -> None:
    assert resolve_kind("auto", 100.0) == "vibration"
    assert resolve_kind("auto", 99.9) == "slow"
    assert resolve_kind("auto", None) == "slow"
    assert resolve_kind("slow", 10_000.0) == "slow"
    auto = FeatureSettings()
    fast = summarise(_signal_window(np.ones(200), sample_rate=100.0), settings=auto)
    slow = summarise(_signal_window(np.ones(200), sample_rate=10.0), settings=auto)
    assert "kurtosis" in fast["c0"] and "slope" not in fast["c0"]
    assert "slope" in slow["c0"] and "kurtosis" not in slow["c0"]


def test_sine_closed_forms() -> None:
    amplitude, hz = 2.0, 250.0  # 40 samples a cycle: the peak itself is sampled
    values = amplitude * np.sin(2 * np.pi * hz * _seconds())
    features = summarise(_signal_window(values), settings=VIBRATION)["c0"]
    assert features["rms"] == pytest.approx(amplitude / math.sqrt(2), rel=1e-6)
    assert features["peak"] == pytest.approx(amplitude, rel=1e-6)
    assert features["crest"] == pytest.approx(math.sqrt(2), rel=1e-6)
    assert features["kurtosis"] == pytest.approx(1.5, rel=1e-6)
    assert abs(_number(features["skewness"])) < 1e-9
    assert features["centroid_hz"] == pytest.approx(hz, rel=1e-6)
    # All of a sine's energy (its variance A²/2) is in the band holding its frequency.
    assert features["band_0_312p5"] == pytest.approx(amplitude**2 / 2, rel=1e-6)
    for band in ("band_312p5_625", "band_625_1250", "band_1250_2500", "band_2500_5000"):
        assert _number(features[band]) < 1e-12


def test_gaussian_noise_kurtosis_and_skewness() -> None:
    rng = np.random.default_rng(11)
    values = rng.normal(1.0, 0.5, size=(2, 100_000))
    summary = summarise(_signal_window(values), settings=VIBRATION)
    for i, channel in enumerate(("c0", "c1")):
        row = values[i]
        deviation = row - row.mean()
        m2, m3, m4 = (float(np.mean(deviation**k)) for k in (2, 3, 4))
        assert summary[channel]["kurtosis"] == pytest.approx(m4 / m2**2, rel=1e-6)
        assert summary[channel]["skewness"] == pytest.approx(m3 / m2**1.5, rel=1e-5, abs=1e-9)
        # Pearson's kurtosis, not the excess: about 3 for a normal distribution.
        assert summary[channel]["kurtosis"] == pytest.approx(3.0, abs=0.06)
        assert _number(summary[channel]["skewness"]) == pytest.approx(0.0, abs=0.03)


def test_skewed_signal_against_numpy() -> None:
    rng = np.random.default_rng(5)
    values = rng.exponential(2.0, size=(3, 4096))
    bands = [(0.0, 700.0), (700.0, 2100.0), (2100.0, 5000.0), (1000.0, 1500.0)]
    settings = FeatureSettings(kind="vibration", bands=bands)
    summary = summarise(_signal_window(values), settings=settings)
    for i in range(3):
        row = values[i]
        features = summary[f"c{i}"]
        deviation = row - row.mean()
        m2, m3, m4 = (float(np.mean(deviation**k)) for k in (2, 3, 4))
        assert features["skewness"] == pytest.approx(m3 / m2**1.5, rel=1e-6)
        assert features["kurtosis"] == pytest.approx(m4 / m2**2, rel=1e-6)
        assert features["crest"] == pytest.approx(
            np.abs(row).max() / np.sqrt(np.mean(row**2)), rel=1e-6
        )
        centroid, energies = _reference_spectrum(row, RATE, bands)
        assert features["centroid_hz"] == pytest.approx(centroid, rel=1e-6)
        for (low, high), energy in zip(bands, energies, strict=True):
            assert features[band_name(low, high)] == pytest.approx(energy, rel=1e-6)


def test_two_tones_land_in_their_bands_and_sum_to_the_variance() -> None:
    t = _seconds()
    values = 3.0 * np.sin(2 * np.pi * 100 * t) + 1.0 * np.sin(2 * np.pi * 2000 * t) + 0.7
    features = summarise(_signal_window(values), settings=VIBRATION)["c0"]
    bands = [name for name in feature_names("vibration", RATE) if name.startswith("band_")]
    assert features["band_0_312p5"] == pytest.approx(9.0 / 2, rel=1e-6)
    assert features["band_1250_2500"] == pytest.approx(1.0 / 2, rel=1e-6)
    assert sum(_number(features[name]) for name in bands) == pytest.approx(
        float(np.var(values)), rel=1e-6
    )
    # Power-weighted mean frequency of the two tones.
    assert features["centroid_hz"] == pytest.approx((4.5 * 100 + 0.5 * 2000) / 5.0, rel=1e-6)

    custom = FeatureSettings(kind="vibration", bands=[(0, 1000), (1000, 5000), (3000, 4000)])
    split = summarise(_signal_window(values), settings=custom)["c0"]
    assert split["band_0_1000"] == pytest.approx(4.5, rel=1e-6)
    assert split["band_1000_5000"] == pytest.approx(0.5, rel=1e-6)
    assert _number(split["band_3000_4000"]) < 1e-12


def test_tone_at_nyquist_counts_in_the_top_band() -> None:
    values = np.where(np.arange(1000) % 2 == 0, 1.0, -1.0)  # exactly the Nyquist frequency
    features = summarise(_signal_window(values, sample_rate=1000.0), settings=VIBRATION)["c0"]
    assert features["band_250_500"] == pytest.approx(1.0, rel=1e-6)
    assert features["centroid_hz"] == pytest.approx(500.0, rel=1e-3)


def test_default_bands_are_octaves_up_to_nyquist() -> None:
    assert default_bands(10_000.0) == (
        (0.0, 312.5),
        (312.5, 625.0),
        (625.0, 1250.0),
        (1250.0, 2500.0),
        (2500.0, 5000.0),
    )
    assert feature_names("vibration", 8000.0) == (
        *FEATURES,
        "crest",
        "kurtosis",
        "skewness",
        "centroid_hz",
        "band_0_250",
        "band_250_500",
        "band_500_1000",
        "band_1000_2000",
        "band_2000_4000",
    )
    assert feature_names("slow", None) == (*FEATURES, "slope")
    assert feature_names("auto", 50.0, [(1.0, 2.0)]) == (*FEATURES, "slope")
    assert band_name(0.25, 1e6) == "band_0p25_1000000"
    with pytest.raises(ValueError, match="vibration features need a regular sample rate"):
        feature_names("vibration", None)


def test_bands_without_a_bin_are_none() -> None:
    # 1000 samples at 1 kHz: bins every 1 Hz up to 500 Hz.
    settings = FeatureSettings(kind="vibration", bands=[(600, 800), (10.2, 10.7), (10, 11)])
    values = np.sin(2 * np.pi * 10 * _seconds(1000, 1000.0))
    features = summarise(_signal_window(values, sample_rate=1000.0), settings=settings)["c0"]
    assert features["band_600_800"] is None
    assert features["band_10p2_10p7"] is None
    assert features["band_10_11"] == pytest.approx(0.5 * 4 / 6, rel=1e-6)


def test_missing_samples_are_filled_with_the_mean_for_the_spectrum() -> None:
    rng = np.random.default_rng(2)
    t = _seconds(2000)
    values = 1.5 + np.sin(2 * np.pi * 400 * t) + rng.normal(0, 0.2, t.shape)
    values[rng.random(t.shape) < 0.1] = math.nan
    values[17] = math.inf
    bands = [(0.0, 300.0), (300.0, 500.0), (500.0, 5000.0)]
    settings = FeatureSettings(kind="vibration", bands=bands)
    features = summarise(_signal_window(values), settings=settings)["c0"]
    finite = values[np.isfinite(values)]
    assert features["n"] == finite.shape[0]
    assert features["mean"] == pytest.approx(finite.mean(), rel=1e-6)
    assert features["rms"] == pytest.approx(np.sqrt(np.mean(finite**2)), rel=1e-6)
    deviation = finite - finite.mean()
    m2, m4 = float(np.mean(deviation**2)), float(np.mean(deviation**4))
    assert features["kurtosis"] == pytest.approx(m4 / m2**2, rel=1e-6)
    centroid, energies = _reference_spectrum(values, RATE, bands)
    assert features["centroid_hz"] == pytest.approx(centroid, rel=1e-6)
    for (low, high), energy in zip(bands, energies, strict=True):
        assert features[band_name(low, high)] == pytest.approx(energy, rel=1e-6)
    assert sum(energies) == pytest.approx(float(np.var(finite)), rel=1e-9)


def test_undefined_features_are_none_and_records_are_json() -> None:
    values = np.array(
        [
            np.full(64, 2.5),  # constant: no shape, no spectrum, zero energy
            np.zeros(64),  # rms 0: no crest either
            np.full(64, math.nan),  # nothing finite: everything None
            np.full(64, 1e300) * np.where(np.arange(64) % 2 == 0, 1.0, -1.0),  # var overflows
        ]
    )
    summary = summarise(_signal_window(values, sample_rate=1000.0), settings=VIBRATION)
    constant, zero, dead, huge = (summary[f"c{i}"] for i in range(4))
    assert constant["crest"] == 1.0
    assert constant["kurtosis"] is None
    assert constant["skewness"] is None
    assert constant["centroid_hz"] is None
    assert constant["band_0_31p25"] == 0.0
    assert zero["crest"] is None and zero["rms"] == 0.0
    assert dead == {"n": 0, **dict.fromkeys(feature_names("vibration", 1000.0))}
    assert huge["rms"] == pytest.approx(1e300)
    assert huge["kurtosis"] == pytest.approx(1.0)
    assert huge["band_250_500"] is None  # 1e600 units² is not a float64
    json.dumps(summary, allow_nan=False)  # raises on NaN or inf


def test_slope_of_a_ramp_on_the_sample_rate() -> None:
    t = _seconds(600, 10.0)
    values = np.vstack([3.0 + 0.5 * t, 7.0 - 0.02 * t])
    summary = summarise(_signal_window(values, sample_rate=10.0), settings=SLOW)
    assert summary["c0"]["slope"] == pytest.approx(0.5, rel=1e-6)
    assert summary["c1"]["slope"] == pytest.approx(-0.02, rel=1e-6)


def test_slope_on_irregular_times() -> None:
    rng = np.random.default_rng(9)
    times = np.sort(rng.uniform(0.0, 5.0, 40))
    values = np.vstack([2.0 - 1.5 * times, 2.0 - 1.5 * times + rng.normal(0, 0.3, 40)])
    times[3] = math.nan  # a finite sample without a usable time: counted in n, not in the fit
    values[1, 10:20] = math.nan
    window = _signal_window(values, sample_rate=None, times_s=times)
    summary = summarise(window, settings=FeatureSettings())  # auto: slow without a rate
    assert summary["c0"]["slope"] == pytest.approx(-1.5, rel=1e-6)
    usable = np.isfinite(values[1]) & np.isfinite(times)
    fitted = float(np.polyfit(times[usable], values[1][usable], 1)[0])
    assert summary["c1"]["slope"] == pytest.approx(fitted, rel=1e-6)
    assert summary["c1"]["n"] == 30


def test_slope_without_times_or_rate_spreads_samples_over_the_window() -> None:
    window = SampleWindow(
        source="test",
        channels=("a",),
        values=np.array([[1.0, 2.0, 3.0, 4.0]]),
        ts=datetime(2024, 1, 1, tzinfo=UTC),
        mono_ns=0,
        duration_s=2.0,
        sample_rate=None,
    )
    assert summarise(window, settings=SLOW)["a"]["slope"] == pytest.approx(2.0)


def test_slope_needs_two_finite_samples_at_distinct_times() -> None:
    values = np.array([[math.nan, 4.0, math.nan], [1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    summary = summarise(
        _signal_window(values, sample_rate=None, times_s=[1.0, 1.0, math.nan]), settings=SLOW
    )
    assert summary["c0"]["slope"] is None  # one finite sample
    assert summary["c1"]["slope"] is None  # two samples, one time
    assert summarise(_signal_window(values[1:], sample_rate=2.0), settings=SLOW)["c0"][
        "slope"
    ] == pytest.approx(2.0)


def test_every_feature_is_rounded() -> None:
    rng = np.random.default_rng(4)
    values = rng.normal(0.0, 1.0 / 3.0, size=(2, 1000)) + 1.0 / 7.0
    for settings in (VIBRATION, SLOW):
        summary = summarise(_signal_window(values, sample_rate=1000.0), settings=settings)
        for features in summary.values():
            for name, value in features.items():
                if isinstance(value, float):
                    assert value == float(f"{value:.{SIGNIFICANT_DIGITS}g}"), name
    mean = summarise(_signal_window(np.full(10, 1.0 / 3.0)), settings=VIBRATION)["c0"]["mean"]
    assert mean == 0.3333333


def test_sixteen_channels_match_one_by_one_and_vector_layout() -> None:
    rng = np.random.default_rng(16)
    t = _seconds()
    values = np.vstack(
        [
            (1 + i) * np.sin(2 * np.pi * (40 + 97 * i) * t) + rng.normal(0, 0.1, t.shape)
            for i in range(16)
        ]
    )
    values[5, ::7] = math.nan
    values[9] = math.nan
    channels = tuple(f"axis.{i}" for i in range(16))
    summary = summarise(_signal_window(values, channels=channels), settings=VIBRATION)
    names = feature_names("vibration", RATE)
    assert list(summary) == list(channels)
    assert all(tuple(features)[1:] == names for features in summary.values())
    for i, channel in enumerate(channels):
        alone = summarise(_signal_window(values[i], channels=(channel,)), settings=VIBRATION)
        assert alone[channel] == summary[channel]

    layout = [f"{channel}.{name}" for channel in channels for name in names]
    vector = feature_vector(summary, [*layout, "axis.3.n", "nosuch.rms", "axis.3.nosuch"])
    assert vector.shape == (16 * len(names) + 3,)
    assert vector[names.index("rms")] == summary["axis.0"]["rms"]
    assert np.isnan(vector[9 * len(names) : 10 * len(names)]).all()  # the dead channel
    assert np.isfinite(vector[: 9 * len(names)]).all()
    assert vector[-3] == 10_000 and np.isnan(vector[-2:]).all()
    with pytest.raises(ValueError, match=r"not of the form `channel\.feature`"):
        feature_vector(summary, ["rms"])


def test_bad_shapes_are_clear_errors() -> None:
    window = _signal_window(np.zeros((2, 10)), sample_rate=None, times_s=np.arange(9.0))
    with pytest.raises(ValueError, match="9 sample times for 10 samples"):
        summarise(window, settings=SLOW)
    with pytest.raises(ValueError, match="vibration features need a regular sample rate"):
        summarise(window, settings=VIBRATION)
    wrong = SampleWindow(
        source="bad",
        channels=("a", "b", "c"),
        values=np.zeros((2, 10)),
        ts=datetime(2024, 1, 1, tzinfo=UTC),
        mono_ns=0,
        duration_s=1.0,
        sample_rate=None,
    )
    with pytest.raises(ValueError, match=r"'bad' has values of shape \(2, 10\) for 3 channels"):
        summarise(wrong)


def test_empty_vibration_window() -> None:
    window = _signal_window(np.empty((1, 0)))
    assert summarise(window, settings=VIBRATION) == {
        "c0": {"n": 0, **dict.fromkeys(feature_names("vibration", RATE))}
    }


def test_reused_buffers_across_threads_and_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # summarise keeps per-thread scratch buffers for each window shape; results must not
    # depend on what ran before, in which thread, or whether the window was too big to keep.
    rng = np.random.default_rng(21)
    windows = [
        _signal_window(rng.normal(i, 1.0 + i, size=(4, 512 + 64 * (i % 3)))) for i in range(12)
    ]
    for window in windows[::5]:
        window.values[1, ::3] = math.nan
    expected = [summarise(window, settings=VIBRATION) for window in windows]
    with ThreadPoolExecutor(max_workers=3) as pool:
        for _ in range(5):
            results = list(pool.map(lambda w: summarise(w, settings=VIBRATION), windows))
            assert results == expected
    monkeypatch.setattr(features_module, "WORKSPACE_MAX_SAMPLES", 100)
    assert [summarise(window, settings=VIBRATION) for window in windows] == expected


@pytest.mark.parametrize("factor", [1e-140, 1e-70, 1e70, 1e140])
def test_extreme_magnitudes_scale_like_the_signal(factor: float) -> None:
    # Peaks outside 1e-60..1e60 are computed on samples divided by the peak: fourth powers of
    # 1e140 would overflow and of 1e-140 underflow. Every feature must scale as it should.
    rng = np.random.default_rng(8)
    values = rng.standard_t(5, size=(2, 3000)) + 0.5
    values[1, ::11] = math.nan  # and the masked path
    plain = summarise(_signal_window(values), settings=VIBRATION)
    scaled = summarise(_signal_window(values * factor), settings=VIBRATION)
    for channel in ("c0", "c1"):
        for name, value in plain[channel].items():
            power = 2 if name.startswith("band_") else 1
            if name in ("n", "crest", "kurtosis", "skewness", "centroid_hz"):
                power = 0
            expected = _number(value) * factor**power
            assert scaled[channel][name] == pytest.approx(expected, rel=1e-5), (channel, name)
