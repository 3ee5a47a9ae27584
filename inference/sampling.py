"""Sampling policy for retraining: which analysed frames are kept as `sample` payloads (the
model was unsure, a class of interest, or at random for drift checks), under per-hour, per-UTC-day
and daily-byte caps, which raw sensor windows are kept (one in N), the boost both take while a
drift is active, and the JSON body that describes a kept sample to a labelling tool.

Pure bookkeeping: the caller encodes and stores the payload, then reports its size back.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Literal, get_args

from config.cameras import SamplingSettings
from inference.detections import Detection
from sensors.base import Frame, utc_now

SampleReason = Literal["uncertain", "class", "random"]
REASONS: tuple[SampleReason, ...] = get_args(SampleReason)
TicketState = Literal["open", "committed", "refused", "cancelled"]
CAPS = ("hour", "day", "bytes")


@dataclass(eq=False, slots=True)
class SampleTicket:
    """A frame the sampler wants, holding a slot of the hourly and daily counts until the caller
    commits it (with the payload's size) or cancels it."""

    number: int  # unique per sampler: identifies the ticket among the open ones
    reason: SampleReason
    ts: datetime
    state: TicketState = field(default="open")
    boosted: bool = False  # taken while a drift boost raised the random share


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"sampling needs an aware UTC timestamp, not the naive {ts.isoformat()}")
    return ts.astimezone(UTC)


class Boost:
    """A sampling rate multiplied by `factor` for times before `until` (a later `set` replaces
    it): what a drift asks for, so that retraining gets more of the data that drifted."""

    def __init__(self) -> None:
        self.factor = 1.0
        self.until: datetime | None = None

    def set(self, factor: float, until: datetime) -> None:
        if not factor >= 1.0:  # written so that NaN is refused too
            raise ValueError(f"sampling boost must be a factor >= 1, not {factor}")
        self.factor, self.until = float(factor), _utc(until)

    def at(self, ts: datetime) -> float:
        """The factor in force at `ts` (1 when none is)."""
        return self.factor if self.until is not None and ts < self.until else 1.0

    def status(self) -> dict[str, object] | None:
        if self.until is None:
            return None
        return {"factor": self.factor, "until": self.until.isoformat()}


