"""The tracker and zones on synthetic detection sequences (boxes scripted frame by frame)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from config.cameras import TrackingSettings, Zone
from inference.detections import Detection
from inference.tracking import Tracker, TrackEvent
from sensors.base import Frame

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
WIDTH, HEIGHT = 640, 480
# The tracker reads only a frame's size and stamps: one shared read-only view stands in for pixels.
PIXELS = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (HEIGHT, WIDTH, 3))
LABELS = {0: "person", 2: "car"}


def frame(t: float, index: int | None = None) -> Frame:
    mono = 7_000_000_000 + round(t * 1e9)
    return Frame(
        "cam", PIXELS, T0 + timedelta(seconds=t), mono, round(t * 5) if index is None else index
    )


def box(
    cx: float, bottom: float, w: float = 40, h: float = 100, score: float = 0.8, cls: int = 0
) -> Detection:
    """A detection given by its anchor (bottom centre), as a person's feet would place it."""
    return Detection(cx - w / 2, bottom - h, cx + w / 2, bottom, score, cls, LABELS[cls])


def tracker(zones: list[Zone] | None = None, **settings: float) -> Tracker:
    return Tracker(TrackingSettings(**settings), zones or [], (WIDTH, HEIGHT))


def kinds(events: list[TrackEvent]) -> list[tuple[str, int]]:
    return [(e.kind, e.track.id) for e in events if e.kind != "improved"]


def test_one_object_moving_across_is_one_track() -> None:
    t = tracker()
    events: list[TrackEvent] = []
    for i in range(50):
        events += t.update([box(30 + 12 * i, 300)], frame(i / 5, i))
    for i in range(50, 70):  # it has left: the detector runs and sees nothing
        events += t.update([], frame(i / 5, i))
    assert kinds(events) == [("started", 1), ("ended", 1)]
    started, ended = (e for e in events if e.kind in ("started", "ended"))
    assert started.frame_index == 1  # min_hits=2: the second detection confirms it
    assert ended.track.hits == 50
    assert ended.track.duration_s == pytest.approx(49 / 5)
    assert ended.track.first_ts == T0 and ended.track.last_index == 49
    assert len(ended.track.path) == 50
    assert ended.track.path[-1] == pytest.approx((30 + 12 * 49, 250))
    assert t.stats.started == 1 and t.stats.ended == 1 and t.open_tracks == 0


def test_still_person_for_ten_minutes_is_one_track() -> None:
    rng = np.random.default_rng(7)
    t = tracker()
    events: list[TrackEvent] = []
    for i in range(10 * 60 * 5):  # ten minutes at 5 fps
        # Jittery boxes, wobbly scores, and one frame in ten where the detector misses them.
        if rng.random() < 0.1:
            detections = []
        else:
            jitter = rng.normal(0, 2, size=2)
            score = float(np.clip(rng.normal(0.7, 0.1), 0.36, 0.99))
            detections = [box(320 + jitter[0], 400 + jitter[1], score=score)]
        events += t.update(detections, frame(i / 5, i))
    events += t.end_all(frame(600.0, 3000))
    assert kinds(events) == [("started", 1), ("ended", 1)]
    ended = events[-1]
    assert ended.track.duration_s == pytest.approx(600, abs=2)
    assert ended.track.hits > 2500
    improved = [e for e in events if e.kind == "improved"]
    # The best view improves now and then (the running maximum of noisy scores), not per frame.
    assert 0 < len(improved) < 30
    best = max((e for e in events if e.keep_frame), key=lambda e: e.track.best.score)
    assert ended.track.best == best.track.best
    assert ended.track.best_index == best.frame_index


def test_still_person_seen_only_at_keepalives_is_one_track() -> None:
    """The motion gate passes a still scene every 10 s; the tracker must not end the track
    between keepalives (the gap is not a miss), nor on one missed keepalive."""
    t = tracker(max_missed=2.0)
    events: list[TrackEvent] = []
    for k in range(61):  # ten minutes, one update per 10 s keepalive
        detections = [] if k == 30 else [box(320, 400, score=0.6 + 0.001 * (k % 7))]
        events += t.update(detections, frame(10.0 * k, k))
    assert kinds(events) == [("started", 1)]
    assert len(t.tracks) == 1 and t.tracks[0].hits == 60
    # Two missed keepalives in a row do end it.
    events = t.update([], frame(620.0, 62)) + t.update([], frame(630.0, 63))
    assert kinds(events) == [("ended", 1)]
    assert events[0].track.last_ts == T0 + timedelta(seconds=600)


