"""Owns the status page's HTML: the page and its live fragment, rendered on the server from an
`/api/status` report, the recent events and the 24-hour history (inline SVG charts), plus the
page's one script and one style sheet. Every value is escaped here; no external resource, no
inline script or style (the CSP forbids them)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.status.history import WINDOW_S, History, Sample
from appliance.status.schema import DestinationReport, LiveDestination, StatusReport
from config.units import format_duration, format_size


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


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


def destination_alarms(destinations: Mapping[str, DestinationReport | LiveDestination]) -> str:
    """What an operator must act on about shipping: a destination that refuses the backlog (its
    cursor is held) and another journal shipping under this appliance's id."""
    lines = []
    for name, d in destinations.items():
        if d.get("refused"):
            lines.append(
                f"<p><strong>{_e(name)} refuses the backlog</strong> (since "
                f"{_e(d.get('refused_since'))}; nothing more ships there until it is resolved): "
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


def _model_row(name: str, package: dict[str, Any]) -> list[str]:
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
        _e(until),
        watch_shown,
    ]


# ---------------------------------------------------------------------------------- charts

# The drawing's own units; the SVG scales to its column (viewBox), text included: 12 units of
# text are about 10 px on a phone (400 units across ~360 px) and 17 px in a desktop column.
_WIDTH, _HEIGHT = 400, 136
_LEFT, _RIGHT, _TOP, _BOTTOM = 2.0, 398.0, 18.0, 116.0
# At most this many points per line: a day of minute samples would otherwise send 1440 points
# per series with every live update, far more than a phone's width can show.
_SLOTS = 200
_SERIES_CLASSES = 6  # s0..s5 in the style sheet, reused in turn beyond that


@dataclass(frozen=True, slots=True)
class _Series:
    label: str
    points: list[tuple[float, float | None]]  # (Unix time, value); None: not known then

    @property
    def latest(self) -> float | None:
        return next((v for _, v in reversed(self.points) if v is not None), None)


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.1f}"


def _segments(
    points: list[tuple[float, float | None]], start: float, span: float, gap_s: float
) -> list[list[tuple[float, float]]]:
    """The line's pieces: broken where a value is unknown or samples are further apart than
    `gap_s` (the daemon was down); within a piece, the highest value of each of _SLOTS time
    slots, so a short peak still shows."""
    pieces: list[list[tuple[float, float]]] = []
    piece: list[tuple[float, float]] = []
    slot_of_last = -1
    previous_t: float | None = None
    for t, value in points:
        if t < start:
            continue
        broken = value is None or (previous_t is not None and t - previous_t > gap_s)
        previous_t = t
        if broken and piece:
            pieces.append(piece)
            piece, slot_of_last = [], -1
        if value is None:
            continue
        slot = min(_SLOTS - 1, int((t - start) / span * _SLOTS))
        if slot == slot_of_last:
            if value > piece[-1][1]:
                piece[-1] = (t, value)
        else:
            piece.append((t, value))
            slot_of_last = slot
    if piece:
        pieces.append(piece)
    return pieces


def _path(series: _Series, start: float, span: float, top: float, gap_s: float) -> str:
    commands = []
    for piece in _segments(series.points, start, span, gap_s):
        coords = [
            (
                _LEFT + (t - start) / span * (_RIGHT - _LEFT),
                _BOTTOM - value / top * (_BOTTOM - _TOP),
            )
            for t, value in piece
        ]
        x, y = coords[0]
        commands.append(f"M{x:.1f} {y:.1f}")
        commands.extend(f"L{x:.1f} {y:.1f}" for x, y in coords[1:])
        if len(coords) == 1:
            commands.append("h0")  # a lone sample: the round line cap draws it as a dot
    return "".join(commands)


