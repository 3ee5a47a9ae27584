"""Owns the active alarms (`AlarmBoard`): what on the machine watched or on the link an operator
must see, from when it starts until it clears: sensor limits crossed, anomalies, zone alerts,
refused deliveries, disk and journal trouble. The stages hand it every record they journal (a
`Recorder`'s watch); the health monitor hands it the live state of destinations, storage and the
journal. It logs one line when an alarm opens and one when it clears; `/api/status`, the page,
`/metrics`, `appliance status` and the `health` record show its list (docs/status-api.md,
"Alarms")."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.status.schema import AlarmReport
from appliance.status.wording import describe
from config.units import format_duration, format_size
from sync.records import NewRecord, Priority, format_ts

if TYPE_CHECKING:
    # Types only: the health module imports this one, and `appliance status` imports that
    # without the journal's writer side or the sync engine (they load on first use).
    from sync import Journal, StorageGuard
    from sync.engine import DestinationState

log = logging.getLogger(__name__)

CRITICAL, WARNING = "critical", "warning"
SEVERITIES = (CRITICAL, WARNING)
KINDS = ("limit", "anomaly", "zone", "delivery", "storage", "journal")
APPLIANCE = "appliance"  # the `source` of the appliance's own storage and journal alarms

# A zone alert is a sighting, not a state that ends by itself: its alarm stays this long after
# the zone's last alert entry, so an operator who looks away for a few minutes still sees it.
ZONE_HOLD_S = 300.0
# Failed commits and dropped records are counts that only grow: their alarm stays until none
# more happened for this long.
JOURNAL_QUIET_S = 300.0
# Disk budget use that opens its warning, and the lower one that clears it: retention brings use
# back to 95 % once it passes the budget, so one threshold would flap.
BUDGET_OPEN, BUDGET_CLEAR = 0.90, 0.85
_SHED = {1: "telemetry", 2: "telemetry and samples", 3: "telemetry, samples and events"}


def severity_of(priority: Priority) -> str:
    """An `alert` record's alarm is critical, an `event` record's a warning."""
    return CRITICAL if priority == Priority.ALERT else WARNING


@dataclass
class Alarm:
    """One active alarm; `report()` is its `AlarmReport`."""

    id: str
    kind: str
    source: str
    what: str
    severity: str
    since: str
    updated: str
    value: float | str | None = None
    expires: float | None = None
    """On the board's monotonic clock: when it clears by itself (zone alerts, journal trouble)."""
    detail: dict[str, Any] = field(default_factory=dict)
    """What the board needs to keep it up to date (a limit's bounds, a zone's entry count)."""

    def report(self) -> AlarmReport:
        return {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "what": self.what,
            "severity": self.severity,
            "since": self.since,
            "updated": self.updated,
            "value": self.value,
        }


def _ts(record: NewRecord) -> str:
    return format_ts(record.ts if record.ts is not None else datetime.now(UTC))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _bound(value: Any) -> str:
    return repr(float(value))


