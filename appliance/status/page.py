"""Owns the status page's HTML: the page and its live fragment, rendered on the server from an
`/api/status` report (the active alarms first), the recent events in words and the 24-hour
history (its charts are `appliance.status.charts`) with snapshots, and clips that play in place
beside them, plus the page's one script and one style sheet. Every value is escaped here; no
external resource, no inline script or style (the CSP forbids them)."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from appliance.status.assets import SCRIPT, STYLE
from appliance.status.charts import render_charts
from appliance.status.history import History
from appliance.status.schema import (
    AlarmReport,
    DestinationReport,
    JournalHealth,
    LiveDestination,
    StatusReport,
)
from appliance.status.wording import describe, number
from config.units import format_duration, format_size
from sync.records import parse_ts


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def when(ts: str | None, now: float | None = None) -> str:
    """A time as `<time>`: short (the clock today, else day and minute, never microseconds),
    the exact UTC time on hover; the page's script shows it in the browser's own time zone."""
    if not isinstance(ts, str) or not ts:
        return _e(ts or None)
    try:
        moment = parse_ts(ts).astimezone(UTC).replace(microsecond=0)
    except ValueError:
        return _e(ts)
    today = datetime.fromtimestamp(time.time() if now is None else now, UTC).date()
    if moment.date() == today:
        shown = f"{moment:%H:%M:%S}"
    elif moment.year == today.year:
        shown = f"{moment:%b} {moment.day} {moment:%H:%M}"
    else:
        shown = f"{moment:%Y-%m-%d %H:%M}"
    return (
        f'<time datetime="{moment:%Y-%m-%dT%H:%M:%SZ}" title="{moment:%Y-%m-%d %H:%M:%S} UTC">'
        f"{shown} UTC</time>"
    )


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{format_duration(seconds)} ago"


def _table(head: list[str], rows: list[list[str]], empty: str, *, name: str) -> str:
    if not rows:
        return f'<p class="muted" data-name="{_e(name)}">{_e(empty)}</p>'
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table data-name="{_e(name)}"><tr>{cells}</tr>{body}</table></div>'


def _state(state: Any) -> str:
    good = state in ("ok", "running", "finished", "scoring", "yes")
    return f'<span class="{"good" if good else "bad"}">{_e(state)}</span>'


def destination_alarms(
    destinations: Mapping[str, DestinationReport | LiveDestination], *, now: float | None = None
) -> str:
    """What an operator must act on about shipping: a destination that refuses the backlog (its
    cursor is held) and another journal shipping under this appliance's id."""
    lines = []
    for name, d in destinations.items():
        if d.get("refused"):
            lines.append(
                f"<p><strong>{_e(name)} refuses the backlog</strong> (since "
                f"{when(d.get('refused_since'), now)}; nothing more ships there until it is resolved): "
                f"{_e(d['refused'])}</p>"
            )
        collision = d.get("collision")
        if collision:
            lines.append(
                f"<p><strong>Another journal ships under this appliance id</strong> "
                f"({_e(name)}: {_e(', '.join(collision.get('journals', [])))}): "
                f"{_e(collision.get('detail'))}</p>"
            )
    return "".join(lines)


def _drift(drift: dict[str, Any] | None) -> str:
    """A source's drift badge: `drift` with the drifting quantities and their PSI, `ok`, or a
    muted state while there is nothing to compare yet (`reference`, `waiting`, `off`)."""
    if not drift:
        return _e(None)
    state = drift.get("state")
    if state == "drift":
        drifting = ", ".join(
            f"{name} {q['psi']}"
            for name, q in (drift.get("quantities") or {}).items()
            if q.get("state") == "drift"
        )
        return f'<span class="bad" title="since {_e(drift.get("since"))}">drift</span> ' + _e(
            drifting
        )
    return _state(state) if state == "ok" else f'<span class="muted">{_e(state)}</span>'


