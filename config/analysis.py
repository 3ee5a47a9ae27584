"""What is computed on a source's data: features, limits, anomaly detection, refits, drift."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator

from config.base import Duration, Problem, Strict, TimeWindow, raise_problems
from config.words import BAND_FEATURE_PATTERN, did_you_mean, listing

TemporalKind = Literal["delta", "residual"]
"""Temporal anomaly features (inference/temporal.py computes them)."""

FeatureName = Literal[
    "rms",
    "peak",
    "mean",
    "min",
    "max",
    "crest",
    "kurtosis",
    "skewness",
    "centroid_hz",
    "slope",
]
FEATURE_NAMES: tuple[str, ...] = get_args(FeatureName)

# The features inference/features.py computes (it takes these names from here): `config check`
# must know which features a source's windows will carry.
BASE_FEATURES = ("rms", "peak", "mean", "min", "max")
"""Every window, whatever the settings."""
VIBRATION_FEATURES = ("crest", "kurtosis", "skewness", "centroid_hz")
"""Added for vibration, followed by one `band_<low>_<high>` energy per band."""
SLOW_FEATURES = ("slope",)
"""Added for slow signals."""
VIBRATION_MIN_RATE_HZ = 100.0
"""`auto` treats a regularly sampled source at this rate or above as vibration."""
OCTAVE_BANDS = 5
"""Default bands: five octaves up to the Nyquist frequency."""

_BAND_FEATURE = re.compile(BAND_FEATURE_PATTERN)


def _hz(value: float) -> str:
    # Positional and shortest, as numpy's format_float_positional(trim="-"): 625.0 -> "625",
    # 312.5 -> "312p5" (no dot, so `channel.feature` splits at its last dot).
    text = format(Decimal(repr(float(value))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text.replace(".", "p")


def band_feature(low: float, high: float) -> str:
    """`band_<low>_<high>` in Hz, compact: band_0_625, band_312p5_625."""
    return f"band_{_hz(low)}_{_hz(high)}"


def default_bands(sample_rate: float) -> tuple[tuple[float, float], ...]:
    """Five octave bands up to the Nyquist frequency (OCTAVE_BANDS)."""
    nyquist = sample_rate / 2.0
    edges = [0.0] + [nyquist / 2.0**k for k in range(OCTAVE_BANDS - 1, -1, -1)]
    return tuple((edges[i], edges[i + 1]) for i in range(OCTAVE_BANDS))


def _feature_name(value: str) -> str:
    if value in FEATURE_NAMES or _BAND_FEATURE.fullmatch(value):
        return value
    raise ValueError(
        f"unknown feature {value!r}{did_you_mean(value, FEATURE_NAMES)}: a feature is one of "
        f"{listing(FEATURE_NAMES)}, or a band energy band_<low>_<high> in Hz (e.g. band_0_625)"
    )


LimitFeature = Annotated[
    str,
    AfterValidator(_feature_name),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": list(FEATURE_NAMES), "type": "string"},
                {"pattern": BAND_FEATURE_PATTERN, "type": "string"},
            ]
        }
    ),
]
"""A window feature's name: one of FeatureName or a band energy `band_<low>_<high>`."""


class Limit(Strict):
    feature: LimitFeature = Field(
        description="Window feature the limit watches (a band energy as `band_<low>_<high>`)."
    )
    channel: str | None = Field(
        default=None, description="Channel the limit applies to; null means every channel."
    )
    above: float | None = Field(default=None, description="Violated when the feature exceeds it.")
    below: float | None = Field(
        default=None, description="Violated when the feature falls under it."
    )
    priority: Literal["alert", "event"] = Field(
        default="alert", description="Priority of the record written when the limit is crossed."
    )

    @model_validator(mode="after")
    def _needs_a_bound(self) -> Limit:
        if self.above is None and self.below is None:
            raise ValueError("a limit needs `above`, `below` or both")
        return self


