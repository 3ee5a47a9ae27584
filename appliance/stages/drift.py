"""The drift stage sensors and cameras share: the model's inputs and outputs against its
reference, `drift` records when a quantity starts or stops drifting, the sampling boost while a
drift is active."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from appliance.runtime.logs import RateLimitedLog
from appliance.stages.recorder import Recorder
from config.analysis import DriftSettings
from inference.drift import (
    DriftError,
    DriftEvent,
    DriftMonitor,
    Observed,
    load_references,
    reference_path,
    save_references,
)
from sync import NewRecord, Priority
from sync.records import format_ts

log = logging.getLogger(__name__)


INPUTS_MODEL = "inputs"
"""What a source without a model checks its inputs under (its reference file's MODEL@VERSION)."""


class Boostable(Protocol):
    """A sampler a drift can boost (inference.sampling's Sampler and RawWindowSampler)."""

    def boost(self, factor: float, until: datetime) -> None: ...


class DriftStage:
    """One source's drift checks against its current model's reference (the saved one, or the
    first `drift.reference` of data time after the model was activated), `drift` records when a
    quantity starts or stops drifting, and the sampling boost while one drifts."""

    def __init__(
        self,
        source: str,
        settings: DriftSettings,
        recorder: Recorder,
        data_dir: Path,
        boostable: Boostable | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.recorder = recorder
        self.data_dir = data_dir
        self.boostable = boostable
        self.model: str | None = None
        self.monitor: DriftMonitor | None = None
        self.events = 0
        self._warn = RateLimitedLog(log)

    async def activate(self, model: str) -> None:
        """Check against `model` from now on (a new version starts from its own reference)."""
        if not self.settings.enabled or model == self.model:
            return
        path = reference_path(self.data_dir, model, self.source)
        try:
            references = await asyncio.to_thread(load_references, path)
        except DriftError as exc:
            log.warning("drift reference of %s: %s; collecting anew", self.source, exc)
            references = []
        self.model = model
        self.monitor = DriftMonitor(self.settings, references)

    def observe(self, quantity: str, values: Observed, ts: datetime) -> None:
        """Values of `quantity` at data time `ts` (ignored until a model is activated)."""
        if self.monitor is not None:
            self.monitor.observe(quantity, values, ts)

    async def check(self, *, ts: datetime | None = None, mono_ns: int | None = None) -> None:
        """When a check is due: compare, journal the events, save a new reference, boost.
        `ts` and `mono_ns` stamp the records (the frame's or window's own)."""
        monitor = self.monitor
        if monitor is None or not monitor.due():
            return
        for event in monitor.check():
            await self._journal(event, ts, mono_ns)
        if monitor.unsaved:
            await self._save(monitor)
        now = monitor.now
        if monitor.active and self.boostable is not None and now is not None:
            until = now + timedelta(seconds=self.settings.boost_duration)
            self.boostable.boost(self.settings.sampling_boost, until)

    async def _journal(self, event: DriftEvent, ts: datetime | None, mono_ns: int | None) -> None:
        self.events += 1
        log.info(
            "drift %s",
            event.kind,
            extra={
                "fields": {
                    "source": self.source,
                    "model": self.model,
                    "quantity": event.quantity,
                    "psi": round(event.psi, 3),
                }
            },
        )
        await self.recorder.append(
            NewRecord(
                source=self.source,
                kind="drift",
                priority=Priority.EVENT,
                body={
                    **event.as_dict(),
                    "model": self.model,
                    "source": self.source,
                    "data_ts": format_ts(event.ts),
                },
                model=None if self.model == INPUTS_MODEL else self.model,
                ts=ts,
                mono_ns=mono_ns,
            )
        )

    async def _save(self, monitor: DriftMonitor) -> None:
        assert self.model is not None
        path = reference_path(self.data_dir, self.model, self.source)
        try:
            await asyncio.to_thread(
                save_references, path, monitor.references(), model=self.model, source=self.source
            )
        except OSError as exc:  # a full or read-only disk: checks go on, saving is retried
            self._warn.warning(
                "drift-save", "drift reference not saved", source=self.source, error=str(exc)
            )
            return
        monitor.unsaved = False

    def status(self) -> dict[str, Any]:
        """For health and the status page: `off`, `waiting` (no model yet), or the monitor's
        state (`reference` while collecting, `ok`, `drift`) with its quantities."""
        if not self.settings.enabled:
            return {"state": "off", "model": None, "since": None, "quantities": {}}
        if self.monitor is None:
            return {"state": "waiting", "model": None, "since": None, "quantities": {}}
        return {"model": self.model, **self.monitor.status(), "events": self.events}