@pytest.mark.parametrize("offset", [10, 0], ids=["near-miss", "head-on"])
def test_crossing_objects_keep_their_ids(offset: int) -> None:
    """Head-on, the two boxes coincide at frame 20: only their velocities tell them apart."""
    t = tracker()
    events: list[TrackEvent] = []
    for i in range(40):  # they meet in the middle around frame 20
        a = box(80 + 12 * i, 300)  # walks right
        b = box(560 - 12 * i, 300 + offset)  # walks left
        detections = [a, b] if i % 2 else [b, a]  # the detector's order means nothing
        events += t.update(detections, frame(i / 5, i))
    events += t.end_all(frame(8.0, 40))
    ended = {e.track.id: e.track for e in events if e.kind == "ended"}
    assert sorted(ended) == [1, 2]
    for track in ended.values():
        assert track.hits == 40
        xs = [x for x, _ in track.path[-40:]]
        steps = np.diff(xs)
        # Each track moved one way all along: it never swapped to the other walker.
        assert np.all(steps > 0) or np.all(steps < 0), xs


def test_fast_mover_at_a_low_frame_rate_is_one_track() -> None:
    """At 2 fps a car moves most of its width between frames: its boxes barely overlap (IoU 0.06)."""
    t = tracker()
    events: list[TrackEvent] = []
    for i in range(12):
        events += t.update([box(20 + 40 * i, 400, w=45, h=30, cls=2)], frame(i / 2, i))
    events += t.end_all(frame(6.0, 12))
    assert kinds(events) == [("started", 1), ("ended", 1)]
    assert events[-1].track.label == "car"


def test_irregular_updates_from_a_gated_camera() -> None:
    """A car at 80 px/s; after three regular frames, updates come 0.2 s to 1.2 s apart (the gate,
    a busy detector). A long gap moves it further than its own size: only its velocity finds it."""
    rng = np.random.default_rng(11)
    t = tracker()
    events: list[TrackEvent] = []
    now, i, longest = 0.0, 0, 0.0
    while now < 7.0:
        events += t.update([box(20 + 80 * now, 400, w=60, h=30, cls=2)], frame(now, i))
        gap = 0.2 if i < 3 else float(rng.uniform(0.2, 1.2))
        longest = max(longest, gap)
        now += gap
        i += 1
    events += t.end_all(frame(now, i))
    assert longest * 80 > 60  # the test does cover a jump beyond the car's size
    assert kinds(events) == [("started", 1), ("ended", 1)]
    assert events[-1].track.hits == i


def test_classes_are_tracked_apart() -> None:
    """A person getting into a car: the boxes coincide, the tracks must not swap labels."""
    t = tracker()
    events: list[TrackEvent] = []
    for i in range(10):
        person = box(300 + 2 * i, 300, w=60, h=60, cls=0)
        car = box(300, 300, w=60, h=60, cls=2)
        events += t.update([car, person] if i % 2 else [person, car], frame(i / 5, i))
    for view in t.tracks:
        assert view.last.label == view.label and view.best.label == view.label
        assert view.hits == 10
    assert sorted(e.track.label for e in events if e.kind == "started") == ["car", "person"]


def test_confirmed_tracks_match_before_tentative_ones() -> None:
    """A stray box beside a tracked person must not steal the person's next detection."""
    t = tracker()
    events: list[TrackEvent] = []
    for i in range(5):
        events += t.update([box(100, 300)], frame(i / 5, i))
    events += t.update([box(100, 300), box(110, 300, score=0.4)], frame(1.0, 5))
    # The person moves right, now overlapping the stray box (IoU 0.9) more than its own (0.67).
    for i in range(6, 10):
        events += t.update([box(108, 300)], frame(i / 5, i))
    assert kinds(events) == [("started", 1)]
    assert t.tracks[0].hits == 10


def test_one_frame_flicker_is_filtered_by_min_hits() -> None:
    t = tracker(min_hits=2, max_missed=1.0)
    events: list[TrackEvent] = []
    for i in range(20):
        detections = [box(100, 200, score=0.4)] if i == 3 else []
        events += t.update(detections, frame(i / 5, i))
    assert events == []
    assert t.stats.discarded == 1 and t.open_tracks == 0
    # The next real object still gets id 1: ids count objects, not noise.
    events = t.update([box(300, 300)], frame(4.0, 20)) + t.update([box(302, 300)], frame(4.2, 21))
    assert kinds(events) == [("started", 1)]


