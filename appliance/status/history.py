"""Owns the status page's 24-hour history: a ring of samples of backlog and throughput taken
from the figures the status server computes (one a minute on a grid, and one at once when the
backlog changes between two), kept in `DATA_DIR/status-history.json` (written atomically) so
the page's charts survive a restart."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sync.records import format_ts

log = logging.getLogger(__name__)

HISTORY_FILE = "status-history.json"
FORMAT = "appliance-status-history"
VERSION = 1
WINDOW_S = 24 * 3600.0
SAMPLE_INTERVAL_S = 60.0
MAX_SAMPLES = 1440  # a day at one sample a minute
# Samples go to disk at most this often (and always at a clean stop): a day of samples is about
# 100 kB, and rewriting it every minute would wear an SD card for little gain.
SAVE_INTERVAL_S = 600.0


class HistoryFileError(ValueError):
    """The history file is not one this appliance wrote; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Figures:
    """What one sample is computed from: running totals read at one moment."""

    journalled_total: int  # records this process has journalled so far
    backlog: Mapping[str, tuple[int, int]]  # destination -> (records, bytes) waiting now
    acked_total: Mapping[str, int]  # destination -> records it acknowledged in this process


@dataclass(frozen=True, slots=True)
class DestinationSample:
    backlog_records: int
    backlog_bytes: int
    acked_per_min: float | None  # None: no earlier total to compare with (the first sample)


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # Unix time, seconds
    journalled_per_min: float | None  # None: the first sample of a run
    destinations: Mapping[str, DestinationSample]

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "journalled_per_min": self.journalled_per_min,
            "destinations": {
                name: {
                    "backlog_records": d.backlog_records,
                    "backlog_bytes": d.backlog_bytes,
                    "acked_per_min": d.acked_per_min,
                }
                for name, d in self.destinations.items()
            },
        }


def _rate(now: int, before: int, seconds: float) -> float:
    # A total that fell (an engine replaced) counts what it shows now, never a negative rate.
    delta = now - before if now >= before else now
    return round(delta * 60.0 / seconds, 2)


