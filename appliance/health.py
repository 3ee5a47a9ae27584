"""The daemon's health: one snapshot of components, storage and writer, journalled periodically
as `health` records and written to the journal's meta table as a heartbeat `appliance status` reads."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from appliance.supervisor import ComponentHealth
from sync import Journal, NewRecord, Priority, StorageFull, StorageGuard
from sync.engine import DestinationState
from sync.records import format_ts

HEARTBEAT_KEY = "daemon"
HEARTBEAT_INTERVAL_S = (
    5.0  # how often the daemon writes its heartbeat; status judges staleness by it
)


def app_version() -> str:
    try:
        return version("edge-appliance")
    except PackageNotFoundError:
        return "0+unknown"


class HealthMonitor:
    """Collects health from the parts the daemon wires together."""

    def __init__(self, journal: Journal, guard: StorageGuard, *, mode: str) -> None:
        self.journal = journal
        self.guard = guard
        self.mode = mode
        self.components: dict[str, ComponentHealth] = {}
        self.sources: dict[str, Any] = {}
        self.anomalies: dict[str, Callable[[], dict[str, Any]]] = {}
        # Per source with anomaly.refit enabled: its refit (appliance/refit.py), shown in its
        # anomaly entry as `refit`.
        self.refits: dict[str, Callable[[], dict[str, Any]]] = {}
        # Sensors' drift states (a camera's is part of its entry in `cameras`).
        self.drift: dict[str, Callable[[], dict[str, Any]]] = {}
        self.status_url: str | None = None  # where the status page listens, once it does
        self.cameras: dict[str, Callable[[], dict[str, Any]]] = {}
        self.destinations: dict[str, DestinationState] = {}
        # Model package pulls (appliance/model_updates.py), when a destination has `models: true`.
        self.models: Callable[[], dict[str, Any]] | None = None
        # Per package NAME of a `package:NAME` detector: active, previous, canary and watch
        # (appliance/canary.py); shown under models.packages.
        self.canaries: dict[str, Callable[[], dict[str, Any]]] = {}
        self.started = datetime.now(UTC)
        self._started_mono = time.monotonic()

    def reasons(self) -> list[str]:
        reasons = []
        if self.guard.degraded_reason:
            reasons.append(self.guard.degraded_reason)
        for name, component in sorted(self.components.items()):
            if component.state == "degraded":
                reasons.append(f"component_degraded:{name}")
        for name, destination in sorted(self.destinations.items()):
            if destination.refused is not None:
                reasons.append(f"sync_refused:{name}")
            if destination.collision is not None:
                reasons.append(f"journal_collision:{name}")
        return reasons

    def snapshot(self) -> dict[str, Any]:
        reasons = self.reasons()
        stats = self.journal.stats
        usage = self.guard.last_usage
        return {
            "state": "degraded" if reasons else "ok",
            "reasons": reasons,
            "mode": self.mode,
            "version": app_version(),
            "pid": os.getpid(),
            "boot_id": self.journal.boot_id,
            "started": format_ts(self.started),
            "uptime_s": round(time.monotonic() - self._started_mono, 1),
            "status_url": self.status_url,
            "components": {n: c.to_dict() for n, c in sorted(self.components.items())},
            "sources": {name: self._source(name, h) for name, h in sorted(self.sources.items())},
            "cameras": {name: health() for name, health in sorted(self.cameras.items())},
            "destinations": {n: d.to_dict() for n, d in sorted(self.destinations.items())},
            "models": self._models(),
            "journal": {
                "commits": stats.commits,
                "records": stats.records,
                "failed_commits": stats.failed_commits,
                "pending": self.journal.pending,
                "shed_level": self.journal.shed_level,
                "dropped": {f"{p}:{r}": n for (p, r), n in sorted(stats.dropped.items())},
            },
            "storage": None
            if usage is None
            else {
                "journal_bytes": usage.journal_bytes,
                "payload_bytes": usage.payload_bytes,
                "fs_free": usage.fs_free,
                "budget": self.guard.settings.disk_budget,
            },
        }

    def _models(self) -> dict[str, Any] | None:
        """Package pulls and, per package, its versions, canary and watch."""
        if self.models is None and not self.canaries:
            return None
        models = {} if self.models is None else dict(self.models())
        if self.canaries:
            models["packages"] = {name: get() for name, get in sorted(self.canaries.items())}
        return models

    def _source(self, name: str, health: Any) -> dict[str, Any]:
        last = health.last_reading_mono_ns
        entry: dict[str, Any] = {
            "state": health.state,
            "windows": health.windows,
            "bad_values": health.bad_values,
            "reconnects": health.reconnects,
            "error": health.error,
            "last_reading_age_s": None
            if last is None
            else round((time.monotonic_ns() - last) / 1e9, 1),
        }
        if health.extra:
            entry["extra"] = dict(health.extra)
        anomaly = self.anomalies.get(name)
        if anomaly is not None:
            entry["anomaly"] = anomaly()
            refit = self.refits.get(name)
            if refit is not None:
                entry["anomaly"]["refit"] = refit()
        drift = self.drift.get(name)
        if drift is not None:
            entry["drift"] = drift()
        return entry

    async def heartbeat(self, *, state: str | None = None) -> None:
        """Write the snapshot to meta (best effort: a full disk must not stop the daemon)."""
        snap = self.snapshot()
        snap["heartbeat"] = format_ts(datetime.now(UTC))
        if state is not None:
            snap["state"] = state
        try:
            await self.journal.set_meta({HEARTBEAT_KEY: json.dumps(snap)})
        except StorageFull:
            pass

    async def record(self) -> None:
        """Journal a `health` telemetry record."""
        try:
            await self.journal.append(
                NewRecord(
                    source="appliance",
                    kind="health",
                    priority=Priority.TELEMETRY,
                    body=self.snapshot(),
                )
            )
        except StorageFull:
            pass