def test_min_hits_one_starts_at_once() -> None:
    t = tracker(min_hits=1)
    events = t.update([box(100, 200)], frame(0.0))
    assert kinds(events) == [("started", 1)]
    assert events[0].keep_frame


def test_max_missed_ends_a_track() -> None:
    t = tracker(max_missed=2.0)
    events: list[TrackEvent] = []
    for i in range(10):
        events += t.update([box(200, 300)], frame(i / 5, i))
    ended_at = None
    for i in range(10, 40):
        new = t.update([], frame(i / 5, i))
        if new:
            assert kinds(new) == [("ended", 1)]
            ended_at = i
            events += new
            break
    # Last seen at 1.8 s: unseen for more than 2 s first at 4.0 s (frame 20).
    assert ended_at == 20
    assert events[-1].ts == T0 + timedelta(seconds=4.0)
    assert events[-1].track.last_ts == T0 + timedelta(seconds=1.8)
    # A new object in the same place afterwards is a new track.
    events = t.update([box(200, 300)], frame(4.2, 21)) + t.update([box(200, 300)], frame(4.4, 22))
    assert kinds(events) == [("started", 2)]


def test_best_detection_follows_the_highest_score() -> None:
    t = tracker()
    scores = [0.5, 0.6, 0.55, 0.9, 0.7, 0.95, 0.4]
    events: list[TrackEvent] = []
    for i, score in enumerate(scores):
        events += t.update([box(200 + i, 300, score=score)], frame(i / 5, i))
    keep = [(e.kind, e.frame_index, e.track.best.score) for e in events if e.keep_frame]
    # Confirmed at frame 1 (0.6); improved at 0.9 and 0.95; the 0.5 before confirmation is ignored.
    assert keep == [("started", 1, 0.6), ("improved", 3, 0.9), ("improved", 5, 0.95)]
    (view,) = t.tracks
    assert view.best_index == 5 and view.best.score == 0.95 and view.last.score == 0.4


# ------------------------------------------------------------------------------------ zones

RIGHT_HALF = Zone(name="dock", polygon=[(0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)])


def test_walking_into_and_out_of_a_zone() -> None:
    t = tracker([RIGHT_HALF])
    events: list[TrackEvent] = []
    xs = [100 + 20 * i for i in range(25)] + [580 - 20 * i for i in range(25)]
    for i, x in enumerate(xs):
        events += t.update([box(x, 300)], frame(i / 5, i))
    events += t.end_all(frame(10.0, 50))
    assert kinds(events) == [
        ("started", 1),
        ("zone_entered", 1),
        ("zone_left", 1),
        ("ended", 1),
    ]
    entered = next(e for e in events if e.kind == "zone_entered")
    assert entered.zone == RIGHT_HALF and entered.as_dict()["zone"] == "dock"
    assert entered.frame_index == 11  # the first frame with the feet at x >= 320
    assert entered.track.zones == ("dock",)
    left = next(e for e in events if e.kind == "zone_left")
    assert left.track.zones == ()
    assert events[-1].track.zones_visited == ("dock",)


def test_border_jitter_does_not_flap() -> None:
    rng = np.random.default_rng(3)
    t = tracker([RIGHT_HALF])
    events: list[TrackEvent] = []
    for i in range(300):  # a minute standing on the border, the box jittering by a few pixels
        x = 320 + float(rng.normal(0, 3))
        if i % 25 == 24:
            x -= 30  # now and then a glitch throws one box well outside
        events += t.update([box(x, 300)], frame(i / 5, i))
    assert kinds(events) == [("started", 1), ("zone_entered", 1)]
    # Walking away for real does leave the zone (after two updates clearly outside).
    for i in range(300, 310):
        events += t.update([box(320 - 30 * (i - 299), 300)], frame(i / 5, i))
    assert kinds(events)[-1] == ("zone_left", 1)
    assert Counter(e.kind for e in events)["zone_entered"] == 1


def test_anchor_is_the_bottom_centre() -> None:
    """A box reaching into the zone does not count while the feet are outside it."""
    floor = Zone(name="floor", polygon=[(0.0, 0.75), (1.0, 0.75), (1.0, 1.0), (0.0, 1.0)])
    t = tracker([floor], min_hits=1)
    events = t.update([box(320, 350, h=300)], frame(0.0, 0))  # spans y 50..350, feet above 360
    events += t.update([box(320, 370, h=300)], frame(0.2, 1))  # feet at 370: inside
    assert kinds(events) == [("started", 1), ("zone_entered", 1)]
    assert events[-1].frame_index == 1


