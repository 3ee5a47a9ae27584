"""The CSV replay source: a file of timestamped rows cut into windows by data time."""

from __future__ import annotations

import asyncio
import csv
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import IO

import numpy as np

from config.sensors import CsvSensor
from sensors.base import (
    QualityIssue,
    QualityReport,
    Reading,
    SampleWindow,
    SourceError,
    SourceHealth,
    SourceLifecycle,
    utc_now,
)

BATCH_LINES = 2000
MAX_EXAMPLES = 5
COMMON_DELIMITERS = (",", ";", "\t", "|")
# Float noise in epoch arithmetic must not push a row sitting exactly on a boundary into the
# window before it.
_EPSILON = 1e-9


@dataclass(slots=True)
class _Row:
    """One data line, parsed off the event loop. `ts` is None when the row had to be dropped."""

    line: int
    ts: float | None
    values: list[float]
    issues: list[QualityIssue]


@dataclass(slots=True)
class _Layout:
    fields: int
    ts_index: int
    channels: tuple[str, ...]
    indexes: tuple[int, ...]


@dataclass(slots=True)
class _Pending:
    """Bad input met since the last report."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[QualityIssue] = field(default_factory=list)

    def add(self, issue: QualityIssue) -> None:
        self.counts[issue.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(issue)


class CsvSource(SourceLifecycle):
    """Replays a CSV file; a finite source. The file is opened anew by each `readings()` call.

    The first line is the header. A window opens at the first row's timestamp and covers
    `window` seconds of data time; the first row at or past its end closes it and opens the
    window, aligned on the first one's grid, that holds that row (empty windows in a gap are not
    emitted). Bad input becomes NaN values or dropped rows, counted in `QualityReport`s.
    """

    def __init__(self, cfg: CsvSensor) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.finite = True
        self.health = SourceHealth()
        self._file: IO[str] | None = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()
        await super().__aexit__(exc_type, exc, tb)

    async def readings(self) -> AsyncIterator[Reading]:
        self.health.state = "running"
        await self._close()
        try:
            self._file = await asyncio.to_thread(self._open)
            header, line = await asyncio.to_thread(_read_header, self._file)
            async for reading in self._replay(header, line):
                yield reading
        finally:
            await self._close()
        self.health.state = "finished"

    def _open(self) -> IO[str]:
        try:
            # Undecodable bytes become U+FFFD and so unparseable values, not a crash.
            return self.cfg.path.open(encoding="utf-8-sig", errors="replace", newline="")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise SourceError(
                self.name, f"cannot open {self.cfg.path}: {reason}", retryable=True
            ) from exc

    async def _close(self) -> None:
        if self._file is not None:
            handle, self._file = self._file, None
            await asyncio.to_thread(handle.close)

    async def _replay(self, header: str, line: int) -> AsyncIterator[Reading]:
        if not header.strip():
            yield self._report(Counter({"empty_file": 1}), [], data_ts=None)
            return
        layout = self._layout(header)
        window_s = self.cfg.window
        pending = _Pending()
        rows: list[list[float]] = []
        times: list[float] = []
        start: float | None = None
        end = 0.0
        latest = -math.inf
        first_ts: float | None = None
        mono_anchor = 0.0
        seen_rows = False
        assert self._file is not None
        handle = self._file
        while True:
            batch, line, eof = await asyncio.to_thread(_read_batch, handle, line, layout, self.cfg)
            for row in batch:
                if row.ts is None:
                    for issue in row.issues:
                        pending.add(issue)
                    continue
                seen_rows = True
                ts = row.ts
                if start is not None and ts >= end - _EPSILON:
                    await self._pace(first_ts, mono_anchor, end)
                    yield self._window(layout, rows, times, start)
                    if pending.counts:
                        yield self._report(pending.counts, pending.examples, data_ts=start)
                        pending = _Pending()
                    rows, times = [], []
                    steps = math.floor((ts - start) / window_s + _EPSILON)
                    start += steps * window_s
                    end = start + window_s
                elif start is None:
                    start, end = ts, ts + window_s
                    first_ts, mono_anchor = ts, time.monotonic()
                if ts < latest:
                    pending.add(
                        QualityIssue(
                            "out_of_order",
                            f"timestamp {_fmt_ts(ts)} is before {_fmt_ts(latest)}",
                            row.line,
                        )
                    )
                latest = max(latest, ts)
                for issue in row.issues:
                    pending.add(issue)
                rows.append(row.values)
                times.append(ts)
            if eof:
                break
        if start is not None:
            await self._pace(first_ts, mono_anchor, end)
            yield self._window(layout, rows, times, start)
        if not seen_rows and not pending.counts:
            yield self._report(Counter({"empty_file": 1}), [], data_ts=None)
        elif pending.counts:
            yield self._report(pending.counts, pending.examples, data_ts=start)

    def _layout(self, header: str) -> _Layout:
        delimiter = self.cfg.delimiter
        names = [name.strip() for name in _split(header, delimiter)]
        if self.cfg.timestamp_column not in names:
            message = (
                f"the header of {self.cfg.path} has no timestamp column "
                f"{self.cfg.timestamp_column!r}; fields found: {names}"
            )
            others = [d for d in COMMON_DELIMITERS if d != delimiter and d in header]
            if others and delimiter not in header:
                likely = max(others, key=header.count)
                message += f"; is the delimiter {likely!r}? (configured: {delimiter!r})"
            raise SourceError(self.name, message, retryable=False)
        ts_index = names.index(self.cfg.timestamp_column)
        if self.cfg.columns is None:
            wanted = [name for i, name in enumerate(names) if i != ts_index]
        else:
            missing = [name for name in self.cfg.columns if name not in names]
            if missing:
                raise SourceError(
                    self.name,
                    f"columns {missing} are not in the header of {self.cfg.path}; "
                    f"fields found: {names}",
                    retryable=False,
                )
            wanted = list(self.cfg.columns)
        return _Layout(
            fields=len(names),
            ts_index=ts_index,
            channels=tuple(wanted),
            indexes=tuple(names.index(name) for name in wanted),
        )

    async def _pace(self, first_ts: float | None, mono_anchor: float, data_end: float) -> None:
        if self.cfg.pace == "original" and first_ts is not None:
            delay = mono_anchor + (data_end - first_ts) - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
        else:
            await asyncio.sleep(0)

    def _window(
        self, layout: _Layout, rows: list[list[float]], times: list[float], start: float
    ) -> SampleWindow:
        values = np.array(rows, dtype=np.float64).reshape(len(rows), len(layout.channels)).T
        now_ns = time.monotonic_ns()
        self.health.windows += 1
        self.health.last_reading_mono_ns = now_ns
        return SampleWindow(
            source=self.name,
            channels=layout.channels,
            values=np.ascontiguousarray(values),
            ts=datetime.fromtimestamp(start, UTC),
            mono_ns=now_ns,
            duration_s=self.cfg.window,
            sample_rate=self.cfg.sample_rate,
            times_s=np.array(times, dtype=np.float64) - start,
            # Every row has every column: a NaN is a value that was bad or missing.
            quality=("missing",) if np.isnan(values).any() else (),
        )

    def _report(
        self, counts: Counter[str], examples: list[QualityIssue], *, data_ts: float | None
    ) -> QualityReport:
        self.health.bad_values += sum(counts.values())
        return QualityReport(
            source=self.name,
            ts=utc_now() if data_ts is None else datetime.fromtimestamp(data_ts, UTC),
            mono_ns=time.monotonic_ns(),
            counts=dict(counts),
            examples=tuple(examples),
        )


def _split(line: str, delimiter: str) -> list[str]:
    text = line.rstrip("\r\n")
    try:
        return next(csv.reader([text], delimiter=delimiter), [])
    except csv.Error:
        # A stray quote or NUL byte: a plain split still lets the field count judge the row.
        return text.split(delimiter)


def _fmt_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _read_header(handle: IO[str]) -> tuple[str, int]:
    """The first non-blank line and its line number; ("", n) when there is none."""
    line = 0
    while True:
        text = handle.readline()
        if not text:
            return "", line
        line += 1
        if text.strip():
            return text, line


def _read_batch(
    handle: IO[str], line: int, layout: _Layout, cfg: CsvSensor
) -> tuple[list[_Row], int, bool]:
    """Read and parse up to BATCH_LINES lines (runs in a worker thread)."""
    rows: list[_Row] = []
    for _ in range(BATCH_LINES):
        text = handle.readline()
        if not text:
            return rows, line, True
        line += 1
        if not text.strip():
            continue
        rows.append(_parse(text, line, layout, cfg))
    return rows, line, False


def _parse(text: str, line: int, layout: _Layout, cfg: CsvSensor) -> _Row:
    fields = [value.strip() for value in _split(text, cfg.delimiter)]
    if len(fields) != layout.fields:
        issue = QualityIssue(
            "wrong_field_count",
            f"expected {layout.fields} fields, got {len(fields)}: {_show(text.strip())}",
            line,
        )
        return _Row(line, None, [], [issue])
    ts = _parse_ts(fields[layout.ts_index], cfg.timestamp_format)
    if ts is None:
        issue = QualityIssue(
            "bad_timestamp",
            f"{cfg.timestamp_column}: {_show(fields[layout.ts_index])} is not "
            f"{cfg.timestamp_format}",
            line,
        )
        return _Row(line, None, [], [issue])
    values: list[float] = []
    issues: list[QualityIssue] = []
    for name, index in zip(layout.channels, layout.indexes, strict=True):
        raw = fields[index]
        try:
            value = float(raw)
        except ValueError:
            issues.append(QualityIssue("unparseable", f"{name}: {_show(raw)}", line))
            values.append(math.nan)
            continue
        if math.isnan(value):
            issues.append(QualityIssue("nan", f"{name}: {_show(raw)}", line))
        elif math.isinf(value):
            issues.append(QualityIssue("inf", f"{name}: {_show(raw)}", line))
            value = math.nan
        values.append(value)
    return _Row(line, ts, values, issues)


def _parse_ts(raw: str, fmt: str) -> float | None:
    try:
        if fmt == "iso8601":
            parsed = datetime.fromisoformat(raw)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp()
        value = float(raw)
    except (ValueError, OverflowError, OSError):
        return None
    seconds = value / 1000.0 if fmt == "epoch_ms" else value
    try:
        # Out of datetime's range: such a row could never be stamped on a window.
        datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return seconds
