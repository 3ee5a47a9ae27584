"""The live sources' shared parts: windows on the wall-clock grid with their value checks, and
the reconnect loop with its health (each source's own tests run it against its real server)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from config.sensors import LiveSensorCommon
from sensors.base import QualityReport, SampleWindow, SourceError
from sensors.live import QUEUE_MAX, LiveSource, QualityLog, WindowBuilder

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def builder(**options: object) -> tuple[WindowBuilder, QualityLog]:
    quality = QualityLog()
    return WindowBuilder("rig", ("temp", "pressure"), 10.0, quality, **options), quality  # type: ignore[arg-type]


def test_columns_fall_into_windows_on_the_wall_clock_grid() -> None:
    windows, _ = builder()
    assert windows.add({"temp": 20.0}, at(3.5)) == []
    assert windows.add({"pressure": 1.5, "temp": 21.0}, at(7.25)) == []
    (first,) = windows.add({"temp": 22.0}, at(12.0))
    assert first.ts == T0 and first.duration_s == 10.0 and first.sample_rate is None
    assert first.channels == ("temp", "pressure")
    np.testing.assert_array_equal(first.values, [[20.0, 21.0], [np.nan, 1.5]])
    assert first.times_s is not None
    np.testing.assert_allclose(first.times_s, [3.5, 7.25])
    # Nothing arrives after 12 s: the timer closes the second window once its end has passed.
    assert windows.due(at(19.9)) == []
    assert windows.seconds_to_close(at(19.0)) == pytest.approx(1.0)
    (second,) = windows.due(at(20.0))
    assert second.ts == at(10.0)
    np.testing.assert_allclose(second.times_s if second.times_s is not None else [], [2.0])
    assert windows.due(at(40.0)) == [] and windows.flush() == []


def test_bad_values_are_counted_and_left_out() -> None:
    windows, quality = builder(ranges={"pressure": (0.0, 10.0)})
    windows.add({"temp": math.nan, "pressure": 99.0}, at(1.0))
    windows.add({"temp": math.inf, "pressure": 2.0, "humidity": 40.0}, at(2.0))
    (window,) = windows.flush()
    # A column with no valid value adds nothing; the other keeps its valid value only.
    np.testing.assert_array_equal(window.values, [[np.nan], [2.0]])
    report = quality.report("rig")
    assert report is not None
    assert report.counts == {"nan": 1, "out_of_range": 1, "inf": 1, "malformed": 1}
    assert any("pressure: 99 outside [0, 10]" in e.detail for e in report.examples)
    assert any("unknown channel 'humidity'" in e.detail for e in report.examples)
    assert quality.report("rig") is None  # reported once


def test_a_stuck_channel_is_reported_once_per_run_and_kept() -> None:
    windows, quality = builder(stuck_after=3)
    for second in range(6):
        windows.add({"temp": 5.0, "pressure": float(second)}, at(second))
    windows.add({"temp": 6.0}, at(6.0))
    for second in range(7, 10):
        windows.add({"temp": 6.0}, at(second))
    report = quality.report("rig")
    assert report is not None and report.counts == {"stuck": 2}
    assert "temp has read 5 3 times in a row" in report.examples[0].detail
    (window,) = windows.flush()
    assert np.count_nonzero(window.values[0] == 5.0) == 6  # a flat line may be true: kept


def test_gaps_and_a_clock_set_back_are_reported() -> None:
    windows, quality = builder(gap_after_s=5.0)
    windows.add({"temp": 1.0}, at(1.0))
    windows.add({"temp": 2.0}, at(2.0))
    windows.add({"temp": 3.0}, at(9.0))  # 7 s of silence
    # Slightly out of order (network reordering): no clock issue.
    windows.add({"temp": 4.0}, at(8.5))
    # Set back by an hour (a clock synced to GPS): the open window closes, a new one begins.
    (closed,) = windows.add({"temp": 5.0}, at(-3600.0))
    np.testing.assert_array_equal(closed.values[0], [1.0, 2.0, 3.0, 4.0])
    report = quality.report("rig")
    assert report is not None and report.counts == {"gap": 1, "clock_backwards": 1}
    (after,) = windows.flush()
    assert after.ts == at(-3600.0)


class ScriptedLink(LiveSource):
    """A link that fails as the test says: the base's loop and health, without a server."""

    transient = (EOFError,)

    def __init__(self, script: list[BaseException | None], reconnect_max_s: float = 0.05) -> None:
        cfg = LiveSensorCommon(name="link", window=0.1, reconnect_max=reconnect_max_s)
        super().__init__(cfg, ("v",))
        self.script = script
        self.sessions = 0

    async def _session(self) -> None:
        self.sessions += 1
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise step
        self._connected()
        for value in range(3):
            self._publish({"v": float(value)})
            await asyncio.sleep(0.01)
        if self.script:
            raise EOFError("link dropped")
        while True:  # the link holds: values keep coming, windows keep closing
            self._publish({"v": 9.0})
            await asyncio.sleep(0.02)


async def first_windows(source: LiveSource, count: int) -> list[SampleWindow]:
    windows: list[SampleWindow] = []
    async with source:
        async for reading in source.readings():
            if isinstance(reading, SampleWindow):
                windows.append(reading)
            if len(windows) >= count:
                break
    return windows