class Sampler:
    """Decides which frames become samples and keeps every cap.

    `consider(ts, detections)` returns a ticket (with its reason) or None; the caller encodes the
    frame and calls `commit(ticket, size)`, which refuses (returns False) if the payload would
    pass the day's byte budget, so the budget is never exceeded; a caller that gives up calls
    `cancel(ticket)`. Open tickets count against the hourly and daily caps so that several frames
    in flight at once cannot overshoot them either.

    Periods are UTC clock hours and UTC days of the times `consider` is given (the camera
    pipeline gives wall time for live cameras, footage time for files). A clock that steps (a ship
    syncing its clock) starts a new period whichever way it steps: the caps still bound every
    period, and a clock set back does not lock sampling out until its old day comes again.
    """

    def __init__(
        self,
        cfg: SamplingSettings,
        rng: random.Random | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.cfg = cfg
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._classes = frozenset(cfg.classes)
        self._day: date | None = None
        self._hour: tuple[date, int] | None = None
        self._day_kept = 0
        self._day_bytes = 0
        self._hour_kept = 0
        self._open: set[int] = set()  # numbers of the open tickets of the current hour
        self._tickets = 0
        self._boost = Boost()
        self.counters: dict[str, int] = {
            "considered": 0,
            **{f"kept_{reason}": 0 for reason in REASONS},
            "kept_boosted": 0,
            "kept_bytes": 0,
            **{f"skipped_cap_{cap}": 0 for cap in CAPS},
            "cancelled": 0,
        }

    # --------------------------------------------------------------------------- periods

    def _roll(self, ts: datetime) -> None:
        day = ts.date()
        hour = (day, ts.hour)
        if day != self._day:
            self._day, self._day_kept, self._day_bytes = day, 0, 0
        if hour != self._hour:
            self._hour, self._hour_kept = hour, 0
            # Tickets of a past hour stop holding slots; they may still be committed, against
            # the caps of the period current then.
            self._open.clear()

    # -------------------------------------------------------------------------- decisions

    def boost(self, factor: float, until: datetime) -> None:
        """Multiply the random share by `factor` (at most 1 in all) for frames taken before
        `until`; a later call replaces it. The caps hold as always."""
        self._boost.set(factor, until)

    def random_share(self, ts: datetime) -> float:
        """The share of frames kept at random at `ts`, boost included."""
        return min(1.0, self.cfg.random * self._boost.at(_utc(ts)))

    def reason_for(
        self, detections: Iterable[Detection], *, share: float | None = None
    ) -> SampleReason | None:
        """Why this frame is worth keeping, by priority (uncertain, class, random), or None.
        `share`: the random share to draw against (default the configured one)."""
        # One draw per frame whatever the detections: a seeded run keeps the same sequence.
        lucky = self._rng.random() < (self.cfg.random if share is None else share)
        uncertain = False
        wanted_class = False
        band = self.cfg.uncertain
        for det in detections:
            if band is not None and band[0] <= det.score < band[1]:
                uncertain = True
            if det.label in self._classes:
                wanted_class = True
        if uncertain:
            return "uncertain"
        if wanted_class:
            return "class"
        if lucky:
            return "random"
        return None

    def _exhausted_cap(self, size: int = 0) -> str | None:
        """The first cap with no room for one more sample of `size` bytes, or None."""
        held = len(self._open)
        if self._day_kept + held >= self.cfg.per_day:
            return "day"
        if self._day_bytes + size > self.cfg.daily_bytes or self._day_bytes >= self.cfg.daily_bytes:
            return "bytes"
        if self._hour_kept + held >= self.cfg.per_hour:
            return "hour"
        return None

    def consider(self, ts: datetime, detections: Sequence[Detection]) -> SampleTicket | None:
        """A ticket if the frame taken at `ts` (UTC wall time) should be kept, else None."""
        now = _utc(ts)
        self._roll(now)
        self.counters["considered"] += 1
        boosted = self._boost.at(now) > 1.0
        reason = self.reason_for(detections, share=self.random_share(now))
        if reason is None:
            return None
        cap = self._exhausted_cap()
        if cap is not None:
            self.counters[f"skipped_cap_{cap}"] += 1
            return None
        self._tickets += 1
        ticket = SampleTicket(number=self._tickets, reason=reason, ts=now, boosted=boosted)
        self._open.add(ticket.number)
        return ticket

    def _close(self, ticket: SampleTicket, state: TicketState) -> None:
        """Close an open ticket, freeing the slot it held."""
        if ticket.state != "open":
            raise RuntimeError(f"sample ticket is already {ticket.state}")
        ticket.state = state
        self._open.discard(ticket.number)

    def commit(self, ticket: SampleTicket, size_bytes: int) -> bool:
        """Account a sample of `size_bytes`; False (nothing accounted) if a cap has no room.

        Only a True answer lets the caller store the payload.
        """
        if size_bytes < 0:
            raise ValueError(f"sample size must be >= 0 bytes, not {size_bytes}")
        # Closed first: the ticket's own slot is the one this sample takes.
        self._close(ticket, "committed")
        cap = self._exhausted_cap(size_bytes)
        if cap is not None:
            ticket.state = "refused"
            self.counters[f"skipped_cap_{cap}"] += 1
            return False
        self._hour_kept += 1
        self._day_kept += 1
        self._day_bytes += size_bytes
        self.counters[f"kept_{ticket.reason}"] += 1
        self.counters["kept_boosted"] += ticket.boosted
        self.counters["kept_bytes"] += size_bytes
        return True

    def cancel(self, ticket: SampleTicket) -> None:
        """Give the ticket's slot back (the frame could not be encoded or stored)."""
        self._close(ticket, "cancelled")
        self.counters["cancelled"] += 1

    def status(self) -> dict[str, object]:
        """Counters since start plus the use of the current hour and day, for the status page."""
        now = _utc(self._clock())
        # Read-only: a period with no frame yet shows as empty, without resetting anything.
        this_day = self._day == now.date()
        this_hour = self._hour == (now.date(), now.hour)
        return {
            "counters": dict(self.counters),
            "hour": {
                "kept": self._hour_kept if this_hour else 0,
                "open": len(self._open) if this_hour else 0,
                "cap": self.cfg.per_hour,
            },
            "day": {
                "kept": self._day_kept if this_day else 0,
                "cap": self.cfg.per_day,
                "bytes": self._day_bytes if this_day else 0,
                "bytes_cap": self.cfg.daily_bytes,
            },
            "boost": self._boost.status(),
        }


class RawWindowSampler:
    """Which raw sensor windows are kept: one in `every` (0: none), and `factor` times as often
    while boosted (never more than every window)."""

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"raw window sampling needs every >= 0, not {every}")
        self.every = every
        self._since = 0
        self._boost = Boost()
        self.kept = 0
        self.kept_boosted = 0

    def boost(self, factor: float, until: datetime) -> None:
        """Keep windows `factor` times as often for windows starting before `until`."""
        self._boost.set(factor, until)

    def take(self, ts: datetime) -> bool:
        """Whether the window starting at `ts` is kept."""
        if not self.every:
            return False
        factor = self._boost.at(_utc(ts))
        self._since += 1
        if self._since < max(1, round(self.every / factor)):
            return False
        self._since = 0
        self.kept += 1
        self.kept_boosted += factor > 1.0
        return True

    def status(self) -> dict[str, object]:
        return {
            "every": self.every,
            "kept": self.kept,
            "kept_boosted": self.kept_boosted,
            "boost": self._boost.status(),
        }


