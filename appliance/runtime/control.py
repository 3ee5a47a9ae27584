"""The daemon's local control socket (`control.sock` in the data directory, a Unix socket only
the appliance's user can open). `appliance sync --now` asks the running daemon through it instead
of opening a second writer; the answer streams progress as NDJSON lines. `appliance models refit`
asks it to start a source's baseline refit now (appliance/models/refit.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sync.destination import DestinationError
from sync.engine import Progress, SyncEngine
from sync.reader import JournalReader

CONTROL_SOCKET = "control.sock"


def collision_warnings(engines: list[SyncEngine]) -> list[str]:
    """What `sync --now` prints besides its result: another journal shipping under this id."""
    return [
        f"{engine.name}: {engine.state.collision.detail}"
        for engine in engines
        if engine.state.collision is not None
    ]


async def drain_engines(
    engines: list[SyncEngine], time_limit: float | None
) -> AsyncIterator[dict[str, Any]]:
    """Drain each engine in turn, yielding progress dicts, then one final dict with `done`."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)

    async def run() -> dict[str, Any]:
        for engine in engines:
            backlog = await engine.backlog()
            payloads, payload_bytes = await engine.journal.read(
                functools.partial(JournalReader.payloads_waiting, destination=engine.name)
            )
            # The estimate, before the first batch: records with their bytes in the journal,
            # and payloads (those of unacknowledged records included) with their sizes. Sent
            # bytes are compressed batches and payloads, so they are reported beside it, never
            # measured against it.
            totals = {
                "records_total": sum(n for n, _, _ in backlog.values()),
                "record_bytes_total": sum(b for _, b, _ in backlog.values()),
                "payloads_total": payloads,
                "payload_bytes_total": payload_bytes,
            }
            s = engine.state
            start = Progress(
                engine.name,
                s.records_sent,
                s.bytes_sent,
                s.payloads_sent,
                s.payload_bytes_delivered,
            )
            started = time.monotonic()

            def report(
                p: Progress,
                totals: dict[str, int] = totals,
                start: Progress = start,
                started: float = started,
            ) -> None:
                sent_bytes = p.bytes - start.bytes
                elapsed = max(time.monotonic() - started, 1e-3)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(
                        {
                            "destination": p.destination,
                            "records": p.records - start.records,
                            "payloads": p.payloads - start.payloads,
                            "payload_bytes": p.payload_bytes - start.payload_bytes,
                            **totals,
                            "bytes": sent_bytes,
                            "rate_bytes_per_s": sent_bytes / elapsed,
                            "elapsed_s": elapsed,
                        }
                    )

            report(start)  # the estimate shows before the first batch goes
            try:
                complete = await engine.drain(report)
            except DestinationError as exc:
                return {
                    "done": True,
                    "drained": False,
                    "reason": str(exc),
                    "warnings": collision_warnings(engines),
                }
            if not complete:
                return {
                    "done": True,
                    "drained": False,
                    "reason": f"{engine.name}: daily payload budget reached; payloads wait for tomorrow",
                    "warnings": collision_warnings(engines),
                }
        return {
            "done": True,
            "drained": True,
            "reason": None,
            "warnings": collision_warnings(engines),
        }

    task = asyncio.ensure_future(run())
    deadline = None if time_limit is None else time.monotonic() + time_limit
    try:
        while not task.done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                yield {
                    "done": True,
                    "drained": False,
                    "reason": f"timed out after {time_limit:g} s",
                }
                return
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait(
                {getter, task}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()
        yield task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


RefitStarter = Callable[[str, str], str | None]
"""`start(source, trigger)`: starts a refit, or says why not (`BaselineRefits.start`)."""


class ControlServer:
    """Serves POST /sync?destination=NAME&timeout=S and POST /refit?source=NAME on the control
    socket while the daemon runs."""

    def __init__(
        self, data_dir: Path, engines: list[SyncEngine], refit: RefitStarter | None = None
    ) -> None:
        self.path = data_dir / CONTROL_SOCKET
        self.engines = engines
        self.refit = refit
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> ControlServer:
        app = web.Application()
        app.router.add_post("/sync", self._sync)
        app.router.add_post("/refit", self._refit)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.path.unlink(missing_ok=True)  # left by a killed daemon: we hold the writer lock
        site = web.UnixSite(self._runner, str(self.path))
        await site.start()
        self.path.chmod(0o600)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.path.unlink(missing_ok=True)

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("destination")
        engines = [e for e in self.engines if name in (None, e.name)]
        if not engines:
            raise web.HTTPBadRequest(text=f"no destination named {name!r}")
        timeout = float(request.query["timeout"]) if "timeout" in request.query else None
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for engine in engines:
            engine.wake.clear()
        async for line in drain_engines(engines, timeout):
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response

    async def _refit(self, request: web.Request) -> web.Response:
        source = request.query.get("source")
        if not source:
            raise web.HTTPBadRequest(text="name the source: /refit?source=NAME")
        if self.refit is None:
            why_not: str | None = "no source of this appliance has anomaly.refit enabled"
        else:
            why_not = self.refit(source, "manual")
        return web.json_response({"source": source, "started": why_not is None, "reason": why_not})


async def ask_refit(data_dir: Path, source: str) -> dict[str, Any]:
    """Client side of POST /refit: the daemon's answer, {source, started, reason}. Raises
    `FileNotFoundError` or `aiohttp.ClientConnectionError` when no daemon listens."""
    connector = aiohttp.UnixConnector(path=str(data_dir / CONTROL_SOCKET))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post("http://appliance/refit", params={"source": source}) as response,
    ):
        if response.status != 200:
            return {"source": source, "started": False, "reason": (await response.text()).strip()}
        answer: dict[str, Any] = await response.json()
        return answer


async def ask_daemon(
    data_dir: Path, destination: str | None, time_limit: float | None
) -> AsyncIterator[dict[str, Any]]:
    """Client side: stream the daemon's progress lines."""
    params = {
        k: v for k, v in (("destination", destination), ("timeout", time_limit)) if v is not None
    }
    connector = aiohttp.UnixConnector(path=str(data_dir / CONTROL_SOCKET))
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        ) as session,
        session.post(
            "http://appliance/sync", params={k: str(v) for k, v in params.items()}
        ) as response,
    ):
        if response.status != 200:
            raise DestinationError("daemon", (await response.text()).strip(), retryable=False)
        async for raw in response.content:
            if raw.strip():
                yield json.loads(raw)