def _model_row(name: str, package: dict[str, Any], now: float) -> list[str]:
    """One package: its versions, its canary (running, or how the last one ended) and watch."""
    canary = package.get("canary") or {}
    watch = package.get("watch") or {}
    state = canary.get("state")
    if state:
        good = state in ("running", "passed")
        why = canary.get("reason") or ""
        shown = (
            f'<span class="{"good" if good else "bad"}" title="{_e(why)}">{_e(state)}</span> '
            + _e(canary.get("version"))
        )
    else:
        shown = _e(None)
    until = canary.get("ends_at") if state == "running" else watch.get("until")
    watch_state = watch.get("state")
    if watch_state:
        bad = watch_state in ("rolled_back", "rollback_failed")
        title = watch.get("detail") or ""
        watch_shown = (
            f'<span class="{"bad" if bad else "good"}" title="{_e(title)}">{_e(watch_state)}'
            f"</span> {_e(watch.get('version'))}"
        )
    else:
        watch_shown = _e(None)
    return [
        _e(name),
        _e(package.get("active")),
        _e(package.get("previous")),
        shown,
        _e(canary.get("agreement")),
        _e(canary.get("latency_ratio")),
        _e(canary.get("error_rate")),
        _e(canary.get("frames")),
        when(until, now),
        watch_shown,
    ]


# --------------------------------------------------------------------------------- alarms

_SEVERITIES = ("critical", "warning")


def _alarm_value(value: float | str | None) -> str:
    return "" if value is None else f" &middot; last value {_e(number(value))}"


def render_alarms(alarms: Sequence[AlarmReport], *, now: float) -> str:
    """The active alarms, most severe first as the report orders them: each with its severity in
    words (never colour alone), source, what, since when and its last value; "No active
    alarms" when there are none, so the section is always where the eye expects it."""
    if not alarms:
        items = '<p class="muted">No active alarms</p>'
    else:
        rows = []
        for alarm in alarms:
            severity = alarm["severity"]
            shade = severity if severity in _SEVERITIES else "warning"
            rows.append(
                f'<li class="alarm-item {shade}" data-alarm="{_e(alarm["id"])}" '
                f'data-severity="{_e(severity)}">'
                f'<span class="severity">{_e(severity.upper())}</span> '
                f'<strong class="alarm-source">{_e(alarm["source"])}</strong> '
                f'<span class="alarm-what">{_e(alarm["what"])}</span>'
                f'<span class="alarm-meta">{_e(alarm["kind"])} &middot; since '
                f"{when(alarm['since'], now)}{_alarm_value(alarm['value'])}</span></li>"
            )
        items = f'<ul class="alarm-list">{"".join(rows)}</ul>'
    return (
        '<section class="alarms" data-name="alarms" aria-labelledby="alarms-title">'
        f'<h2 id="alarms-title">Active alarms</h2>{items}</section>'
    )


def _status_strip(report: StatusReport) -> str:
    """The appliance's own health and the machine's alarms side by side but apart: an alarm is
    about the machine watched or the link, the health about this box (docs/status-api.md)."""
    alarms = report["alarms"]
    critical = sum(1 for alarm in alarms if alarm["severity"] == "critical")
    if not alarms:
        count, shade = "no alarms", "none"
    else:
        count = f"{len(alarms)} alarm{'' if len(alarms) == 1 else 's'}"
        count += f", {critical} critical" if critical else ""
        shade = "critical" if critical else "warning"
    daemon = report["daemon"]
    reasons = f" ({_e(', '.join(report['reasons']))})" if report["reasons"] else ""
    return (
        '<div class="strip">'
        f'<p class="alarm-count {shade}" data-name="alarm-count">'
        f'<span class="label">Alarms</span> <strong>{_e(count)}</strong></p>'
        f'<p class="health" data-name="summary"><span class="label">Appliance</span> '
        f"{_state(report['state'])}{reasons} &middot; up {_e(format_duration(report['uptime_s']))}"
        f" &middot; pid {_e(daemon.get('pid'))}</p></div>"
    )


