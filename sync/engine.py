"""The sync engine: ships the journal's backlog to one destination in priority order (records,
then their payloads, alert first), moves cursors only on acknowledgement, and owns the outer
retry loop (jittered, capped backoff; rate-limited error logs), bandwidth cap, daily payload
budget and time windows."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from config.shipping import DirectoryDestination, HttpDestination, S3Destination, SyncSection
from config.units import in_windows
from sync.destination import (
    Batch,
    Destination,
    DestinationError,
    JournalCollision,
    RateLimiter,
    encode_batch,
)
from sync.errors import SyncError
from sync.journal import Journal
from sync.payloads import PayloadStore
from sync.reader import JournalReader
from sync.records import NewRecord, Priority, format_ts

log = logging.getLogger(__name__)

DestinationConfig = HttpDestination | DirectoryDestination | S3Destination
_OUTBOX_PAGE = 64
_ERROR_LOG_INTERVAL_S = 60.0
# Records the engine journals about its destinations (alert priority: an operator must act).
REFUSED_KIND = "sync_refused"
COLLISION_KIND = "journal_collision"


@dataclass
class DestinationState:
    """What status shows per destination."""

    name: str
    reachable: bool | None = None
    draining: bool = False
    last_success: str | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    records_sent: int = 0
    batches_sent: int = 0
    bytes_sent: int = 0
    payloads_sent: int = 0
    payload_bytes_delivered: int = 0  # their sizes, also of those the destination had already
    payloads_skipped: int = 0
    payload_bytes_today: int = 0
    day: str = ""
    rate_bytes_per_s: float = 0.0
    # A permanent refusal (a 409 conflict, a bad token, ...): the cursor stays where it is and
    # health is degraded until a drain succeeds. Retried every sync.retry_max.
    refused: str | None = None
    refused_since: str | None = None
    # Another journal live under this appliance id upstream (two boxes, one id), while it lasts.
    collision: JournalCollision | None = None


@dataclass(frozen=True)
class Progress:
    """One step of a drain, for progress bars: totals so far."""

    destination: str
    records: int
    bytes: int
    payloads: int
    payload_bytes: int = 0  # sizes of the payloads delivered (a resumed one sends fewer bytes)


def inflight_key(destination: str, priority: Priority) -> str:
    """The journal `meta` key holding the bounds of the batch last sent to a destination that
    needs them after a crash (`Destination.dedups_records` False). A stale value is harmless: it
    is used only while it starts beyond the acknowledged cursor."""
    return f"sync_inflight:{destination}:{priority.label}"


def parse_bounds(text: str | None) -> tuple[int, int] | None:
    """`FIRST-LAST` as written under inflight_key; None for nothing or anything else."""
    first, sep, last = (text or "").partition("-")
    if not sep or not first.isdigit() or not last.isdigit() or int(first) > int(last):
        return None
    return int(first), int(last)


class SyncEngine:
    """Drains one destination. `drain()` for a one-off (sync --now), `run()` for the daemon."""

    def __init__(
        self,
        journal: Journal,
        payloads: PayloadStore,
        destination: Destination,
        cfg: DestinationConfig,
        settings: SyncSection,
    ) -> None:
        self.journal = journal
        self.payloads = payloads
        self.destination = destination
        self.cfg = cfg
        self.settings = settings
        self.limiter = RateLimiter(cfg.bandwidth)
        self.state = DestinationState(cfg.name)
        self.wake = asyncio.Event()
        # True when a scheduler sets `wake` every sync.interval (the daemon's APScheduler job);
        # then run() waits for it after a drain instead of timing the interval itself.
        self.scheduled = False
        # Two drains never ship the same batch at once: the daemon's loop and `sync --now`
        # (which asks the daemon) take turns on this lock.
        self._lock = asyncio.Lock()
        # Per priority, the bounds (first, last seq) of a batch sent but not acknowledged yet,
        # and the bounds last journalled for a destination that needs them after a crash.
        self._unacknowledged: dict[Priority, tuple[int, int]] = {}
        self._journalled_bounds: dict[Priority, tuple[int, int]] = {}
        self._last_error_log = 0.0
        self._suppressed_errors = 0
        self._alerted_refusal: str | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    # ---------------------------------------------------------------------------- draining

    async def drain(self, progress: Callable[[Progress], None] | None = None) -> bool:
        """Ship everything there is now. True when the backlog is empty; False when stopped
        early by the daily payload budget (records are all shipped then)."""
        async with self._lock:
            self.state.draining = True
            try:
                await self.journal.register_destination(self.name)
                complete = True
                for priority in Priority:
                    await self._drain_records(priority, progress)
                    complete = await self._drain_payloads(priority, progress) and complete
                self.state.last_success = format_ts(datetime.now(UTC))
                self.state.consecutive_failures = 0
                self.state.reachable = True
                self.state.refused = self.state.refused_since = None
                self._alerted_refusal = None
                return complete
            except DestinationError as exc:
                if not exc.retryable:
                    await self._note_refusal(exc)
                raise
            finally:
                self.state.draining = False
                await self._note_collision()

    async def _note_refusal(self, exc: DestinationError) -> None:
        """A permanent refusal is never quiet: kept in the state (health is degraded by it) and
        journalled as an alert, once per distinct refusal."""
        message = str(exc)
        if self.state.refused is None:
            self.state.refused_since = format_ts(datetime.now(UTC))
        self.state.refused = message
        if message == self._alerted_refusal:
            return
        self._alerted_refusal = message
        log.error(
            "destination refused the backlog",
            extra={"fields": {"destination": self.name, "error": message}},
        )
        await self._journal_alert(
            REFUSED_KIND, {"destination": self.name, "error": message, "cursor_held": True}
        )

    async def _note_collision(self) -> None:
        """Raise (and clear) the alarm when the destination reports another journal live under
        this appliance id."""
        seen = self.destination.collision
        before = self.state.collision
        if seen == before:
            return
        self.state.collision = seen
        if seen is None:
            log.info("journal collision cleared", extra={"fields": {"destination": self.name}})
            await self._journal_alert(
                COLLISION_KIND,
                {
                    "destination": self.name,
                    "event": "cleared",
                    "journal_id": self.journal.journal_id,
                },
                priority=Priority.EVENT,
            )
            return
        if before is not None and set(before.journals) == set(seen.journals):
            return
        log.error(
            "another journal is shipping under this appliance id",
            extra={"fields": {"destination": self.name, "journals": list(seen.journals)}},
        )
        await self._journal_alert(
            COLLISION_KIND,
            {
                "destination": self.name,
                "event": "detected",
                "journal_id": self.journal.journal_id,
                "journals": list(seen.journals),
                "detail": seen.detail,
            },
        )

    async def _journal_alert(
        self, kind: str, body: dict[str, object], priority: Priority = Priority.ALERT
    ) -> None:
        try:
            await self.journal.append(
                NewRecord(source=f"sync:{self.name}", kind=kind, priority=priority, body=body)
            )
        except SyncError as exc:  # a closed or full journal: the state and the log still say it
            log.warning(
                "could not journal a sync alert",
                extra={"fields": {"destination": self.name, "kind": kind, "error": str(exc)}},
            )

    def _report(self, progress: Callable[[Progress], None] | None) -> None:
        if progress is not None:
            s = self.state
            progress(
                Progress(
                    self.name,
                    s.records_sent,
                    s.bytes_sent,
                    s.payloads_sent,
                    s.payload_bytes_delivered,
                )
            )

    def _account(self, sent: int, started: float) -> None:
        self.state.bytes_sent += sent
        elapsed = max(time.monotonic() - started, 1e-6)
        current = sent / elapsed
        rate = self.state.rate_bytes_per_s
        self.state.rate_bytes_per_s = current if rate == 0 else 0.8 * rate + 0.2 * current

    async def _drain_records(
        self, priority: Priority, progress: Callable[[Progress], None] | None
    ) -> None:
        """Three things overlap here, each of which would otherwise wait for the others: reading
        and encoding the next batch (CPU here), sending this one (the link and the receiver), and
        committing the previous one's acknowledgement (an fsync of the journal). Batches are still
        sent one at a time and in order, and acknowledgements commit in order; the cursor moves
        only with an acknowledgement.

        A batch interrupted after it may have reached the destination (an error, a cut, the stop)
        is sent again with the same bounds, so the destination recognises it by its identity, even
        if more records have arrived since (`_unacknowledged`). For a destination that does not
        recognise records by sequence number (`dedups_records` False) the bounds are journalled
        before the send, so that holds after a crash too."""
        key = inflight_key(self.name, priority)
        after, journalled = await self.journal.read(
            lambda r: (r.cursor(self.name, priority), r.meta(key))
        )
        bounds = parse_bounds(journalled)
        if priority not in self._unacknowledged and bounds is not None and bounds[0] > after:
            self._unacknowledged[priority] = self._journalled_bounds[priority] = bounds
        batch = await self._next_batch(priority, after)
        committing: asyncio.Task[None] | None = None
        try:
            while batch is not None:
                upcoming = asyncio.ensure_future(self._next_batch(priority, batch.last_seq))
                try:
                    started = time.monotonic()
                    bounds = (batch.first_seq, batch.last_seq)
                    if (
                        not self.destination.dedups_records
                        and self._journalled_bounds.get(priority) != bounds
                    ):
                        await self.journal.set_meta({key: f"{bounds[0]}-{bounds[1]}"})
                        self._journalled_bounds[priority] = bounds
                    self._unacknowledged[priority] = bounds
                    await self.destination.send_batch(batch, self.limiter)
                    # Chained at once, with no await between the send and it: a stop that comes
                    # while the previous commit runs still records this acknowledgement.
                    previous = committing
                    committing = asyncio.ensure_future(
                        self._commit(batch, started, progress, after=previous)
                    )
                    if previous is not None:
                        await asyncio.shield(previous)  # in order; its error surfaces here
                except BaseException:
                    upcoming.cancel()
                    # Only the abandoned read's own outcome is dropped; the error that got us
                    # here is re-raised below.
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await upcoming
                    raise
                batch = await upcoming
        finally:
            if committing is not None and not committing.done():
                # A batch the destination acknowledged is recorded even when we stop now.
                await asyncio.shield(committing)
        if committing is not None:
            await committing

    async def _next_batch(self, priority: Priority, after: int) -> Batch | None:
        records = await self.journal.read(
            functools.partial(
                JournalReader.records_after,
                priority=priority,
                after_seq=after,
                limit=self.settings.batch_records,
                max_bytes=self.settings.batch_bytes,
            )
        )
        interrupted = self._unacknowledged.get(priority)
        if interrupted is not None and records and records[0].seq == interrupted[0]:
            records = [r for r in records if r.seq <= interrupted[1]]
        if not records:
            return None
        identity = self.journal.identity
        journal_id = identity.shipped_as(records[0].seq)
        end = identity.epoch_end(records[0].seq)
        if end is not None:
            # Records of an earlier identity (journalled before identities, or before a fork)
            # ship in batches of their own, under the id they always had.
            records = [r for r in records if r.seq <= end]
        batch = await asyncio.to_thread(
            encode_batch, self.journal.appliance_id, priority, records, journal_id
        )
        return dataclasses.replace(batch, follows=identity.follows(journal_id))

    async def _commit(
        self,
        batch: Batch,
        started: float,
        progress: Callable[[Progress], None] | None,
        *,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        if after is not None:
            await after
        await self.journal.acknowledge(
            self.name,
            batch.priority,
            batch.first_seq,
            batch.last_seq,
            batch.batch_id,
            batch.payloads,
        )
        if self._unacknowledged.get(batch.priority) == (batch.first_seq, batch.last_seq):
            del self._unacknowledged[batch.priority]
        self.state.records_sent += batch.records
        self.state.batches_sent += 1
        self._account(len(batch.body), started)
        self._report(progress)

    def _budget_left(self) -> int | None:
        budget = self.cfg.daily_payload_budget
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        if self.state.day != today:
            self.state.day, self.state.payload_bytes_today = today, 0
        return None if budget is None else budget - self.state.payload_bytes_today

    async def _drain_payloads(
        self, priority: Priority, progress: Callable[[Progress], None] | None
    ) -> bool:
        while True:
            items = await self.journal.read(
                lambda r: r.payload_outbox(self.name, priority, _OUTBOX_PAGE)
            )
            if not items:
                return True
            for sha256, size, media_type, state, seq in items:
                path = self.payloads.path_for(sha256)
                if state != "present" or not path.exists():
                    # Evicted or lost on this side: nothing to send, say so and move on.
                    self.state.payloads_skipped += 1
                    await self.journal.payload_done(self.name, sha256)
                    continue
                left = self._budget_left()
                if left is not None and size > left:
                    return False
                started = time.monotonic()
                sent = await self.destination.send_payload(
                    sha256,
                    size,
                    media_type,
                    path,
                    self.limiter,
                    self.journal.identity.shipped_as(seq),
                )
                await self.journal.payload_done(self.name, sha256)
                self.state.payload_bytes_today += sent
                self.state.payloads_sent += 1
                self.state.payload_bytes_delivered += size
                self._account(sent, started)
                self._report(progress)

    async def backlog(self) -> dict[Priority, tuple[int, int, str | None]]:
        return await self.journal.read(lambda r: JournalReader.backlog(r, self.name))

    # ------------------------------------------------------------------------- daemon loop

    async def run(self) -> None:
        """Drain whenever there is a link, every `sync.interval` and at once on `wake`."""
        await self.journal.register_destination(self.name)
        while True:
            now = datetime.now(UTC)
            if not in_windows(self.cfg.windows, now):
                await self._sleep(60.0 - now.second)  # re-check at the next minute
                continue
            try:
                self.state.reachable = await self.destination.reachable()
                if not self.state.reachable:
                    self._failed(DestinationError(self.name, "not reachable", retryable=True))
                    await self._probe_until_reachable()
                    continue
                await self.drain()
            except DestinationError as exc:
                self._failed(exc)
                delay = min(
                    self.settings.retry_max, 2.0 ** min(self.state.consecutive_failures, 16)
                )
                if not exc.retryable:
                    delay = self.settings.retry_max
                await self._sleep(delay * random.uniform(0.5, 1.0))
                continue
            await self._sleep(None if self.scheduled else self.settings.interval)

    async def _probe_until_reachable(self) -> None:
        """The link is down: probe cheaply every `probe_interval` (jittered) and return as soon
        as it answers, so a returning link is drained at once, not after a long backoff."""
        while True:
            await self._sleep(self.settings.probe_interval * random.uniform(0.5, 1.0))
            if await self.destination.reachable():
                return

    async def final_attempt(self) -> None:
        """On shutdown: one try to ship what is waiting (the caller bounds it), never an error."""
        with contextlib.suppress(DestinationError):
            if await self.destination.reachable():
                await self.drain()

    async def _sleep(self, seconds: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)
        self.wake.clear()

    def _failed(self, exc: DestinationError) -> None:
        self.state.consecutive_failures += 1
        self.state.last_error = str(exc)
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL_S:
            log.warning(
                "sync attempt failed",
                extra={
                    "fields": {
                        "destination": self.name,
                        "error": str(exc),
                        "retryable": exc.retryable,
                        "consecutive_failures": self.state.consecutive_failures,
                        "suppressed_since_last": self._suppressed_errors,
                    }
                },
            )
            self._last_error_log, self._suppressed_errors = now, 0
        else:
            self._suppressed_errors += 1
