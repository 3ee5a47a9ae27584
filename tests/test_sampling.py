"""Sampling for retraining: reasons and their priority, the hourly, daily and byte caps with an
injected UTC clock (across an hour and a midnight), the random share, and the sample body."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from config import SamplingSettings
from inference.detections import Detection
from inference.sampling import Sampler, sample_body
from sensors.base import Frame

T0 = datetime(2024, 3, 1, 22, 10, tzinfo=UTC)


def det(label: str = "person", score: float = 0.9, class_id: int = 0) -> Detection:
    return Detection(64.0, 48.0, 192.0, 240.0, score, class_id, label)


def settings(**overrides: object) -> SamplingSettings:
    base: dict[str, object] = {
        "uncertain": (0.25, 0.5),
        "classes": ["boat"],
        "random": 0.0,
        "per_hour": 1000,
        "per_day": 1000,
        "daily_bytes": "1GiB",
    }
    base.update(overrides)
    return SamplingSettings.model_validate(base)


def keep(sampler: Sampler, ts: datetime, detections: list[Detection], size: int = 1000) -> bool:
    ticket = sampler.consider(ts, detections)
    return ticket is not None and sampler.commit(ticket, size)


# -------------------------------------------------------------------------------- reasons


def test_reasons_and_their_priority() -> None:
    sampler = Sampler(settings(), random.Random(0))
    assert sampler.consider(T0, []) is None
    assert sampler.consider(T0, [det(score=0.9)]) is None  # sure, and not a wanted class
    unsure = sampler.consider(T0, [det(score=0.3)])
    assert unsure is not None and unsure.reason == "uncertain"
    boat = sampler.consider(T0, [det("boat", 0.9, 8)])
    assert boat is not None and boat.reason == "class"
    both = sampler.consider(T0, [det("boat", 0.9, 8), det(score=0.49)])
    assert both is not None and both.reason == "uncertain"
    # The band is [low, high): the upper bound itself is a sure detection.
    assert sampler.consider(T0, [det(score=0.5)]) is None
    assert sampler.consider(T0, [det(score=0.25)]) is not None


def test_uncertainty_off_and_random_lowest_priority() -> None:
    sampler = Sampler(settings(uncertain=None, random=1.0), random.Random(0))
    ticket = sampler.consider(T0, [det(score=0.3)])
    assert ticket is not None and ticket.reason == "random"
    ticket = sampler.consider(T0, [det("boat", 0.3, 8)])
    assert ticket is not None and ticket.reason == "class"


def test_random_share_is_about_the_configured_rate() -> None:
    sampler = Sampler(settings(random=0.05, classes=[]), random.Random(1234))
    kept = sum(keep(sampler, T0, []) for _ in range(20_000))
    assert 850 <= kept <= 1150  # 1000 expected; a binomial sd is ~31
    assert sampler.counters["kept_random"] == kept
    assert sampler.counters["considered"] == 20_000
    # The same seed gives the same choices: runs can be replayed.
    again = Sampler(settings(random=0.05, classes=[]), random.Random(1234))
    assert sum(keep(again, T0, []) for _ in range(20_000)) == kept


# ----------------------------------------------------------------------------------- caps


def test_hourly_cap_resets_on_the_next_clock_hour() -> None:
    sampler = Sampler(settings(per_hour=3), random.Random(0))
    start = datetime(2024, 3, 1, 10, 58, tzinfo=UTC)
    results = [keep(sampler, start + timedelta(seconds=i), [det(score=0.3)]) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert sampler.counters["skipped_cap_hour"] == 2
    # 11:00 is a new hour, though less than an hour has passed.
    assert keep(sampler, datetime(2024, 3, 1, 11, 0, tzinfo=UTC), [det(score=0.3)])
    assert sampler.counters["kept_uncertain"] == 4


def test_daily_cap_resets_at_utc_midnight_not_local() -> None:
    sampler = Sampler(settings(per_day=4), random.Random(0))
    # Frames from 23:30 to 02:00 at UTC+2 cross the local midnight but not the UTC one
    # (21:30 to 00:00 UTC is 21:30 .. 23:59:59 UTC); a local day would reset after the first.
    plus_two = timezone(timedelta(hours=2))
    late = datetime(2024, 3, 1, 23, 30, tzinfo=plus_two)
    kept = [keep(sampler, late + timedelta(minutes=30 * i), [det("boat")]) for i in range(5)]
    kept.append(keep(sampler, datetime(2024, 3, 1, 23, 59, 59, tzinfo=UTC), [det("boat")]))
    assert kept == [True, True, True, True, False, False]
    assert sampler.counters["skipped_cap_day"] == 2
    assert keep(sampler, datetime(2024, 3, 2, 0, 0, 1, tzinfo=UTC), [det("boat")])
    assert sampler.status()["counters"] == sampler.counters


def test_byte_budget_is_never_exceeded() -> None:
    sampler = Sampler(settings(daily_bytes=10_000), random.Random(0))
    sizes = [4000, 4000, 3000, 2000, 1, 5000]
    results = []
    for size in sizes:
        ticket = sampler.consider(T0, [det(score=0.3)])
        results.append(ticket is not None and sampler.commit(ticket, size))
    # 4000 + 4000 = 8000; 3000 would pass 10000; 2000 fills it exactly; then nothing fits.
    assert results == [True, True, False, True, False, False]
    assert sampler.counters["kept_bytes"] == 10_000
    assert sampler.counters["skipped_cap_bytes"] == 3
    # A full budget refuses at consider time, before anyone spends effort encoding.
    assert sampler.consider(T0, [det(score=0.3)]) is None
    assert sampler.counters["skipped_cap_bytes"] == 4
    assert keep(sampler, T0 + timedelta(days=1), [det(score=0.3)], 10_000)


def test_open_tickets_hold_their_slots() -> None:
    sampler = Sampler(settings(per_hour=2), random.Random(0))
    first = sampler.consider(T0, [det(score=0.3)])
    second = sampler.consider(T0, [det(score=0.3)])
    assert first is not None and second is not None
    assert sampler.consider(T0, [det(score=0.3)]) is None  # two in flight fill the hour
    sampler.cancel(first)
    third = sampler.consider(T0, [det(score=0.3)])
    assert third is not None
    assert sampler.commit(second, 10) and sampler.commit(third, 10)
    assert sampler.consider(T0, [det(score=0.3)]) is None
    with pytest.raises(RuntimeError, match="already committed"):
        sampler.commit(second, 10)
    with pytest.raises(RuntimeError, match="already cancelled"):
        sampler.cancel(first)
    assert sampler.counters["cancelled"] == 1


def test_a_ticket_from_a_past_hour_is_checked_against_the_current_caps() -> None:
    sampler = Sampler(settings(per_hour=1), random.Random(0))
    old = sampler.consider(T0, [det(score=0.3)])
    assert old is not None
    fresh = sampler.consider(T0 + timedelta(hours=1), [det(score=0.3)])
    assert fresh is not None and sampler.commit(fresh, 10)
    # The old ticket's hour is gone and this hour's only slot is used.
    assert not sampler.commit(old, 10)
    assert old.state == "refused"
    assert sampler.counters["kept_uncertain"] == 1


def test_zero_caps_keep_nothing() -> None:
    for cap in ({"per_hour": 0}, {"per_day": 0}, {"daily_bytes": 0}):
        sampler = Sampler(settings(**cap), random.Random(0))
        assert sampler.consider(T0, [det(score=0.3)]) is None


def test_status_reports_the_current_periods() -> None:
    now = [T0]
    sampler = Sampler(settings(per_hour=5, per_day=50), random.Random(0), clock=lambda: now[0])
    assert keep(sampler, T0, [det(score=0.3)], 1234)
    status = sampler.status()
    assert status["hour"] == {"kept": 1, "open": 0, "cap": 5}
    assert status["day"] == {"kept": 1, "cap": 50, "bytes": 1234, "bytes_cap": 1024**3}
    now[0] = T0 + timedelta(days=1)  # no frame yet today: nothing used today
    assert sampler.status()["day"] == {"kept": 0, "cap": 50, "bytes": 0, "bytes_cap": 1024**3}


def test_bad_input_is_refused() -> None:
    sampler = Sampler(settings(), random.Random(0))
    with pytest.raises(ValueError, match="naive"):
        sampler.consider(datetime(2024, 3, 1, 12, 0), [det()])
    ticket = sampler.consider(T0, [det(score=0.3)])
    assert ticket is not None
    with pytest.raises(ValueError, match=">= 0 bytes"):
        sampler.commit(ticket, -1)


# ---------------------------------------------------------------------------- sample body


def test_sample_body_prefills_a_labelling_tool() -> None:
    frame = Frame(
        source="deck",
        image=np.zeros((480, 640, 3), dtype=np.uint8),
        ts=T0,
        mono_ns=123_456_789,
        index=42,
        position_s=1.68,
    )
    detections = [det(score=0.3123456), Detection(600.0, 400.0, 640.0, 480.0, 0.8, 8, "boat")]
    body = sample_body(detections, "uncertain", "yolov3-tiny@1a2b3c", frame)
    assert body["reason"] == "uncertain"
    assert body["model"] == "yolov3-tiny@1a2b3c"
    assert body["source"] == "deck"
    assert body["frame"] == {
        "index": 42,
        "ts": "2024-03-01T22:10:00+00:00",
        "mono_ns": 123_456_789,
        "position_s": 1.68,
        "width": 640,
        "height": 480,
    }
    assert body["image"] == {"width": 640, "height": 480}
    assert body["predictions"] == [
        {
            "label": "person",
            "class_id": 0,
            "score": 0.3123,
            "box": [64.0, 48.0, 192.0, 240.0],
            "box_norm": [0.1, 0.1, 0.3, 0.5],
        },
        {
            "label": "boat",
            "class_id": 8,
            "score": 0.8,
            "box": [600.0, 400.0, 640.0, 480.0],
            "box_norm": [0.9375, 0.83333, 1.0, 1.0],
        },
    ]
    # A payload shrunk to 320x240 gets its boxes in its own pixels; the normalised ones stay.
    small = sample_body(detections, "class", "m@2", frame, image_size=(320, 240))
    assert small["image"] == {"width": 320, "height": 240}
    predictions = small["predictions"]
    assert isinstance(predictions, list)
    assert predictions[0]["box"] == [32.0, 24.0, 96.0, 120.0]
    assert predictions[0]["box_norm"] == [0.1, 0.1, 0.3, 0.5]


def test_sample_body_refuses_a_bad_model_or_reason() -> None:
    frame = Frame("deck", np.zeros((4, 4, 3), dtype=np.uint8), T0, 0, 0)
    with pytest.raises(ValueError, match="name@version"):
        sample_body([], "class", "yolov3-tiny", frame)
    with pytest.raises(ValueError, match="reason"):
        sample_body([], "bored", "m@1", frame)  # type: ignore[arg-type]
