"""Owns what every receiver store does, whatever holds the rows (receiver.db on SQLite, or
PostgreSQL for a fleet): the `RecordStore` protocol the handlers call, the results they get, the
rule that tells two boxes under one appliance id from a replaced disk, and the 409 a conflicting
batch gets. Docs: docs/sync-protocol.md ("Journals"), docs/fleet.md."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from receiver.batches import IncomingBatch
from receiver.protocol import Refusal

# LEGACY_JOURNAL: the journal of records shipped without a Journal-Id: by appliances of a version
# before journal identities, and by upgraded ones for what they journalled before the upgrade.
from sync.identity import LEGACY_JOURNAL

# Two journals of one appliance id both shipping within this long of each other are two boxes
# sharing an id, not a replaced disk; the flag clears once all but one have been quiet this long.
DEFAULT_CONCURRENT_QUIET_S = 86400.0
# Most conflicting seqs named in a 409 (the count is always given).
CONFLICTS_NAMED = 20


@dataclass(frozen=True, slots=True)
class BatchResult:
    stored: int
    duplicates: int
    # The journals of this appliance id that are live at once (two boxes, one id), if any.
    concurrent_journals: list[str]
    concurrency_changed: bool


@dataclass(frozen=True, slots=True)
class JournalSpan:
    journal_id: str
    first_seen_s: float
    last_seen_s: float
    follows: str | None = None


def concurrent_journals(spans: Sequence[JournalSpan], now_s: float, quiet_s: float) -> list[str]:
    """The journals of one appliance id that shipped interleaved with another within `quiet_s`.

    A replaced disk is a new journal that starts after the old one stopped: their spans (first
    to last batch) do not overlap, so they are epochs, not a collision. Two boxes under one id
    keep shipping, so their spans overlap. A journal and the one it follows (an upgraded journal
    and `legacy`, a fork and its origin) are one box's history, which ships both in one drain."""
    live = [span for span in spans if span.last_seen_s >= now_s - quiet_s]
    flagged: set[str] = set()
    for index, one in enumerate(live):
        for other in live[index + 1 :]:
            lineage = one.follows == other.journal_id or other.follows == one.journal_id
            overlap = (
                one.last_seen_s >= other.first_seen_s and other.last_seen_s >= one.first_seen_s
            )
            if overlap and not lineage:
                flagged.update((one.journal_id, other.journal_id))
    return sorted(flagged)


