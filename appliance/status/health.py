"""The daemon's health and its one judge: one snapshot of components, sources, storage and writer,
and the reasons it is degraded (grace periods for sources included). `/healthz`, the status page,
`/api/status`, the journalled `health` records and the heartbeat in the journal's meta table
(what `appliance status` reads) all take the judgement from here, so they cannot disagree. The
snapshot also carries the active alarms (appliance/status/alarms.py), which are not part of the
judgement: a machine in alarm is not an appliance at fault."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from appliance.runtime.supervisor import ComponentHealth
from appliance.status.alarms import AlarmBoard
from appliance.status.schema import (
    ComponentReport,
    Described,
    DestinationBacklog,
    HealthRecord,
    HealthSnapshot,
    LiveDestination,
    SourceReport,
)
from sync import JournalReader, NewRecord, Priority, StorageFull
from sync.records import format_ts

if TYPE_CHECKING:
    # Types only: `appliance status` and `--version` import this module, and they must not load
    # numpy (sensors) or the journal's writer side (tests/test_cli_basics.py).
    from sensors.base import SourceHealth
    from sync import Journal, StorageGuard
    from sync.engine import DestinationState

HEARTBEAT_KEY = "daemon"
HEARTBEAT_INTERVAL_S = (
    5.0  # how often the daemon writes its heartbeat; status judges staleness by it
)
# A source failed or reconnecting (a camera not running) for longer than this degrades health;
# shorter outages (a broker restart, a camera's reopen) are normal and only show on the page.
SOURCE_GRACE_S = 15.0
_BAD_SOURCE_STATES = ("failed", "reconnecting")


def app_version() -> str:
    try:
        return version("edge-appliance")
    except PackageNotFoundError:
        return "0+unknown"


class HealthMonitor:
    """Collects health from the parts the daemon wires together."""

    def __init__(
        self,
        journal: Journal,
        guard: StorageGuard,
        *,
        mode: str,
        camera_names: Iterable[str] = (),
        grace_s: float = SOURCE_GRACE_S,
        alarms: AlarmBoard | None = None,
    ) -> None:
        self.journal = journal
        self.guard = guard
        # The daemon's board, which its stages also feed with their records.
        self.alarms = alarms if alarms is not None else AlarmBoard()
        self.mode = mode
        self.camera_names = set(camera_names)
        self.grace_s = grace_s
        self.components: dict[str, ComponentHealth] = {}
        # Every source's health, cameras' included (those are judged by `camera_names`).
        self.sources: dict[str, SourceHealth] = {}
        self.anomalies: dict[str, Callable[[], dict[str, Any]]] = {}
        # Per source with anomaly.refit enabled: its refit (appliance/models/refit.py), shown in its
        # anomaly entry as `refit`.
        self.refits: dict[str, Callable[[], dict[str, Any]]] = {}
        # Sensors' drift states (a camera's is part of its entry in `cameras`).
        self.drift: dict[str, Callable[[], dict[str, Any]]] = {}
        self.status_url: str | None = None  # where the status page listens, once it does
        self.cameras: dict[str, Callable[[], dict[str, Any]]] = {}
        self.destinations: dict[str, DestinationState] = {}
        # Model package pulls (appliance/models/updates.py), when a destination has `models: true`.
        self.models: Callable[[], dict[str, Any]] | None = None
        # Per package NAME of a `package:NAME` detector: active, previous, canary and watch
        # (appliance/models/canary.py); shown under models.packages.
        self.canaries: dict[str, Callable[[], dict[str, Any]]] = {}
        self.started = datetime.now(UTC)
        self._started_mono = time.monotonic()
        self._bad_since: dict[str, float] = {}

    def observe(self) -> None:
        """Note since when each source has been down and each camera not running, and bring the
        alarms that live state decides up to date (called by `reasons`, and each second by the
        status server so a grace period ends, and an alarm opens or clears, on time)."""
        self.alarms.refresh(
            destinations=self.destinations,
            guard=self.guard,
            journal=self.journal,
            anomalies=self.anomalies,
        )
        now = time.monotonic()
        bad: set[str] = set()
        for name, health in self.sources.items():
            if name in self.camera_names:
                if health.state != "running":
                    bad.add(f"camera_not_running:{name}")
            elif health.state in _BAD_SOURCE_STATES:
                bad.add(f"source_{health.state}:{name}")
        for reason in bad:
            self._bad_since.setdefault(reason, now)
        for reason in set(self._bad_since) - bad:
            del self._bad_since[reason]

    def reasons(self) -> list[str]:
        """Why the appliance is degraded; empty when healthy. Storage, components, destinations
        refused or colliding, and sources down for longer than the grace period."""
        self.observe()
        now = time.monotonic()
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
        reasons += [
            r for r, since in sorted(self._bad_since.items()) if now - since >= self.grace_s
        ]
        return reasons

    def snapshot(self) -> HealthSnapshot:
        reasons = self.reasons()
        stats = self.journal.stats
        integrity = self.journal.integrity
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
            "components": {n: _component(c) for n, c in sorted(self.components.items())},
            "sources": {name: self._source(name, h) for name, h in sorted(self.sources.items())},
            "cameras": {name: health() for name, health in sorted(self.cameras.items())},
            "destinations": {n: live_destination(d) for n, d in sorted(self.destinations.items())},
            "models": self._models(),
            "journal": {
                "commits": stats.commits,
                "records": stats.records,
                "failed_commits": stats.failed_commits,
                "pending": self.journal.pending,
                "shed_level": self.journal.shed_level,
                "dropped": {f"{p}:{r}": n for (p, r), n in sorted(stats.dropped.items())},
                "last_stop": integrity.last_stop,
                "integrity": {
                    "state": integrity.state,
                    "check": integrity.check,
                    "started_at": integrity.started_at,
                    "checked_at": integrity.checked_at,
                    "seconds": integrity.seconds,
                    "detail": integrity.detail,
                },
            },
            "storage": None
            if usage is None
            else {
                "journal_bytes": usage.journal_bytes,
                "payload_bytes": usage.payload_bytes,
                "fs_free": usage.fs_free,
                "budget": self.guard.settings.disk_budget,
            },
            "alarms": self.alarms.reports(),
        }

    def _models(self) -> Described | None:
        """Package pulls and, per package, its versions, canary and watch."""
        if self.models is None and not self.canaries:
            return None
        models = {} if self.models is None else dict(self.models())
        if self.canaries:
            models["packages"] = {name: get() for name, get in sorted(self.canaries.items())}
        return models

    def _source(self, name: str, health: SourceHealth) -> SourceReport:
        last = health.last_reading_mono_ns
        entry: SourceReport = {
            "state": health.state,
            "windows": health.windows,
            "bad_values": health.bad_values,
            "reconnects": health.reconnects,
            "readings_dropped": health.readings_dropped,
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

    async def backlog(self) -> dict[str, DestinationBacklog]:
        """What each destination has not acknowledged yet, from the journal: the `health`
        record carries it so the shore's fleet view shows an appliance's backlog as it last
        reported it."""
        names = sorted(self.destinations)

        def read(reader: JournalReader) -> dict[str, DestinationBacklog]:
            figures: dict[str, DestinationBacklog] = {}
            for name in names:
                waiting = reader.backlog(name)
                payloads, payload_bytes = reader.payloads_waiting(name)
                oldest = sorted(ts for _, _, ts in waiting.values() if ts is not None)
                figures[name] = {
                    "records": sum(n for n, _, _ in waiting.values()),
                    "bytes": sum(b for _, b, _ in waiting.values()),
                    "payloads": payloads,
                    "payload_bytes": payload_bytes,
                    "oldest": oldest[0] if oldest else None,
                }
            return figures

        return await self.journal.read_figures(read) if names else {}

    async def record(self) -> None:
        """Journal a `health` telemetry record: the snapshot and the destinations' backlog."""
        body: HealthRecord = {**self.snapshot(), "backlog": await self.backlog()}
        try:
            await self.journal.append(
                NewRecord(source="appliance", kind="health", priority=Priority.TELEMETRY, body=body)
            )
        except StorageFull:
            pass


def _component(health: ComponentHealth) -> ComponentReport:
    return {"state": health.state, "restarts": health.restarts, "last_error": health.last_error}


def live_destination(state: DestinationState) -> LiveDestination:
    """What the daemon shows of a destination's engine now."""
    collision = state.collision
    return {
        "name": state.name,
        "reachable": state.reachable,
        "draining": state.draining,
        "last_success": state.last_success,
        "last_error": state.last_error,
        "consecutive_failures": state.consecutive_failures,
        "records_sent": state.records_sent,
        "batches_sent": state.batches_sent,
        "bytes_sent": state.bytes_sent,
        "payloads_sent": state.payloads_sent,
        "payloads_skipped": state.payloads_skipped,
        "payload_bytes_today": state.payload_bytes_today,
        "day": state.day,
        "rate_bytes_per_s": state.rate_bytes_per_s,
        "refused": state.refused,
        "refused_since": state.refused_since,
        "collision": None
        if collision is None
        else {"journals": list(collision.journals), "detail": collision.detail},
    }