def test_zone_classes_filter_which_objects_count() -> None:
    cars_only = Zone(name="lane", polygon=RIGHT_HALF.polygon, classes=["car"])
    t = tracker([cars_only, RIGHT_HALF])
    events: list[TrackEvent] = []
    for i in range(10):
        person = box(600 - 10 * i, 300)
        car = box(40 + 60 * i, 450, w=80, h=50, cls=2)
        events += t.update([person, car], frame(i / 5, i))
    by_label = {(e.track.label, e.zone.name) for e in events if e.kind == "zone_entered" and e.zone}
    assert by_label == {("person", "dock"), ("car", "lane"), ("car", "dock")}


def test_a_track_confirmed_inside_a_zone_enters_it() -> None:
    t = tracker([RIGHT_HALF])
    events = t.update([box(500, 300)], frame(0.0, 0)) + t.update([box(502, 300)], frame(0.2, 1))
    assert kinds(events) == [("started", 1), ("zone_entered", 1)]


def test_end_all_closes_every_track() -> None:
    t = tracker([RIGHT_HALF])
    events: list[TrackEvent] = []
    for i in range(5):
        events += t.update([box(100, 300), box(500, 300)], frame(i / 5, i))
    events += t.update([box(100, 300), box(500, 300), box(300, 100, cls=2)], frame(1.0, 5))
    assert len(t.tracks) == 2 and t.open_tracks == 3  # the car is still tentative
    closing = t.end_all()  # no frame: stamped now
    assert sorted(kinds(closing)) == [("ended", 1), ("ended", 2), ("zone_left", 2)]
    zone_left = next(i for i, e in enumerate(closing) if e.kind == "zone_left")
    assert closing[zone_left + 1].kind == "ended"  # a zone closes before its track ends
    assert all(e.frame_index is None and e.ts > T0 for e in closing)
    assert t.tracks == [] and t.open_tracks == 0
    assert t.stats.discarded == 1
    assert t.end_all() == []
    body = closing[-1].as_dict()
    assert body["event"] == "ended" and body["hits"] == 6 and body["label"] == "person"


def test_a_new_picture_size_ends_tracks_and_rescales_zones() -> None:
    t = tracker([RIGHT_HALF], min_hits=1)
    t.update([box(500, 300)], frame(0.0, 0))
    big = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (960, 1280, 3))
    second = Frame("cam", big, T0 + timedelta(seconds=1), 8_000_000_000, 5)
    events = t.update([box(1000, 600)], second)  # x=1000 is in the right half of 1280
    assert kinds(events) == [("zone_left", 1), ("ended", 1), ("started", 2), ("zone_entered", 2)]


# ------------------------------------------------------------------------------ bad input


def test_updates_out_of_time_order_are_refused() -> None:
    t = tracker()
    t.update([], frame(1.0))
    with pytest.raises(ValueError, match="time order"):
        t.update([], frame(0.5))


def test_an_inverted_or_non_finite_box_is_refused() -> None:
    t = tracker()
    with pytest.raises(ValueError, match="invalid box"):
        t.update([Detection(10, 10, 5, 20, 0.9, 0, "person")], frame(0.0))
    with pytest.raises(ValueError, match="invalid box"):
        t.update([Detection(10, 10, float("nan"), 20, 0.9, 0, "person")], frame(0.0))


def test_bad_zones_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unique.*dock"):
        tracker([RIGHT_HALF, RIGHT_HALF])
    flat = Zone(name="line", polygon=[(0.1, 0.1), (0.5, 0.5), (0.9, 0.9)])
    with pytest.raises(ValueError, match=r"'line'.*no area"):
        tracker([flat])
    with pytest.raises(ValueError, match="frame_size"):
        Tracker(TrackingSettings(), [], (0, 480))
    with pytest.raises(ValueError, match="max_tracks"):
        Tracker(TrackingSettings(), [], (640, 480), max_tracks=0)


def test_open_tracks_are_bounded() -> None:
    t = Tracker(TrackingSettings(), [], (WIDTH, HEIGHT), max_tracks=3)
    crowd = [box(40 + 60 * k, 300) for k in range(5)]
    t.update(crowd, frame(0.0))
    assert t.open_tracks == 3 and t.stats.dropped_detections == 2
