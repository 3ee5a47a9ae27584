"""What a destination is to the engine: the Destination protocol, batches and their encoding, the
error tree (retryable or permanent), the bandwidth limiter, and an in-memory fake for tests."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from sync.errors import SyncError
from sync.records import Priority, StoredRecord


class DestinationError(SyncError):
    """A destination refused or failed. `retryable` False means retrying cannot help (bad
    token, refused payload): the engine reports it and stops trying that item."""

    def __init__(self, destination: str, message: str, *, retryable: bool) -> None:
        self.destination = destination
        self.retryable = retryable
        super().__init__(f"destination {destination!r}: {message}")


@dataclass(frozen=True)
class Batch:
    """Records of one priority with a stable identity: a resend is recognised upstream."""

    appliance_id: str
    priority: Priority
    first_seq: int
    last_seq: int
    records: int
    body: bytes  # gzip-compressed NDJSON
    raw_bytes: int
    payloads: tuple[str, ...]
    # The journal the records belong to (sync/identity.py); None for records journalled before
    # journals had identities, which ship exactly as they did then.
    journal_id: str | None = None
    # The id whose history this journal continues (sync/identity.py `follows`), if any.
    follows: str | None = None

    @property
    def batch_id(self) -> str:
        return f"{self.priority.label}-{self.first_seq}-{self.last_seq}"


def encode_batch(
    appliance_id: str,
    priority: Priority,
    records: Sequence[StoredRecord],
    journal_id: str | None = None,
) -> Batch:
    """NDJSON in the shape `appliance export` writes, gzip level 6 (see docs/sync-protocol.md).
    The journal is the batch's (`Journal-Id`, the object key), not repeated in every line: 47
    bytes a record cost an eighth more raw bytes to encode and compress."""
    lines = []
    payloads: list[str] = []
    for record in records:
        lines.append(record.to_json_line())
        payloads.extend(record.payloads)
    raw = ("\n".join(lines) + "\n").encode()
    return Batch(
        appliance_id=appliance_id,
        priority=priority,
        first_seq=records[0].seq,
        last_seq=records[-1].seq,
        records=len(records),
        body=gzip.compress(raw, compresslevel=6, mtime=0),
        raw_bytes=len(raw),
        payloads=tuple(dict.fromkeys(payloads)),
        journal_id=journal_id,
    )


def conflicting_seqs(stored_body: bytes, batch: Batch) -> list[int] | None:
    """For destinations that name batches by their bounds: compare what is already stored under
    a batch's name with the batch. [] when it holds the same records (a resend after a crash:
    nothing to write); the seqs that differ, or that it lacks, when it holds other records (a
    journal restored from an old backup or copied onto a second box reuses seqs: never
    overwrite); None when the stored copy cannot be read (a torn write: write it again)."""
    try:
        stored = {
            int(record["seq"]): record
            for record in map(json.loads, gzip.decompress(stored_body).splitlines())
        }
        ours = [json.loads(line) for line in gzip.decompress(batch.body).splitlines()]
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        return None
    return [int(record["seq"]) for record in ours if stored.get(int(record["seq"])) != record]


def conflict_error(destination: str, batch: Batch, where: str, seqs: list[int]) -> DestinationError:
    """The permanent refusal of a batch that would overwrite other records (see above)."""
    named = ", ".join(str(seq) for seq in seqs[:20]) + (" ..." if len(seqs) > 20 else "")
    journal = f"journal {batch.journal_id}" if batch.journal_id else "the legacy journal"
    return DestinationError(
        destination,
        f"batch {batch.batch_id} conflicts: {where} already holds other records under seqs "
        f"{named} of {journal} ({len(seqs)} in all); nothing was overwritten. A journal restored "
        "from an old backup or copied onto a second box reuses seqs it already shipped: see "
        "docs/operations.md, 'Journal conflicts'",
        retryable=False,
    )


@dataclass(frozen=True)
class JournalCollision:
    """Upstream holds another live journal under this appliance's id: two boxes were given one
    id (docs/sync-protocol.md, "Journals"). Both journals' records are kept; this is the warning
    a destination hands the engine, which alerts and degrades health until it clears."""

    journals: tuple[str, ...]  # the live journals under the id, this one included
    detail: str


class RateLimiter:
    """Token bucket in bytes per second (None: unlimited). A burst is at most one second."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._tokens = rate or 0.0
        self._last = time.monotonic()

    async def consume(self, amount: int) -> None:
        if not self.rate:
            return
        while True:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= min(amount, self.rate):
                self._tokens -= amount  # may go negative: a big item is paid for afterwards
                return
            await asyncio.sleep((min(amount, self.rate) - self._tokens) / self.rate)


class Destination(Protocol):
    """One upstream. Entered once by the engine; every method may raise DestinationError."""

    name: str
    dedups_records: bool
    """True when the destination recognises records it already holds by their sequence numbers
    (the receiver). False when it names what it stores by the batch's bounds (directory, S3): a
    batch that may have landed unacknowledged must then be resent with exactly the same bounds,
    even after a crash, or the records would be stored twice; the engine journals the bounds
    before each send for it."""

    @property
    def collision(self) -> JournalCollision | None:
        """Set by the destination when it learns that another journal is live under this
        appliance's id (the receiver says so in its answers; directory and S3 destinations see
        the other journal's marker); None once that has cleared."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def reachable(self) -> bool:
        """A cheap connectivity probe: False while the link is down; raises a permanent
        DestinationError when the destination answers but can never work as configured."""
        ...

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        """Deliver a batch; returning means the destination acknowledged it durably."""
        ...

    async def send_payload(
        self,
        sha256: str,
        size: int,
        media_type: str,
        path: Path,
        limiter: RateLimiter,
        journal_id: str | None = None,
    ) -> int:
        """Deliver a payload, resuming what the destination already holds; return bytes sent.
        `journal_id` is that of the record that refers to it (None: a legacy record)."""
        ...


@dataclass
class MemoryDestination:
    """In-memory fake used beside the real destinations in engine tests: can fail on demand."""

    name: str = "memory"
    dedups_records: bool = False
    batches: dict[str, Batch] = field(default_factory=dict)
    records: dict[int, dict[str, object]] = field(default_factory=dict)
    payloads: dict[str, bytes] = field(default_factory=dict)
    arrivals: list[tuple[str, str]] = field(default_factory=list)  # ("batch"|"payload", id)
    fail_next: int = 0
    up: bool = True
    collision: JournalCollision | None = None
    probes: int = 0  # reachability probes answered, for tests that wait on them

    async def __aenter__(self) -> MemoryDestination:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def reachable(self) -> bool:
        self.probes += 1
        return self.up

    def _maybe_fail(self) -> None:
        if not self.up:
            raise DestinationError(self.name, "link down", retryable=True)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise DestinationError(self.name, "injected failure", retryable=True)

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        self._maybe_fail()
        await limiter.consume(len(batch.body))
        self.batches[batch.batch_id] = batch
        for line in gzip.decompress(batch.body).splitlines():
            record = json.loads(line)
            self.records[int(record["seq"])] = record
        self.arrivals.append(("batch", batch.batch_id))

    async def send_payload(
        self,
        sha256: str,
        size: int,
        media_type: str,
        path: Path,
        limiter: RateLimiter,
        journal_id: str | None = None,
    ) -> int:
        self._maybe_fail()
        if sha256 in self.payloads:
            return 0
        data = await asyncio.to_thread(path.read_bytes)
        await limiter.consume(len(data))
        self.payloads[sha256] = data
        self.arrivals.append(("payload", sha256))
        return len(data)
