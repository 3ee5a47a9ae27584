"""Owns the fleet view's HTML (receiver/fleet.py serves it): the fleet page, one appliance's
page, the refusal page and the style sheet. Server-rendered, no script, nothing from elsewhere:
the Content-Security-Policy allows only this receiver's style sheet, images and clips. Every
value an appliance sent is escaped."""

from __future__ import annotations

import json
from collections.abc import Iterable
from html import escape
from typing import Any
from urllib.parse import quote

REFRESH_S = 60

STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --bad: #c62828; --muted: #6b7280;
  --line: rgba(127, 127, 127, 0.3); }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 1rem; max-width: 80rem; }
h1 { font-size: 1.5rem; margin: 0 0 0.25rem; }
h2 { font-size: 1.15rem; margin: 1.5rem 0 0.5rem; }
.muted, .meta { color: var(--muted); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.35rem 0.6rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { font-weight: 600; }
.state-ok { color: var(--ok); }
.state-degraded { color: var(--bad); }
.state-unknown { color: var(--muted); }
.alerts { color: var(--bad); font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.25rem 1rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; }
code, pre { font: 13px/1.4 ui-monospace, monospace; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; max-height: 8rem;
  overflow: auto; }
.media { display: grid; grid-template-columns: repeat(auto-fill, minmax(16rem, 1fr));
  gap: 1rem; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 0.5rem; }
figure img, figure video { display: block; width: 100%; height: auto; border-radius: 4px; }
figcaption { font-size: 0.85rem; margin-top: 0.35rem; }
.missing { color: var(--muted); font-style: italic; }
a { color: inherit; }
"""


def format_bytes(value: int | None) -> str:
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _e(value: object) -> str:
    return escape("" if value is None else str(value))


def _page(title: str, body: str, *, refresh: bool = True) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{_e(title)}</title>"
        '<link rel="stylesheet" href="/fleet.css"></head>'
        f"<body>{body}</body></html>\n"
    )


def _state(summary: dict[str, Any]) -> str:
    state = str(summary["state"])
    css = state if state in ("ok", "degraded") else "unknown"
    return f'<span class="state state-{css}">{_e(state)}</span>'


def _backlog(summary: dict[str, Any]) -> str:
    if summary["backlog_records"] is None:
        return '<span class="muted">not reported</span>'
    return (
        f"{summary['backlog_records']} records, {_e(format_bytes(summary['backlog_bytes']))}"
        f' <span class="muted">({_e(format_age(summary["health_age_s"]))})</span>'
    )


def _link(appliance_id: str) -> str:
    return f"/fleet/{quote(appliance_id, safe='')}"


def render_fleet(appliances: list[dict[str, Any]], generated_at: str) -> str:
    """The fleet page: one row per appliance, the degraded ones counted at the top."""
    degraded = sum(1 for a in appliances if a["state"] == "degraded")
    alerting = sum(1 for a in appliances if a["alerts_24h"])
    rows = []
    for a in appliances:
        today = a["today"]
        alerts = a["alerts_24h"]
        rows.append(
            f'<tr data-appliance="{_e(a["appliance_id"])}">'
            f'<td><a href="{_link(a["appliance_id"])}">{_e(a["appliance_id"])}</a></td>'
            f"<td>{_state(a)}</td>"
            f'<td title="{_e(a["last_seen"])}">{_e(format_age(a["last_seen_age_s"]))}</td>'
            f"<td>{_backlog(a)}</td>"
            f'<td class="num">{today["records"]}</td>'
            f'<td class="num">{_e(format_bytes(today["payload_bytes"]))}</td>'
            f'<td class="num{" alerts" if alerts else ""}">{alerts}</td>'
            f"<td>{_e(a['version'] or '–')}</td>"
            f"<td>{_e(', '.join(a['models']) or '–')}</td></tr>"
        )
    table = (
        '<div class="scroll"><table data-name="appliances"><tr><th>Appliance</th><th>State</th>'
        "<th>Last seen</th><th>Backlog (as reported)</th><th class=num>Records today</th>"
        "<th class=num>Payloads today</th><th class=num>Alerts 24 h</th><th>Version</th>"
        f"<th>Models</th></tr>{''.join(rows)}</table></div>"
        if rows
        else '<p class="muted">No appliance has shipped anything to this receiver yet.</p>'
    )
    body = (
        "<header><h1>Fleet</h1>"
        f'<p class="meta">{len(appliances)} appliances, {degraded} degraded, {alerting} with '
        f"alerts in the last 24 h. Figures at {_e(generated_at)} (today is the UTC day, by "
        "arrival).</p></header>"
        f"<main>{table}</main>"
    )
    return _page("Fleet", body)


def _payload(ref: dict[str, Any], kind: object) -> str:
    size = format_bytes(ref["size"])
    if not ref["stored"]:
        return f'<span class="missing">{_e(ref["sha256"][:12])}: not received yet</span>'
    url, media_type = _e(ref["url"]), str(ref["media_type"])
    alt = f"{kind} {ref['sha256'][:12]}"
    if media_type.startswith("image/"):
        return f'<img src="{url}" alt="{_e(alt)}" loading="lazy">'
    if media_type == "video/mp4":
        return f'<video src="{url}" controls preload="metadata"></video>'
    return f'<a href="{url}" download>{_e(media_type)}, {_e(size)}</a>'


def _body(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return f"<pre>{_e(text[:600] + ('…' if len(text) > 600 else ''))}</pre>"


def _alert_rows(alerts: Iterable[dict[str, Any]]) -> str:
    rows = [
        f'<tr data-seq="{_e(a["seq"])}"><td>{_e(a["ts"])}</td><td>{_e(a["source"])}</td>'
        f"<td>{_e(a['kind'])}</td><td>{_body(a['body'])}</td>"
        f"<td>{' '.join(_payload(p, a['kind']) for p in a['payloads'])}</td></tr>"
        for a in alerts
    ]
    if not rows:
        return '<p class="muted">No alert records.</p>'
    return (
        '<div class="scroll"><table data-name="alerts"><tr><th>Time</th><th>Source</th>'
        f"<th>Kind</th><th>Body</th><th>Payloads</th></tr>{''.join(rows)}</table></div>"
    )


def _media(records: Iterable[dict[str, Any]]) -> str:
    figures = []
    for record in records:
        for ref in record["payloads"]:
            caption = (
                f"{_e(record['kind'])} from {_e(record['source'])}, {_e(record['ts'])}, "
                f"{_e(format_bytes(ref['size']))}"
            )
            figures.append(
                f'<figure data-kind="{_e(record["kind"])}">{_payload(ref, record["kind"])}'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    if not figures:
        return '<p class="muted">No snapshots or clips.</p>'
    return f'<div class="media">{"".join(figures)}</div>'


def render_appliance(
    summary: dict[str, Any],
    alerts: list[dict[str, Any]],
    media: list[dict[str, Any]],
    generated_at: str,
) -> str:
    """One appliance's page: what it last reported, then its recent alerts, snapshots and
    clips (newest first)."""
    a = summary
    backlog = a["backlog"]
    destinations = (
        "".join(
            f"<li>{_e(name)}: {d['records']} records ({_e(format_bytes(d['bytes']))}), "
            f"{d['payloads']} payloads ({_e(format_bytes(d['payload_bytes']))})"
            f"{', oldest ' + _e(d['oldest']) if d['oldest'] else ''}</li>"
            for name, d in backlog.items()
        )
        if backlog
        else ""
    )
    reasons = ", ".join(a["reasons"])
    facts = [
        ("State", f"{_state(a)}{' (' + _e(reasons) + ')' if reasons else ''}"),
        ("Last seen", f"{_e(format_age(a['last_seen_age_s']))} ({_e(a['last_seen'])})"),
        ("First seen", _e(a["first_seen"])),
        (
            "Last health record",
            _e(a["health_ts"]) if a["health_ts"] else '<span class="muted">none yet</span>',
        ),
        ("Version", _e(a["version"] or "–")),
        ("Models", _e(", ".join(a["models"]) or "–")),
        ("Backlog", _backlog(a) + (f"<ul>{destinations}</ul>" if destinations else "")),
        (
            "Today",
            f"{a['today']['records']} records, {a['today']['payloads']} payloads "
            f"({_e(format_bytes(a['today']['payload_bytes']))})",
        ),
        ("Alerts, last 24 h", str(a["alerts_24h"])),
        (
            "In all",
            f"{a['totals']['records']} records, {a['totals']['payloads']} payloads "
            f"({_e(format_bytes(a['totals']['payload_bytes']))})",
        ),
    ]
    facts_html = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    body = (
        f'<header><p><a href="/fleet">Fleet</a></p><h1>{_e(a["appliance_id"])}</h1>'
        f'<p class="meta">Figures at {_e(generated_at)}.</p></header>'
        f'<main><dl data-name="facts">{facts_html}</dl>'
        f"<h2>Recent alerts</h2>{_alert_rows(alerts)}"
        f"<h2>Snapshots and clips</h2>{_media(media)}</main>"
    )
    return _page(f"{a['appliance_id']}: fleet", body)


def render_refusal(status: int, error: str, detail: str) -> str:
    """What a page answers instead of itself (no token, a wrong one, an unknown appliance)."""
    body = (
        f"<main><h1>{_e(error.capitalize())}</h1><p>{_e(detail)}</p>"
        f'<p class="muted">HTTP {status}. <a href="/fleet">Fleet</a></p></main>'
    )
    return _page(error, body, refresh=False)


__all__ = [
    "STYLE",
    "format_age",
    "format_bytes",
    "render_appliance",
    "render_fleet",
    "render_refusal",
]
