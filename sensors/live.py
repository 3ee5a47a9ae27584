"""What the live sources (MQTT, Modbus, OPC UA, NMEA) share: cutting timestamped values into
windows with their value checks, counting bad input, and reconnecting with jittered backoff.

A live source subclasses `LiveSource` and implements `_session()`: connect, call `_connected()`,
then hand every message, poll or sentence to `_publish()` until the link fails. The base turns
that into the `Source` protocol: windows on the wall-clock grid, data-quality reports, health.

Between the source and its consumer (the daemon's pipeline) sits one bounded queue of
`QUEUE_MAX` readings. A consumer that stalls for longer than that many windows loses the oldest
(newest data wins, as with a camera's frames): each one lost is counted in the source's
`health.readings_dropped`, which the status page, `appliance status` and `/metrics`
(`appliance_source_readings_dropped_total`) show. Memory stays bounded whatever the consumer does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from config.sensors import LiveSensorCommon
from sensors.base import (
    QualityIssue,
    QualityReport,
    Reading,
    SampleWindow,
    SourceError,
    SourceHealth,
    SourceLifecycle,
    mono_ns,
    utc_now,
)

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5
BACKOFF_FIRST_S = 0.5
# A sample this much older than the one before it means the clock was set back (a ship's clock
# synced to GPS), not messages arriving slightly out of order.
BACKWARDS_TOLERANCE_S = 1.0
QUEUE_MAX = 256
"""Readings (windows and quality reports) a live source holds for a consumer that is behind:
minutes of windows at the usual 1 s, while a healthy pipeline takes each one at once."""


@dataclass(slots=True)
class QualityLog:
    """Bad input met since the last report: counts by reason and the first few examples."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[QualityIssue] = field(default_factory=list)

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(QualityIssue(reason, detail))

    def report(self, source: str) -> QualityReport | None:
        """The report of everything since the last one (None when there was nothing); resets."""
        if not self.counts:
            return None
        report = QualityReport(
            source=source,
            ts=utc_now(),
            mono_ns=mono_ns(),
            counts=dict(self.counts),
            examples=tuple(self.examples),
        )
        self.counts, self.examples = Counter(), []
        return report