async def test_failed_connects_back_off_and_a_reconnect_is_counted() -> None:
    link = ScriptedLink([ConnectionRefusedError("refused"), TimeoutError("slow"), None, None])
    states: list[str] = []

    async def watch() -> None:
        while True:
            if not states or states[-1] != link.health.state:
                states.append(link.health.state)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        windows = await asyncio.wait_for(first_windows(link, 2), 10)
    finally:
        watcher.cancel()
    assert link.sessions >= 4
    assert "reconnecting" in states and states[-1] in ("running", "finished")
    assert link.health.reconnects >= 1
    assert sum(int(np.count_nonzero(np.isfinite(w.values))) for w in windows) >= 3
    assert link.health.state == "finished"


async def test_a_link_that_drops_before_its_first_reading_keeps_backing_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device that accepts the connection and drops it at once must not be retried several
    times a second (each retry logs): only a session that delivered readings resets the
    backoff."""
    asked: list[int] = []

    def quick_delay(failures: int, cap_s: float) -> float:
        asked.append(failures)
        return 0.001

    monkeypatch.setattr("sensors.live.backoff_delay", quick_delay)

    class Dropping(ScriptedLink):
        async def _session(self) -> None:
            self.sessions += 1
            self._connected()
            if self.sessions <= 4:
                raise EOFError("closed by the peer")
            self._publish({"v": 1.0})  # the fifth session delivers, then drops
            if self.sessions == 5:
                raise EOFError("closed by the peer")
            await asyncio.sleep(3600)

    link = Dropping([])
    async with link, contextlib.aclosing(link.readings()) as readings:
        await asyncio.wait_for(anext(readings), 5)
    assert asked[:5] == [1, 2, 3, 4, 1]


async def test_an_unexpected_error_or_a_permanent_one_fails_the_source() -> None:
    with pytest.raises(ValueError, match="bug"):
        await asyncio.wait_for(first_windows(ScriptedLink([ValueError("bug")]), 1), 5)
    permanent = ScriptedLink([SourceError("link", "bad credentials", retryable=False)])
    with pytest.raises(SourceError, match="bad credentials"):
        await asyncio.wait_for(first_windows(permanent, 1), 5)
    assert permanent.health.state == "failed"


async def test_bad_input_without_any_valid_value_still_reports() -> None:
    class NothingValid(ScriptedLink):
        async def _session(self) -> None:
            self._connected()
            self.quality.add("malformed", "garbage")
            await asyncio.sleep(3600)

    source = NothingValid([])
    async with source, contextlib.aclosing(source.readings()) as readings:
        reading = await asyncio.wait_for(anext(readings), 5)
    assert isinstance(reading, QualityReport) and reading.counts == {"malformed": 1}


async def test_a_window_carries_the_reasons_of_the_bad_input_met_while_it_was_open() -> None:
    class Noisy(ScriptedLink):
        async def _session(self) -> None:
            self._connected()
            self._publish({"v": 1.0})
            self._publish({"v": math.nan})
            await asyncio.sleep(3600)

    source = Noisy([])
    async with source, contextlib.aclosing(source.readings()) as readings:
        window = await asyncio.wait_for(anext(readings), 5)
        report = await asyncio.wait_for(anext(readings), 5)
    assert isinstance(window, SampleWindow) and window.quality == ("nan",)
    assert isinstance(report, QualityReport) and report.counts == {"nan": 1}
    assert source.health.bad_values == 1 and source.health.windows == 1


def test_a_channel_found_at_run_time_gets_its_row() -> None:
    windows, _ = builder()
    windows.add({"temp": 1.0}, at(1.0))
    windows.add_channel("xdr.pitch")
    windows.add_channel("temp")  # known already: nothing changes
    windows.add({"xdr.pitch": 2.5}, at(2.0))
    (window,) = windows.flush()
    assert window.channels == ("temp", "pressure", "xdr.pitch")
    np.testing.assert_array_equal(window.values, [[1.0, np.nan], [np.nan, np.nan], [np.nan, 2.5]])


def test_a_window_waits_for_late_values_when_told_to() -> None:
    windows, _ = builder(lateness_s=2.0)
    windows.add({"temp": 1.0}, at(9.0))
    assert windows.due(at(11.0)) == []  # its end has passed, its lateness not yet
    assert windows.seconds_to_close(at(11.0)) == pytest.approx(1.0)
    assert windows.add({"temp": 2.0}, at(9.5)) == []  # stamped at the source, arriving late
    (window,) = windows.due(at(12.0))
    np.testing.assert_array_equal(window.values[0], [1.0, 2.0])


class SilentLink(LiveSource):
    """A source fed by the test through `_publish`: no session runs."""

    async def _session(self) -> None:
        raise AssertionError("not started in this test")


async def test_a_consumer_that_falls_behind_loses_the_oldest_readings_counted() -> None:
    link = SilentLink(LiveSensorCommon(name="link", window=1.0), ("v",))
    extra = 7
    # Each value opens the next window and closes the one before it: QUEUE_MAX + extra windows
    # close while nobody reads.
    for second in range(QUEUE_MAX + extra + 1):
        link._publish({"v": float(second)}, at(second + 0.5))
    assert link.health.windows == QUEUE_MAX + extra
    assert link.health.readings_dropped == extra
    assert link._out.qsize() == QUEUE_MAX
    kept = [link._out.get_nowait() for _ in range(QUEUE_MAX)]
    assert isinstance(kept[0], SampleWindow) and isinstance(kept[-1], SampleWindow)
    # The newest windows were kept, the oldest `extra` dropped.
    assert kept[0].ts == at(extra) and kept[-1].ts == at(QUEUE_MAX + extra - 1)