class AlarmBoard:
    """The active alarms, opened and cleared by records (`observe`) and by the live state of
    destinations, storage and the journal (`refresh`). Everything runs on the event loop."""

    def __init__(
        self,
        *,
        zone_hold_s: float = ZONE_HOLD_S,
        quiet_s: float = JOURNAL_QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.zone_hold_s = zone_hold_s
        self.quiet_s = quiet_s
        self.clock = clock
        self._alarms: dict[str, Alarm] = {}
        self._opened_at: dict[str, float] = {}
        # The journal's counters as last seen, and as they were when their open alarm started.
        self._failed_seen = self._failed_at_open = 0
        self._dropped_seen: dict[tuple[str, str], int] = {}
        self._dropped_at_open: dict[tuple[str, str], int] = {}
        self._failing_observe = False

    # ------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._alarms)

    def get(self, alarm_id: str) -> Alarm | None:
        return self._alarms.get(alarm_id)

    def reports(self) -> list[AlarmReport]:
        """The active alarms, critical before warning, then oldest first."""
        ordered = sorted(
            self._alarms.values(), key=lambda a: (SEVERITIES.index(a.severity), a.since, a.id)
        )
        return [alarm.report() for alarm in ordered]

    # ------------------------------------------------------------------------ open and clear

    def _open(self, alarm: Alarm) -> None:
        """Open `alarm`, or bring the open one with its id up to date (its `since` stays)."""
        current = self._alarms.get(alarm.id)
        if current is None:
            self._alarms[alarm.id] = alarm
            self._opened_at[alarm.id] = self.clock()
            log.warning("alarm raised", extra={"fields": self._fields(alarm)})
            return
        escalated = current.severity == WARNING and alarm.severity == CRITICAL
        current.what, current.value, current.updated = alarm.what, alarm.value, alarm.updated
        current.expires = alarm.expires
        current.detail.update(alarm.detail)
        if escalated:
            current.severity = CRITICAL
            log.warning("alarm escalated", extra={"fields": self._fields(current)})

    def _clear(self, alarm_id: str, why: str) -> None:
        alarm = self._alarms.pop(alarm_id, None)
        if alarm is None:
            return
        lasted = self.clock() - self._opened_at.pop(alarm_id, self.clock())
        fields = {**self._fields(alarm), "lasted": format_duration(max(lasted, 0.0)), "why": why}
        log.info("alarm cleared", extra={"fields": fields})

    @staticmethod
    def _fields(alarm: Alarm) -> dict[str, Any]:
        return {
            "alarm": alarm.id,
            "kind": alarm.kind,
            "source": alarm.source,
            "severity": alarm.severity,
            "what": alarm.what,
            "value": alarm.value,
            "since": alarm.since,
        }

    # ------------------------------------------------------------------------------ records

    def observe(self, record: NewRecord) -> None:
        """A record a stage journalled (or tried to: a full disk must not hide an alarm). Called
        on the event loop for every record, so it is quick, and it never raises into a stage."""
        try:
            if record.kind == "reading":
                self._reading(record)
            elif record.kind == "limit":
                self._limit(record)
            elif record.kind == "anomaly":
                self._anomaly(record)
            elif record.kind == "zone_entry" and record.priority == Priority.ALERT:
                self._zone(record)
            self._failing_observe = False
        except Exception as exc:  # a malformed body costs its alarm, never the source
            if not self._failing_observe:
                log.error(
                    "alarm board could not read a record",
                    extra={"fields": {"source": record.source, "kind": record.kind}},
                    exc_info=exc,
                )
            self._failing_observe = True

    def _limit(self, record: NewRecord) -> None:
        body = record.body
        above, below = body.get("above"), body.get("below")
        bounds = "".join(
            f"{sign}{_bound(b)}" for sign, b in (("<", below), (">", above)) if b is not None
        )
        alarm_id = f"limit:{record.source}:{body['channel']}:{body['feature']}{bounds}"
        if body.get("state") == "cleared":
            self._clear(alarm_id, describe("limit", body))
            return
        self._open(
            Alarm(
                id=alarm_id,
                kind="limit",
                source=record.source,
                what=describe("limit", body),
                severity=severity_of(record.priority),
                since=_ts(record),
                updated=_ts(record),
                value=_finite(body.get("value")),
                detail={"body": dict(body)},
            )
        )

    def _reading(self, record: NewRecord) -> None:
        """A window of a source with an open limit alarm: its value now, while it still crosses
        the limit (the pipeline's `cleared` record, right after, closes the alarm otherwise)."""
        prefix = f"limit:{record.source}:"
        channels = record.body.get("channels") or {}
        for alarm in self._alarms.values():
            if not alarm.id.startswith(prefix):
                continue
            limit = alarm.detail["body"]
            value = _finite((channels.get(limit["channel"]) or {}).get(limit["feature"]))
            if value is None:
                continue
            above, below = limit.get("above"), limit.get("below")
            if not ((above is not None and value > above) or (below is not None and value < below)):
                continue
            alarm.value, alarm.updated = value, _ts(record)
            alarm.what = describe("limit", {**limit, "value": value})

    def _anomaly(self, record: NewRecord) -> None:
        body = record.body
        alarm_id = f"anomaly:{record.source}"
        event = body.get("kind")
        if event == "ended":
            self._clear(alarm_id, describe("anomaly", body))
            return
        if event not in ("started", "escalated"):
            return
        self._open(
            Alarm(
                id=alarm_id,
                kind="anomaly",
                source=record.source,
                what=describe("anomaly", body),
                severity=severity_of(record.priority),
                since=_ts(record),
                updated=_ts(record),
                value=_finite(body.get("score")),
            )
        )

    def _zone(self, record: NewRecord) -> None:
        body = record.body
        alarm_id = f"zone:{record.source}:{body['zone']}"
        current = self._alarms.get(alarm_id)
        entries = 1 if current is None else int(current.detail.get("entries", 1)) + 1
        what = describe("zone_entry", body)
        self._open(
            Alarm(
                id=alarm_id,
                kind="zone",
                source=record.source,
                what=what if entries == 1 else f"{what} ({entries} entries)",
                severity=CRITICAL,  # only `alert` zone entries open one
                since=_ts(record),
                updated=_ts(record),
                value=_finite(body.get("score")),
                expires=self.clock() + self.zone_hold_s,
                detail={"entries": entries},
            )
        )

    # --------------------------------------------------------------------------- live state

    def refresh(
        self,
        *,
        destinations: Mapping[str, DestinationState],
        guard: StorageGuard,
        journal: Journal,
        anomalies: Mapping[str, Callable[[], Mapping[str, Any]]],
    ) -> None:
        """Open and clear the alarms that live state decides (called by the health monitor on
        each look: every second while the status page runs, every heartbeat without it)."""
        now = self.clock()
        for alarm in list(self._alarms.values()):
            if alarm.expires is not None and now >= alarm.expires:
                held = self.quiet_s if alarm.kind == "journal" else self.zone_hold_s
                self._clear(alarm.id, f"nothing more for {format_duration(held)}")
        self._deliveries(destinations)
        self._storage(guard, journal)
        self._journal(journal, now)
        self._integrity(journal)
        self._anomalies_now(anomalies)

    def _deliveries(self, destinations: Mapping[str, DestinationState]) -> None:
        now = format_ts(datetime.now(UTC))
        for name, state in destinations.items():
            refused_id = f"delivery:{name}"
            if state.refused is not None:
                refused: dict[str, Any] = {"destination": name, "error": state.refused}
                self._open(
                    Alarm(
                        id=refused_id,
                        kind="delivery",
                        source=name,
                        what=describe("sync_refused", refused),
                        severity=CRITICAL,
                        since=state.refused_since or now,
                        updated=state.refused_since or now,
                        value=None,
                    )
                )
            else:
                self._clear(refused_id, f"{name} takes the backlog again")
            collision_id = f"delivery:{name}:collision"
            if state.collision is not None:
                collision: dict[str, Any] = {
                    "destination": name,
                    "journals": list(state.collision.journals),
                }
                current = self._alarms.get(collision_id)
                self._open(
                    Alarm(
                        id=collision_id,
                        kind="delivery",
                        source=name,
                        what=describe("journal_collision", collision),
                        severity=WARNING,
                        since=now if current is None else current.since,
                        updated=now if current is None else current.updated,
                        value=None,
                    )
                )
            else:
                self._clear(collision_id, f"no other journal ships to {name} under this id")

    def _storage(self, guard: StorageGuard, journal: Journal) -> None:
        now = format_ts(datetime.now(UTC))
        usage = guard.last_usage
        level = journal.shed_level
        if guard.degraded_reason or level:
            free = "" if usage is None else f"{format_size(usage.fs_free)} free, "
            shed = _SHED.get(level)
            self._open(
                Alarm(
                    id="storage:disk_full",
                    kind="storage",
                    source=APPLIANCE,
                    what=f"disk full: {free}under storage.min_free "
                    f"{format_size(guard.settings.min_free)}"
                    + (f"; not journalling {shed}" if shed else ""),
                    severity=CRITICAL,
                    since=self._since("storage:disk_full", now),
                    updated=now,
                    value=None if usage is None else usage.fs_free,
                )
            )
        else:
            self._clear("storage:disk_full", "disk space recovered")
        if usage is None:
            return
        budget = guard.settings.disk_budget
        share = usage.used / budget
        if share >= BUDGET_OPEN or (share >= BUDGET_CLEAR and "storage:budget" in self._alarms):
            self._open(
                Alarm(
                    id="storage:budget",
                    kind="storage",
                    source=APPLIANCE,
                    what=f"disk budget {share:.0%} used ({format_size(usage.used)} of "
                    f"{format_size(budget)}): retention removes the oldest records, synced "
                    "ones first",
                    severity=WARNING,
                    since=self._since("storage:budget", now),
                    updated=now,
                    value=round(share * 100, 1),
                )
            )
        else:
            self._clear("storage:budget", f"disk budget {share:.0%} used")

    def _since(self, alarm_id: str, now: str) -> str:
        current = self._alarms.get(alarm_id)
        return now if current is None else current.since

    def _journal(self, journal: Journal, now_mono: float) -> None:
        now = format_ts(datetime.now(UTC))
        stats = journal.stats
        failed = stats.failed_commits
        if failed > self._failed_seen:
            if "journal:commits" not in self._alarms:
                self._failed_at_open = self._failed_seen
            count = failed - self._failed_at_open
            self._open(
                Alarm(
                    id="journal:commits",
                    kind="journal",
                    source=APPLIANCE,
                    what=f"journal commits failing: {count} failed"
                    + (f"; last error: {stats.last_error}" if stats.last_error else ""),
                    severity=CRITICAL,
                    since=self._since("journal:commits", now),
                    updated=now,
                    value=count,
                    expires=now_mono + self.quiet_s,
                )
            )
        self._failed_seen = failed
        dropped = dict(stats.dropped)
        if any(n > self._dropped_seen.get(key, 0) for key, n in dropped.items()):
            if "journal:dropped" not in self._alarms:
                self._dropped_at_open = dict(self._dropped_seen)
            lost = {
                key: n - self._dropped_at_open.get(key, 0)
                for key, n in dropped.items()
                if n > self._dropped_at_open.get(key, 0)
            }
            total = sum(lost.values())
            worst = sorted(lost.items(), key=lambda item: (-item[1], item[0]))
            self._open(
                Alarm(
                    id="journal:dropped",
                    kind="journal",
                    source=APPLIANCE,
                    what=f"{total} records not journalled: "
                    + ", ".join(
                        f"{p} {n} ({reason.replace('_', ' ')})" for (p, reason), n in worst[:3]
                    ),
                    # A lost alert is what the journal exists to keep.
                    severity=CRITICAL
                    if any(p == Priority.ALERT.label for p, _ in lost)
                    else WARNING,
                    since=self._since("journal:dropped", now),
                    updated=now,
                    value=total,
                    expires=now_mono + self.quiet_s,
                )
            )
        self._dropped_seen = dropped

    def _integrity(self, journal: Journal) -> None:
        """The background check found the journal damaged: open until a restart salvages it
        (only a restart can: the file is quarantined before anything else opens it)."""
        check = journal.integrity
        if check.state != "failed":
            self._clear("journal:damaged", f"journal check {check.state}")
            return
        at = check.checked_at or format_ts(datetime.now(UTC))
        self._open(
            Alarm(
                id="journal:damaged",
                kind="journal",
                source=APPLIANCE,
                what=describe("integrity_check", check.to_dict()),
                severity=CRITICAL,
                since=at,
                updated=at,
                value=None,
            )
        )

    def _anomalies_now(self, anomalies: Mapping[str, Callable[[], Mapping[str, Any]]]) -> None:
        """An open anomaly alarm follows its stage: closed when the stage is no longer in an
        anomaly (its `ended` record normally closed it already; a restarted source's stage
        starts without one), its score kept current while it is."""
        for alarm in [a for a in self._alarms.values() if a.kind == "anomaly"]:
            describer = anomalies.get(alarm.source)
            if describer is None:
                continue
            state = describer()
            if not state.get("in_anomaly"):
                self._clear(alarm.id, "the anomaly stage is no longer in an anomaly")
                continue
            score = _finite(state.get("last_score"))
            if score is not None:
                alarm.value = score


def count_by_kind_and_severity(alarms: Iterable[AlarmReport]) -> dict[tuple[str, str], int]:
    """Active alarms per (kind, severity), every pair present (0 when none): what `/metrics`
    exports, so a query for a pair that has none still finds a series."""
    counts = {(kind, severity): 0 for kind in KINDS for severity in SEVERITIES}
    for alarm in alarms:
        key = (alarm["kind"], alarm["severity"])
        counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = [
    "APPLIANCE",
    "BUDGET_CLEAR",
    "BUDGET_OPEN",
    "CRITICAL",
    "JOURNAL_QUIET_S",
    "KINDS",
    "SEVERITIES",
    "WARNING",
    "ZONE_HOLD_S",
    "Alarm",
    "AlarmBoard",
    "count_by_kind_and_severity",
    "severity_of",
]
