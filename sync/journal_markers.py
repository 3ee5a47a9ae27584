"""Journal markers, shared by the `directory` and `s3` destinations: each journal keeps a small
`journal.json` saying when it first and last shipped there, and comparing the markers under one
appliance id tells a journal that replaced another (never a problem) from two that ship at the
same time (two boxes share one id: a collision, flagged in `concurrent-journals.json` and handed
to the engine). The receiver applies the same rule to its own records (receiver/store.py)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sync.destination import JournalCollision
from sync.records import format_ts, parse_ts

log = logging.getLogger(__name__)

# Another journal under this appliance id counts as live alongside ours when it was seen after
# ours first appeared and within this long: a journal that stopped before ours started (a
# replaced disk) or has been quiet this long (a box long gone) is not a collision.
COLLISION_QUIET_S = 24 * 3600.0
# A journal's marker is rewritten (and the others' markers read) at most this often.
MARKER_REFRESH_S = 60.0
MARKER_NAME = "journal.json"
FLAG_NAME = "concurrent-journals.json"


@dataclass(frozen=True, slots=True)
class JournalMarker:
    """The `journal.json` of one journal: when it first and last shipped to a destination."""

    appliance_id: str
    journal_id: str
    first_seen: datetime
    last_seen: datetime
    follows: str | None = None  # the journal whose history this one continues (a fork's origin)

    def to_json(self) -> bytes:
        doc = {
            "appliance_id": self.appliance_id,
            "journal_id": self.journal_id,
            "first_seen": format_ts(self.first_seen),
            "last_seen": format_ts(self.last_seen),
            "follows": self.follows,
        }
        return json.dumps(doc, indent=1).encode()


def parse_marker(data: bytes, journal_id: str) -> JournalMarker | None:
    """The marker in `data` if it is a sound one for `journal_id`, else None (ignored)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("journal_id") != journal_id:
            return None
        return JournalMarker(
            appliance_id=str(doc.get("appliance_id", "")),
            journal_id=journal_id,
            first_seen=parse_ts(str(doc["first_seen"])),
            last_seen=parse_ts(str(doc["last_seen"])),
            follows=doc.get("follows") if isinstance(doc.get("follows"), str) else None,
        )
    except (ValueError, KeyError, TypeError):
        return None


def next_marker(
    appliance_id: str,
    journal_id: str,
    first_seen: datetime | None,
    now: datetime,
    follows: str | None = None,
) -> JournalMarker:
    """Our marker refreshed to `now`, keeping the first sighting already recorded (if any)."""
    first = now if first_seen is None else min(first_seen, now)
    return JournalMarker(appliance_id, journal_id, first, now, follows)


def live_alongside(
    ours: JournalMarker, others: Iterable[JournalMarker], now: datetime, quiet_s: float
) -> list[JournalMarker]:
    """The other journals live alongside ours: seen since ours first appeared, and recently.
    A journal that stopped before ours appeared is one ours replaced, never a collision; nor is
    one ours follows or that follows ours (one box's history, forked after a restore)."""
    horizon = now - timedelta(seconds=quiet_s)
    return sorted(
        (
            other
            for other in others
            if other.journal_id != ours.journal_id
            and other.journal_id != ours.follows
            and other.follows != ours.journal_id
            and other.last_seen >= ours.first_seen
            and other.last_seen >= horizon
        ),
        key=lambda marker: marker.journal_id,
    )


def collision_for(
    ours: JournalMarker, live: list[JournalMarker], where: str
) -> JournalCollision | None:
    """The warning for the engine when journals other than ours are live, else None."""
    if not live:
        return None
    journals = tuple(sorted([ours.journal_id, *(other.journal_id for other in live)]))
    seen = ", ".join(
        f"{other.journal_id} (last seen {format_ts(other.last_seen)})" for other in live
    )
    detail = (
        f"appliance id {ours.appliance_id!r} has {len(journals)} live journals at {where}: "
        f"this one {ours.journal_id} (first seen {format_ts(ours.first_seen)}) and {seen}; "
        "two boxes share one id: give each its own appliance.id"
    )
    return JournalCollision(journals=journals, detail=detail)


def flag_json(ours: JournalMarker, collision: JournalCollision, now: datetime) -> bytes:
    """The `concurrent-journals.json` flag: the collision, for whoever reads the destination."""
    doc = {
        "appliance_id": ours.appliance_id,
        "journals": list(collision.journals),
        "detected_by": ours.journal_id,
        "detected_at": format_ts(now),
        "detail": collision.detail,
    }
    return json.dumps(doc, indent=1).encode()


class MarkerClock:
    """When a destination's marker for one journal is due again (monotonic, per process)."""

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.journal_id: str | None = None
        self.first_seen: datetime | None = None  # ours, once read or written in this process
        self._last: float | None = None
        self._problem: str | None = None

    def due(self, journal_id: str) -> bool:
        if journal_id != self.journal_id:
            self.journal_id, self.first_seen, self._last = journal_id, None, None
        return self._last is None or time.monotonic() - self._last >= self.refresh_s

    def done(self) -> None:
        self._last = time.monotonic()
        self._problem = None

    def failed(self, destination: str, problem: str) -> None:
        """Markers only warn: a failure never fails the batch. Tried again when next due,
        logged once per distinct problem."""
        self._last = time.monotonic()
        if problem != self._problem:
            self._problem = problem
            log.warning(
                "journal marker not kept up to date; concurrent journals go unnoticed",
                extra={"fields": {"destination": destination, "problem": problem}},
            )


def markers_from(entries: Mapping[str, bytes | None], ours: str) -> list[JournalMarker]:
    """The sound markers among `journal id -> marker bytes` (None: not there), ours left out."""
    found = []
    for journal_id, data in entries.items():
        if journal_id == ours or data is None:
            continue
        marker = parse_marker(data, journal_id)
        if marker is not None:
            found.append(marker)
    return found
