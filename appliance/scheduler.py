"""Periodic jobs on APScheduler (retention, WAL checkpoint, health records, heartbeat, the sync interval), as an async
context manager; a failing job is logged and tried again at its next run, never fatal."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger(__name__)


class Jobs:
    """Named interval jobs; every job is a coroutine function with no arguments."""

    def __init__(self) -> None:
        self._scheduler: Any = AsyncIOScheduler(timezone=UTC)
        self.runs: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    def every(
        self, name: str, seconds: float, job: Callable[[], Awaitable[Any]], *, run_now: bool = False
    ) -> None:
        async def guarded() -> None:
            try:
                await job()
            except Exception as exc:  # a job error must not kill the scheduler or the daemon
                self.failures[name] = self.failures.get(name, 0) + 1
                log.exception(
                    "scheduled job failed", extra={"fields": {"job": name, "error": str(exc)}}
                )
            else:
                self.runs[name] = self.runs.get(name, 0) + 1

        first = datetime.now(UTC) + (timedelta(0) if run_now else timedelta(seconds=seconds))
        self._scheduler.add_job(
            guarded,
            "interval",
            seconds=seconds,
            id=name,
            name=name,
            next_run_time=first,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(seconds)),
        )

    async def __aenter__(self) -> Jobs:
        self._scheduler.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._scheduler.shutdown(wait=False)
