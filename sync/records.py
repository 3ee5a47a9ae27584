"""The record: what every result becomes in the journal (fields and priorities of DESIGN.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any

from config.units import parse_duration


class Priority(IntEnum):
    """Shipped in ascending order, evicted in descending order."""

    ALERT = 1
    EVENT = 2
    SAMPLE = 3
    TELEMETRY = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Priority:
        try:
            return cls[label.upper()]
        except KeyError:
            names = ", ".join(p.label for p in cls)
            raise ValueError(f"unknown priority {label!r}; expected one of {names}") from None


# Fixed bytes a record costs beyond its body (columns, row header, index entry); used to
# estimate sizes for the budget, calibrated against the real file by retention.
RECORD_OVERHEAD_BYTES = 96


def format_ts(moment: datetime) -> str:
    """UTC ISO-8601 with microseconds and a Z: sorts as text, which `--since` relies on."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PayloadRef:
    """A content-addressed payload file a record refers to."""

    sha256: str
    size: int
    media_type: str = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A record to append. The journal stamps seq, appliance_id and boot_id."""

    source: str
    kind: str
    priority: Priority
    body: Mapping[str, Any]
    model: str | None = None
    payloads: tuple[PayloadRef, ...] = ()
    ts: datetime | None = None
    mono_ns: int | None = None


_encode_line = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as the journal holds it; `body_json` stays encoded so batches ship without re-encoding."""

    seq: int
    appliance_id: str
    boot_id: str
    ts: str
    mono_ns: int
    source: str
    kind: str
    priority: Priority
    model: str | None
    body_json: str
    payloads: tuple[str, ...] = field(default=())

    @property
    def body(self) -> Any:
        return json.loads(self.body_json)

    def to_json_line(self, journal_id: str | None = None) -> str:
        """`json.dumps(self.to_dict(journal_id))` (compact, UTF-8 as is) without decoding the
        body: the stored body is already compact JSON, so it is spliced in as it is (a third of
        the cost of a telemetry record on the way out was that decode and re-encode).

        `journal_id` is the journal's identity (sync/identity.py); None leaves the field out, as
        records journalled before journals had identities were shipped."""
        head = _encode_line(
            {
                "seq": self.seq,
                "appliance_id": self.appliance_id,
                **({} if journal_id is None else {"journal_id": journal_id}),
                "boot_id": self.boot_id,
                "ts": self.ts,
                "mono_ns": self.mono_ns,
                "source": self.source,
                "kind": self.kind,
                "priority": self.priority.label,
                "model": self.model,
            }
        )
        return (
            f'{head[:-1]},"body":{self.body_json},"payloads":{_encode_line(list(self.payloads))}}}'
        )

    def to_dict(self, journal_id: str | None = None) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "appliance_id": self.appliance_id,
            **({} if journal_id is None else {"journal_id": journal_id}),
            "boot_id": self.boot_id,
            "ts": self.ts,
            "mono_ns": self.mono_ns,
            "source": self.source,
            "kind": self.kind,
            "priority": self.priority.label,
            "model": self.model,
            "body": self.body,
            "payloads": list(self.payloads),
        }


def parse_since(text: str, option: str = "--since") -> str:
    """`--since` (or `option`): an ISO-8601 time or date (UTC if no zone), or an age such as
    `30m` or `2d`."""
    try:
        return format_ts(datetime.now(UTC) - timedelta(seconds=parse_duration(text)))
    except ValueError:
        pass
    try:
        return format_ts(parse_ts(text))
    except ValueError:
        raise ValueError(
            f"{option} {text!r}: expected an ISO-8601 time such as 2026-11-01T00:00:00Z or an age such as 2h"
        ) from None