class FeatureSettings(Strict):
    kind: Literal["auto", "vibration", "slow"] = Field(
        default="auto",
        description="vibration: adds crest, kurtosis (Pearson, normal = 3), skewness, "
        "centroid_hz and band energies; slow: adds slope (units/s); both also give rms, peak, "
        "mean, min and max. auto: vibration for regularly sampled sources at 100 Hz or more, slow "
        "otherwise.",
    )
    bands: list[tuple[float, float]] = Field(
        default_factory=list,
        description="Vibration: FFT bands [low, high) in Hz whose energy is a feature, named "
        "`band_<low>_<high>` with `p` for a decimal point (e.g. band_312p5_625); empty: five "
        "octave bands up to the Nyquist frequency.",
    )

    @model_validator(mode="after")
    def _bands_are_ordered(self) -> FeatureSettings:
        raise_problems(
            [
                (("bands", index), f"band [{low}, {high}] must have 0 <= low < high")
                for index, (low, high) in enumerate(self.bands)
                if not 0 <= low < high
            ]
        )
        return self


class RefitSettings(Strict):
    enabled: bool = Field(
        default=False,
        description="Refit the source's baseline on the device on its recent healthy readings, "
        "validate it, try it in shadow beside the current one and watch it after activation.",
    )
    every: Duration = Field(
        default=604800.0,
        ge=0,
        description="Least age of the current baseline (since it was fitted) before a refit "
        "starts. An attempt that activated nothing is tried again a day later at the soonest "
        "(or after `every`, when shorter).",
    )
    windows: list[TimeWindow] = Field(
        default_factory=list,
        description="UTC time windows (HH:MM-HH:MM, may wrap midnight) in which a refit may "
        "start; empty means any time.",
    )
    data: Duration = Field(
        default=86400.0,
        gt=0,
        description="Span of the source's most recent readings (data time) the refit is fitted "
        "and validated on; windows with bad input or in or near an anomaly are left out.",
    )
    holdout: float = Field(
        default=0.25,
        ge=0.05,
        le=0.5,
        description="Share of those clean windows, the newest, held out of the fit to validate "
        "the new baseline on.",
    )
    max_over_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Validation: most share of the held-out windows over the new threshold.",
    )
    canary: Duration = Field(
        default=3600.0,
        gt=0,
        description="Data time the new baseline scores every window in shadow beside the "
        "current one before it is judged (and at least 100 windows).",
    )
    max_alarm_ratio: float = Field(
        default=2.0,
        ge=1,
        description="Canary: the new baseline's share of windows over its threshold may be at "
        "most this times the current one's, plus 0.01. Watch: the same limit against the share "
        "the replaced baseline had in the canary.",
    )
    watch: Duration = Field(
        default=21600.0,
        ge=0,
        description="Data time after activation in which an alarm share over the limit or a "
        "scoring error rolls back to the previous baseline by itself. 0: no watch.",
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness added to the process that fits (one CPU thread), so inference "
        "never waits for it.",
    )