def format_ts(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def now_ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def conflict_refusal(batch: IncomingBatch, seqs: list[int]) -> Refusal:
    named = ", ".join(str(seq) for seq in seqs[:CONFLICTS_NAMED])
    more = f" and {len(seqs) - CONFLICTS_NAMED} more" if len(seqs) > CONFLICTS_NAMED else ""
    journal = (
        "the legacy journal (records shipped without a journal id)"
        if batch.journal_id == LEGACY_JOURNAL
        else f"journal {batch.journal_id}"
    )
    return Refusal(
        409,
        "conflicting records",
        f"batch {batch.batch_id} of appliance {batch.appliance_id}: seqs {named}{more} of "
        f"{journal} are already stored with other content ({len(seqs)} in all); nothing of "
        "this batch was stored. A journal restored from an old backup, or one tampered with, "
        "reuses seqs it already shipped: see docs/operations.md, 'Journal conflicts'",
        extra={"conflicting_seqs": seqs[:CONFLICTS_NAMED], "conflicts": len(seqs)},
    )


def same_record(stored_line: str, line: str) -> bool:
    if stored_line == line:
        return True
    try:
        return bool(json.loads(stored_line) == json.loads(line))
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class PublishedPackage:
    name: str
    version: str
    sha256: str
    size: int
    appliances: tuple[str, ...]
    groups: tuple[str, ...]
    published_at: str

    def addressed_to(self, appliance_id: str, group: str | None) -> bool:
        if not self.appliances and not self.groups:
            return True
        return appliance_id in self.appliances or (group is not None and group in self.groups)

    def listing(self) -> dict[str, Any]:
        """What an appliance sees."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "published_at": self.published_at,
        }

    def as_dict(self) -> dict[str, Any]:
        """What the publisher sees: the listing and the targets."""
        doc = asdict(self)
        doc["appliances"], doc["groups"] = list(self.appliances), list(self.groups)
        return doc


TokenRole = Literal["appliance", "admin"]


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """A bearer token kept in the store: its sha256 only, never the token itself."""

    token_id: str  # the first 12 hex digits of the digest: names the token in lists and revokes
    digest: bytes
    role: TokenRole
    appliance_id: str | None  # the appliance an appliance token belongs to; None for admin
    label: str
    created_at: str
    revoked_at: str | None = None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token_entry(
    token: str, role: TokenRole, appliance_id: str | None, label: str = ""
) -> TokenEntry:
    digest = token_digest(token)
    return TokenEntry(digest.hex()[:12], digest, role, appliance_id, label, now_ts())


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records a consumer reads (`GET /v1/records`): all of them, or one appliance's, or
    some kinds or priorities (each a set: a record matches any of its values)."""

    appliance_id: str | None = None
    kinds: tuple[str, ...] = ()
    priorities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredRecord:
    appliance_id: str
    journal_id: str
    seq: int
    received_at: str
    line: str  # the record as the appliance shipped it


@dataclass(frozen=True, slots=True)
class RecordPage:
    """One page of records in commit order, and the cursor to ask for the next one."""

    records: list[StoredRecord]
    cursor: str
    more: bool


def bad_cursor(cursor: str) -> Refusal:
    return Refusal(
        400,
        "bad cursor",
        f"after={cursor[:80]!r} is not a cursor this receiver gave: send the `next` of the "
        "previous page, or no `after` to start from the oldest record",
    )


# ------------------------------------------------------------------------ the fleet view's rows

HEALTH_FIELDS = ("state", "reasons", "version", "mode", "started", "models", "cameras", "backlog")
"""What the fleet view reads of the body of an appliance's newest `health` record (the
appliance's `HealthSnapshot`, appliance/status/schema.py): both stores select only these."""

ALERT_WINDOW_S = 86400.0
"""Alerts are counted over this long, by the records' own time."""


@dataclass(frozen=True, slots=True)
class FleetRow:
    """One appliance as the fleet view sees it, all from the store, so every replica agrees:
    its totals, what arrived today (the store's UTC day, by arrival), its alerts of the last
    `ALERT_WINDOW_S` (by record time) and its newest `health` record (`HEALTH_FIELDS` of its
    body, as the appliance sent them: the fleet view checks their shapes)."""

    appliance_id: str
    first_seen: str
    last_seen: str
    records: int
    payloads: int
    payload_bytes: int
    records_today: int
    payloads_today: int
    payload_bytes_today: int
    alerts_24h: int
    health_ts: str | None
    health: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class FleetFigures:
    """Every appliance (or the one asked for), at the store's time `now_s`."""

    now_s: float
    rows: list[FleetRow]


@dataclass(frozen=True, slots=True)
class ShoreRecord:
    """A stored record for the fleet view: where it is kept and its line as shipped."""

    journal_id: str
    seq: int
    received_at: str
    line: str


@dataclass(frozen=True, slots=True)
class RecentRecords:
    """One appliance's newest alerts and newest records with payloads (snapshots, clips,
    sampled windows), newest first by record time, and the size of each of their payloads
    the receiver holds whole (one it lacks is not there: not uploaded yet, or lost)."""

    alerts: list[ShoreRecord]
    media: list[ShoreRecord]
    payloads: dict[str, int]


def payload_refs(line: str) -> list[str]:
    """The sha256s a record line refers to (none when `payloads` is missing or not a list)."""
    try:
        value = json.loads(line)
    except ValueError:
        return []
    refs = value.get("payloads") if isinstance(value, dict) else None
    return [r for r in refs if isinstance(r, str)] if isinstance(refs, list) else []


class RecordStore(Protocol):
    """What the receiver's handlers need of a store. Every method is durable when it returns
    (committed, fsync'd by the database) and safe to call from several replicas at once."""

    async def store_batch(self, batch: IncomingBatch) -> BatchResult:
        """Store new records, count the rest as duplicates. Raises `Refusal` (409) when a record
        conflicts with one already stored: nothing of the batch is stored then."""
        ...

    async def record_payload(
        self, appliance_id: str, sha256: str, size: int, journal_id: str | None
    ) -> None:
        """Count a verified, stored payload once (a second call for it changes nothing)."""
        ...

    async def summary(self, appliance_id: str) -> dict[str, Any]:
        """What `GET /v1/appliances/ID/summary` answers."""
        ...

    async def packages(self) -> list[PublishedPackage]:
        """Every published model package, oldest first."""
        ...

    async def package_by_sha256(self, sha256: str) -> PublishedPackage | None: ...

    async def package_by_version(self, name: str, version: str) -> PublishedPackage | None: ...

    async def save_package(self, package: PublishedPackage) -> PublishedPackage:
        """Insert the row, or give an existing one (same name, version and bytes) the new
        targets; what is stored now."""
        ...

    async def tokens(self) -> list[TokenEntry]:
        """Every token ever added, revoked ones included, oldest first."""
        ...

    async def add_token(self, entry: TokenEntry) -> None:
        """Keep a new token (its digest); ValueError when that digest is already kept."""
        ...

    async def revoke_tokens(
        self, *, appliance_id: str | None = None, token_id: str | None = None
    ) -> int:
        """Revoke the appliance's tokens, or one token by id; how many were still active."""
        ...

    async def records_after(
        self, cursor: str | None, wanted: RecordFilter, limit: int
    ) -> RecordPage:
        """Up to `limit` records committed after `cursor` (None: from the oldest), in commit
        order, that match `wanted`. A record whose transaction is still open when the page is
        read is never passed over: the cursor stops before it until it commits, so a consumer
        that follows `cursor` sees every record once, whichever replica stored it. Raises
        `Refusal` (400) for a cursor this store did not give."""
        ...

    async def ping(self) -> None:
        """Raise when the store cannot answer now (for `/healthz`)."""
        ...

    async def close(self) -> None: ...

    async def fleet(self, appliance_id: str | None = None) -> FleetFigures:
        """Every appliance the store knows (or only `appliance_id`: no rows when unknown), by
        id, with the figures of `FleetRow` at the store's time."""
        ...

    async def recent_records(self, appliance_id: str, limit: int) -> RecentRecords:
        """An appliance's `limit` newest alerts and `limit` newest records with payloads."""
        ...

    async def payload_size(self, appliance_id: str, sha256: str) -> int | None:
        """Bytes of a payload of this appliance the receiver holds whole; None when it does
        not (unknown, in progress, or another appliance's)."""
        ...
