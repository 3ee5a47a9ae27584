"""The page's 24-hour history between two samples on its grid (appliance/status/history.py): a
sample at once when the backlog changes, so the backlog chart never says 0 while the table
beside it says 80 waiting; at most one such sample stands between two on the grid, so a busy
day still fits in the ring."""

from __future__ import annotations

from pathlib import Path

from appliance.status.history import MAX_SAMPLES, WINDOW_S, Figures, History

T0 = 1_700_000_000.0


def figures(journalled: int, waiting: int, acked: int = 0) -> Figures:
    return Figures(
        journalled_total=journalled,
        backlog={"shore": (waiting, waiting * 300)},
        acked_total={"shore": acked},
    )


def backlog(history: History) -> list[tuple[float, int]]:
    return [(s.t - T0, s.destinations["shore"].backlog_records) for s in history.samples()]


def test_a_changed_backlog_is_sampled_at_once_between_two_minutes(tmp_path: Path) -> None:
    history = History(tmp_path / "h.json", appliance_id="ship-01", clock=lambda: T0)
    history.record(figures(0, 0), now=T0)  # the sample at start: nothing waits yet
    assert history.observe(figures(0, 0), now=T0 + 5) is None  # nothing changed: no sample

    # 80 records journalled 20 s later: the chart must show them now, not at the next minute.
    between = history.observe(figures(80, 80), now=T0 + 20)
    assert between is not None and between.destinations["shore"].backlog_records == 80
    assert backlog(history) == [(0.0, 0), (20.0, 80)]
    # Its rates are the newest known ones (none yet): a rate over 20 s would be noise.
    assert between.journalled_per_min is None

    # A later change replaces it: one sample between two on the grid, the newest.
    history.observe(figures(95, 95), now=T0 + 40)
    assert backlog(history) == [(0.0, 0), (40.0, 95)]
    assert history.observe(figures(95, 95), now=T0 + 50) is None

    # The grid's own sample takes its place, with its rate over the whole minute.
    minute = history.record(figures(120, 120, acked=0), now=T0 + 60)
    assert backlog(history) == [(0.0, 0), (60.0, 120)]
    assert minute.journalled_per_min == 120.0

    # After that, a change keeps the minute's rates (acknowledgements go on at that pace).
    history.record(figures(180, 150, acked=30), now=T0 + 120)
    changed = history.observe(figures(190, 10, acked=170), now=T0 + 130)
    assert changed is not None
    assert (changed.journalled_per_min, changed.destinations["shore"].acked_per_min) == (60.0, 30.0)
    assert backlog(history)[-2:] == [(120.0, 150), (130.0, 10)]


def test_a_new_destination_is_a_change(tmp_path: Path) -> None:
    history = History(tmp_path / "h.json", appliance_id="ship-01", clock=lambda: T0)
    history.record(figures(0, 5), now=T0)
    both = Figures(
        journalled_total=0, backlog={"shore": (5, 1500), "usb": (5, 1500)}, acked_total={}
    )
    sample = history.observe(both, now=T0 + 1)
    assert sample is not None and sorted(sample.destinations) == ["shore", "usb"]
    assert sample.destinations["usb"].acked_per_min is None


def test_a_day_of_constant_change_still_fits_a_day_in_the_ring(tmp_path: Path) -> None:
    history = History(tmp_path / "h.json", appliance_id="ship-01", clock=lambda: T0)
    t, waiting = T0, 0
    for minute in range(int(WINDOW_S // 60) + 30):
        history.record(figures(waiting, waiting), now=T0 + minute * 60.0)
        for second in range(5, 60, 5):  # the page open all day, the backlog moving every 5 s
            waiting += 1
            t = T0 + minute * 60.0 + second
            history.observe(figures(waiting, waiting), now=t)
    samples = history.samples()
    assert len(samples) <= MAX_SAMPLES + 1
    assert samples[-1].t == t and samples[-1].destinations["shore"].backlog_records == waiting
    assert samples[-1].t - samples[0].t >= WINDOW_S - 120  # still a day, not the last hours


def test_a_sample_between_minutes_is_kept_in_the_file_like_any_other(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    history = History(path, appliance_id="ship-01", clock=lambda: T0 + 30)
    history.record(figures(0, 0), now=T0)
    history.observe(figures(80, 80), now=T0 + 20)
    history.save()
    again = History(path, appliance_id="ship-01", clock=lambda: T0 + 30)
    again.load()
    assert backlog(again) == [(0.0, 0), (20.0, 80)]
