"""Journalling for pipelines: append a record, store a payload and append the record that
references it, and never crash a pipeline on a full disk (drops are counted and logged instead);
hand every record to a watcher (the daemon's alarm board), journalled or not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from appliance.runtime.logs import RateLimitedLog
from sync import Journal, NewRecord, PayloadError, PayloadRef, PayloadStore, Priority, StorageFull

log = logging.getLogger(__name__)

RecordWatch = Callable[[NewRecord], None]
"""Sees every record a stage tries to journal, right after the try (appliance/status/alarms.py).
Called on the event loop: it must be quick and must not raise."""


@dataclass
class RecorderStats:
    records: int = 0
    payloads: int = 0
    payload_bytes: int = 0
    dropped: int = 0


class Recorder:
    """One source's way into the journal and the payload store."""

    def __init__(
        self,
        source: str,
        journal: Journal,
        payloads: PayloadStore,
        *,
        watch: RecordWatch | None = None,
    ) -> None:
        self.source = source
        self.journal = journal
        self.payloads = payloads
        self.watch = watch
        self.stats = RecorderStats()
        self._warn = RateLimitedLog(log)

    async def append(self, record: NewRecord) -> int | None:
        """Journal `record`: its seq, or None (counted, logged at most once a minute) if refused.
        The watcher sees it either way: a full disk must not hide an alarm."""
        try:
            seq = await self.journal.append(record)
        except (StorageFull, PayloadError) as exc:
            if self.watch is not None:
                self.watch(record)
            self.stats.dropped += 1
            if isinstance(exc, PayloadError):
                self.journal.count_drop(record.priority, "payload_vanished")
            self._warn.warning(
                f"full:{record.priority}",
                "record not journalled",
                source=self.source,
                priority=record.priority.label,
                reason=getattr(exc, "reason", str(exc)),
            )
            return None
        self.stats.records += 1
        if self.watch is not None:
            self.watch(record)
        return seq

    async def store(self, data: bytes, media_type: str, priority: Priority) -> PayloadRef | None:
        """Store a payload; None (the drop counted under `priority`) when the disk is full."""
        try:
            ref = await self.payloads.put(data, media_type)
        except StorageFull:
            self.journal.count_drop(priority, "disk_full")
            self.stats.dropped += 1
            self._warn.warning(
                f"payload-full:{priority}",
                "payload not kept: disk full",
                source=self.source,
                priority=priority.label,
            )
            return None
        self.stats.payloads += 1
        self.stats.payload_bytes += ref.size
        return ref

    async def append_with_payloads(self, record: NewRecord) -> int | None:
        """Journal a record whose payloads are already stored (its seq, or None); if the record
        is refused, its payloads are removed again (unless another record uses them)."""
        seq = await self.append(record)
        if seq is None:
            for ref in record.payloads:
                await self.discard_payload(ref.sha256)
        return seq

    async def discard_payload(self, sha256: str) -> None:
        """Remove a payload whose record could not be journalled, unless another record uses it."""
        known = await self.journal.read(lambda r: r.payload_info([sha256]))
        if sha256 not in known:
            await asyncio.to_thread(self.payloads.delete, sha256)
