"""Owns the consumers' read API, `GET /v1/records`: every record the shore holds, in the order
it was committed, a page at a time behind a cursor that neither skips nor repeats a record,
whichever replica stored it (docs/fleet.md, "Reading what arrived")."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from config.names import NAME_PATTERN
from receiver.backend import RecordFilter, RecordStore
from receiver.protocol import Refusal, valid_appliance_id
from sync.records import Priority

DEFAULT_PAGE = 500
MAX_PAGE = 5000
# Kinds are the appliance's own names (`reading`, `zone_entry`, ...); anything else matches nothing.
_KIND_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MAX_VALUES = 32
PRIORITIES = tuple(priority.label for priority in Priority)


class StoreHolder(Protocol):
    """What the read routes need of the receiver (receiver/app.py `_Receiver`)."""

    @property
    def store(self) -> RecordStore: ...


def _values(request: web.Request, name: str) -> tuple[str, ...]:
    """A repeatable query parameter, each value also split at commas: `kind=a,b&kind=c`."""
    values = [part.strip() for given in request.query.getall(name, []) for part in given.split(",")]
    values = [value for value in values if value]
    if len(values) > _MAX_VALUES:
        raise Refusal(400, f"too many {name} values", f"give at most {_MAX_VALUES} {name} values")
    return tuple(dict.fromkeys(values))


def record_filter(request: web.Request) -> RecordFilter:
    """The query's filters, checked (400 naming the bad one)."""
    appliance_id = request.query.get("appliance")
    if appliance_id is not None and not valid_appliance_id(appliance_id):
        raise Refusal(400, "bad appliance id", f"appliance must match {NAME_PATTERN}")
    kinds = _values(request, "kind")
    for kind in kinds:
        if not _KIND_RE.fullmatch(kind):
            raise Refusal(400, "bad kind", f"kind {kind[:80]!r} is not a record kind")
    priorities = _values(request, "priority")
    for priority in priorities:
        if priority not in PRIORITIES:
            raise Refusal(
                400,
                "bad priority",
                f"priority {priority[:80]!r} is not one of {', '.join(PRIORITIES)}",
            )
    return RecordFilter(appliance_id, kinds, priorities)


def page_size(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None:
        return DEFAULT_PAGE
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise Refusal(400, "bad limit", f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(text)


class RecordReads:
    """The read route of one receiver app; only admin tokens read the whole fleet."""

    def __init__(
        self, receiver: StoreHolder, authorize_admin: Callable[[web.Request, str], None]
    ) -> None:
        self.receiver = receiver
        self.authorize_admin = authorize_admin

    async def records(self, request: web.Request) -> web.Response:
        """GET /v1/records?after=CURSOR&appliance=ID&kind=K&priority=P&limit=N."""
        self.authorize_admin(request, "reading records")
        wanted = record_filter(request)
        limit = page_size(request)
        after = request.query.get("after") or None
        page = await self.receiver.store.records_after(after, wanted, limit)
        records: list[dict[str, Any]] = [
            {
                "appliance_id": stored.appliance_id,
                "journal_id": stored.journal_id,
                "seq": stored.seq,
                "received_at": stored.received_at,
                "record": json.loads(stored.line),
            }
            for stored in page.records
        ]
        return web.json_response({"records": records, "next": page.cursor, "more": page.more})


def add_read_routes(
    app: web.Application,
    receiver: StoreHolder,
    authorize_admin: Callable[[web.Request, str], None],
) -> RecordReads:
    """Register `GET /v1/records` (docs/fleet.md, "Reading what arrived") on `app`."""
    reads = RecordReads(receiver, authorize_admin)
    app.router.add_get("/v1/records", reads.records, allow_head=False)
    return reads