def _journal_check(journal: JournalHealth | None, now: float) -> str:
    """How the last run stopped and what the journal's integrity check found (a background
    check after an unclean stop, docs/operations.md)."""
    if not journal or "integrity" not in journal:
        return ""
    check = journal["integrity"]
    words = describe("integrity_check", {**check, "last_stop": journal["last_stop"]})
    shown = (
        f'<strong class="bad">{_e(words)}</strong>'
        if check["state"] in ("failed", "error")
        else _e(words)
    )
    ended = f" ({when(check['checked_at'], now)})" if check["checked_at"] else ""
    return f'<p data-name="journal-check">Integrity: {shown}{ended}</p>'


# ------------------------------------------------------------------------------ the page


def _thumbnail(url: str, what: str) -> str:
    # A thumbnail is a link to the image itself: a tap opens it full size.
    return (
        f'<a class="thumb" href="{_e(url)}" target="_blank" rel="noopener" '
        f'title="open full size"><img src="{_e(url)}" alt="snapshot: {_e(what)}" '
        'loading="lazy"></a>'
    )


def _video(payload: Mapping[str, Any], what: str, poster: str | None) -> str:
    """A clip that plays in place. Only its index is fetched until it plays (preload="metadata",
    then Range requests); `data-clip` lets the page's script keep a playing clip playing when
    the live fragment around it is replaced."""
    url = _e(payload["url"])
    shown = f' poster="{_e(poster)}"' if poster else ""
    return (
        f'<span class="clip"><video data-clip="{_e(payload["sha256"])}" src="{url}" controls '
        f'preload="metadata" playsinline{shown} aria-label="clip: {_e(what)}">'
        f'<a href="{url}">download the clip</a></video></span>'
    )


def _entry_snapshots(body: Any, snapshots: Mapping[int, list[str]]) -> list[str]:
    """The snapshots of the zone entries a clip covers, as far as they are on the page."""
    entries = body.get("entries") if isinstance(body, Mapping) else None
    urls: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        seq = entry.get("seq") if isinstance(entry, Mapping) else None
        if isinstance(seq, int):
            urls += [url for url in snapshots.get(seq, []) if url not in urls]
    return urls


def _event_media(event: Mapping[str, Any], what: str, snapshots: Mapping[int, list[str]]) -> str:
    """An event's images as thumbnails; a clip's video beside the snapshots of its entries."""
    served = [p for p in event["payloads"] if p["url"]]
    videos = [p for p in served if str(p["media_type"]).startswith("video/")]
    images = [str(p["url"]) for p in served if p not in videos]
    if videos:
        images += [u for u in _entry_snapshots(event["body"], snapshots) if u not in images]
    poster = images[0] if images else None
    return "".join(_thumbnail(url, what) for url in images) + "".join(
        _video(p, what, poster) for p in videos
    )


def _event_rows(events: list[dict[str, Any]], now: float) -> list[list[str]]:
    snapshots = {
        int(event["seq"]): [
            str(p["url"])
            for p in event["payloads"]
            if p["url"] and str(p["media_type"]).startswith("image/")
        ]
        for event in events
    }
    rows = []
    for event in events:
        what = describe(event["kind"], event["body"])
        images = _event_media(event, what, snapshots)
        priority = event["priority"]
        rows.append(
            [
                when(event["ts"], now),
                f'<span class="bad">{_e(priority)}</span>' if priority == "alert" else _e(priority),
                _e(event["source"]),
                _e(event["kind"]),
                f'<span class="what">{_e(what)}</span>{images}',
            ]
        )
    return rows