def sample_body(
    detections: Sequence[Detection],
    reason: SampleReason,
    model_name_version: str,
    frame: Frame,
    *,
    image_size: tuple[int, int] | None = None,
) -> dict[str, object]:
    """The JSON body of a `sample` record: what the model saw, so a labelling tool can pre-fill it.

    Boxes come in pixels of the stored image (`image_size` = (width, height) of the payload when
    it was shrunk; default the frame's) and normalised to 0..1, which fits any size.
    """
    if reason not in REASONS:
        raise ValueError(f"sample reason must be one of {list(REASONS)}, not {reason!r}")
    name, at, version = model_name_version.partition("@")
    if not (name and at and version):
        raise ValueError(f"model must be written name@version, not {model_name_version!r}")
    frame_w, frame_h = frame.width, frame.height
    width, height = image_size if image_size is not None else (frame_w, frame_h)
    if width < 1 or height < 1:
        raise ValueError(f"image_size must be positive, not {image_size}")
    predictions = []
    for det in detections:
        norm = [
            min(1.0, max(0.0, v))
            for v in (det.x1 / frame_w, det.y1 / frame_h, det.x2 / frame_w, det.y2 / frame_h)
        ]
        predictions.append(
            {
                "label": det.label,
                "class_id": det.class_id,
                "score": round(det.score, 4),
                "box": [
                    round(norm[0] * width, 1),
                    round(norm[1] * height, 1),
                    round(norm[2] * width, 1),
                    round(norm[3] * height, 1),
                ],
                "box_norm": [round(v, 5) for v in norm],
            }
        )
    return {
        "reason": reason,
        "model": model_name_version,
        "source": frame.source,
        "frame": {
            "index": frame.index,
            "ts": frame.ts.isoformat(),
            "mono_ns": frame.mono_ns,
            "position_s": frame.position_s,
            "width": frame_w,
            "height": frame_h,
        },
        "image": {"width": width, "height": height},
        "predictions": predictions,
    }
