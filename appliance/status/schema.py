"""Owns the contract of the status report: the typed shape that `appliance status --json`,
`/api/status`, `/metrics`, the status page, the heartbeat and the `health` record share, so strict
mypy checks every reader (docs/status-api.md describes the same fields for people).

The report is built in layers: `HealthSnapshot` (the daemon's live view, `health.py`), the
journal's figures `StatusFigures` (`report.collect_status`, with the heartbeat's snapshot as its
`daemon` when the daemon runs elsewhere), and `StatusReport` (both, merged by the status server).
The entries a stage describes for itself (a camera's counters, an anomaly stage, a drift check,
a model package's canary) are open mappings: they belong to their stage, not to this contract.
"""

from __future__ import annotations

from typing import Any, NotRequired, Required

# typing_extensions' TypedDict (a dependency of pydantic): pydantic validates reports against
# these types in the tests, and on Python 3.11 it needs this one rather than typing's.
from typing_extensions import TypedDict

Described = dict[str, Any]
"""An entry a stage describes for itself (camera, anomaly, drift, model package)."""


class ComponentReport(TypedDict):
    state: str
    restarts: int
    last_error: str | None


class CollisionReport(TypedDict):
    journals: list[str]
    detail: str


class LiveDestination(TypedDict):
    """`sync.engine.DestinationState`, as the daemon sees its destination now."""

    name: str
    reachable: bool | None
    draining: bool
    last_success: str | None
    last_error: str | None
    consecutive_failures: int
    records_sent: int
    batches_sent: int
    bytes_sent: int
    payloads_sent: int
    payloads_skipped: int
    payload_bytes_today: int
    day: str
    rate_bytes_per_s: float
    refused: str | None
    refused_since: str | None
    collision: CollisionReport | None


class SourceReport(TypedDict):
    """A source's health (cameras also have one here, beside their entry in `cameras`)."""

    state: str
    windows: int
    bad_values: int
    reconnects: int
    readings_dropped: int
    error: str | None
    last_reading_age_s: float | None
    extra: NotRequired[dict[str, float]]
    anomaly: NotRequired[Described]
    drift: NotRequired[Described]
    windows_per_s: NotRequired[float | None]
    """Only in the status server's report: windows per second over the last few seconds."""


class IntegrityReport(TypedDict):
    """The journal file's integrity as this run knows it (`sync.recovery.IntegrityState`)."""

    state: str  # skipped | pending | running | ok | failed | error | salvaged
    check: str | None  # integrity_check | quick_check: the check that ran, runs or will run
    started_at: str | None  # when the background check started
    checked_at: str | None  # when the last check ended
    seconds: float | None
    detail: str  # in words: why, or what the check found


class JournalHealth(TypedDict):
    commits: int
    records: int
    failed_commits: int
    pending: int
    shed_level: int
    dropped: dict[str, int]
    last_stop: str  # how the run before this one stopped: clean | unclean | new
    integrity: IntegrityReport


class StorageHealth(TypedDict):
    journal_bytes: int
    payload_bytes: int
    fs_free: int
    budget: int


class AlarmReport(TypedDict):
    """One active alarm: something on the machine or the link that an operator must see, from
    when it starts until it clears (appliance/status/alarms.py; docs/status-api.md). An alarm is
    about the machine watched or the link, not the appliance's own health (`state`/`reasons`)."""

    id: str  # stable while the alarm is open: "limit:gearbox:vib_radial:peak>2.0"
    kind: str  # limit | anomaly | zone | delivery | storage | journal
    source: str  # the source, camera or destination it belongs to ("appliance" for storage)
    what: str  # in words: "vib_radial peak 3.51 over 2.0"
    severity: str  # "critical" or "warning"
    since: str  # ISO 8601 UTC: when it started
    updated: str  # ISO 8601 UTC: when it was last seen (its last value's time)
    value: float | str | None  # its last value, where it has one


class HealthSnapshot(TypedDict):
    """What the daemon knows of itself now: `HealthMonitor.snapshot()`, journalled as the
    `health` record and written to meta as the heartbeat (with `heartbeat`, its time)."""

    state: str
    reasons: list[str]
    mode: str
    version: str
    pid: int
    boot_id: str
    started: str
    uptime_s: float
    status_url: str | None
    components: dict[str, ComponentReport]
    sources: dict[str, SourceReport]
    cameras: dict[str, Described]
    destinations: dict[str, LiveDestination]
    models: Described | None
    journal: JournalHealth
    storage: StorageHealth | None
    alarms: list[AlarmReport]
    heartbeat: NotRequired[str]


class DestinationBacklog(TypedDict):
    """What one destination has not acknowledged yet, as the journal says."""

    records: int
    bytes: int  # estimated, as in `BacklogFigures`
    payloads: int
    payload_bytes: int
    oldest: str | None  # the ts of the oldest record waiting; None: nothing waits