def render_live(
    report: StatusReport, events: list[dict[str, Any]], history: History, *, now: float
) -> str:
    """The part of the page that updates (the stream, or /partial when polling): the alarm
    count beside the appliance's health, the active alarms, then every figure, escaped, and
    the charts."""
    daemon = report["daemon"]
    parts = [_status_strip(report), render_alarms(report["alarms"], now=now)]
    parts.append("<h2>Last 24 hours</h2>")
    parts.append(
        render_charts(
            history.samples(), now=now, gap_s=history.gap_s, interval_s=history.interval_s
        )
    )
    sources = [
        [
            _e(name),
            _state(s["state"]),
            _e(s["windows"]),
            _e(s.get("windows_per_s")),
            _e(_age(s["last_reading_age_s"])),
            _e(s["reconnects"]),
            _e(s["bad_values"]),
            _e(s["readings_dropped"]),
            # The stage's state, and its refit's while one runs (e.g. "scoring, refit canary").
            _e(
                ", refit ".join(
                    str(state)
                    for state in (
                        (s.get("anomaly") or {}).get("state"),
                        ((s.get("anomaly") or {}).get("refit") or {}).get("state"),
                    )
                    if state not in (None, "idle")
                )
                or None
            ),
            _drift(s.get("drift")),
            _e(s["error"] or ""),
        ]
        for name, s in daemon["sources"].items()
        if name not in daemon["cameras"]
    ]
    parts.append("<h2>Sources</h2>")
    parts.append(
        _table(
            [
                "source",
                "state",
                "windows",
                "per s",
                "last reading",
                "reconnects",
                "bad values",
                "dropped",
                "anomaly",
                "drift",
                "error",
            ],
            sources,
            "no sources",
            name="sources",
        )
    )
    cameras = []
    for name, cam in daemon["cameras"].items():
        latency = cam.get("latency_ms") or {}
        pipeline = cam.get("pipeline") or {}
        cameras.append(
            [
                _e(name),
                _state(cam.get("state")),
                _e(f"{cam.get('fps', 0.0):.1f}"),
                _e(_age(cam.get("last_frame_age_s"))),
                _e(cam.get("reconnects")),
                _e(cam.get("frames_dropped")),
                _e(cam.get("model")),
                _e(f"{latency.get('p50') or 0:.0f} / {latency.get('p95') or 0:.0f} ms"),
                _e(pipeline.get("skipped_motion")),
                _drift(cam.get("drift")),
            ]
        )
    parts.append("<h2>Cameras</h2>")
    parts.append(
        _table(
            [
                "camera",
                "state",
                "fps",
                "last frame",
                "reconnects",
                "drops",
                "model",
                "p50 / p95",
                "motion skipped",
                "drift",
            ],
            cameras,
            "no cameras",
            name="cameras",
        )
    )
    packages = (daemon.get("models") or {}).get("packages") or {}
    if packages:
        parts.append("<h2>Models</h2>")
        parts.append(
            _table(
                [
                    "package",
                    "active",
                    "previous",
                    "canary",
                    "agreement",
                    "latency ratio",
                    "error rate",
                    "frames",
                    "until",
                    "watch",
                ],
                [_model_row(name, p, now) for name, p in packages.items()],
                "no model packages",
                name="models",
            )
        )
    disk = report["disk"]
    parts.append("<h2>Journal</h2>")
    parts.append(
        f"<p>{_e(report['records']['total'])} records; disk {_e(format_size(disk['used_bytes']))} "
        f"of {_e(format_size(disk['budget_bytes']))} budget; file system free "
        f"{_e(format_size(disk['fs_free_bytes']))}; oldest unsynced "
        f"{_e(_age(report['oldest_unsynced_age_s']))}</p>"
    )
    parts.append(_journal_check(daemon.get("journal"), now))
    parts.append(
        _table(
            ["priority", "records", "unsynced"],
            [
                [_e(p), _e(n), _e(report["unsynced"][p]["records"])]
                for p, n in report["records"]["by_priority"].items()
            ],
            "no records",
            name="records",
        )
    )
    parts.append(
        _table(
            ["evicted", "reason", "records"],
            [[_e(x["priority"]), _e(x["reason"]), _e(x["records"])] for x in report["evictions"]],
            "no evictions",
            name="evictions",
        )
    )
    parts.append(
        _table(
            ["rolled up", "per", "records", "into", "bytes saved"],
            [
                [
                    _e(x["of"]),
                    _e(f"{x['resolution_s']} s"),
                    _e(x["records"]),
                    _e(x["rollups"]),
                    _e(format_size(x["bytes_before"] - x["bytes_after"])),
                ]
                for x in report["rollups"]
            ],
            "no rollups (storage.tiers)",
            name="rollups",
        )
    )
    parts.append(
        _table(
            ["dropped", "reason", "records"],
            [[_e(x["priority"]), _e(x["reason"]), _e(x["records"])] for x in report["drops"]],
            "no drops",
            name="drops",
        )
    )
    parts.append(
        _table(
            ["data quality", "reason", "count"],
            [[_e(x["source"]), _e(x["reason"]), _e(x["count"])] for x in report["data_quality"]],
            "no bad data counted",
            name="data-quality",
        )
    )
    alarms = destination_alarms(report["destinations"], now=now)
    if alarms:
        parts.append(f'<div class="alarm" data-name="sync-alarms">{alarms}</div>')
    parts.append("<h2>Destinations</h2>")
    destinations = []
    for name, d in report["destinations"].items():
        backlog = ", ".join(
            f"{p} {b['records']} ({format_size(b['bytes'])})" for p, b in d["backlog"].items()
        )
        budget = d["daily_payload_budget"]
        today = format_size(d.get("payload_bytes_today") or 0)
        destinations.append(
            [
                _e(name),
                _state({True: "yes", False: "no", None: "unknown"}[d["reachable"]]),
                _e(backlog),
                _e(d["payloads_waiting"]),
                when(d["last_success"], now),
                _e(today if not budget else f"{today} of {format_size(budget)}"),
                _e(None if d["eta_s"] is None else format_duration(d["eta_s"])),
                _e(d.get("refused") or d["last_error"] or ""),
            ]
        )
    parts.append(
        _table(
            [
                "destination",
                "reachable",
                "backlog",
                "payloads",
                "last success",
                "today",
                "ETA",
                "last error",
            ],
            destinations,
            "no destinations configured",
            name="destinations",
        )
    )
    parts.append("<h2>Recent events and alerts</h2>")
    rows = _event_rows(events, now)
    parts.append(
        _table(["time", "priority", "source", "kind", "what"], rows, "no events yet", name="events")
    )
    return "\n".join(parts)


