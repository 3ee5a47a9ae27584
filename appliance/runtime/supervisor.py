"""Restart budgets: a crashing component is restarted with jittered backoff, within a budget of
restarts per window; past the budget it is marked degraded and left stopped, never looped."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

ComponentState = Literal["starting", "running", "backoff", "finished", "degraded", "stopped"]
_BACKOFF_FIRST_S = 1.0
_BACKOFF_CAP_S = 60.0


@dataclass
class ComponentHealth:
    name: str
    state: ComponentState = "starting"
    restarts: int = 0
    last_error: str | None = None


class Supervised:
    """Runs `factory()` until it returns; on an exception restarts it within the budget."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        budget: int,
        window_s: float,
        on_event: Callable[[str, ComponentHealth], Awaitable[None]] | None = None,
        backoff_first_s: float = _BACKOFF_FIRST_S,
    ) -> None:
        self.name = name
        self.health = ComponentHealth(name)
        self._factory = factory
        self._budget = budget
        self._window_s = window_s
        self._on_event = on_event
        self._backoff_first_s = backoff_first_s
        self._failures: deque[float] = deque()

    async def run(self) -> None:
        consecutive = 0
        while True:
            self.health.state = "running"
            started = time.monotonic()
            try:
                await self._factory()
            except asyncio.CancelledError:
                self.health.state = "stopped"
                raise
            except Exception as exc:
                now = time.monotonic()
                self._failures.append(now)
                while self._failures and now - self._failures[0] > self._window_s:
                    self._failures.popleft()
                self.health.last_error = f"{type(exc).__name__}: {exc}"
                if now - started > _BACKOFF_CAP_S:
                    consecutive = 0  # it ran well for a while: start the backoff afresh
                consecutive += 1
                if len(self._failures) > self._budget:
                    self.health.state = "degraded"
                    log.error(
                        "component keeps failing; restart budget spent, marked degraded",
                        extra={
                            "fields": {
                                "component": self.name,
                                "error": self.health.last_error,
                                "failures_in_window": len(self._failures),
                            }
                        },
                    )
                    await self._notify("degraded")
                    return
                delay = min(_BACKOFF_CAP_S, self._backoff_first_s * 2 ** (consecutive - 1))
                delay *= random.uniform(0.5, 1.0)  # jitter: many sources must not retry in step
                self.health.state = "backoff"
                self.health.restarts += 1
                log.warning(
                    "component failed; restarting",
                    extra={
                        "fields": {
                            "component": self.name,
                            "error": self.health.last_error,
                            "retry_in_s": round(delay, 2),
                        }
                    },
                )
                await self._notify("restarting")
                await asyncio.sleep(delay)
                continue
            self.health.state = "finished"
            await self._notify("finished")
            return

    async def _notify(self, event: str) -> None:
        if self._on_event is not None:
            await self._on_event(event, self.health)