def _chart(
    name: str, caption: str, unit: str, series: list[_Series], *, now: float, gap_s: float
) -> str:
    times = [t for s in series for t, _ in s.points]
    first = min(times)
    # The axis spans the history there is, up to 24 h, so a young appliance's charts are not a
    # sliver at the right edge.
    span = min(WINDOW_S, max(now - first, gap_s))
    start = now - span
    values = [v for s in series for t, v in s.points if v is not None and t >= start]
    highest = max(values, default=0.0)
    top = highest if highest > 0 else 1.0
    since = "24 h ago" if span >= WINDOW_S * 0.99 else f"{format_duration(span)} ago"
    now_parts = [
        f"{s.label} {'unknown' if s.latest is None else _number(s.latest)}" for s in series
    ]
    summary = (
        f"{caption}, {unit}, from {since} to now: highest {_number(highest)}; "
        f"now {', '.join(now_parts)}."
    )
    lines = "".join(
        f'<path class="line s{index % _SERIES_CLASSES}" fill="none" '
        f'd="{_path(s, start, span, top, gap_s)}"><title>{_e(s.label)}</title></path>'
        for index, s in enumerate(series)
    )
    legend = "".join(
        f'<li><span class="swatch s{index % _SERIES_CLASSES}"></span>{_e(s.label)}'
        f' <span class="muted">{"-" if s.latest is None else _e(_number(s.latest))}</span></li>'
        for index, s in enumerate(series)
    )
    return (
        f'<figure class="chart" data-name="{_e(name)}">'
        f'<figcaption>{_e(caption)} <span class="muted">({_e(unit)})</span></figcaption>'
        f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" width="100%" role="img" '
        f'aria-label="{_e(summary)}" preserveAspectRatio="xMidYMid meet">'
        f"<title>{_e(summary)}</title>"
        f'<line class="grid" x1="{_LEFT}" y1="{_TOP}" x2="{_RIGHT}" y2="{_TOP}"/>'
        f'<line class="axis" x1="{_LEFT}" y1="{_BOTTOM}" x2="{_RIGHT}" y2="{_BOTTOM}"/>'
        f'<text class="label" x="{_LEFT}" y="{_TOP - 4}">{_e(_number(highest))} {_e(unit)}</text>'
        f'<text class="label" x="{_LEFT}" y="{_HEIGHT - 4}">{_e(since)}</text>'
        f'<text class="label" x="{_RIGHT}" y="{_HEIGHT - 4}" text-anchor="end">now</text>'
        f"{lines}</svg>"
        f'<ul class="legend">{legend}</ul></figure>'
    )


def render_charts(samples: Sequence[Sample], *, now: float, gap_s: float, interval_s: float) -> str:
    """Backlog per destination and throughput (journalled, acknowledged) over the last 24 h,
    as inline SVG with a text alternative; the same series as `GET /api/history`."""
    if not samples:
        return (
            '<p class="muted" data-name="charts">No history yet: a sample is taken every '
            f"{_e(format_duration(interval_s))}.</p>"
        )
    destinations = sorted({name for s in samples for name in s.destinations})
    parts = []
    if destinations:
        backlog = [
            _Series(
                name,
                [
                    (s.t, float(d.backlog_records) if (d := s.destinations.get(name)) else None)
                    for s in samples
                ],
            )
            for name in destinations
        ]
        parts.append(_chart("backlog", "Backlog", "records waiting", backlog, now=now, gap_s=gap_s))
    throughput = [_Series("journalled", [(s.t, s.journalled_per_min) for s in samples])]
    throughput += [
        _Series(
            f"acknowledged by {name}",
            [(s.t, d.acked_per_min if (d := s.destinations.get(name)) else None) for s in samples],
        )
        for name in destinations
    ]
    parts.append(
        _chart("throughput", "Throughput", "records/min", throughput, now=now, gap_s=gap_s)
    )
    return '<div class="charts">' + "".join(parts) + "</div>"


# ------------------------------------------------------------------------------ the page


def render_live(
    report: StatusReport, events: list[dict[str, Any]], history: History, *, now: float
) -> str:
    """The part of the page that updates (the stream, or /partial when polling): every figure,
    escaped, and the charts."""
    daemon = report["daemon"]
    parts = [
        f'<p data-name="summary">{_state(report["state"])} '
        + (_e(", ".join(report["reasons"])) if report["reasons"] else "")
        + f" &middot; up {_e(format_duration(report['uptime_s']))} &middot; pid {_e(daemon['pid'])}</p>"
    ]
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
                [_model_row(name, p) for name, p in packages.items()],
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
    alarms = destination_alarms(report["destinations"])
    if alarms:
        parts.append(f'<div class="alarm" role="alert" data-name="sync-alarms">{alarms}</div>')
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
                _e(d["last_success"]),
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
    rows = []
    for event in events:
        summary = json.dumps(event["body"], separators=(",", ":"))
        images = "".join(
            f'<img src="{_e(p["url"])}" alt="snapshot" loading="lazy">'
            for p in event["payloads"]
            if p["url"]
        )
        rows.append(
            [
                _e(event["ts"]),
                _e(event["priority"]),
                _e(event["source"]),
                _e(event["kind"]),
                f"<code>{_e(summary[:200])}</code>{images}",
            ]
        )
    parts.append(
        _table(["time", "priority", "source", "kind", "what"], rows, "no events yet", name="events")
    )
    return "\n".join(parts)