class HealthRecord(HealthSnapshot):
    """The body of a journalled `health` record: the snapshot and, per destination, its
    backlog (what the shore's fleet view shows of an appliance; docs/fleet.md)."""

    backlog: dict[str, DestinationBacklog]


class DaemonReport(TypedDict, total=False):
    """The daemon as a report sees it: only `running` when it is not; the status server's
    report adds the rest of the live snapshot."""

    running: Required[bool]
    state: str
    reasons: list[str]
    pid: int | None
    version: str | None
    mode: str | None
    started: str | None
    heartbeat_age_s: float | None
    components: dict[str, ComponentReport]
    sources: dict[str, SourceReport]
    cameras: dict[str, Described]
    destinations: dict[str, LiveDestination]
    models: Described | None
    uptime_s: float
    status_url: str | None
    boot_id: str
    journal: JournalHealth
    storage: StorageHealth | None
    alarms: list[AlarmReport]


class BacklogFigures(TypedDict):
    records: int
    bytes: int


class DestinationReport(TypedDict):
    type: str
    backlog: dict[str, BacklogFigures]
    backlog_records: int
    backlog_bytes: int
    payloads_waiting: int
    payload_bytes_waiting: int
    oldest_unsynced_age_s: float | None
    reachable: bool | None
    last_success: str | None
    last_error: str | None
    refused: str | None
    refused_since: str | None
    collision: CollisionReport | None
    rate_bytes_per_s: float | None
    payload_bytes_today: int | None
    daily_payload_budget: int | None
    # Only in the status server's report: the live engine's counters and the time to drain.
    draining: NotRequired[bool]
    records_sent: NotRequired[int]
    batches_sent: NotRequired[int]
    bytes_sent: NotRequired[int]
    payloads_sent: NotRequired[int]
    payloads_skipped: NotRequired[int]
    consecutive_failures: NotRequired[int]
    eta_s: NotRequired[float | None]


class KindCount(TypedDict):
    priority: str
    kind: str
    records: int
    bytes: int


class RecordsReport(TypedDict):
    total: int
    by_priority: dict[str, int]
    by_kind: dict[str, int]
    by_priority_and_kind: list[KindCount]


class UnsyncedReport(TypedDict):
    records: int
    oldest: str | None
    oldest_age_s: float | None


class DiskReport(TypedDict):
    journal_bytes: int
    journal_file_bytes: int
    payload_bytes: int
    payload_files: int
    payloads_missing: int
    used_bytes: int
    budget_bytes: int
    fs_free_bytes: int
    fs_total_bytes: int


class EvictionCount(TypedDict):
    priority: str
    reason: str
    records: int
    bytes: int


class RollupCount(TypedDict):
    """Tiered telemetry since the journal began, per tier and kind rolled up (storage.tiers)."""

    resolution_s: int
    of: str
    records: int  # records the rollups replaced
    rollups: int  # rollup records written
    bytes_before: int
    bytes_after: int


class DropCount(TypedDict):
    priority: str
    reason: str
    records: int


class QualityCount(TypedDict):
    source: str
    reason: str
    count: int


class StatusFigures(TypedDict):
    """`appliance status --json`: the journal's figures and the daemon's last heartbeat."""

    appliance_id: str
    journal_id: str | None
    data_dir: str
    daemon: DaemonReport
    boots: int
    last_seq: int
    records: RecordsReport
    unsynced: dict[str, UnsyncedReport]
    oldest_unsynced_age_s: float | None
    disk: DiskReport
    destinations: dict[str, DestinationReport]
    evictions: list[EvictionCount]
    rollups: list[RollupCount]
    drops: list[DropCount]
    data_quality: list[QualityCount]


class StatusReport(StatusFigures):
    """`/api/status`: the figures with the live snapshot in place of the heartbeat; what the
    page and `/metrics` render."""

    state: str
    reasons: list[str]
    healthy: bool
    version: str
    uptime_s: float
    status_url: str | None
    alarms: list[AlarmReport]
    """The active alarms, most severe and oldest first (the daemon's, from its snapshot)."""


__all__ = [
    "AlarmReport",
    "BacklogFigures",
    "CollisionReport",
    "ComponentReport",
    "DaemonReport",
    "Described",
    "DestinationBacklog",
    "DestinationReport",
    "DiskReport",
    "DropCount",
    "EvictionCount",
    "HealthRecord",
    "HealthSnapshot",
    "IntegrityReport",
    "JournalHealth",
    "KindCount",
    "LiveDestination",
    "QualityCount",
    "RecordsReport",
    "RollupCount",
    "SourceReport",
    "StatusFigures",
    "StatusReport",
    "StorageHealth",
    "UnsyncedReport",
]
