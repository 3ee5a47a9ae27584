"""Owns building the status report: `appliance status` (the journal, disk and the daemon's last
heartbeat, read-only, daemon running or not) and the status server's live report (the same
figures with the daemon's live snapshot merged in). The shape is `schema.py`'s."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.status.health import HEARTBEAT_INTERVAL_S, HEARTBEAT_KEY
from appliance.status.schema import (
    DaemonReport,
    DestinationReport,
    HealthSnapshot,
    JournalHealth,
    LiveDestination,
    SourceReport,
    StatusFigures,
    StatusReport,
    UnsyncedReport,
)
from appliance.status.wording import describe
from config import ApplianceConfig
from config.units import format_duration, format_size
from sync import JOURNAL_FILE, JournalReader, Priority
from sync.records import parse_ts


def _age_s(ts: str | None, now: datetime) -> float | None:
    return None if ts is None else max(0.0, (now - parse_ts(ts)).total_seconds())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_status(cfg: ApplianceConfig) -> StatusFigures:
    """Everything `appliance status` shows, as a JSON-able dict."""
    data_dir = cfg.appliance.data_dir
    now = datetime.now(UTC)
    reader = JournalReader.open(data_dir)
    try:
        counts = reader.counts()
        unsynced = reader.unsynced()
        evictions = reader.evictions()
        rollups = reader.rollups()
        drops = reader.drops()
        quality = reader.quality()
        files, payload_bytes, missing = reader.payload_totals()
        heartbeat_raw = reader.meta(HEARTBEAT_KEY)
        boots = reader.meta("boots")
        last_seq = reader.meta("seq_hw")
        identity = reader.identity()
        journal_live = reader.live_bytes()
        backlogs = {d.name: reader.backlog(d.name) for d in cfg.sync.destinations}
        waiting = {d.name: reader.payloads_waiting(d.name) for d in cfg.sync.destinations}
    finally:
        reader.close()
    journal_file_bytes = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            journal_file_bytes += (data_dir / f"{JOURNAL_FILE}{suffix}").stat().st_size
    disk = shutil.disk_usage(data_dir)

    daemon: DaemonReport = {"running": False}
    if heartbeat_raw:
        beat = json.loads(heartbeat_raw)
        age = _age_s(beat.get("heartbeat"), now)
        running = (
            beat.get("state") != "stopped"
            and age is not None
            and age < 3 * HEARTBEAT_INTERVAL_S
            and _pid_alive(int(beat.get("pid", 0)))
        )
        daemon = {
            "running": running,
            "state": beat.get("state") if running else "stopped",
            "reasons": beat.get("reasons", []) if running else [],
            "pid": beat.get("pid"),
            "version": beat.get("version"),
            "mode": beat.get("mode"),
            "started": beat.get("started"),
            "heartbeat_age_s": None if age is None else round(age, 1),
            "components": beat.get("components", {}),
            "sources": beat.get("sources", {}),
            "cameras": beat.get("cameras", {}),
            "destinations": beat.get("destinations", {}),
            "models": beat.get("models"),
            # A stopped daemon's alarms are as old as its last heartbeat: only a running one's.
            "alarms": beat.get("alarms", []) if running else [],
        }
        if "journal" in beat:
            # Kept when stopped too: the last run's check result (a damaged journal above all)
            # matters most when the daemon is not running.
            daemon["journal"] = beat["journal"]

    by_priority: dict[str, int] = {p.label: 0 for p in Priority}
    by_kind: dict[str, int] = {}
    for priority, kind, records, _bytes in counts:
        by_priority[priority.label] += records
        by_kind[kind] = by_kind.get(kind, 0) + records
    unsynced_out: dict[str, UnsyncedReport] = {}
    oldest_age: float | None = None
    for priority, (records, oldest) in unsynced.items():
        age = _age_s(oldest, now)
        unsynced_out[priority.label] = {
            "records": records,
            "oldest": oldest,
            "oldest_age_s": None if age is None else round(age, 1),
        }
        if age is not None:
            oldest_age = max(oldest_age or 0.0, age)
    destinations: dict[str, DestinationReport] = {}
    live_states = daemon.get("destinations", {}) if daemon.get("running") else {}
    for dest in cfg.sync.destinations:
        backlog = backlogs[dest.name]
        ages = [a for a in (_age_s(ts, now) for _, _, ts in backlog.values()) if a is not None]
        live: dict[str, Any] = dict(live_states.get(dest.name, {}))
        destinations[dest.name] = {
            "type": dest.type,
            "backlog": {p.label: {"records": n, "bytes": b} for p, (n, b, _) in backlog.items()},
            "backlog_records": sum(n for n, _, _ in backlog.values()),
            "backlog_bytes": sum(b for _, b, _ in backlog.values()),
            "payloads_waiting": waiting[dest.name][0],
            "payload_bytes_waiting": waiting[dest.name][1],
            "oldest_unsynced_age_s": round(max(ages), 1) if ages else None,
            "reachable": live.get("reachable"),
            "last_success": live.get("last_success"),
            "last_error": live.get("last_error"),
            "refused": live.get("refused"),
            "refused_since": live.get("refused_since"),
            "collision": live.get("collision"),
            "rate_bytes_per_s": live.get("rate_bytes_per_s"),
            "payload_bytes_today": live.get("payload_bytes_today"),
            "daily_payload_budget": dest.daily_payload_budget,
        }
    return {
        "appliance_id": cfg.appliance.id,
        "journal_id": None if identity is None else identity.journal_id,
        "data_dir": str(data_dir),
        "daemon": daemon,
        "boots": int(boots) if boots else 0,
        "last_seq": int(last_seq) if last_seq else 0,
        "records": {
            "total": sum(by_priority.values()),
            "by_priority": by_priority,
            "by_kind": dict(sorted(by_kind.items())),
            "by_priority_and_kind": [
                {"priority": p.label, "kind": k, "records": n, "bytes": b} for p, k, n, b in counts
            ],
        },
        "unsynced": unsynced_out,
        "oldest_unsynced_age_s": None if oldest_age is None else round(oldest_age, 1),
        "disk": {
            "journal_bytes": journal_live,
            "journal_file_bytes": journal_file_bytes,
            "payload_bytes": payload_bytes,
            "payload_files": files,
            "payloads_missing": missing,
            "used_bytes": journal_live + payload_bytes,
            "budget_bytes": cfg.storage.disk_budget,
            "fs_free_bytes": disk.free,
            "fs_total_bytes": disk.total,
        },
        "destinations": destinations,
        "evictions": [
            {"priority": p.label, "reason": r, "records": n, "bytes": b} for p, r, n, b in evictions
        ],
        "rollups": [
            {
                "resolution_s": r,
                "of": k,
                "records": n,
                "rollups": m,
                "bytes_before": b,
                "bytes_after": a,
            }
            for r, k, n, m, b, a in rollups
        ],
        "drops": [{"priority": p.label, "reason": r, "records": n} for p, r, n in drops],
        "data_quality": [{"source": s, "reason": r, "count": c} for s, r, c in quality],
    }


_LIVE_DESTINATION_KEYS = (
    "reachable",
    "draining",
    "last_success",
    "last_error",
    "rate_bytes_per_s",
    "payload_bytes_today",
    "records_sent",
    "bytes_sent",
    "refused",
    "refused_since",
    "collision",
)


def live_destination_report(
    dest: DestinationReport, live: LiveDestination | None
) -> DestinationReport:
    """A destination's figures with its engine's live state in place of the heartbeat's, and
    the time its backlog takes at the current rate."""
    merged = dest.copy()
    if live is not None:
        for key in _LIVE_DESTINATION_KEYS:
            merged[key] = live[key]  # type: ignore[literal-required]
    pending = merged["backlog_bytes"] + merged["payload_bytes_waiting"]
    rate = merged.get("rate_bytes_per_s") or 0.0
    merged["eta_s"] = 0.0 if pending == 0 else (round(pending / rate, 1) if rate else None)
    return merged


def live_report(
    figures: StatusFigures,
    snapshot: HealthSnapshot,
    reasons: list[str],
    *,
    status_url: str | None,
) -> StatusReport:
    """`/api/status`: the journal's `figures` with the daemon's live `snapshot` in place of
    its heartbeat, judged by `reasons` (the health judge's)."""
    daemon: DaemonReport = {
        "running": True,
        "state": snapshot["state"],
        "reasons": snapshot["reasons"],
        "pid": snapshot["pid"],
        "version": snapshot["version"],
        "mode": snapshot["mode"],
        "started": snapshot["started"],
        "boot_id": snapshot["boot_id"],
        "uptime_s": snapshot["uptime_s"],
        "status_url": snapshot["status_url"],
        "components": snapshot["components"],
        "sources": snapshot["sources"],
        "cameras": snapshot["cameras"],
        "destinations": snapshot["destinations"],
        "models": snapshot["models"],
        "journal": snapshot["journal"],
        "storage": snapshot["storage"],
        "alarms": snapshot["alarms"],
    }
    return {
        **figures,
        "state": "degraded" if reasons else "ok",
        "reasons": reasons,
        "healthy": not reasons,
        "version": snapshot["version"],
        "uptime_s": snapshot["uptime_s"],
        "status_url": status_url,
        "alarms": snapshot["alarms"],
        "daemon": daemon,
        "destinations": {
            name: live_destination_report(dest, snapshot["destinations"].get(name))
            for name, dest in figures["destinations"].items()
        },
    }


def render_status(report: StatusFigures) -> str:
    """The human view of `collect_status`."""
    lines: list[str] = []
    daemon = report["daemon"]
    if daemon.get("running"):
        state = daemon["state"]
        if daemon.get("reasons"):
            state += f" ({', '.join(daemon['reasons'])})"
        lines.append(
            f"appliance {report['appliance_id']}: daemon running, {state}, pid {daemon['pid']}"
        )
    else:
        lines.append(f"appliance {report['appliance_id']}: daemon not running")
    if daemon.get("running"):
        alarms = daemon.get("alarms", [])
        lines.append(f"alarms     {len(alarms)} active" if alarms else "alarms     none")
        lines += [
            f"  {a['severity'].upper():<8} {a['source']}: {a['what']} (since {a['since']})"
            for a in alarms
        ]
    lines.append(
        f"data dir   {report['data_dir']}  (boots: {report['boots']}, last seq: {report['last_seq']})"
    )
    if report["journal_id"]:
        lines.append(f"journal    {report['journal_id']}")
    journal = daemon.get("journal")
    if journal and "integrity" in journal:
        lines.append(f"  check    {integrity_words(journal)}")
    disk = report["disk"]
    lines.append(
        f"disk       {format_size(disk['used_bytes'])} used of {format_size(disk['budget_bytes'])} budget "
        f"(journal {format_size(disk['journal_bytes'])}, payloads {format_size(disk['payload_bytes'])} "
        f"in {disk['payload_files']} files); file system free {format_size(disk['fs_free_bytes'])}"
    )
    records = report["records"]
    lines.append(f"records    {records['total']} in the journal")
    lines.append("  priority    records   unsynced   oldest unsynced")
    for priority, total in records["by_priority"].items():
        unsynced = report["unsynced"][priority]
        age = unsynced["oldest_age_s"]
        lines.append(
            f"  {priority:<10} {total:>8} {unsynced['records']:>10}   {format_duration(age) if age is not None else '-'}"
        )
    if records["by_kind"]:
        lines.append("  by kind: " + ", ".join(f"{k} {n}" for k, n in records["by_kind"].items()))
    for name, dest in report["destinations"].items():
        reach = {True: "reachable", False: "unreachable", None: "reachability unknown"}[
            dest["reachable"]
        ]
        age = dest["oldest_unsynced_age_s"]
        line = (
            f"shipping   {name} ({dest['type']}, {reach}): {dest['backlog_records']} records "
            f"({format_size(dest['backlog_bytes'])}) and {dest['payloads_waiting']} payloads "
            f"({format_size(dest['payload_bytes_waiting'])}) waiting"
        )
        if age is not None:
            line += f", oldest {format_duration(age)}"
        if dest["last_success"]:
            line += f"; last success {dest['last_success']}"
        if dest["rate_bytes_per_s"]:
            line += f"; {format_size(dest['rate_bytes_per_s'])}/s"
        if dest["daily_payload_budget"]:
            line += f"; payloads today {format_size(dest['payload_bytes_today'] or 0)} of {format_size(dest['daily_payload_budget'])}"
        lines.append(line)
        if dest["refused"]:
            lines.append(
                f"           REFUSED since {dest['refused_since']}, cursor held: {dest['refused']}"
            )
        elif dest["last_error"] and dest["reachable"] is not True:
            lines.append(f"           last error: {dest['last_error']}")
        if dest["collision"]:
            lines.append(f"           JOURNAL COLLISION: {dest['collision']['detail']}")
    if report["evictions"]:
        lines.append(
            "evictions  "
            + ", ".join(
                f"{e['priority']}/{e['reason']} {e['records']} ({format_size(e['bytes'])})"
                for e in report["evictions"]
            )
        )
    else:
        lines.append("evictions  none")
    if report["rollups"]:
        lines.append(
            "rollups    "
            + ", ".join(
                f"{r['records']} {r['of']} -> {r['rollups']} of {r['resolution_s']} s "
                f"({format_size(r['bytes_before'])} -> {format_size(r['bytes_after'])})"
                for r in report["rollups"]
            )
        )
    if report["drops"]:
        lines.append(
            "dropped    "
            + ", ".join(f"{d['priority']}/{d['reason']} {d['records']}" for d in report["drops"])
        )
    if report["data_quality"]:
        lines.append(
            "data quality "
            + ", ".join(f"{q['source']}/{q['reason']} {q['count']}" for q in report["data_quality"])
        )
    if disk["payloads_missing"]:
        lines.append(f"payloads missing on disk: {disk['payloads_missing']}")
    sources = daemon.get("sources", {}) if daemon.get("running") else {}
    for name, source in sorted(sources.items()):
        lines.append(_source_line(name, source))
    cameras = daemon.get("cameras", {}) if daemon.get("running") else {}
    for name, cam in sorted(cameras.items()):
        lines.append(_camera_line(name, cam))
    components = daemon.get("components", {}) if daemon.get("running") else {}
    for name, component in sorted(components.items()):
        if component.get("state") not in ("running", "finished"):
            lines.append(
                f"component  {name}: {component.get('state')} ({component.get('last_error')})"
            )
    return "\n".join(lines)


def integrity_words(journal: JournalHealth) -> str:
    """The journal's last stop and its integrity check in words (the page says the same)."""
    return describe("integrity_check", {**journal["integrity"], "last_stop": journal["last_stop"]})


def _source_line(name: str, source: SourceReport) -> str:
    age = source.get("last_reading_age_s")
    parts = [
        f"source     {name}: {source.get('state')}",
        "no reading yet" if age is None else f"last reading {age:.1f} s ago",
        f"windows {source.get('windows', 0)}, bad values {source.get('bad_values', 0)}",
        f"reconnects {source.get('reconnects', 0)}",
    ]
    if source.get("readings_dropped"):
        parts.append(f"dropped {source['readings_dropped']} readings (consumer behind)")
    anomaly = source.get("anomaly")
    if anomaly:
        parts.append(
            f"anomaly {anomaly.get('state')}"
            + (" (in anomaly)" if anomaly.get("in_anomaly") else "")
            + f", {anomaly.get('anomalies', 0)} found"
        )
    if source.get("error"):
        parts.append(f"last error: {source['error']}")
    return ", ".join(parts)


def _camera_line(name: str, cam: dict[str, Any]) -> str:
    pipeline = cam.get("pipeline", {})
    latency = cam.get("latency_ms") or {}
    age = cam.get("last_frame_age_s")
    parts = [
        f"camera     {name}: {cam.get('state')}, {cam.get('fps', 0):.1f} fps",
        "no frame yet" if age is None else f"last frame {age:.1f} s ago",
        f"{cam.get('model')} p50 {latency.get('p50') or 0:.0f} ms",
        f"analysed {pipeline.get('analysed', 0)}/{pipeline.get('frames', 0)}"
        f" (motion skipped {pipeline.get('skipped_motion', 0)})",
        f"objects {pipeline.get('objects', 0)}, zone entries {pipeline.get('zone_entries', 0)}",
        f"drops {cam.get('frames_dropped', 0)}, reconnects {cam.get('reconnects', 0)}",
    ]
    if cam.get("error"):
        parts.append(f"last error: {cam['error']}")
    return ", ".join(parts)


def ensure_data_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist")
