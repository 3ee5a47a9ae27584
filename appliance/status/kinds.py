"""Owns the list of record kinds the appliance journals: each kind's name, its usual priority and
what one record of it says. The one list that `appliance export --kind` accepts and its `--help`
shows, that docs/cli.md documents, and that tests/test_cli_basics.py holds against every stage
that journals a record (a kind journalled but missing here fails that test).

A kind names what a record is (`reading`, `limit`, `zone_entry`); a priority (`alert`, `event`,
`sample`, `telemetry`) says how urgently it ships and how long it survives a full disk. The two
are different words for different things: a `limit` record is an `alert` or an `event`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One kind of record: `priority` is how it is usually journalled (some kinds take theirs
    from the config or from what happened), `meaning` one line for `--help` and the docs."""

    name: str
    priority: str
    meaning: str


RECORD_KINDS: tuple[Kind, ...] = (
    # Sensor sources (appliance/stages/pipeline.py, anomalies.py, drift.py)
    Kind("reading", "telemetry", "one window of a sensor source: its features per channel"),
    Kind(
        "limit",
        "the limit's (alert or event); event when it clears",
        "a feature limit crossed or cleared, with the value and the limit",
    ),
    Kind("data_quality", "event", "bad input from a source (gaps, NaN, unparseable rows), counted"),
    Kind("anomaly", "event or alert (by severity)", "an anomaly started or ended, with its score"),
    Kind(
        "anomaly_window",
        "the anomaly's",
        "the raw samples around an anomaly, an .npz payload",
    ),
    Kind("baseline", "event", "a source's anomaly baseline fitted on the device"),
    Kind("drift", "event", "a model's inputs drifted from its reference, or came back"),
    # Cameras (appliance/stages/vision.py)
    Kind("object", "event", "one tracked object when it ends, with its best snapshot"),
    Kind("zone_entry", "the zone's (alert or event)", "an object entered a zone, with a snapshot"),
    Kind("clip", "the zone's", "an MP4 clip around zone entries, with pre- and post-roll"),
    Kind("sample", "sample", "a raw window or a frame kept for labelling, with its predictions"),
    # Models (appliance/models/trial.py)
    Kind("model", "event or alert", "a model package or baseline refit step: staged, canary, ..."),
    # The appliance itself (appliance/daemon.py, appliance/status/health.py)
    Kind("lifecycle", "event", "the daemon started or stopped"),
    Kind("component", "event", "a supervised component failed, restarted or was degraded"),
    Kind("health", "telemetry", "the health snapshot and each destination's backlog"),
    # The journal and shipping (sync/)
    Kind("eviction", "event", "records retention evicted, by priority and reason"),
    Kind(
        "rollup",
        "telemetry",
        "readings (or health snapshots) older than a tier, as one aggregate per channel, "
        "feature and bucket (storage.tiers)",
    ),
    Kind("rollup_pass", "event", "what a pass of tiered telemetry rolled up, by tier"),
    Kind("recovery", "event", "what a salvage or payload reconciliation at start found"),
    Kind(
        "integrity_check",
        "event; alert when it found damage",
        "the journal's full check after an unclean stop (run in the background): passed, "
        "found damage (restart to salvage) or could not finish",
    ),
    Kind("journal_fork", "event", "`appliance journal fork` gave the journal a new id"),
    Kind("sync_refused", "alert", "a destination refused the backlog; its cursor holds"),
    Kind(
        "journal_collision",
        "alert; event when it clears",
        "another journal ships under this appliance id",
    ),
)

KIND_NAMES: tuple[str, ...] = tuple(kind.name for kind in RECORD_KINDS)


def check_kind(name: str) -> str:
    """`name` if the appliance journals records of that kind; else ValueError saying which kinds
    there are (and the nearest one, for a typo)."""
    if name in KIND_NAMES:
        return name
    from sync.records import Priority  # only on this error path: `--help` stays light

    near = difflib.get_close_matches(name, KIND_NAMES, n=1)
    if name in {p.label for p in Priority}:
        hint = f"; {name} is a priority, not a kind"
    else:
        hint = f"; did you mean {near[0]}?" if near else ""
    raise ValueError(f"unknown kind {name!r}{hint} (kinds: {', '.join(KIND_NAMES)})")
