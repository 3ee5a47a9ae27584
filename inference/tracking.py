"""Tracking and zones: turns one camera's per-frame detections into tracked objects and their events.

Detections are matched to open tracks per class, greedily by overlap (IoU) against both the track's
last box and the box moved on by the track's velocity, then by centre distance for what is left (a
fast mover at a low frame rate may not overlap its last box at all). A track counts once it has
`min_hits` detections; it emits `started` then, `zone_entered` / `zone_left` as its anchor point
(bottom centre of the box: a person's feet) crosses zone borders, `improved` when a better
detection of it arrives, and `ended` when it has not been seen for `max_missed` seconds.

Updates may arrive irregularly: the motion gate skips frames in which nothing moved, so a gap
between updates is not evidence that an object left. A track is only ended at an update that
missed it, and only after at least two consecutive updates missed it (one missed detection after a
long gated pause is not enough to end an object that stood still through the pause).
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from config.cameras import TrackingSettings, Zone
from inference.detections import Detection
from sensors.base import Frame, mono_ns, utc_now

EventKind = Literal["started", "improved", "zone_entered", "zone_left", "ended"]
"""`started` and `improved` both mean: this frame is now the track's best view (keep a copy)."""

Point = tuple[float, float]

PATH_LENGTH = 50
"""Centres kept per track (the most recent ones)."""

MISSES_TO_END = 2
"""Consecutive updates that must miss a track, besides max_missed seconds, before it ends."""

ZONE_EXIT_UPDATES = 2
"""Consecutive updates the anchor must be outside a zone (beyond the margin) to leave it."""

ZONE_EXIT_MARGIN = 0.1
"""How far outside a zone the anchor must be to count as outside, as a share of the box height:
detectors jitter a box's bottom edge in proportion to its size, and this absorbs that jitter."""

SIZE_RATIO_LIMIT = 4.0
"""A distance match needs the two boxes' areas within this factor of each other."""

DEFAULT_MAX_TRACKS = 256
"""Bound on open tracks per camera; detections that would open more are dropped and counted."""