def _sync_section(report: StatusReport, *, token_configured: bool) -> str:
    """ "Sync now": the form when a token is configured, with where the token is; otherwise no
    form (it could only be refused) but how to enable it."""
    if not token_configured:
        return (
            '<p data-name="sync-help">"Sync now" needs the status token, and this appliance '
            "has none configured. To enable it, put one line of at least 16 characters, without "
            "spaces, in a file, name that file as <code>status.token_file</code> under "
            "<code>status:</code> in the config, and restart the appliance "
            "(docs/status-api.md). Until then, <code>appliance sync --now</code> on the "
            "appliance itself ships the backlog at once.</p>"
        )
    options = "".join(
        f'<option value="{_e(name)}">{_e(name)}</option>' for name in report["destinations"]
    )
    return f"""<form id="sync-form">
<label>token <input name="token" type="password" autocomplete="current-password"></label>
<label>destination <select name="destination"><option value="">all</option>{options}</select></label>
<button type="submit">Sync now</button>
</form>
<p class="muted" data-name="sync-help">The token is the text in the file that
<code>status.token_file</code> names in the appliance's config.</p>
<p id="sync-result" class="muted" role="status"></p>"""


def render_page(
    report: StatusReport,
    events: list[dict[str, Any]],
    history: History,
    *,
    now: float,
    token_configured: bool = True,
) -> str:
    """The whole page: no build step, one stylesheet and one script from this server.
    `token_configured`: whether `status.token_file` gives a token ("Sync now" needs one)."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(report["appliance_id"])} status</title>
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header><h1>{_e(report["appliance_id"])}</h1><p class="muted">version {_e(report["version"])}</p></header>
<main id="live" data-updates="none">
{render_live(report, events, history, now=now)}
</main>
<section>
<h2>Sync now</h2>
{_sync_section(report, token_configured=token_configured)}
<noscript><p>Live updates and "Sync now" need JavaScript; /api/status works without.</p></noscript>
</section>
</body>
</html>
"""


__all__ = [
    "SCRIPT",  # served by web.py as /app.js and /app.css, kept in assets.py
    "STYLE",
    "destination_alarms",
    "render_alarms",
    "render_charts",
    "render_live",
    "render_page",
    "when",
]
