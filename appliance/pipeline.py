"""The pipeline of one sensor source: readings -> features, limits and samples -> journal records.

This is where sensors/, inference/ and sync/ meet; nothing else wires them together."""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass

import numpy as np

from appliance.logs import RateLimitedLog
from config import CsvSensor, Limit, SimulatedSensor
from inference.features import Summary, summarise
from sensors import QualityReport, SampleWindow, Source
from sync import Journal, NewRecord, PayloadError, PayloadStore, Priority, StorageFull
from sync.records import format_ts

log = logging.getLogger(__name__)

SensorConfig = SimulatedSensor | CsvSensor


@dataclass
class PipelineStats:
    windows: int = 0
    records: int = 0
    samples: int = 0
    limit_crossings: int = 0
    dropped: int = 0


def encode_window(window: SampleWindow) -> bytes:
    """Raw samples of a window as a compressed .npz (values, channel names, start, rate)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        values=window.values.astype(np.float32),
        channels=np.array(window.channels),
        ts=np.array(format_ts(window.ts)),
        sample_rate=np.array(window.sample_rate if window.sample_rate is not None else np.nan),
        duration_s=np.array(window.duration_s),
    )
    return buffer.getvalue()


class SourcePipeline:
    """Runs one source to its end (or cancellation) and journals what it sees."""

    def __init__(
        self, cfg: SensorConfig, source: Source, journal: Journal, payloads: PayloadStore
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.journal = journal
        self.payloads = payloads
        self.stats = PipelineStats()
        self._violated: set[tuple[int, str]] = set()
        self._warn = RateLimitedLog(log)

    async def run(self) -> None:
        async with self.source:
            async for reading in self.source.readings():
                if isinstance(reading, SampleWindow):
                    await self._on_window(reading)
                else:
                    await self._on_quality(reading)

    async def _append(self, record: NewRecord) -> bool:
        try:
            await self.journal.append(record)
        except (StorageFull, PayloadError) as exc:
            self.stats.dropped += 1
            if isinstance(exc, PayloadError):
                self.journal.count_drop(record.priority, "payload_vanished")
            self._warn.warning(
                f"full:{record.priority}",
                "record not journalled",
                source=self.cfg.name,
                priority=record.priority.label,
                reason=getattr(exc, "reason", str(exc)),
            )
            return False
        self.stats.records += 1
        return True

    async def _on_window(self, window: SampleWindow) -> None:
        self.stats.windows += 1
        summary = summarise(window)
        body = {
            "window_s": window.duration_s,
            "sample_rate": window.sample_rate,
            "channels": summary,
        }
        await self._append(
            NewRecord(
                source=self.cfg.name,
                kind="reading",
                priority=Priority.TELEMETRY,
                body=body,
                ts=window.ts,
                mono_ns=window.mono_ns,
            )
        )
        await self._check_limits(window, summary)
        every = self.cfg.sample_raw_every
        if every and self.stats.windows % every == 0:
            await self._keep_sample(window, summary)

    async def _check_limits(self, window: SampleWindow, summary: Summary) -> None:
        for index, limit in enumerate(self.cfg.limits):
            channels = [limit.channel] if limit.channel else list(summary)
            for channel in channels:
                value = summary.get(channel, {}).get(limit.feature)
                if value is None:
                    continue  # no finite samples: neither a violation nor a clear
                key = (index, channel)
                violated = _violates(limit, float(value))
                if violated == (key in self._violated):
                    continue
                if violated:
                    self._violated.add(key)
                else:
                    self._violated.discard(key)
                self.stats.limit_crossings += 1
                await self._append(
                    NewRecord(
                        source=self.cfg.name,
                        kind="limit",
                        priority=Priority.from_label(limit.priority)
                        if violated
                        else Priority.EVENT,
                        body={
                            "state": "violated" if violated else "cleared",
                            "channel": channel,
                            "feature": limit.feature,
                            "value": value,
                            "above": limit.above,
                            "below": limit.below,
                        },
                        ts=window.ts,
                        mono_ns=window.mono_ns,
                    )
                )

    async def _keep_sample(self, window: SampleWindow, summary: Summary) -> None:
        data = await asyncio.to_thread(encode_window, window)
        try:
            ref = await self.payloads.put(data, "application/x-npz")
        except StorageFull:
            self.journal.count_drop(Priority.SAMPLE, "disk_full")
            self.stats.dropped += 1
            self._warn.warning(
                "payload-full", "raw sample not kept: disk full", source=self.cfg.name
            )
            return
        if await self._append(
            NewRecord(
                source=self.cfg.name,
                kind="sample",
                priority=Priority.SAMPLE,
                body={
                    "reason": "periodic",
                    "channels": list(window.channels),
                    "features": summary,
                    "samples": int(window.values.shape[1]),
                },
                payloads=(ref,),
                ts=window.ts,
                mono_ns=window.mono_ns,
            )
        ):
            self.stats.samples += 1
        else:
            await self._discard_payload(ref.sha256)

    async def _discard_payload(self, sha256: str) -> None:
        """Remove a payload whose record could not be journalled, unless another record uses it."""
        referenced = await self.journal.read(
            lambda r: r.conn.execute(
                "SELECT 1 FROM payloads WHERE sha256 = ?", (sha256,)
            ).fetchone()
        )
        if referenced is None:
            await asyncio.to_thread(self.payloads.delete, sha256)

    async def _on_quality(self, report: QualityReport) -> None:
        await self._append(
            NewRecord(
                source=self.cfg.name,
                kind="data_quality",
                priority=Priority.EVENT,
                body={
                    "counts": report.counts,
                    "examples": [
                        {"reason": e.reason, "detail": e.detail, "line": e.line}
                        for e in report.examples
                    ],
                },
                ts=report.ts,
                mono_ns=report.mono_ns,
            )
        )


def _violates(limit: Limit, value: float) -> bool:
    return (limit.above is not None and value > limit.above) or (
        limit.below is not None and value < limit.below
    )
