"""What a config means, checked without I/O: the channels and features a source's windows will
carry, and the limits, anomaly features, faults and ranges that name them; the words for a
class a detector does not know and for a name given twice.

Only what the config itself fixes is checked. A CSV source's channels come from its file's
header and an MQTT wildcard's from the topics that arrive, so those are matched as far as they
are known (a wildcard as a pattern); a detector's classes are known for the built-in one (and,
in `config check`, from a `labels_file`), not for an ONNX file's metadata or a package's manifest.
The warnings `config check` prints are `ApplianceConfig.warnings()`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from config.analysis import (
    BASE_FEATURES,
    SLOW_FEATURES,
    VIBRATION_FEATURES,
    VIBRATION_MIN_RATE_HZ,
    AnomalySettings,
    FeatureSettings,
    Limit,
    band_feature,
    default_bands,
)
from config.base import KeyPath, Problem, format_key
from config.words import did_you_mean, listing

MAX_LISTED = 12
"""Names listed in a message before it says how many more there are."""


def some(names: Sequence[str]) -> str:
    """`a, b and c`, or the first MAX_LISTED and how many more."""
    if len(names) <= MAX_LISTED:
        return listing(names, last="and")
    return f"{', '.join(names[:MAX_LISTED])} and {len(names) - MAX_LISTED} more"


@dataclass(frozen=True)
class Channels:
    """The channels a source's windows will carry, as far as the config fixes them."""

    names: tuple[str, ...] = ()
    patterns: tuple[tuple[str, re.Pattern[str]], ...] = ()
    """Channels made at run time, as (how the docs write them, what they match)."""
    unknown: str | None = None
    """Why they cannot be known before the source runs (then nothing is checked against them)."""

    def has(self, channel: str) -> bool:
        return (
            self.unknown is not None
            or channel in self.names
            or any(pattern.fullmatch(channel) for _, pattern in self.patterns)
        )

    def describe(self) -> str:
        parts = list(self.names[:MAX_LISTED])
        if len(self.names) > MAX_LISTED:
            parts.append(f"{len(self.names) - MAX_LISTED} more")
        parts += [shown for shown, _ in self.patterns]
        return listing(parts, last="and") if parts else "none"

    def unknown_channel(self, channel: str) -> str:
        return (
            f"no channel {channel!r} in this source{did_you_mean(channel, self.names)}; its "
            f"channels are {self.describe()}"
        )


@dataclass(frozen=True)
class Features:
    """The features each channel of a source's windows will carry."""

    names: tuple[str, ...]
    why: str
    """Which kind they are and why, as a message says it."""
    problem: Problem | None = None
    """A features setting that cannot work on this source."""

    def unknown_feature(self, feature: str) -> str:
        bands = [name for name in self.names if name.startswith("band_")]
        plain = [name for name in self.names if not name.startswith("band_")]
        if feature.startswith("band_") and bands:
            # Band names differ in digits only: a "did you mean" would pick one at random.
            return (
                f"this source has no band {feature!r}; its bands ({self.why}) are "
                f"{some(bands)} (features.bands sets others)"
            )
        listed = some(plain) if not bands else f"{', '.join(plain)} and {len(bands)} bands"
        return (
            f"this source does not compute feature {feature!r}{did_you_mean(feature, plain)}"
            f"; its features ({self.why}) are {listed}"
        )


def features_of(settings: FeatureSettings, sample_rate: float | None, source: str) -> Features:
    """The features of each channel, as inference/features.py computes them. `sample_rate`
    None: the source's samples are not regular (CSV, live sources), so vibration is impossible."""
    kind = settings.kind
    if kind == "auto":
        if sample_rate is not None and sample_rate >= VIBRATION_MIN_RATE_HZ:
            kind, why = "vibration", f"vibration features: {sample_rate:g} Hz, kind auto"
        elif sample_rate is None:
            kind, why = "slow", f"slow features: a {source} source has no regular sample rate"
        else:
            kind, why = "slow", f"slow features: {sample_rate:g} Hz is under 100 Hz, kind auto"
    else:
        why = f"{kind} features: features.kind is {kind}"
    if kind == "slow":
        return Features(BASE_FEATURES + SLOW_FEATURES, why)
    if sample_rate is None:
        problem: Problem = (
            ("features", "kind"),
            f"vibration features need a regular sample rate, and a {source} source's samples "
            "come when they come: use kind slow (or auto)",
        )
        return Features(BASE_FEATURES + SLOW_FEATURES, why, problem)
    bands = settings.bands or default_bands(sample_rate)
    names = tuple(band_feature(low, high) for low, high in bands)
    return Features(BASE_FEATURES + VIBRATION_FEATURES + names, why)


def analysis_problems(
    channels: Channels,
    features: Features,
    limits: Sequence[Limit],
    anomaly: AnomalySettings | None,
) -> list[Problem]:
    """Limits and anomaly features checked against the source's channels and features (paths
    relative to the source)."""
    problems: list[Problem] = [features.problem] if features.problem else []
    for index, limit in enumerate(limits):
        if limit.channel is not None and not channels.has(limit.channel):
            problems.append((("limits", index, "channel"), channels.unknown_channel(limit.channel)))
        if limit.feature not in features.names:
            problems.append((("limits", index, "feature"), features.unknown_feature(limit.feature)))
    for index, name in enumerate(anomaly.features if anomaly else []):
        path: KeyPath = ("anomaly", "features", index)
        channel, dot, feature = name.rpartition(".")
        if not dot or not channel or not feature:
            problems.append(
                (path, f"{name!r} is not a `channel.feature` name (e.g. vib_radial.rms)")
            )
            continue
        if not channels.has(channel):
            problems.append((path, channels.unknown_channel(channel)))
        elif feature not in features.names:
            problems.append((path, features.unknown_feature(feature)))
    return problems


def channel_problems(
    channels: Channels, named: Iterable[tuple[KeyPath, str, str]]
) -> list[Problem]:
    """Channels named elsewhere in a source (faults, ranges) that it does not have: each item is
    (path, channel, what names it)."""
    return [
        (path, f"{what}: {channels.unknown_channel(channel)}")
        for path, channel, what in named
        if not channels.has(channel)
    ]


def repeated(items: Iterable[tuple[KeyPath, str]], what: str) -> list[Problem]:
    """A problem at each repeat of a name, naming where it first stands (which keeps it)."""
    problems: list[Problem] = []
    first: dict[str, KeyPath] = {}
    for path, name in items:
        if name in first:
            problems.append(
                (
                    path,
                    f"two {what} are named {name!r} (the other is {format_key(first[name])}); "
                    "names must be unique",
                )
            )
        else:
            first[name] = path
    return problems


def labels_problem(name: str, labels: Sequence[str], model: str) -> str:
    """A class a camera names that its detector does not report."""
    return (
        f"class {name!r} is not a label of model {model!r}{did_you_mean(name, labels)}; its "
        f"labels: {some(list(labels))}"
    )


__all__ = [
    "Channels",
    "Features",
    "analysis_problems",
    "channel_problems",
    "features_of",
    "labels_problem",
    "repeated",
    "some",
]
