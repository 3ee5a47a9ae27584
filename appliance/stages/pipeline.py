"""The pipeline of one sensor source: readings -> features, limits, anomalies, drift checks and
samples -> journal records.

Cameras have their own in appliance/stages/vision.py; both journal through appliance/stages/recorder.py."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.stages.anomalies import AnomalyStage
from appliance.stages.baselines import BaselineStore
from appliance.stages.drift import INPUTS_MODEL, DriftStage
from appliance.stages.recorder import Recorder, RecordWatch
from config import Limit
from inference.features import Summary, summarise
from inference.sampling import RawWindowSampler
from sensors import QualityReport, SampleWindow, SensorConfig, Source
from sync import Journal, NewRecord, PayloadStore, Priority
from sync.records import format_ts


@dataclass
class PipelineStats:
    windows: int = 0
    samples: int = 0
    limit_crossings: int = 0


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
        self,
        cfg: SensorConfig,
        source: Source,
        journal: Journal,
        payloads: PayloadStore,
        baselines: BaselineStore | None = None,
        *,
        replay: bool = False,
        watch: RecordWatch | None = None,
        violated: Iterable[tuple[int, str]] = (),
    ) -> None:
        """`watch` sees every record (the alarm board); `violated`: the limits (index, channel)
        a previous run of this source left crossed (`violated`), so a restart journals `cleared`
        for one that recovered meanwhile, and no second `violated` for one that did not."""
        self.cfg = cfg
        self.source = source
        self.journal = journal
        self.payloads = payloads
        self.stats = PipelineStats()
        self.recorder = Recorder(cfg.name, journal, payloads, watch=watch)
        self._violated: set[tuple[int, str]] = set(violated)
        self.anomaly: AnomalyStage | None = None
        if cfg.anomaly is not None:
            store = baselines or BaselineStore.in_data_dir(journal.data_dir)
            self.anomaly = AnomalyStage(
                cfg.name, cfg.anomaly, self.recorder, store, wait_for_fit=replay
            )
        self.raw_sampler = RawWindowSampler(cfg.sample_raw_every)
        self.drift = DriftStage(
            cfg.name, cfg.drift, self.recorder, journal.data_dir, boostable=self.raw_sampler
        )

    @property
    def violated(self) -> frozenset[tuple[int, str]]:
        """The limits (index in `limits`, channel) crossed now."""
        return frozenset(self._violated)

    @property
    def model(self) -> str | None:
        """The baseline scoring this source, stamped on all its records so that ashore can tell
        which model saw them; None without anomaly detection or before a baseline is fitted."""
        return None if self.anomaly is None else self.anomaly.model

    def drift_status(self) -> dict[str, Any]:
        """The source's drift state for its health entry, with its raw window sampling."""
        return {**self.drift.status(), "raw_sampling": self.raw_sampler.status()}

    async def run(self) -> None:
        if self.anomaly is not None:
            await asyncio.to_thread(self.anomaly.load)
        async with self.source:
            async for reading in self.source.readings():
                if isinstance(reading, SampleWindow):
                    await self._on_window(reading)
                else:
                    await self._on_quality(reading)
        if self.anomaly is not None:
            await self.anomaly.finish()

    async def _append(self, record: NewRecord) -> bool:
        return await self.recorder.append(record) is not None

    async def _on_window(self, window: SampleWindow) -> None:
        self.stats.windows += 1
        if self.anomaly is not None:
            # A baseline swap (refit activation or rollback) lands here, before the reading is
            # stamped: each window's records name the one baseline that scored it.
            await self.anomaly.begin_window(window)
        summary = summarise(window, settings=self.cfg.features)
        # Scored before the reading is journalled, so that the reading carries its score (the
        # rollups of tiered telemetry keep each bucket's highest).
        score = None
        if self.anomaly is not None:
            score = await self.anomaly.on_window(window, summary)
        body: dict[str, object] = {
            "window_s": window.duration_s,
            "sample_rate": window.sample_rate,
            "channels": summary,
        }
        if window.quality:
            body["quality"] = list(window.quality)
        if score is not None and math.isfinite(score):
            body["anomaly_score"] = float(f"{score:.7g}")
        await self._append(
            NewRecord(
                source=self.cfg.name,
                kind="reading",
                priority=Priority.TELEMETRY,
                body=body,
                model=self.model,
                ts=window.ts,
                mono_ns=window.mono_ns,
            )
        )
        await self._check_limits(window, summary)
        await self._check_drift(window, summary, score)
        if self.raw_sampler.take(window.ts):
            await self._keep_sample(window, summary)

    async def _check_drift(
        self, window: SampleWindow, summary: Summary, score: float | None
    ) -> None:
        """Each channel's mean (or its first feature) and the anomaly score, against the
        reference of the baseline scoring the source (of its inputs when it has no anomaly
        detection; nothing while its baseline is still being fitted)."""
        model = INPUTS_MODEL if self.anomaly is None else self.anomaly.model
        if model is None or not self.cfg.drift.enabled:
            return
        await self.drift.activate(model)
        for channel, features in summary.items():
            name = "mean" if "mean" in features else next((f for f in features if f != "n"), None)
            if name is None:
                continue
            value = features[name]
            self.drift.observe(
                f"{channel}.{name}", math.nan if value is None else float(value), window.ts
            )
        if score is not None:
            self.drift.observe("anomaly_score", score, window.ts)
        await self.drift.check(ts=window.ts, mono_ns=window.mono_ns)

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
                        model=self.model,
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
        ref = await self.recorder.store(data, "application/x-npz", Priority.SAMPLE)
        if ref is None:
            return
        seq = await self.recorder.append_with_payloads(
            NewRecord(
                source=self.cfg.name,
                kind="sample",
                priority=Priority.SAMPLE,
                model=self.model,
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
        )
        if seq is not None:
            self.stats.samples += 1

    async def _on_quality(self, report: QualityReport) -> None:
        await self._append(
            NewRecord(
                source=self.cfg.name,
                kind="data_quality",
                priority=Priority.EVENT,
                model=self.model,
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
