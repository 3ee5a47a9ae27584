"""Owns the status page's charts: backlog per destination and throughput over the last 24 hours
as inline SVG (no chart library, nothing external: the CSP allows none), each with a text
alternative and a legend, drawn from the history's samples (`appliance.status.history`)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.status.history import WINDOW_S, Sample
from config.units import format_duration


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


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
