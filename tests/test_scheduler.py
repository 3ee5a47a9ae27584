"""Tests of appliance.scheduler: interval jobs on the monotonic clock, failures retried, no
overlap, a clean stop, and no dependence on the wall clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from appliance.scheduler import Jobs


async def test_jobs_run_at_their_interval_and_run_now_runs_at_once() -> None:
    ticks: list[float] = []
    later: list[float] = []

    async def tick() -> None:
        ticks.append(time.monotonic())

    async def late() -> None:
        later.append(time.monotonic())

    jobs = Jobs()
    jobs.every("tick", 0.1, tick, run_now=True)
    jobs.every("late", 10.0, late)
    started = time.monotonic()
    async with jobs:
        await asyncio.sleep(0.45)
    assert ticks and ticks[0] - started < 0.05
    assert 3 <= len(ticks) <= 6 and jobs.runs["tick"] == len(ticks)
    assert later == [] and "late" not in jobs.runs


async def test_a_failing_job_is_counted_and_tried_again() -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError("disk busy")

    jobs = Jobs()
    jobs.every("flaky", 0.05, flaky, run_now=True)
    async with jobs:
        await asyncio.sleep(0.28)
    assert jobs.failures["flaky"] >= 2 and jobs.runs["flaky"] >= 2


async def test_a_slow_job_never_overlaps_itself_and_missed_runs_are_not_made_up() -> None:
    running = 0
    overlap = False
    starts: list[float] = []

    async def slow() -> None:
        nonlocal running, overlap
        running += 1
        overlap = overlap or running > 1
        starts.append(time.monotonic())
        await asyncio.sleep(0.25)  # five intervals
        running -= 1

    jobs = Jobs()
    jobs.every("slow", 0.05, slow, run_now=True)
    async with jobs:
        await asyncio.sleep(0.6)
    assert not overlap
    # At 0, 0.25 and 0.5 (a busy box may push the third past the stop): one run after each,
    # never a burst of the missed ones.
    assert 2 <= len(starts) <= 3


async def test_the_stop_cancels_a_running_job_and_waits_for_it() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    jobs = Jobs()
    jobs.every("forever", 1.0, forever, run_now=True)
    async with jobs:
        await asyncio.sleep(0.05)
    assert cancelled.is_set()


async def test_the_wall_clock_jumping_decades_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A board without a real-time clock boots in 1970 and jumps to today: the jobs neither
    stall nor try to make up the missed decades."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1

    jobs = Jobs()
    jobs.every("tick", 0.1, tick, run_now=True)
    async with jobs:
        await asyncio.sleep(0.15)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 56 * 365 * 86400)
        await asyncio.sleep(0.3)
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        await asyncio.sleep(0.3)
    assert 5 <= ticks <= 9  # 0.75 s at 0.1 s: 8, give or take a busy box


def test_bad_intervals_and_duplicate_names_are_refused() -> None:
    async def job() -> None:
        return None

    jobs = Jobs()
    with pytest.raises(ValueError, match="interval must be positive"):
        jobs.every("x", 0, job)
    jobs.every("x", 1, job)
    with pytest.raises(ValueError, match="already scheduled"):
        jobs.every("x", 1, job)
