"""Periodic jobs on the monotonic clock (retention, WAL checkpoint, health records, heartbeat, the
sync interval), as an async context manager; a failing job is logged and tried again at its next
run, never fatal.

Why not APScheduler (which this module used before): it schedules by wall time, and an appliance's
wall clock steps. A board without a battery-backed clock boots in 1970 and jumps decades forward
when NTP or GPS time arrives; APScheduler then walks every missed run on the event loop (a one-year
jump of a 5 s job alone blocked the loop for 16-26 s and took 340 MiB, bench.autonomy's author
measured), and a step back freezes every job for the size of the step. Intervals measured on the
monotonic clock are immune to both, and a loop per job is all these jobs need."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Clock(Protocol):
    """What the jobs measure intervals with: monotonic seconds and a sleep on the same clock."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The event loop's monotonic clock (never the wall clock: it steps)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Jobs:
    """Named interval jobs; every job is a coroutine function with no arguments. A job never
    overlaps itself: a run that outlasts its interval is followed at once by the next one, and
    missed runs are not made up (one run, not a burst)."""

    def __init__(self, clock: Clock | None = None) -> None:
        # Injectable so tests run the jobs on a fake clock instead of counting ticks in wall time.
        self.clock: Clock = clock or LoopClock()
        self._jobs: dict[str, tuple[float, Callable[[], Awaitable[Any]], bool]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self.runs: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    def every(
        self, name: str, seconds: float, job: Callable[[], Awaitable[Any]], *, run_now: bool = False
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"job {name}: the interval must be positive, not {seconds}")
        if name in self._jobs:
            raise ValueError(f"job {name} is already scheduled")
        self._jobs[name] = (seconds, job, run_now)
        if self._running:  # added after the start: runs from now on
            self._tasks.append(self._start(name))

    def _start(self, name: str) -> asyncio.Task[None]:
        return asyncio.create_task(self._loop(name), name=f"job:{name}")

    async def _loop(self, name: str) -> None:
        seconds, job, run_now = self._jobs[name]
        clock = self.clock
        next_at = clock.now() + (0.0 if run_now else seconds)
        while True:
            await clock.sleep(max(0.0, next_at - clock.now()))
            await self._guarded(name, job)
            next_at = max(next_at + seconds, clock.now())

    async def _guarded(self, name: str, job: Callable[[], Awaitable[Any]]) -> None:
        try:
            await job()
        except Exception as exc:  # a job error must not kill the scheduler or the daemon
            self.failures[name] = self.failures.get(name, 0) + 1
            log.exception(
                "scheduled job failed", extra={"fields": {"job": name, "error": str(exc)}}
            )
        else:
            self.runs[name] = self.runs.get(name, 0) + 1

    async def __aenter__(self) -> Jobs:
        self._running = True
        self._tasks = [self._start(name) for name in self._jobs]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """End every job now (a run in progress is cut); again is a no-op."""
        self._running = False
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # A job cut mid-run is retried at the next start; its error is not the stop's.
        await asyncio.gather(*tasks, return_exceptions=True)