@dataclass(frozen=True, slots=True)
class TrackView:
    """An immutable copy of a track's state at the time of an event."""

    id: int  # per camera, from 1, increasing in the order tracks are confirmed
    label: str
    class_id: int
    first_ts: datetime
    first_mono_ns: int
    first_index: int
    last_ts: datetime  # when it was last detected
    last_mono_ns: int
    last_index: int
    hits: int  # detections matched to it
    last: Detection  # its most recent detection
    best: Detection  # its highest-scoring detection since it was confirmed
    best_ts: datetime
    best_mono_ns: int
    best_index: int  # frame index of `best`: the frame the caller kept on started/improved
    path: tuple[Point, ...]  # box centres in frame pixels, oldest first, at most PATH_LENGTH
    zones: tuple[str, ...]  # zones its anchor is inside now
    zones_visited: tuple[str, ...]  # every zone it entered, in order of first entry

    @property
    def duration_s(self) -> float:
        """Seconds from its first to its last detection (monotonic clock: immune to clock jumps)."""
        return (self.last_mono_ns - self.first_mono_ns) / 1e9

    @property
    def best_score(self) -> float:
        return self.best.score

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary (path and timestamps are left to the caller; records stay small)."""
        return {
            "track_id": self.id,
            "label": self.label,
            "class_id": self.class_id,
            "first_ts": self.first_ts.isoformat(),
            "last_ts": self.last_ts.isoformat(),
            "duration_s": round(self.duration_s, 3),
            "hits": self.hits,
            "best_score": round(self.best.score, 4),
            "best": self.best.as_dict(),
            "best_index": self.best_index,
            "zones": list(self.zones),
            "zones_visited": list(self.zones_visited),
        }


@dataclass(frozen=True, slots=True)
class TrackEvent:
    """Something that happened to a confirmed track, at one frame (or at shutdown for `ended`)."""

    kind: EventKind
    track: TrackView
    ts: datetime  # the frame's wall clock (or now, for end_all without a frame)
    mono_ns: int
    frame_index: int | None  # None when end_all was called without a frame
    zone: Zone | None = None  # for zone_entered and zone_left

    @property
    def keep_frame(self) -> bool:
        """The event's frame shows the track's best detection: the caller should copy it now."""
        return self.kind in ("started", "improved")

    def as_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"event": self.kind, **self.track.as_dict()}
        if self.zone is not None:
            body["zone"] = self.zone.name
        return body


@dataclass(slots=True)
class TrackerStats:
    """Counters for health and status."""

    updates: int = 0
    detections: int = 0
    started: int = 0
    ended: int = 0
    discarded: int = 0  # tentative tracks that never reached min_hits (flicker, noise)
    dropped_detections: int = 0  # detections that found no track and no room for a new one


@dataclass(slots=True)
class _ZoneState:
    inside: bool = False
    outside_updates: int = 0


@dataclass(frozen=True, slots=True)
class _Stamp:
    """When a frame was taken. Tracks keep these, never the Frame: that would pin its pixels."""

    ts: datetime
    mono_ns: int
    index: int

    @classmethod
    def of(cls, frame: Frame) -> _Stamp:
        return cls(frame.ts, frame.mono_ns, frame.index)


@dataclass(slots=True)
class _Track:
    key: int  # internal; the public id is only given on confirmation
    class_id: int
    label: str
    first: _Stamp
    last_frame: _Stamp
    last: Detection
    hits: int = 1
    misses: int = 0  # consecutive updates that did not see it
    id: int | None = None
    best: Detection | None = None
    best_frame: _Stamp | None = None
    velocity: Point = (0.0, 0.0)  # pixels per second, smoothed
    path: deque[Point] = field(default_factory=lambda: deque(maxlen=PATH_LENGTH))
    zones: dict[str, _ZoneState] = field(default_factory=dict)
    visited: list[str] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        return self.id is not None

    def predicted(self, at_ns: int, horizon_s: float) -> Detection:
        """The last box moved on by the velocity (over at most `horizon_s` seconds)."""
        dt = min(max(0.0, (at_ns - self.last_frame.mono_ns) / 1e9), horizon_s)
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        box = self.last
        return Detection(
            box.x1 + dx, box.y1 + dy, box.x2 + dx, box.y2 + dy, box.score, box.class_id, box.label
        )

    def view(self) -> TrackView:
        assert self.id is not None and self.best is not None and self.best_frame is not None
        best_frame = self.best_frame
        return TrackView(
            id=self.id,
            label=self.label,
            class_id=self.class_id,
            first_ts=self.first.ts,
            first_mono_ns=self.first.mono_ns,
            first_index=self.first.index,
            last_ts=self.last_frame.ts,
            last_mono_ns=self.last_frame.mono_ns,
            last_index=self.last_frame.index,
            hits=self.hits,
            last=self.last,
            best=self.best,
            best_ts=best_frame.ts,
            best_mono_ns=best_frame.mono_ns,
            best_index=best_frame.index,
            path=tuple(self.path),
            zones=tuple(name for name, state in self.zones.items() if state.inside),
            zones_visited=tuple(self.visited),
        )


@dataclass(frozen=True, slots=True)
class _ScaledZone:
    zone: Zone
    contour: npt.NDArray[np.float32]  # shape (n, 1, 2), frame pixels, as cv2 wants it


class Tracker:
    """Per-camera tracker. Feed it every frame the detector ran on, in order, with its detections.

    `frame_size` is (width, height) in pixels, to scale the zones' normalised polygons; a frame of
    another size (a stream that came back at another resolution) ends every open track and rescales
    the zones. Only frames' timestamps are kept, never their pixels.
    """

    def __init__(
        self,
        cfg: TrackingSettings,
        zones: list[Zone],
        frame_size: tuple[int, int],
        *,
        max_tracks: int = DEFAULT_MAX_TRACKS,
    ) -> None:
        if max_tracks < 1:
            raise ValueError(f"max_tracks must be at least 1, got {max_tracks}")
        names = [zone.name for zone in zones]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"zone names must be unique per camera; repeated: {duplicates}")
        for zone in zones:
            if abs(_polygon_area(zone.polygon)) <= 0.0:
                raise ValueError(f"zone {zone.name!r}: polygon {zone.polygon} encloses no area")
        self.cfg = cfg
        self.zones = list(zones)
        self.max_tracks = max_tracks
        self.stats = TrackerStats()
        self._max_missed_ns = round(cfg.max_missed * 1e9)
        self._tracks: list[_Track] = []
        self._next_key = 0
        self._next_id = 1
        self._last_mono_ns: int | None = None
        self._frame_size = (0, 0)
        self._scaled: list[_ScaledZone] = []
        self._scale_zones(_check_size(frame_size))

    @property
    def tracks(self) -> list[TrackView]:
        """The confirmed tracks open now."""
        return [track.view() for track in self._tracks if track.confirmed]

    @property
    def open_tracks(self) -> int:
        """Open tracks, confirmed or not (what `max_tracks` bounds)."""
        return len(self._tracks)

    def update(self, detections: list[Detection], frame: Frame) -> list[TrackEvent]:
        """Match one frame's detections to the tracks; return what happened, in order."""
        if self._last_mono_ns is not None and frame.mono_ns < self._last_mono_ns:
            raise ValueError(
                f"camera {frame.source!r} frame {frame.index}: updates must come in time order "
                f"(mono_ns {frame.mono_ns} is before the previous update's {self._last_mono_ns})"
            )
        for detection in detections:
            _check_detection(detection, frame)
        events: list[TrackEvent] = []
        if (frame.width, frame.height) != self._frame_size:
            # The stream came back at another resolution: old boxes mean nothing in the new one.
            events.extend(
                self._end_tracks(list(self._tracks), frame.ts, frame.mono_ns, frame.index)
            )
            self._scale_zones((frame.width, frame.height))
        self._last_mono_ns = frame.mono_ns
        self.stats.updates += 1
        self.stats.detections += len(detections)

        matches = self._match(detections, frame.mono_ns)
        matched_keys = {track.key for track, _ in matches}
        taken = {j for _, j in matches}
        unmatched = [d for j, d in enumerate(detections) if j not in taken]

        # Ends first: an id is closed before anything new happens in the same frame.
        expired: list[_Track] = []
        for track in self._tracks:
            if track.key in matched_keys:
                continue
            track.misses += 1
            unseen_ns = frame.mono_ns - track.last_frame.mono_ns
            if track.misses >= MISSES_TO_END and unseen_ns > self._max_missed_ns:
                expired.append(track)
        events.extend(self._end_tracks(expired, frame.ts, frame.mono_ns, frame.index))

        for track, j in matches:
            events.extend(self._observe(track, detections[j], frame))
        for detection in unmatched:
            if len(self._tracks) >= self.max_tracks:
                self.stats.dropped_detections += 1
                continue
            track = _Track(
                key=self._next_key,
                class_id=detection.class_id,
                label=detection.label,
                first=_Stamp.of(frame),
                last_frame=_Stamp.of(frame),
                last=detection,
            )
            self._next_key += 1
            self._tracks.append(track)
            track.path.append(detection.center)
            self._update_zones(track, detection)
            if track.hits >= self.cfg.min_hits:
                events.extend(self._confirm(track, detection, frame))
        return events

    def end_all(self, frame: Frame | None = None) -> list[TrackEvent]:
        """Close every open track (shutdown, end of a file): `zone_left` and `ended` events.

        Without a frame the events are stamped with the current clocks.
        """
        if frame is None:
            ts, now_ns, index = utc_now(), mono_ns(), None
        else:
            ts, now_ns, index = frame.ts, frame.mono_ns, frame.index
        return self._end_tracks(list(self._tracks), ts, now_ns, index)

    # ------------------------------------------------------------------ internals

    def _match(self, detections: list[Detection], now_ns: int) -> list[tuple[_Track, int]]:
        """Greedy matching, confirmed tracks before tentative ones, so noise never steals a box.

        The pairwise measures are numpy arrays: this runs on the event loop for every analysed
        frame, and a busy street has tens of tracks times tens of boxes."""
        horizon_s = self.cfg.max_missed
        free = set(range(len(detections)))
        matches: list[tuple[_Track, int]] = []
        found = _boxes(detections)
        found_classes = np.fromiter((d.class_id for d in detections), np.int64, len(detections))
        for confirmed in (True, False):
            tracks = [t for t in self._tracks if t.confirmed is confirmed]
            if not tracks or not free:
                continue
            columns = np.fromiter(sorted(free), np.intp, len(free))
            boxes = found[columns]
            last = _boxes([t.last for t in tracks])
            predicted = _boxes([t.predicted(now_ns, horizon_s) for t in tracks])
            same_class = (
                np.fromiter((t.class_id for t in tracks), np.int64, len(tracks))[:, None]
                == found_classes[columns][None, :]
            )
            # Overlap with the last box holds a still object; with the predicted one, a mover.
            overlap = np.maximum(_pairwise_iou(last, boxes), _pairwise_iou(predicted, boxes))
            overlapping = same_class & (overlap >= self.cfg.iou_threshold)
            # Else moved less than its own size: still the same object at a low frame rate.
            size = np.maximum(np.maximum(last[:, 2] - last[:, 0], last[:, 3] - last[:, 1]), 1.0)[
                :, None
            ]
            moved = (
                np.minimum(_pairwise_distance(last, boxes), _pairwise_distance(predicted, boxes))
                / size
            )
            near = same_class & ~overlapping & _pairwise_similar_size(last, boxes) & (moved < 1.0)
            # Higher overlap first; then shorter relative distance first.
            ranked = sorted(
                (-float(overlap[ti, c]), int(ti), int(columns[c]))
                for ti, c in zip(*np.nonzero(overlapping), strict=True)
            )
            close = sorted(
                (float(moved[ti, c]), int(ti), int(columns[c]))
                for ti, c in zip(*np.nonzero(near), strict=True)
            )
            taken: set[int] = set()
            for pool in (ranked, close):
                for _, ti, j in pool:
                    if ti in taken or j not in free:
                        continue
                    taken.add(ti)
                    free.discard(j)
                    matches.append((tracks[ti], j))
        return matches

    def _observe(self, track: _Track, detection: Detection, frame: Frame) -> list[TrackEvent]:
        dt = (frame.mono_ns - track.last_frame.mono_ns) / 1e9
        if dt > 0:
            (cx, cy), (px, py) = detection.center, track.last.center
            vx, vy = (cx - px) / dt, (cy - py) / dt
            if track.hits > 1:
                # Smoothed, so one jittery box does not throw the prediction far off.
                vx, vy = (vx + track.velocity[0]) / 2, (vy + track.velocity[1]) / 2
            track.velocity = (vx, vy)
        track.hits += 1
        track.misses = 0
        track.last = detection
        track.last_frame = _Stamp.of(frame)
        track.path.append(detection.center)
        changes = self._update_zones(track, detection)
        if not track.confirmed:
            if track.hits >= self.cfg.min_hits:
                return self._confirm(track, detection, frame)
            return []
        events: list[TrackEvent] = []
        assert track.best is not None
        if detection.score > track.best.score:
            track.best, track.best_frame = detection, _Stamp.of(frame)
            events.append(self._event("improved", track, frame))
        for scaled, entered in changes:
            kind: EventKind = "zone_entered" if entered else "zone_left"
            events.append(self._event(kind, track, frame, scaled.zone))
        return events

    def _confirm(self, track: _Track, detection: Detection, frame: Frame) -> list[TrackEvent]:
        # The best view is chosen from confirmation on: the caller copies frames only for tracks
        # that count, never for the noise that min_hits filters out.
        track.id = self._next_id
        self._next_id += 1
        track.best, track.best_frame = detection, _Stamp.of(frame)
        self.stats.started += 1
        events = [self._event("started", track, frame)]
        for scaled in self._scaled:
            state = track.zones.get(scaled.zone.name)
            if state is not None and state.inside:
                track.visited.append(scaled.zone.name)
                events.append(self._event("zone_entered", track, frame, scaled.zone))
        return events

    def _update_zones(self, track: _Track, detection: Detection) -> list[tuple[_ScaledZone, bool]]:
        """Move the track's zone states on; return (zone, entered?) for each crossing."""
        anchor = ((detection.x1 + detection.x2) / 2, detection.y2)
        margin = max(2.0, ZONE_EXIT_MARGIN * (detection.y2 - detection.y1))
        changes: list[tuple[_ScaledZone, bool]] = []
        for scaled in self._scaled:
            zone = scaled.zone
            if zone.classes and track.label not in zone.classes:
                continue
            state = track.zones.setdefault(zone.name, _ZoneState())
            # Signed distance to the border: positive inside, negative outside, 0 on it.
            distance = cv2.pointPolygonTest(scaled.contour, anchor, True)
            if not state.inside:
                if distance >= 0:
                    state.inside, state.outside_updates = True, 0
                    changes.append((scaled, True))
            elif distance < -margin:
                state.outside_updates += 1
                if state.outside_updates >= ZONE_EXIT_UPDATES:
                    state.inside, state.outside_updates = False, 0
                    changes.append((scaled, False))
            else:
                state.outside_updates = 0
        if track.confirmed:
            for scaled, entered in changes:
                if entered and scaled.zone.name not in track.visited:
                    track.visited.append(scaled.zone.name)
        return changes

    def _end_tracks(
        self, tracks: list[_Track], ts: datetime, now_ns: int, index: int | None
    ) -> list[TrackEvent]:
        events: list[TrackEvent] = []
        for track in tracks:
            self._tracks.remove(track)
            if not track.confirmed:
                self.stats.discarded += 1
                continue
            # Close the zones first, so every zone_entered has its zone_left.
            for scaled in self._scaled:
                state = track.zones.get(scaled.zone.name)
                if state is not None and state.inside:
                    state.inside = False
                    events.append(self._at("zone_left", track, ts, now_ns, index, scaled.zone))
            self.stats.ended += 1
            events.append(self._at("ended", track, ts, now_ns, index))
        return events

    def _event(
        self, kind: EventKind, track: _Track, frame: Frame, zone: Zone | None = None
    ) -> TrackEvent:
        return self._at(kind, track, frame.ts, frame.mono_ns, frame.index, zone)

    @staticmethod
    def _at(
        kind: EventKind,
        track: _Track,
        ts: datetime,
        now_ns: int,
        index: int | None,
        zone: Zone | None = None,
    ) -> TrackEvent:
        return TrackEvent(kind, track.view(), ts, now_ns, index, zone)

    def _scale_zones(self, size: tuple[int, int]) -> None:
        width, height = size
        self._frame_size = size
        self._scaled = [
            _ScaledZone(
                zone,
                (
                    np.asarray(zone.polygon, dtype=np.float32)
                    * np.asarray([width, height], dtype=np.float32)
                ).reshape(-1, 1, 2),
            )
            for zone in self.zones
        ]


