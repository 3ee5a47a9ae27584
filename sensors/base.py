"""What every source yields and promises: readings (sample windows, data-quality reports), health,
and the Source protocol (an async context manager with an async iterator of readings)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, Protocol, Self

import numpy as np
import numpy.typing as npt

SourceState = Literal["starting", "running", "reconnecting", "finished", "failed"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def mono_ns() -> int:
    return time.monotonic_ns()


@dataclass(frozen=True, slots=True)
class SampleWindow:
    """A window of samples from one source: one row per channel, NaN where a sample is missing."""

    source: str
    channels: tuple[str, ...]
    values: npt.NDArray[np.float64]  # shape (len(channels), n_samples)
    ts: datetime  # UTC wall clock at the window start
    mono_ns: int  # monotonic clock when the window closed, for ordering across clock jumps
    duration_s: float
    sample_rate: float | None  # None for irregularly sampled sources (CSV, live sources)
    # Live sources: each sample column's time in seconds after `ts` (a column is one message,
    # poll or sentence; NaN where a channel had no value in it). None: regular, i / sample_rate.
    times_s: npt.NDArray[np.float64] | None = None
    # Reasons of the bad input met while the window was open (out_of_range, stuck, ...): such a
    # window is journalled but never fitted into an anomaly baseline, except that bad input
    # costing single channels samples (missing, nan, inf, out_of_range) only makes those
    # channels' features doubtful (appliance/stages/anomalies.py, usable_for_anomalies).
    quality: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QualityIssue:
    """One example of bad input, kept so an engineer can find it (line is 1-based, CSV only)."""

    reason: str
    detail: str
    line: int | None = None


@dataclass(frozen=True, slots=True)
class QualityReport:
    """Bad input a source met and did not pass on: counts by reason plus a few examples.

    Reasons in use: `unparseable`, `nan`, `inf`, `missing` (dropped-out samples), `bad_timestamp`,
    `empty_file`, `wrong_field_count`, `out_of_order`; live sources add `out_of_range`, `stuck`,
    `gap`, `clock_backwards`, `malformed` (a payload that is not what was configured),
    `bad_checksum` (NMEA) and `device_error` (Modbus: the device answered an exception such as
    busy or gateway no answer; that poll's values of the read are missing).
    """

    source: str
    ts: datetime
    mono_ns: int
    counts: dict[str, int]
    examples: tuple[QualityIssue, ...] = ()


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame from a camera, as OpenCV gives it (BGR, uint8, height x width x 3)."""

    source: str
    image: npt.NDArray[np.uint8]
    ts: datetime  # UTC wall clock when the frame was read
    mono_ns: int  # monotonic clock when the frame was read
    index: int  # frames taken from this camera since it started (across reconnects)
    position_s: float | None = None  # position in a video file; None for live streams

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


Reading = SampleWindow | QualityReport


@dataclass(slots=True)
class SourceHealth:
    """Live health of a source, read by the daemon's health job."""

    state: SourceState = "starting"
    windows: int = 0
    bad_values: int = 0
    reconnects: int = 0
    last_reading_mono_ns: int | None = None
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    # Readings a consumer that fell behind never got (a live source's bounded queue, oldest first).
    readings_dropped: int = 0


class SourceError(Exception):
    """A source that cannot go on. `retryable` says whether reconnecting may help."""

    def __init__(self, source: str, message: str, *, retryable: bool) -> None:
        self.source = source
        self.retryable = retryable
        super().__init__(f"source {source!r}: {message}")


class SourceLifecycle:
    """The enter/exit half of the `Source` protocol, shared by the source kinds: once entered,
    health says `entered_state`; on exit `finished`, or `failed` with the error that ended it."""

    health: SourceHealth
    entered_state: SourceState = "running"

    async def __aenter__(self) -> Self:
        self.health.state = self.entered_state
        self.health.error = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.health.state = "failed"
            self.health.error = str(exc)
        else:
            self.health.state = "finished"


class Source(Protocol):
    """A sensor source. Enter it, then iterate `readings()`; a finite source's iterator ends."""

    name: str
    finite: bool
    health: SourceHealth

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def readings(self) -> AsyncIterator[Reading]: ...