class History:
    """The ring of samples. Not thread-safe: `record` runs on the event loop, `load` and `save`
    in a worker thread while nothing records (at start, and on a copy taken by `snapshot`)."""

    def __init__(
        self,
        path: Path,
        *,
        appliance_id: str,
        interval_s: float = SAMPLE_INTERVAL_S,
        max_samples: int = MAX_SAMPLES,
        save_interval_s: float = SAVE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self.path = path
        self.appliance_id = appliance_id
        self.interval_s = interval_s
        self.save_interval_s = save_interval_s
        self._clock = clock
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self._previous: tuple[float, Figures] | None = None
        self._saved_at: float | None = None
        # Whether the newest sample was taken by `observe` (off the grid): the next one
        # replaces it, so the ring still holds a day at one sample per interval.
        self._between = False

    @property
    def gap_s(self) -> float:
        """Samples further apart than this have a hole between them (the daemon was down)."""
        return 2.5 * self.interval_s

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def record(self, figures: Figures, now: float | None = None) -> Sample:
        """Add a sample of `figures` taken at `now` (default: the clock); rates are per minute
        since the previous sample of this process."""
        # Rounded as the file keeps it, so a sample reads the same before and after a restart.
        t = round(self._clock() if now is None else now, 3)
        journalled: float | None = None
        acked: dict[str, float] = {}
        if self._previous is not None and t > self._previous[0]:
            before_t, before = self._previous
            seconds = t - before_t
            journalled = _rate(figures.journalled_total, before.journalled_total, seconds)
            acked = {
                name: _rate(total, before.acked_total.get(name, 0), seconds)
                for name, total in figures.acked_total.items()
            }
        self._previous = (t, figures)
        sample = Sample(
            t=t,
            journalled_per_min=journalled,
            destinations={
                name: DestinationSample(records, size, acked.get(name))
                for name, (records, size) in sorted(figures.backlog.items())
            },
        )
        self._add(sample)
        return sample

    def observe(self, figures: Figures, now: float | None = None) -> Sample | None:
        """Between two samples on the grid: a sample at once when the backlog differs from the
        newest sample's (None when it does not), so the charts never show a backlog that the
        page's tables, read at the same moment, have left behind. Its rates are the newest
        sample's: over a few seconds they would be noise. At most one such sample stands at a
        time: the next one, from here or from `record`, takes its place."""
        newest = self._samples[-1] if self._samples else None
        backlog = {name: records for name, (records, _) in figures.backlog.items()}
        if newest is not None and backlog == {
            name: d.backlog_records for name, d in newest.destinations.items()
        }:
            return None
        t = round(self._clock() if now is None else now, 3)
        sample = Sample(
            t=t,
            journalled_per_min=None if newest is None else newest.journalled_per_min,
            destinations={
                name: DestinationSample(
                    records,
                    size,
                    None
                    if newest is None or name not in newest.destinations
                    else newest.destinations[name].acked_per_min,
                )
                for name, (records, size) in sorted(figures.backlog.items())
            },
        )
        self._add(sample, between=True)
        return sample

    def _add(self, sample: Sample, *, between: bool = False) -> None:
        if self._between and self._samples:
            self._samples.pop()
        self._between = between
        # The wall clock went back (NTP on a board without a battery clock): what was recorded
        # "later" than now cannot be placed on the time axis any more.
        while self._samples and self._samples[-1].t > sample.t:
            self._samples.pop()
        self._samples.append(sample)
        while self._samples and self._samples[0].t < sample.t - WINDOW_S:
            self._samples.popleft()

    def to_json(self) -> dict[str, Any]:
        """The series as `GET /api/history` answers them (also the file's content)."""
        samples = list(self._samples)
        destinations = sorted({name for s in samples for name in s.destinations})
        return {
            "format": FORMAT,
            "version": VERSION,
            "appliance_id": self.appliance_id,
            "interval_s": self.interval_s,
            "window_s": WINDOW_S,
            "destinations": destinations,
            "samples": [
                {"ts": format_ts(datetime.fromtimestamp(s.t, UTC)), **s.to_json()} for s in samples
            ],
        }

    # ---------------------------------------------------------------------------- the file

    def load(self) -> None:
        """Read the file, dropping samples older than 24 h. A missing file starts empty; an
        unusable one is logged, kept aside as `*.bad` for a look, and started afresh."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            self._start_afresh(f"cannot read it: {exc}")
            return
        try:
            samples = self._parse(text)
        except HistoryFileError as exc:
            self._start_afresh(str(exc))
            return
        now = self._clock()
        # Samples from the future are from before the clock was set right: no place on the axis.
        kept = [s for s in samples if now - WINDOW_S <= s.t <= now + self.interval_s]
        self._samples.clear()
        self._samples.extend(sorted(kept, key=lambda s: s.t))
        log.info(
            "status history loaded",
            extra={
                "fields": {
                    "path": str(self.path),
                    "samples": len(self._samples),
                    "dropped_old": len(samples) - len(kept),
                }
            },
        )

    def _start_afresh(self, reason: str) -> None:
        bad = self.path.with_name(self.path.name + ".bad")
        with contextlib.suppress(OSError):
            self.path.replace(bad)
        log.warning(
            "status history file unusable, starting afresh",
            extra={"fields": {"path": str(self.path), "kept_as": str(bad), "reason": reason}},
        )
        self._samples.clear()

    def _parse(self, text: str) -> list[Sample]:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HistoryFileError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise HistoryFileError(f'not a status history (no "format": "{FORMAT}")')
        if doc.get("version") != VERSION:
            raise HistoryFileError(f"version {doc.get('version')!r}, this build reads {VERSION}")
        if doc.get("appliance_id") != self.appliance_id:
            raise HistoryFileError(
                f"written by appliance {doc.get('appliance_id')!r}, this is {self.appliance_id!r}"
            )
        raw = doc.get("samples")
        if not isinstance(raw, list):
            raise HistoryFileError("`samples` is not a list")
        return [_parse_sample(index, item) for index, item in enumerate(raw)]

    def due_for_save(self, now: float) -> bool:
        return self._saved_at is None or now - self._saved_at >= self.save_interval_s

    def snapshot(self) -> bytes:
        """The file's content now, taken on the event loop so a thread can write it."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    def save(self, content: bytes | None = None) -> None:
        """Write the file atomically: a temporary file beside it, flushed, then renamed over it,
        so a crash leaves the old file or the new one, never half of one."""
        data = self.snapshot() if content is None else content
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            temporary.replace(self.path)  # os.replace: atomic on one file system
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        self._saved_at = self._clock()


def _number(value: Any, what: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HistoryFileError(f"{what} is {value!r}, not a finite number")
    if value < 0:
        raise HistoryFileError(f"{what} is negative ({value})")
    return float(value)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HistoryFileError(f"{what} is {value!r}, not a whole number >= 0")
    return value


def _parse_sample(index: int, item: Any) -> Sample:
    where = f"sample {index}"
    if not isinstance(item, dict):
        raise HistoryFileError(f"{where} is not an object")
    t = _number(item.get("t"), f"{where}: t")
    assert t is not None
    destinations_raw = item.get("destinations")
    if not isinstance(destinations_raw, dict):
        raise HistoryFileError(f"{where}: `destinations` is not an object")
    destinations: dict[str, DestinationSample] = {}
    for name, figures in destinations_raw.items():
        at = f"{where}, destination {name!r}"
        if not isinstance(figures, dict):
            raise HistoryFileError(f"{at} is not an object")
        destinations[name] = DestinationSample(
            backlog_records=_count(figures.get("backlog_records"), f"{at}: backlog_records"),
            backlog_bytes=_count(figures.get("backlog_bytes"), f"{at}: backlog_bytes"),
            acked_per_min=_number(
                figures.get("acked_per_min"), f"{at}: acked_per_min", optional=True
            ),
        )
    return Sample(
        t=t,
        journalled_per_min=_number(
            item.get("journalled_per_min"), f"{where}: journalled_per_min", optional=True
        ),
        destinations=destinations,
    )