class AnomalySettings(Strict):
    method: Literal["robust_z", "ewma", "hotelling", "isolation_forest", "autoencoder"] = Field(
        default="hotelling",
        description="robust_z: the largest median/MAD z-score of the features; ewma: an "
        "exponentially weighted control chart; hotelling: Hotelling's T² of the feature vector "
        "(the default: see docs/configuration.md for what it is good for); isolation_forest, "
        "autoencoder: scikit-learn models fitted on the baseline and run as ONNX (skl2onnx). "
        "isolation_forest splits one feature at a time: it misses a broken correlation between "
        "channels (use hotelling or autoencoder).",
    )
    features: list[str] = Field(
        default_factory=list,
        description="Feature vector as `channel.feature` names (e.g. `hss_axial.rms`); empty: "
        "every feature of every channel.",
    )
    temporal: list[TemporalKind] = Field(
        default_factory=list,
        description="Features that see change across windows, derived from each channel's "
        "`mean` (or from every feature where none is a mean): `delta` (minus the previous "
        "window's) and `residual` (minus a short-term forecast of it). Empty: each window alone.",
    )
    baseline: Duration = Field(
        default=3600.0,
        gt=0,
        description="Healthy running fitted at the start (or after `models fit-baseline`); no "
        "anomaly is reported before it is fitted.",
    )
    min_windows: int = Field(
        default=30, ge=5, description="Fewest clean windows a baseline may be fitted on."
    )
    false_alarms_per_day: float = Field(
        default=1.0,
        gt=0,
        le=10000,
        description="How often running like the baseline may raise an anomaly, per day of data. "
        "The threshold is calibrated from the baseline's held-out scores (a tail fit) to this "
        "rate, the same way for every method.",
    )
    margin: float = Field(
        default=1.0,
        ge=1,
        description="Multiplies the calibrated threshold. 1 for most uses: lower "
        "`false_alarms_per_day` instead.",
    )
    debounce: tuple[int, int] = Field(
        default=(2, 3),
        description="[k, n]: an anomaly starts when k of the last n windows are over the threshold.",
    )
    hysteresis: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="An anomaly ends when n windows in a row score under threshold x hysteresis.",
    )
    critical: float = Field(
        default=2.0,
        ge=1,
        description="Score / threshold at which an anomaly is an `alert` rather than an `event`.",
    )
    raw_windows: tuple[int, int] = Field(
        default=(3, 3),
        description="[pre, post]: raw-sample windows kept around an anomaly as its payload.",
    )
    refit: RefitSettings = Field(
        default_factory=RefitSettings,
        description="Refitting the baseline on the device in scheduled windows.",
    )

    @model_validator(mode="before")
    @classmethod
    def _quantile_replaced(cls, data: object) -> object:
        if isinstance(data, dict) and "quantile" in data:
            raise ValueError(
                "anomaly.quantile was replaced by false_alarms_per_day (how often healthy running "
                "may raise an anomaly, per day): remove quantile, see docs/configuration.md"
            )
        return data

    @model_validator(mode="after")
    def _debounce_fits(self) -> AnomalySettings:
        problems: list[Problem] = []
        k, n = self.debounce
        if not 1 <= k <= n <= 100:
            problems.append((("debounce",), "debounce must be [k, n] with 1 <= k <= n <= 100"))
        if min(self.raw_windows) < 0 or max(self.raw_windows) > 60:
            problems.append((("raw_windows",), "raw_windows must be [pre, post], each 0..60"))
        raise_problems(problems)
        return self


class DriftSettings(Strict):
    enabled: bool = Field(
        default=True,
        description="Compare the model's inputs and outputs with its reference distribution.",
    )
    reference: Duration = Field(
        default=3600.0,
        gt=0,
        description="Data time after a model is activated whose values become its reference, "
        "when the model brings none (kept in DATA_DIR/models/drift/MODEL@VERSION/SOURCE.json).",
    )
    window: Duration = Field(
        default=3600.0, gt=0, description="Sliding window of recent values compared with it."
    )
    check_interval: Duration = Field(
        default=300.0, gt=0, description="Data time between two comparisons."
    )
    min_count: int = Field(
        default=200,
        ge=10,
        description="Fewest values a reference, and a window, must hold to be compared.",
    )
    bins: int = Field(
        default=10,
        ge=2,
        le=50,
        description="Bins per quantity, cut at the reference's quantiles (both ends open).",
    )
    psi_start: float = Field(
        default=0.25,
        gt=0,
        description="Population stability index at or above which a quantity has drifted.",
    )
    psi_end: float = Field(
        default=0.1, gt=0, description="A drift ends at the first check below this PSI."
    )
    consecutive: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Checks in a row at or above psi_start before a drift starts.",
    )
    sampling_boost: float = Field(
        default=4.0,
        ge=1,
        le=1000,
        description="While a drift is active, the random sampling share (cameras) is multiplied "
        "by it and raw windows (sensors) are kept this many times as often; caps still hold.",
    )
    boost_duration: Duration = Field(
        default=3600.0,
        ge=0,
        description="The boost lasts from each check that still finds a drift until this much "
        "data time later.",
    )
    input_every: int = Field(
        default=5,
        ge=1,
        description="Cameras: brightness and sharpness are measured on one frame in N.",
    )

    @model_validator(mode="after")
    def _ends_below_start(self) -> DriftSettings:
        if self.psi_end > self.psi_start:
            raise_problems([(("psi_end",), "psi_end must not be above psi_start (hysteresis)")])
        return self