class WindowBuilder:
    """Cuts timestamped values of named channels into windows of `window_s` on the wall-clock
    grid (multiples of `window_s` since the epoch, so windows of different sources line up).

    Each `add()` is one column: one message, poll or sentence, with values for any subset of the
    channels. Non-finite, out-of-range and unknown-channel values are counted in `quality` and
    left out (NaN in the column); a channel repeating one value `stuck_after` times is reported
    once per run of repeats, and its values kept (a flat line may be true). Only windows with at
    least one value are emitted.
    """

    def __init__(
        self,
        source: str,
        channels: Sequence[str],
        window_s: float,
        quality: QualityLog,
        *,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        stuck_after: int = 0,
        gap_after_s: float | None = None,
        lateness_s: float = 0.0,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.source = source
        self.channels = tuple(channels)
        self.window_s = window_s
        self.quality = quality
        self._index = {name: i for i, name in enumerate(self.channels)}
        self._ranges = dict(ranges or {})
        self._stuck_after = stuck_after
        self._gap_after_s = gap_after_s
        # Values stamped at the source (OPC UA) arrive after their time: a window is due only
        # this long after its end, so late values still land in it rather than in a second one.
        self._lateness_s = lateness_s
        self._start: float | None = None  # epoch seconds of the open window's start
        self._columns: list[tuple[float, dict[int, float]]] = []
        self._last_t: float | None = None
        self._last_value: dict[int, float] = {}
        self._repeats: dict[int, int] = {}

    def add_channel(self, name: str) -> None:
        """Add a channel found at run time (an MQTT wildcard topic, an NMEA XDR transducer);
        windows closed from now on carry its row, NaN in the columns before its first value."""
        if name not in self._index:
            self._index[name] = len(self.channels)
            self.channels = (*self.channels, name)

    def add(self, values: Mapping[str, float], ts: datetime) -> list[SampleWindow]:
        """Take one column of values seen at `ts` (aware UTC); return the windows it closed."""
        t = ts.timestamp()
        closed: list[SampleWindow] = []
        if self._last_t is not None and t < self._last_t - BACKWARDS_TOLERANCE_S:
            self.quality.add(
                "clock_backwards",
                f"{_iso(t)} is {self._last_t - t:.1f} s before the previous value ({_iso(self._last_t)})",
            )
            closed += self._close()
        elif self._start is not None and t >= self._start + self.window_s:
            closed += self._close()
        if (
            self._gap_after_s is not None
            and self._last_t is not None
            and t - self._last_t > self._gap_after_s
        ):
            self.quality.add(
                "gap", f"no value for {t - self._last_t:.1f} s (since {_iso(self._last_t)})"
            )
        column = self._checked(values)
        if not column:
            return closed
        if self._start is None:
            self._start = math.floor(t / self.window_s) * self.window_s
        self._columns.append((max(0.0, t - self._start), column))
        self._last_t = t
        return closed

    def due(self, now: datetime) -> list[SampleWindow]:
        """The open window, if its end has passed by `now` (call on a timer: a source that went
        quiet must still deliver what it had)."""
        if self._start is not None and now.timestamp() >= self._due():
            return self._close()
        return []

    def _due(self) -> float:
        assert self._start is not None
        return self._start + self.window_s + self._lateness_s

    def seconds_to_close(self, now: datetime) -> float:
        """How long until the open window is due; a whole window when none is open."""
        if self._start is None:
            return self.window_s
        return max(0.0, self._due() - now.timestamp())

    def flush(self) -> list[SampleWindow]:
        """The open window, however short (the source is stopping)."""
        return self._close()

    def _checked(self, values: Mapping[str, float]) -> dict[int, float]:
        column: dict[int, float] = {}
        for name, raw in values.items():
            index = self._index.get(name)
            if index is None:
                self.quality.add("malformed", f"value for unknown channel {name!r}")
                continue
            value = float(raw)
            if math.isnan(value):
                self.quality.add("nan", f"{name}: NaN")
                continue
            if math.isinf(value):
                self.quality.add("inf", f"{name}: {value}")
                continue
            bounds = self._ranges.get(name)
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                self.quality.add(
                    "out_of_range", f"{name}: {value:g} outside [{bounds[0]:g}, {bounds[1]:g}]"
                )
                continue
            self._check_stuck(index, name, value)
            column[index] = value
        return column

    def _check_stuck(self, index: int, name: str, value: float) -> None:
        if not self._stuck_after:
            return
        if self._last_value.get(index) == value:
            self._repeats[index] += 1
            if self._repeats[index] == self._stuck_after:
                self.quality.add(
                    "stuck", f"{name} has read {value:g} {self._stuck_after} times in a row"
                )
        else:
            self._last_value[index] = value
            self._repeats[index] = 1

    def _close(self) -> list[SampleWindow]:
        start, columns = self._start, self._columns
        self._start, self._columns = None, []
        if start is None or not columns:
            return []
        values = np.full((len(self.channels), len(columns)), np.nan)
        times = np.empty(len(columns))
        for col, (offset, column) in enumerate(columns):
            times[col] = offset
            for index, value in column.items():
                values[index, col] = value
        return [
            SampleWindow(
                source=self.source,
                channels=self.channels,
                values=values,
                ts=datetime.fromtimestamp(start, UTC),
                mono_ns=mono_ns(),
                duration_s=self.window_s,
                sample_rate=None,
                times_s=times,
            )
        ]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def backoff_delay(failures: int, cap_s: float) -> float:
    """Jittered exponential backoff: sources that failed together retry apart."""
    delay = min(cap_s, BACKOFF_FIRST_S * 2 ** min(max(failures - 1, 0), 30))
    return float(delay * random.uniform(0.5, 1.0))


class LiveSource(SourceLifecycle, ABC):
    """Base of the networked and serial sources; endless (`finite` False).

    Subclasses set `transient` (the library's exceptions that mean "the link failed, try again")
    and implement `_session()`. Anything else escaping `_session()` is a bug or a permanent
    problem and fails the source (the daemon's supervisor decides what then). A `SourceError`
    with `retryable=True` reconnects too, `retryable=False` fails the source at once.
    """

    transient: tuple[type[BaseException], ...] = ()
    entered_state = "starting"  # running once `_session` has connected

    def __init__(
        self, cfg: LiveSensorCommon, channels: Sequence[str], *, lateness_s: float = 0.0
    ) -> None:
        """`channels` known at the start (more may be added at run time); `lateness_s`: how long
        after a window's end values stamped at the source may still arrive for it."""
        self.name = cfg.name
        self.finite = False
        self.health = SourceHealth()
        self.quality = QualityLog()
        self.reconnect_max_s = cfg.reconnect_max
        self._builder = WindowBuilder(
            cfg.name,
            channels,
            cfg.window,
            self.quality,
            ranges=cfg.ranges,
            stuck_after=cfg.stuck_after,
            gap_after_s=cfg.gap_after,
            lateness_s=lateness_s,
        )
        self._out: asyncio.Queue[Reading] = asyncio.Queue(QUEUE_MAX)
        self._connections = 0

    @property
    def channels(self) -> tuple[str, ...]:
        return self._builder.channels

    @abstractmethod
    async def _session(self) -> None:
        """Connect, call `_connected()`, then `_publish()` what arrives until the link fails
        (raise one of `transient`, or return when the peer closed it)."""

    def _connected(self) -> None:
        """The link is up: health says so, and a reconnect is counted."""
        self._connections += 1
        if self._connections > 1:
            self.health.reconnects += 1
        self.health.state = "running"
        self.health.error = None

    def _publish(self, values: Mapping[str, float], ts: datetime | None = None) -> None:
        """One column of values (seen at `ts`, default now) into the windows."""
        self.health.last_reading_mono_ns = mono_ns()
        for window in self._builder.add(values, ts or utc_now()):
            self._emit(window)

    def _emit(self, window: SampleWindow) -> None:
        if self.quality.counts:
            window = dataclasses.replace(window, quality=tuple(sorted(self.quality.counts)))
        self.health.windows += 1
        self.health.bad_values += sum(self.quality.counts.values())
        self._put(window)
        report = self.quality.report(self.name)
        if report is not None:
            self._put(report)

    def _flush_quality(self) -> None:
        self.health.bad_values += sum(self.quality.counts.values())
        report = self.quality.report(self.name)
        if report is not None:
            self._put(report)

    def _put(self, reading: Reading) -> None:
        """Queue `reading` for the consumer; when it is `QUEUE_MAX` behind, the oldest reading
        makes room and is counted as dropped."""
        if self._out.full():
            self._out.get_nowait()
            self.health.readings_dropped += 1
            if self.health.readings_dropped == 1 or self.health.readings_dropped % 100 == 0:
                log.warning(
                    "source %r: its consumer is %d readings behind; the oldest are dropped "
                    "(%d so far)",
                    self.name,
                    QUEUE_MAX,
                    self.health.readings_dropped,
                )
        self._out.put_nowait(reading)

    async def _run(self) -> None:
        failures = 0
        while True:
            published = self.health.last_reading_mono_ns
            try:
                await self._session()
                raise ConnectionError("the peer closed the connection")
            except SourceError as exc:
                if not exc.retryable:
                    raise
                error: BaseException = exc
            except BaseException as exc:
                if not isinstance(exc, (OSError, TimeoutError, *self.transient)):
                    raise
                error = exc
            # A session that delivered readings before failing starts the backoff afresh. One
            # that connected and failed before its first reading (a device that accepts the
            # connection and drops it at once) keeps backing off: resetting on "connected"
            # alone made such a source retry several times a second, logging each time.
            delivered = self.health.last_reading_mono_ns != published
            failures = 1 if delivered else failures + 1
            self.health.state = "reconnecting"
            self.health.error = str(error) or type(error).__name__
            delay = backoff_delay(failures, self.reconnect_max_s)
            # A SourceError's text already names the source.
            where = "" if isinstance(error, SourceError) else f"source {self.name!r}: "
            log.warning("%s%s; reconnecting in %.1f s", where, self.health.error, delay)
            await asyncio.sleep(delay)

    async def readings(self) -> AsyncGenerator[Reading, None]:
        runner = asyncio.create_task(self._run(), name=f"source:{self.name}")
        try:
            while True:
                if not self._out.empty():
                    yield self._out.get_nowait()
                    continue
                waiting = asyncio.ensure_future(self._out.get())
                timeout = self._builder.seconds_to_close(utc_now())
                try:
                    done, _ = await asyncio.wait(
                        {waiting, runner}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                except BaseException:
                    waiting.cancel()  # the consumer was cancelled: leave no task pending
                    raise
                if waiting in done:
                    yield waiting.result()
                    continue
                waiting.cancel()
                if runner in done:
                    runner.result()  # raises what failed the source
                for window in self._builder.due(utc_now()):
                    self._emit(window)
                if self.quality.counts and self._builder.seconds_to_close(utc_now()) >= (
                    self._builder.window_s
                ):
                    # Bad input with no window to ride on (nothing valid arrived) still reports.
                    self._flush_quality()
        finally:
            # The window in progress is not delivered: a consumer that stopped iterating (the
            # daemon at shutdown) takes nothing more. At most one window is lost, as with every
            # other source.
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