def _check_size(frame_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (operator.index(v) for v in frame_size)
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise ValueError(
            f"frame_size must be (width, height) in whole pixels > 0, got {frame_size}"
        )
    return width, height


def _check_detection(detection: Detection, frame: Frame) -> None:
    box = (detection.x1, detection.y1, detection.x2, detection.y2)
    if (
        not all(math.isfinite(v) for v in box)
        or detection.x2 < detection.x1
        or detection.y2 < detection.y1
    ):
        raise ValueError(
            f"camera {frame.source!r} frame {frame.index}: detection {detection.label!r} has an "
            f"invalid box {box} (need finite x1 <= x2, y1 <= y2)"
        )


def _boxes(detections: list[Detection]) -> npt.NDArray[np.float64]:
    """[n, 4] x1, y1, x2, y2."""
    out = np.empty((len(detections), 4), np.float64)
    for row, d in enumerate(detections):
        out[row] = (d.x1, d.y1, d.x2, d.y2)
    return out


def _areas(boxes: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], 0.0)
    return np.asarray(widths * np.maximum(boxes[:, 3] - boxes[:, 1], 0.0))


def _pairwise_iou(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """[n, m] intersection over union of a's boxes with b's (0 where they do not overlap), the
    same arithmetic as `inference.detections.iou`."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    overlapping = (w > 0) & (h > 0)
    inter = np.where(overlapping, w * h, 0.0)
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlapping)


def _pairwise_distance(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """[n, m] distances between the boxes' centres."""
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    return np.asarray(np.hypot(ca[:, None, 0] - cb[None, :, 0], ca[:, None, 1] - cb[None, :, 1]))


def _pairwise_similar_size(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> npt.NDArray[np.bool_]:
    """[n, m] whether the larger of each pair's areas is within SIZE_RATIO_LIMIT of the smaller."""
    area_a = np.maximum(_areas(a), 1.0)[:, None]
    area_b = np.maximum(_areas(b), 1.0)[None, :]
    return np.asarray(np.maximum(area_a, area_b) <= SIZE_RATIO_LIMIT * np.minimum(area_a, area_b))


def _polygon_area(points: list[tuple[float, float]]) -> float:
    """Shoelace area in normalised units (sign gives the winding)."""
    xs = np.asarray([p[0] for p in points])
    ys = np.asarray([p[1] for p in points])
    return float(0.5 * (np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
