"""Window features per channel: the base statistics of every window, the vibration (shape and
FFT band) or slow-signal (trend) features chosen by FeatureSettings, and the feature vector layout.

All features are computed for every channel of a window at once (numpy over a channels x samples
array), over the finite samples only. A record is JSON, so a feature that is undefined for a
window (no finite sample, zero rms, a constant signal, ...) is None, never NaN or inf.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt

from config.analysis import (
    BASE_FEATURES,
    SLOW_FEATURES,
    VIBRATION_FEATURES,
    VIBRATION_MIN_RATE_HZ,
    FeatureSettings,
    band_feature,
)
from config.analysis import default_bands as default_bands  # the layout's, re-exported
from sensors.base import SampleWindow

FeatureKind = Literal["auto", "vibration", "slow"]
FloatArray = npt.NDArray[np.float64]
Band = tuple[float, float]

# The feature names and default bands are the config's (config/analysis.py), which checks the
# features that limits and anomaly models name against them.
FEATURES = BASE_FEATURES
"""Computed for every window whatever the settings (and the only ones without settings)."""

Summary = dict[str, dict[str, float | int | None]]

SIGNIFICANT_DIGITS = 7
"""Features are rounded to float32 precision (what raw samples are kept at): no sensor resolves
more, and the noise digits past it nearly double a telemetry record's gzip size on the wire
(bench/sync_backlog.py measured 102 -> 56 bytes a record at 6 digits)."""


_ROUNDING = f"%.{SIGNIFICANT_DIGITS}g "


# ------------------------------------------------------------------------------- the layout


def resolve_kind(kind: FeatureKind, sample_rate: float | None) -> Literal["vibration", "slow"]:
    """`auto`: vibration for a regular sample rate of VIBRATION_MIN_RATE_HZ or more, else slow."""
    if kind != "auto":
        return kind
    if sample_rate is not None and sample_rate >= VIBRATION_MIN_RATE_HZ:
        return "vibration"
    return "slow"


band_name = band_feature
"""`band_<low>_<high>` in Hz, compact: band_0_625, band_312p5_625."""


def _bands_for(sample_rate: float, bands: Sequence[Band]) -> tuple[Band, ...]:
    if bands:
        return tuple((float(low), float(high)) for low, high in bands)
    return default_bands(sample_rate)


def feature_names(
    kind: FeatureKind, sample_rate: float | None, bands: Sequence[Band] = ()
) -> tuple[str, ...]:
    """The features (after `n`) that `summarise` gives each channel of a window with this sample
    rate, in order. `bands` empty: the default octave bands. Vibration needs a sample rate."""
    return _feature_names(kind, sample_rate, tuple((float(lo), float(hi)) for lo, hi in bands))


@lru_cache(maxsize=64)
def _feature_names(
    kind: FeatureKind, sample_rate: float | None, bands: tuple[Band, ...]
) -> tuple[str, ...]:
    # Cached: summarise asks for every window, and formatting band names is not free.
    resolved = resolve_kind(kind, sample_rate)
    if resolved == "slow":
        return FEATURES + SLOW_FEATURES
    if sample_rate is None or not sample_rate > 0:
        raise ValueError(
            f"vibration features need a regular sample rate > 0, got {sample_rate!r} "
            "(set features.kind to slow or auto for irregularly sampled sources)"
        )
    names = tuple(band_name(low, high) for low, high in _bands_for(sample_rate, bands))
    return FEATURES + VIBRATION_FEATURES + names


def feature_vector(summary: Summary, names: Sequence[str]) -> FloatArray:
    """Values of `channel.feature` names from a summary, in order; NaN where a feature is None
    or the channel or feature is missing. The name splits at its last dot (channel names may
    hold dots, feature names never do)."""
    out = np.full(len(names), np.nan, dtype=np.float64)
    for index, name in enumerate(names):
        channel, dot, feature = name.rpartition(".")
        if not dot or not channel or not feature:
            raise ValueError(f"feature name {name!r} is not of the form `channel.feature`")
        value = summary.get(channel, {}).get(feature)
        if value is not None:
            out[index] = float(value)
    return out


# --------------------------------------------------------------------------- the features


def summarise(window: SampleWindow, *, settings: FeatureSettings | None = None) -> Summary:
    """Per channel: `n` (finite samples) and its features over those samples, rounded to
    SIGNIFICANT_DIGITS.

    NaN and ±inf samples are left out; a channel with no finite sample gets None for each
    feature. `settings` None: FEATURES only (rms, peak, mean, min, max). Otherwise its kind
    (`auto` resolved by `resolve_kind`) adds:

    vibration (needs `window.sample_rate`):
      crest        peak / rms; None when rms is 0.
      kurtosis     Pearson's, not the excess: m4 / m2² with population moments, so a normal
                   distribution gives 3 and a sine 1.5; None for a constant signal.
      skewness     m3 / m2^1.5 (population moments); None for a constant signal.
      centroid_hz  mean frequency of the one-sided power spectrum (bins weighted by power);
                   None for a constant signal.
      band_<low>_<high>  energy in [low, high) Hz (see below); `settings.bands` or, empty, the
                   default octave bands (`default_bands`).
      The spectrum is one rfft per channel of the samples less their mean, times a periodic
      Hann window (it keeps a strong tone from leaking into far bands). Missing samples are
      filled with the channel mean first, so they add no energy (`n` still counts only the
      finite ones). Band energy is the sum of the one-sided power |X|² over the bins in
      [low, high), where a band reaching the Nyquist frequency also holds the Nyquist bin,
      scaled so that the whole spectrum sums to the variance of the finite samples (population,
      in units²): the bands of a full partition of [0, Nyquist] sum to the variance exactly,
      which is Parseval's theorem for the unwindowed signal (the window alone would bias the
      total). A band holding no FFT bin (above Nyquist, or narrower than the bin spacing) is
      None.
    slow:
      slope        least-squares slope in units per second against `window.times_s` (irregular
                   samples) or, when it is None, i / sample_rate, or with neither, samples
                   spread evenly over `duration_s`; needs 2 finite samples at distinct times,
                   else None. A sample whose time is not finite is left out.
    """
    values = np.asarray(window.values, dtype=np.float64)
    channels = len(window.channels)
    if values.ndim != 2 and channels and values.size % channels == 0:
        values = values.reshape(channels, -1)
    if values.ndim != 2 or values.shape[0] != channels:
        raise ValueError(
            f"window of {window.source!r} has values of shape {values.shape} "
            f"for {channels} channels"
        )
    if not channels:
        return {}
    # An overflow (features of values near the float64 limit) or an undefined quotient gives
    # inf or NaN, which _summary turns into None; the warnings would only repeat that.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return _features(window, values, settings)


def _features(
    window: SampleWindow, values: FloatArray, settings: FeatureSettings | None
) -> Summary:
    base = _Base(values, _workspace(values.shape))
    columns: dict[str, FloatArray] = {
        "rms": base.rms,
        "peak": base.peak,
        "mean": base.mean,
        "min": base.lowest,
        "max": base.highest,
    }
    names: tuple[str, ...] = FEATURES
    if settings is not None:
        names = feature_names(settings.kind, window.sample_rate, settings.bands)
        if resolve_kind(settings.kind, window.sample_rate) == "vibration":
            assert window.sample_rate is not None  # feature_names raised otherwise
            bands = _bands_for(window.sample_rate, settings.bands)
            band_names = names[len(FEATURES) + len(VIBRATION_FEATURES) :]
            columns.update(_vibration(base, window.sample_rate, bands, band_names))
        else:
            columns["slope"] = _slope(base, window)
    return _summary(window.channels, base, names, columns)


WORKSPACE_MAX_SAMPLES = 1 << 22
"""Windows up to this many samples (all channels; 32 MiB a buffer) reuse per-thread buffers."""
_WORKSPACES_PER_THREAD = 4


class _Workspace:
    """Scratch arrays for one window shape, reused from window to window. A fresh megabyte-sized
    temporary is returned to the OS when freed and page-faulted back in on the next window
    (glibc trims the heap top), which cost more than the arithmetic on it: reusing them made
    summarise of 16 x 10,000 samples about three times faster on the benchmark machine
    (bench/sensor_throughput.py)."""

    def __init__(self, channels: int, samples: int) -> None:
        self.deviation = np.empty((channels, samples))
        self.scratch = np.empty((channels, samples))
        bins = samples // 2 + 1
        self.spectrum = np.empty((channels, bins), dtype=np.complex128)
        self.power = np.empty((channels, bins))
        self.power_scratch = np.empty((channels, bins))


_local = threading.local()


def _workspace(shape: tuple[int, ...]) -> _Workspace:
    channels, samples = shape
    if channels * samples > WORKSPACE_MAX_SAMPLES:
        return _Workspace(channels, samples)
    # Per thread, so summarise may run in several threads (asyncio.to_thread) at once.
    spaces: dict[tuple[int, int], _Workspace] | None = getattr(_local, "spaces", None)
    if spaces is None:
        spaces = _local.spaces = {}
    key = (channels, samples)
    space = spaces.pop(key, None)
    if space is None:
        space = _Workspace(channels, samples)
        if len(spaces) >= _WORKSPACES_PER_THREAD:
            del spaces[next(iter(spaces))]  # the least recently used shape
    spaces[key] = space
    return space


_UNSCALED_PEAKS = (1e-60, 1e60)
"""Peaks between these need no scaling: no power of the samples up to the fourth (kurtosis)
can overflow or underflow, even summed over millions of samples."""


class _Base:
    """What every feature starts from: finite counts, the base statistics, and the deviations
    from the mean (0 where a sample is missing), divided by `scale`. The scale is 1 unless some
    channel's peak is outside _UNSCALED_PEAKS; then it is each channel's peak, so sums of
    squares and fourth powers of huge values cannot overflow nor those of tiny ones underflow."""

    def __init__(self, values: FloatArray, space: _Workspace) -> None:
        channels, samples = values.shape
        self.values = values
        self.space = space
        totals = values.sum(axis=1)
        # A finite sum means every sample is finite (NaN and inf propagate): the fast path
        # for the usual complete window, without a mask. A sum that overflowed takes the
        # masked path, which is right too.
        self.finite: npt.NDArray[np.bool_] | None = None
        if np.isfinite(totals).all():
            self.n = np.full(channels, samples, dtype=np.int64)
            self.lowest = values.min(axis=1, initial=np.inf)
            self.highest = values.max(axis=1, initial=-np.inf)
        else:
            self.finite = finite = np.isfinite(values)
            self.n = np.count_nonzero(finite, axis=1)
            self.lowest = np.where(finite, values, np.inf).min(axis=1, initial=np.inf)
            self.highest = np.where(finite, values, -np.inf).max(axis=1, initial=-np.inf)
        has = self.n > 0
        self.peak = np.where(has, np.maximum(np.abs(self.lowest), np.abs(self.highest)), 0.0)
        self.count = np.maximum(self.n, 1)
        smallest, largest = _UNSCALED_PEAKS
        extreme = (self.peak > largest) | ((self.peak > 0.0) & (self.peak < smallest))
        deviation = space.deviation
        inverse: FloatArray | None = None
        if extreme.any():
            self.scale = np.where(self.peak > 0.0, self.peak, 1.0)
            inverse = (1.0 / self.scale)[:, None]
        else:
            self.scale = np.ones(channels)
        if self.finite is None:
            self.scaled_mean = totals / self.count
            if inverse is None:
                np.subtract(values, self.scaled_mean[:, None], out=deviation)  # one pass
            else:
                self.scaled_mean *= inverse[:, 0]
                np.multiply(values, inverse, out=deviation)
                deviation -= self.scaled_mean[:, None]
        else:
            missing = ~self.finite
            if inverse is None:
                np.copyto(deviation, values)
            else:
                np.multiply(values, inverse, out=deviation)
            np.copyto(deviation, 0.0, where=missing)
            self.scaled_mean = deviation.sum(axis=1) / self.count
            deviation -= self.scaled_mean[:, None]
            np.copyto(deviation, 0.0, where=missing)
        self.deviation = deviation
        self.mean = self.scale * self.scaled_mean
        self.m2 = _row_dot(deviation, deviation) / self.count  # of the scaled samples
        # Mean square = variance + mean², both of the scaled samples.
        self.rms = self.scale * np.sqrt(self.m2 + self.scaled_mean * self.scaled_mean)


def _row_dot(a: FloatArray, b: FloatArray) -> FloatArray:
    result: FloatArray = np.einsum("ij,ij->i", a, b)
    return result


def _vibration(
    base: _Base, sample_rate: float, bands: tuple[Band, ...], band_names: Sequence[str]
) -> dict[str, FloatArray]:
    # Missing samples deviate by 0: filled with the mean, they add nothing below.
    deviation, space = base.deviation, base.space
    squared = np.multiply(deviation, deviation, out=space.scratch)
    m2 = base.m2
    m3 = _row_dot(squared, deviation) / base.count
    m4 = _row_dot(squared, squared) / base.count
    # Exactly constant (min == max), not "small m2": a real but tiny spread still has a shape.
    varies = (base.n > 0) & (base.highest > base.lowest)
    safe_m2 = np.where(varies, m2, 1.0)
    kurtosis = np.where(varies, m4 / (safe_m2 * safe_m2), np.nan)
    skewness = np.where(varies, m3 / (safe_m2 * np.sqrt(safe_m2)), np.nan)
    crest = np.where(base.peak > 0.0, base.peak / np.where(base.rms > 0.0, base.rms, 1.0), np.nan)

    samples = deviation.shape[1]
    columns: dict[str, FloatArray] = {
        "crest": crest,
        "kurtosis": kurtosis,
        "skewness": skewness,
    }
    if samples == 0:
        columns["centroid_hz"] = np.full(len(base.n), np.nan)
        for name in band_names:
            columns[name] = np.full(len(base.n), np.nan)
        return columns
    spectral = _spectral(samples, float(sample_rate), bands)
    windowed = np.multiply(deviation, spectral.window, out=space.scratch)
    spectrum = np.fft.rfft(windowed, axis=1, out=space.spectrum)
    power = np.multiply(spectrum.real, spectrum.real, out=space.power)
    power += np.multiply(spectrum.imag, spectrum.imag, out=space.power_scratch)
    power *= spectral.one_sided
    # No matrix product here: OpenBLAS wakes its threads for one, which cost milliseconds a
    # window on a busy two-core box (bench/sensor_throughput.py); these loops are single-thread.
    total = power.sum(axis=1)
    has_power = varies & (total > 0.0)
    safe_total = np.where(has_power, total, 1.0)
    moment: FloatArray = np.einsum("ij,j->i", power, spectral.freqs)
    columns["centroid_hz"] = np.where(has_power, moment / safe_total, np.nan)
    variance = base.scale * base.scale * m2
    to_energy = np.where(has_power, variance / safe_total, 0.0)
    for name, bins in zip(band_names, spectral.band_bins, strict=True):
        if bins is None:
            columns[name] = np.full_like(m2, np.nan)
        else:
            # Bands are contiguous runs of bins; a loop over the few bands, not the samples.
            columns[name] = power[:, bins[0] : bins[1]].sum(axis=1) * to_energy
    return columns


class _Spectral:
    """What the spectrum of one (samples, rate, bands) needs: the Hann window, the bin
    frequencies, the one-sided factor of each bin, and each band's bins as [start, stop) (None
    for a band holding no bin)."""

    def __init__(self, samples: int, sample_rate: float, bands: tuple[Band, ...]) -> None:
        self.window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(samples) / samples)
        freqs = np.asarray(np.fft.rfftfreq(samples, d=1.0 / sample_rate), dtype=np.float64)
        # One-sided: every bin but DC and (even length) Nyquist stands for two in the full FFT.
        one_sided = np.full(freqs.shape, 2.0)
        one_sided[0] = 1.0
        if samples % 2 == 0:
            one_sided[-1] = 1.0
        nyquist = sample_rate / 2.0
        band_bins: list[tuple[int, int] | None] = []
        for low, high in bands:
            inside = np.flatnonzero((freqs >= low) & ((freqs < high) | (high >= nyquist)))
            band_bins.append((int(inside[0]), int(inside[-1]) + 1) if inside.size else None)
        self.freqs = freqs
        self.one_sided = one_sided
        self.band_bins = tuple(band_bins)


@lru_cache(maxsize=32)
def _spectral(samples: int, sample_rate: float, bands: tuple[Band, ...]) -> _Spectral:
    return _Spectral(samples, sample_rate, bands)


def _slope(base: _Base, window: SampleWindow) -> FloatArray:
    samples = base.values.shape[1]
    if window.times_s is not None:
        times = np.asarray(window.times_s, dtype=np.float64).reshape(-1)
        if times.shape[0] != samples:
            raise ValueError(
                f"window of {window.source!r} has {times.shape[0]} sample times "
                f"for {samples} samples"
            )
    elif window.sample_rate is not None and window.sample_rate > 0:
        times = np.arange(samples) / window.sample_rate
    else:
        times = np.arange(samples) * (window.duration_s / max(samples, 1))
    timed_ok = np.isfinite(times)[None, :]
    valid = timed_ok if base.finite is None else base.finite & timed_ok
    valid = np.broadcast_to(valid, base.values.shape)
    k = np.count_nonzero(valid, axis=1)
    count = np.maximum(k, 1)
    timed = np.where(valid, times[None, :], 0.0)
    # The scaled deviations from the mean: the shift leaves the slope as it is.
    x = np.where(valid, base.deviation, 0.0)
    t_mean = timed.sum(axis=1) / count
    x_mean = x.sum(axis=1) / count
    dt = np.where(valid, timed - t_mean[:, None], 0.0)
    dx = np.where(valid, x - x_mean[:, None], 0.0)
    sxx = _row_dot(dt, dt)
    sxy = _row_dot(dt, dx)
    defined = (k >= 2) & (sxx > 0.0)
    slope: FloatArray = np.where(defined, base.scale * sxy / np.where(defined, sxx, 1.0), np.nan)
    return slope


def _summary(
    channels: Sequence[str], base: _Base, names: Sequence[str], columns: dict[str, FloatArray]
) -> Summary:
    table = np.stack([columns[name] for name in names], axis=1)
    # Undefined (NaN) and overflowed (inf) values become None: a record must be valid JSON.
    table = np.where(np.isfinite(table) & (base.n > 0)[:, None], table, np.nan)
    flat = table.ravel().tolist()
    # One %-format of the whole table, then float(): the same digits as f"{value:.7g}" value
    # by value, in half the time.
    rounded = list(map(float, ((_ROUNDING * len(flat)) % tuple(flat)).split()))
    width = len(names)
    summary: Summary = {}
    for index, (channel, count) in enumerate(zip(channels, base.n.tolist(), strict=True)):
        entry: dict[str, float | int | None] = {"n": count}
        row = rounded[index * width : (index + 1) * width]
        entry.update(zip(names, [None if math.isnan(v) else v for v in row], strict=True))
        summary[channel] = entry
    return summary
