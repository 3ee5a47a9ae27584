"""Tests of appliance.runtime.scheduler: interval jobs on a fake monotonic clock (exact counts, no wall
time), failures retried, no overlap, a clean stop, and a real clock that ignores the wall clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from appliance.runtime.scheduler import Jobs, LoopClock


class FakeClock:
    """Monotonic seconds that move only when the test says; sleepers wake in time order."""

    def __init__(self) -> None:
        self.t = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own moment and letting it run until it
        sleeps again before time moves on."""
        target = self.t + seconds
        await _settle()
        while True:
            due = [entry for entry in self._sleepers if entry[0] <= target]
            if not due:
                break
            self.t = max(self.t, min(when for when, _ in due))
            for entry in [e for e in self._sleepers if e[0] <= self.t]:
                self._sleepers.remove(entry)
                if not entry[1].done():
                    entry[1].set_result(None)
            await _settle()
        self.t = target


async def _settle() -> None:
    for _ in range(20):  # woken jobs run to their next await on the clock
        await asyncio.sleep(0)


async def test_jobs_run_at_their_interval_and_run_now_runs_at_once() -> None:
    clock = FakeClock()
    ticks: list[float] = []
    later: list[float] = []

    async def tick() -> None:
        ticks.append(clock.now())

    async def late() -> None:
        later.append(clock.now())

    jobs = Jobs(clock)
    jobs.every("tick", 0.1, tick, run_now=True)
    jobs.every("late", 10.0, late)
    async with jobs:
        await clock.advance(0.45)
    assert ticks == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert jobs.runs["tick"] == 5
    assert later == [] and "late" not in jobs.runs


async def test_a_failing_job_is_counted_and_tried_again() -> None:
    clock = FakeClock()
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError("disk busy")

    jobs = Jobs(clock)
    jobs.every("flaky", 0.05, flaky, run_now=True)
    async with jobs:
        await clock.advance(0.28)
    assert (jobs.failures["flaky"], jobs.runs["flaky"]) == (3, 3)


async def test_a_slow_job_never_overlaps_itself_and_missed_runs_are_not_made_up() -> None:
    clock = FakeClock()
    running = 0
    overlap = False
    starts: list[float] = []

    async def slow() -> None:
        nonlocal running, overlap
        running += 1
        overlap = overlap or running > 1
        starts.append(clock.now())
        await clock.sleep(0.25)  # five intervals
        running -= 1

    jobs = Jobs(clock)
    jobs.every("slow", 0.05, slow, run_now=True)
    async with jobs:
        await clock.advance(0.6)
    assert not overlap
    # One run after each, never a burst of the missed ones.
    assert starts == pytest.approx([0.0, 0.25, 0.5])


async def test_a_job_added_while_running_starts_from_then() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(clock.now())

    jobs = Jobs(clock)
    async with jobs:
        await clock.advance(1.0)
        jobs.every("tick", 0.5, tick)
        await clock.advance(1.2)
    assert ticks == pytest.approx([1.5, 2.0])


async def test_the_stop_cancels_a_running_job_and_waits_for_it() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    jobs = Jobs()
    jobs.every("forever", 1.0, forever, run_now=True)
    async with jobs:
        await started.wait()
    assert cancelled.is_set()


async def test_jobs_stopped_before_the_end_of_their_block_stay_stopped() -> None:
    """The daemon ends its jobs before its last records; leaving the block then is a no-op."""
    runs: list[int] = []

    async def count() -> None:
        runs.append(1)

    clock = FakeClock()
    jobs = Jobs(clock)
    jobs.every("count", 1.0, count, run_now=True)
    async with jobs:
        await clock.advance(2.5)
        await jobs.stop()
        seen = len(runs)
        await clock.advance(5.0)
        assert len(runs) == seen
    assert seen >= 1 and len(runs) == seen


async def test_the_real_clock_ignores_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A board without a real-time clock boots in 1970 and jumps to today: the jobs' clock is the
    loop's monotonic one, which no step of the wall clock moves."""
    clock = LoopClock()
    before = clock.now()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 56 * 365 * 86400)
    jumped = clock.now()
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    stepped_back = clock.now()
    assert before <= jumped <= stepped_back < before + 60
    assert isinstance(Jobs().clock, LoopClock)


def test_bad_intervals_and_duplicate_names_are_refused() -> None:
    async def job() -> None:
        return None

    jobs = Jobs()
    with pytest.raises(ValueError, match="interval must be positive"):
        jobs.every("x", 0, job)
    jobs.every("x", 1, job)
    with pytest.raises(ValueError, match="already scheduled"):
        jobs.every("x", 1, job)