def render_page(
    report: StatusReport, events: list[dict[str, Any]], history: History, *, now: float
) -> str:
    """The whole page: no build step, one stylesheet and one script from this server."""
    options = "".join(
        f'<option value="{_e(name)}">{_e(name)}</option>' for name in report["destinations"]
    )
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
<form id="sync-form">
<label>token <input name="token" type="password" autocomplete="current-password"></label>
<label>destination <select name="destination"><option value="">all</option>{options}</select></label>
<button type="submit">Sync now</button>
</form>
<p id="sync-result" class="muted"></p>
<noscript><p>Live updates and "Sync now" need JavaScript; /api/status works without.</p></noscript>
</section>
</body>
</html>
"""


# Live updates come from the event stream; when the browser has no EventSource, or the stream
# fails three times in a row without delivering (a proxy that buffers, a server that refuses),
# the page falls back to fetching /partial every 3 s. `data-updates` on #live says which
# ("stream", "polling"), for a person looking at the DOM and for the browser tests.
SCRIPT = """"use strict";
(function () {
  const live = document.getElementById("live");
  let polling = null;
  function show(html) {
    live.innerHTML = html;
    live.classList.remove("stale");
  }
  async function refresh() {
    try {
      const response = await fetch("/partial", { cache: "no-store", credentials: "same-origin" });
      if (response.ok) {
        show(await response.text());
      } else {
        live.classList.add("stale");
      }
    } catch (error) {
      live.classList.add("stale");
    }
  }
  function poll() {
    if (polling === null) {
      live.dataset.updates = "polling";
      polling = setInterval(refresh, 3000);
      refresh();
    }
  }
  if (typeof EventSource === "function") {
    const stream = new EventSource("/api/stream");
    let failures = 0;
    stream.addEventListener("live", (event) => {
      failures = 0;
      live.dataset.updates = "stream";
      show(event.data);
    });
    stream.addEventListener("error", () => {
      live.classList.add("stale");
      failures += 1;
      if (stream.readyState === EventSource.CLOSED || failures >= 3) {
        stream.close();
        poll();
      }
    });
  } else {
    poll();
  }
  const form = document.getElementById("sync-form");
  const result = document.getElementById("sync-result");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const destination = form.elements.destination.value;
    const url = "/api/sync" + (destination ? "?destination=" + encodeURIComponent(destination) : "");
    const token = form.elements.token.value;
    // Without a token the request still goes out, so the server's answer says what is needed.
    const headers = token ? { Authorization: "Bearer " + token } : {};
    result.textContent = "asking...";
    try {
      const response = await fetch(url, { method: "POST", credentials: "same-origin", headers });
      const text = await response.text();
      result.textContent = response.status === 202 ? "sync started" : "refused (" + response.status + "): " + text;
      result.className = response.status === 202 ? "good" : "bad";
    } catch (error) {
      result.textContent = "failed: " + error;
      result.className = "bad";
    }
  });
})();
"""

STYLE = """body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 0.5rem 1rem;
  max-width: 70rem; line-height: 1.4; }
h1 { font-size: 1.4rem; margin-bottom: 0; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 0.4rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; margin-bottom: 0.5rem; }
th, td { text-align: left; padding: 0.2rem 0.5rem; border-bottom: 1px solid #ddd;
  vertical-align: top; }
code { font-size: 0.8rem; word-break: break-all; }
/* Wide enough to read: on a phone the table scrolls sideways instead of growing tall. */
td code { display: block; min-width: 16rem; }
img { display: block; max-width: 10rem; margin-top: 0.3rem; }
.good { color: #176f2c; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.alarm { border: 2px solid #b3261e; background: #fdecea; padding: 0 0.8rem; margin: 0.8rem 0; }
.muted { color: #666; font-weight: normal; }
.stale { opacity: 0.5; }
form { display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: center; }
input, select, button { font-size: 1rem; padding: 0.3rem; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(18rem, 1fr)); gap: 1rem; }
.chart { margin: 0; }
.chart figcaption { font-size: 0.9rem; font-weight: 600; }
.chart svg { display: block; width: 100%; height: auto; }
.chart .axis { stroke: #888; stroke-width: 1; }
.chart .grid { stroke: #ddd; stroke-width: 1; stroke-dasharray: 4 3; }
.chart .label { font-size: 12px; fill: #555; }
.chart .line { fill: none; stroke-width: 1.8; stroke-linecap: round; stroke-linejoin: round; }
.legend { list-style: none; padding: 0; margin: 0.2rem 0 0; display: flex; flex-wrap: wrap;
  gap: 0.2rem 1rem; font-size: 0.8rem; }
.swatch { display: inline-block; width: 0.8rem; height: 0.25rem; margin-right: 0.3rem;
  vertical-align: middle; }
.line.s0 { stroke: #1f6feb; } .swatch.s0 { background: #1f6feb; }
.line.s1 { stroke: #d9480f; } .swatch.s1 { background: #d9480f; }
.line.s2 { stroke: #2b8a3e; } .swatch.s2 { background: #2b8a3e; }
.line.s3 { stroke: #862e9c; } .swatch.s3 { background: #862e9c; }
.line.s4 { stroke: #c2255c; } .swatch.s4 { background: #c2255c; }
.line.s5 { stroke: #5c940d; } .swatch.s5 { background: #5c940d; }
@media (max-width: 40rem) { th, td { padding: 0.2rem; font-size: 0.8rem; } }
"""
