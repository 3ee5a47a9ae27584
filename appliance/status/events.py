"""Owns the status server's list of events: `GET /api/events`' filters (priority, kind, source,
since) and pages (`before`, `limit`), and the records it answers with, each payload with its media
type and, for a stored image or clip, the URL the page shows it at (docs/status-api.md)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from appliance.status.kinds import check_kind
from config.names import NAME_RULE, is_name
from sync import JournalReader, Priority
from sync.records import StoredRecord, parse_since

EVENTS_DEFAULT, EVENTS_MAX = 50, 500
EVENT_PRIORITIES = (Priority.ALERT, Priority.EVENT)
# Raster formats only: an SVG is a document that can carry script.
SERVED_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
SERVED_VIDEO_TYPES = frozenset({"video/mp4"})  # camera clips, played in place on the page
SERVED_TYPES = SERVED_IMAGE_TYPES | SERVED_VIDEO_TYPES


class BadQuery(ValueError):
    """A query parameter the API cannot take; its message names the parameter and what fits."""


def _values(given: Iterable[str]) -> tuple[str, ...]:
    """Repeated parameters and comma-separated lists alike, in order, each value once."""
    seen: dict[str, None] = {}
    for text in given:
        for part in text.split(","):
            if part.strip():
                seen[part.strip()] = None
    return tuple(seen)


@dataclass(frozen=True)
class EventQuery:
    """What `GET /api/events` asks for (every filter empty: any)."""

    limit: int = EVENTS_DEFAULT
    priorities: tuple[Priority, ...] = EVENT_PRIORITIES
    kinds: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    since: str | None = None
    before: int | None = None

    @classmethod
    def parse(cls, query: Any) -> EventQuery:
        """From a request's query (a multidict: `getall`, `get`); BadQuery names what is wrong."""
        text = query.get("limit")
        limit = EVENTS_DEFAULT
        if text is not None:
            if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= EVENTS_MAX:
                raise BadQuery(f"limit must be a whole number from 1 to {EVENTS_MAX}, not {text!r}")
            limit = int(text)
        priorities = []
        for label in _values(query.getall("priority", [])):
            if label not in ("alert", "event"):
                raise BadQuery(
                    f"priority must be alert or event (the priorities of events), not {label!r}"
                )
            priorities.append(Priority.from_label(label))
        kinds = _values(query.getall("kind", []))
        for kind in kinds:
            try:
                check_kind(kind)
            except ValueError as exc:
                raise BadQuery(f"kind: {exc}") from None
        sources = _values(query.getall("source", []))
        for source in sources:
            if not is_name(source):
                raise BadQuery(f"source {source!r} is no source name: names are {NAME_RULE}")
        since = query.get("since")
        if since is not None:
            try:
                since = parse_since(since, "since")
            except ValueError as exc:
                raise BadQuery(str(exc)) from None
        text = query.get("before")
        before = None
        if text is not None:
            if not text.isascii() or not text.isdigit() or int(text) < 1:
                raise BadQuery(
                    f"before must be a record's seq (a whole number from 1), not {text!r}: "
                    "take it from the `next_before` of the page before"
                )
            before = int(text)
        return cls(
            limit=limit,
            priorities=tuple(sorted(priorities)) or EVENT_PRIORITIES,
            kinds=kinds,
            sources=sources,
            since=since,
            before=before,
        )

    def next_page(self, before: int) -> str:
        """The path of the page after this one, with the same filters."""
        params: list[tuple[str, str]] = [("limit", str(self.limit))]
        if self.priorities != EVENT_PRIORITIES:
            params.append(("priority", ",".join(p.label for p in self.priorities)))
        if self.kinds:
            params.append(("kind", ",".join(self.kinds)))
        if self.sources:
            params.append(("source", ",".join(self.sources)))
        if self.since is not None:
            params.append(("since", self.since))
        params.append(("before", str(before)))
        return f"/api/events?{urlencode(params)}"


def _event(record: StoredRecord, known: dict[str, tuple[int, str, str]]) -> dict[str, Any]:
    refs = []
    for sha in record.payloads:
        size, media_type, state = known.get(sha, (0, "", "gone"))
        served = state == "present" and media_type in SERVED_TYPES
        refs.append(
            {
                "sha256": sha,
                "size": size,
                "media_type": media_type or None,
                "state": state,
                "url": f"/payloads/{sha}" if served else None,
            }
        )
    return {
        "seq": record.seq,
        "ts": record.ts,
        "source": record.source,
        "kind": record.kind,
        "priority": record.priority.label,
        "model": record.model,
        "body": record.body,
        "payloads": refs,
    }


def find_events(reader: JournalReader, query: EventQuery) -> dict[str, Any]:
    """`GET /api/events`' answer: `events` (newest first), and `next_before` and `next` (the
    path of the following page) or None for both at the end."""
    records, next_before = reader.events_page(
        query.priorities,
        limit=query.limit,
        before=query.before,
        kinds=query.kinds,
        sources=query.sources,
        since=query.since,
    )
    known = reader.payload_info(sorted({sha for r in records for sha in r.payloads}))
    return {
        "events": [_event(record, known) for record in records],
        "next_before": next_before,
        "next": None if next_before is None else query.next_page(next_before),
    }


def recent_events(reader: JournalReader, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` alert and event records, newest first (what the page lists)."""
    events: list[dict[str, Any]] = find_events(reader, EventQuery(limit=limit))["events"]
    return events


def newest_event_seq(reader: JournalReader) -> int:
    """The seq of the newest alert or event record (0: none yet)."""
    newest = reader.recent(EVENT_PRIORITIES, 1)
    return newest[0].seq if newest else 0


__all__ = [
    "EVENTS_DEFAULT",
    "EVENTS_MAX",
    "EVENT_PRIORITIES",
    "SERVED_IMAGE_TYPES",
    "SERVED_TYPES",
    "SERVED_VIDEO_TYPES",
    "BadQuery",
    "EventQuery",
    "find_events",
    "newest_event_seq",
    "recent_events",
]
