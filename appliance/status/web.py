"""The local web status page's server and its HTTP API (aiohttp): routes (`/`, `/healthz`,
`/api/status`, `/api/events`, `/api/history`, the `/api/stream` event stream, `/metrics`,
`POST /api/sync`, image and clip payloads), the token rules and the security headers every response
carries, and the sampling of the 24-hour history. The HTML is `appliance.status.page`'s, the
events' filters and pages `appliance.status.events`'. Contract: docs/status-api.md."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.runtime.control import drain_engines
from appliance.status.events import (
    SERVED_TYPES,
    BadQuery,
    EventQuery,
    find_events,
    newest_event_seq,
    recent_events,
)
from appliance.status.health import HealthMonitor
from appliance.status.history import HISTORY_FILE, Figures, History
from appliance.status.metrics import render_metrics
from appliance.status.page import SCRIPT, STYLE, render_live, render_page
from appliance.status.report import collect_status, live_report
from appliance.status.schema import StatusFigures, StatusReport
from config import ApplianceConfig, ConfigError, StatusSection
from config.models import STATUS_TOKEN_MIN_CHARS
from config.models import is_loopback_host as is_loopback
from sync import Journal, JournalReader, PayloadStore, StorageFull
from sync.engine import SyncEngine
from sync.errors import PayloadError

log = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 1.0
# Journal figures (the same queries as `appliance status`) are shared by requests for this long,
# so several open pages polling every few seconds cost one set of reads, not one each.
_FIGURES_TTL_S = 2.0
_PAGE_EVENTS = 20
MIN_TOKEN_CHARS = STATUS_TOKEN_MIN_CHARS
COOKIE_NAME = "appliance_status"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The event stream: a fresh fragment this often, at once when a new alert or event is journalled
# (looked for this often, and only while a stream is open), and a comment line when the
# fragment has not changed, so the browser, proxies and this server see a live link.
STREAM_INTERVAL_S = 2.0
_NEWS_POLL_S = 0.25
# Streams opened within this long of each other share one rendering of the fragment.
_FRAGMENT_TTL_S = 1.0
# How long a stop waits for open streams to end before the server closes under them.
_STREAM_STOP_S = 2.0
_STREAM_RETRY_MS = 3000

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port); the config model checked the shape."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ConfigError(f"port must be 0-65535, not {number}", key="status.listen", line=None)
    return host, number


def read_status_token(section: StatusSection) -> str | None:
    """The bearer token from `status.token_file` (None without one). Raises ConfigError when the
    file is unusable, or when the page would listen beyond loopback without a token."""
    host, _ = split_listen(section.listen)
    token: str | None = None
    if section.token_file is not None:
        try:
            token = section.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read the status page token from {section.token_file}: {exc}",
                key="status.token_file",
                line=None,
            ) from None
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise ConfigError(
                f"{section.token_file} must hold one token of at least {MIN_TOKEN_CHARS} "
                "characters, without spaces",
                key="status.token_file",
                line=None,
            )
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"the status page would listen on {section.listen}, which is not a loopback "
            "address, without a token: set status.token_file to a file holding one, or set "
            "status.listen to 127.0.0.1:PORT",
            key="status.listen",
            line=None,
        )
    return token


def _cookie_value(token: str) -> str:
    # The cookie is derived from the token, not the token itself: a leaked cookie opens the
    # page but is no bearer token for POST /api/sync.
    return hmac.new(token.encode(), b"appliance status page cookie", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


# --------------------------------------------------------------------------------- journal reads


def payload_media_type(reader: JournalReader, sha256: str) -> str | None:
    """The media type of a payload whose file is present, or None."""
    size_type_state = reader.payload_info([sha256]).get(sha256)
    if size_type_state is None or size_type_state[2] != "present":
        return None
    return size_type_state[1]


def history_figures(report: StatusReport) -> Figures:
    """What the history samples, out of one /api/status report."""
    destinations = report["destinations"]
    return Figures(
        journalled_total=int(report["daemon"]["journal"]["records"]),
        backlog={
            n: (int(d["backlog_records"]), int(d["backlog_bytes"])) for n, d in destinations.items()
        },
        # Only a destination with a live engine counts acknowledgements.
        acked_total={
            n: int(d["records_sent"]) for n, d in destinations.items() if "records_sent" in d
        },
    )


def server_sent_event(event: str, data: str) -> bytes:
    """One `text/event-stream` event; every line of `data` is a `data:` line (the browser joins
    them with newlines), so no line of the fragment can end the event early."""
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


# ---------------------------------------------------------------------------------- the server


class StatusServer:
    """The status page server, entered into the daemon's exit stack once the journal is open."""

    def __init__(
        self,
        cfg: ApplianceConfig,
        journal: Journal,
        store: PayloadStore,
        monitor: HealthMonitor,
        engines: list[SyncEngine],
        *,
        token: str | None,
        history: History | None = None,
        stream_interval_s: float = STREAM_INTERVAL_S,
        supervised: bool = False,
    ) -> None:
        """`supervised`: the caller (the daemon) runs `housekeeping()` under its supervisor;
        otherwise the server runs those loops itself while it is entered."""
        self.cfg = cfg
        self.journal = journal
        self.store = store
        self.monitor = monitor
        self.engines = engines
        self.token = token
        self.host, self.port = split_listen(cfg.status.listen)
        # Beyond loopback every route needs the token, not only POST /api/sync.
        self.protected = not is_loopback(self.host)
        self.history = history or History(
            cfg.appliance.data_dir / HISTORY_FILE,
            appliance_id=cfg.appliance.id,
            interval_s=cfg.status.history_interval,
        )
        self.stream_interval_s = stream_interval_s
        self.supervised = supervised
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._syncs: dict[str, asyncio.Task[None]] = {}
        self._windows: dict[str, deque[tuple[float, int]]] = {}
        self._figures: tuple[float, StatusFigures] | None = None
        self._figures_lock = asyncio.Lock()
        self._sampler: asyncio.Task[None] | None = None
        self._news_watcher: asyncio.Task[None] | None = None
        # Open event streams (their handler tasks), ended by __aexit__ before the runner stops.
        self._streams: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        # Set and replaced whenever streams should send at once (news, or the server stopping).
        self._news = asyncio.Event()
        self._news_generation = 0
        self._fragment: tuple[float, int, str] | None = None
        self._shown_newest_event: int | None = None  # in the last fragment rendered
        self._fragment_lock = asyncio.Lock()
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.on_response_prepare.append(_security_headers)
        app.router.add_get("/", self._page)
        app.router.add_get("/partial", self._partial)
        app.router.add_get("/app.js", self._script)
        app.router.add_get("/app.css", self._style)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get("/api/history", self._api_history)
        app.router.add_get("/api/stream", self._stream)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/api/sync", self._sync)
        app.router.add_get("/payloads/{sha256}", self._payload)
        return app

    async def __aenter__(self) -> StatusServer:
        await asyncio.to_thread(self.history.load)
        # Page requests are short; a browser's idle keep-alive must not hold up the shutdown.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"the status page cannot listen on {self.cfg.status.listen}: "
                f"{exc.strerror or exc}; choose another address or port, or set "
                "status.enabled: false",
                key="status.listen",
                line=None,
            ) from None
        host, port = self._runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/"
        self.monitor.status_url = self.url
        if not self.supervised:
            loops = self.housekeeping()
            self._watcher = asyncio.create_task(loops["status:watch"](), name="status:watch")
            self._sampler = asyncio.create_task(loops["status:history"](), name="status:history")
            self._news_watcher = asyncio.create_task(loops["status:news"](), name="status:news")
        log.info(
            "status page listening",
            extra={"fields": {"url": self.url, "token_required_everywhere": self.protected}},
        )
        with contextlib.suppress(StorageFull):  # the URL is also in the log and in /api/status
            await self.journal.set_meta({"status_url": self.url})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Open streams end first: their handlers return, so the runner's shutdown below does
        # not wait out its timeout for responses that would never finish.
        self._stopping.set()
        self._announce()
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=_STREAM_STOP_S)
        tasks = [
            t
            for t in (self._watcher, self._sampler, self._news_watcher, *self._syncs.values())
            if t is not None
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        await self._save_history()
        if not self.journal.closed:
            with contextlib.suppress(StorageFull):
                await self.journal.set_meta({"status_url": ""})

    def housekeeping(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """The server's long-lived loops by component name: watching sources for the health
        judge and the rates, sampling the history, and looking for news for open streams."""
        return {
            "status:watch": self._watch,
            "status:history": self._sample_history,
            "status:news": self._watch_news,
        }

    # ------------------------------------------------------------------------------ health

    async def _watch(self) -> None:
        while True:
            self._observe()
            await asyncio.sleep(_WATCH_INTERVAL_S)

    def _observe(self) -> None:
        """Let the health judge note sources going down (so a grace period ends on time), and
        keep the last few window counts of each source for a rate."""
        self.monitor.observe()
        now = time.monotonic()
        for name, health in self.monitor.sources.items():
            counts = self._windows.setdefault(name, deque(maxlen=6))
            counts.append((now, int(health.windows)))

    def reasons(self) -> list[str]:
        """Why the appliance is degraded (the health judge's reasons); empty when healthy."""
        return self.monitor.reasons()

    def _window_rate(self, name: str) -> float | None:
        counts = self._windows.get(name)
        if not counts or len(counts) < 2:
            return None
        (t0, w0), (t1, w1) = counts[0], counts[-1]
        return round((w1 - w0) / (t1 - t0), 2) if t1 > t0 else None

    # ----------------------------------------------------------------------------- history

    async def _sample_history(self) -> None:
        """A sample at once (what waits at start), then one each `history.interval_s` on a
        fixed grid; a failed read is logged once per run of failures and sampling goes on."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        failing = False
        while True:
            try:
                self.history.record(history_figures(await self.status_report()))
                failing = False
            except Exception as exc:  # the page's history must outlive a bad read
                if not failing:
                    log.warning(
                        "status history sample failed", extra={"fields": {"error": repr(exc)}}
                    )
                failing = True
            if self.history.due_for_save(time.time()):
                await self._save_history()
            now = loop.time()
            while next_at <= now:  # slots missed while the loop was busy are skipped, not piled up
                next_at += self.history.interval_s
            await asyncio.sleep(next_at - now)

    async def _save_history(self) -> None:
        content = self.history.snapshot()
        try:
            await asyncio.to_thread(self.history.save, content)
        except OSError as exc:  # a full disk costs the charts' last minutes, never the daemon
            log.warning(
                "status history not saved",
                extra={"fields": {"path": str(self.history.path), "error": str(exc)}},
            )

    # ------------------------------------------------------------------------------ stream

    def _announce(self) -> None:
        """Wake every open stream now (news on the page, or the server stopping)."""
        self._news_generation += 1
        self._news.set()
        self._news = asyncio.Event()

    async def _watch_news(self) -> None:
        """While a stream is open, look for an alert or event record newer than the fragment
        shows each _NEWS_POLL_S (one indexed query, and only after the writer committed
        something) and announce it."""
        committed = -1
        failing = False
        while True:
            await asyncio.sleep(_NEWS_POLL_S)
            if not self._streams or self.journal.stats.records == committed:
                continue
            committed = self.journal.stats.records
            try:
                latest = await self.journal.read(newest_event_seq)
                failing = False
            except Exception as exc:  # streams still tick every interval without this
                if not failing:
                    log.warning(
                        "status page could not look for new events",
                        extra={"fields": {"error": repr(exc)}},
                    )
                failing = True
                committed = -1  # look again at the next poll
                continue
            if self._shown_newest_event is not None and latest != self._shown_newest_event:
                self._announce()

    async def _live_fragment(self) -> str:
        """The live fragment, rendered once for every stream and poll within _FRAGMENT_TTL_S
        of each other, and again at once after news."""
        async with self._fragment_lock:
            cached = self._fragment
            if (
                cached is not None
                and cached[1] == self._news_generation
                and time.monotonic() - cached[0] < _FRAGMENT_TTL_S
            ):
                return cached[2]
            generation = self._news_generation
            report = await self.status_report()
            events = await self.events(_PAGE_EVENTS)
            fragment = render_live(report, events, self.history, now=time.time())
            self._fragment = (time.monotonic(), generation, fragment)
            self._shown_newest_event = events[0]["seq"] if events else 0
            return fragment

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # ----------------------------------------------------------------------------- reports

    async def _journal_figures(self) -> StatusFigures:
        async with self._figures_lock:
            if self._figures is not None and time.monotonic() - self._figures[0] < _FIGURES_TTL_S:
                return self._figures[1]
            figures = await asyncio.to_thread(collect_status, self.cfg)
            self._figures = (time.monotonic(), figures)
            return figures

    async def status_report(self) -> StatusReport:
        """`appliance status --json`'s figures with the live snapshot in place of the heartbeat."""
        figures = await self._journal_figures()
        snapshot = self.monitor.snapshot()
        for name, source in snapshot["sources"].items():
            source["windows_per_s"] = self._window_rate(name)
        report = live_report(figures, snapshot, self.reasons(), status_url=self.url)
        # The charts drawn beside this report's tables show its backlog, not the last minute's.
        self.history.observe(history_figures(report))
        return report

    async def events(self, limit: int) -> list[dict[str, Any]]:
        return await self.journal.read(functools.partial(recent_events, limit=limit))

    # ---------------------------------------------------------------------------- auth

    def _bearer_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return (
            self.token is not None
            and scheme.lower() == "bearer"
            and _same(given.strip(), self.token)
        )

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self.protected:
            return await handler(request)
        assert self.token is not None  # read_status_token refuses a protected page without one
        cookie = request.cookies.get(COOKIE_NAME)
        if self._bearer_ok(request) or (
            cookie is not None and _same(cookie, _cookie_value(self.token))
        ):
            return await handler(request)
        given = request.query.get("token")
        if given is None or not _same(given, self.token):
            raise web.HTTPUnauthorized(
                text="this status page needs the token (status.token_file): send "
                "`Authorization: Bearer TOKEN`, or open /?token=TOKEN once in a browser",
                headers={"WWW-Authenticate": 'Bearer realm="appliance"'},
            )
        if request.method == "GET" and request.path == "/":
            # Drop the token from the address bar (and from history) once the cookie is set.
            response: web.StreamResponse = web.Response(status=303, headers={"Location": "/"})
        else:
            response = await handler(request)
        if not response.prepared:  # a finished event stream has sent its headers long ago
            response.set_cookie(
                COOKIE_NAME, _cookie_value(self.token), httponly=True, samesite="Strict", path="/"
            )
        return response

    # ---------------------------------------------------------------------------- routes

    async def _healthz(self, request: web.Request) -> web.Response:
        reasons = self.reasons()
        if reasons:
            return web.json_response({"status": "degraded", "reasons": reasons}, status=503)
        return web.json_response({"status": "ok"})

    async def _api_status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status_report())

    async def _api_events(self, request: web.Request) -> web.Response:
        try:
            query = EventQuery.parse(request.query)
        except BadQuery as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response(
            await self.journal.read(functools.partial(find_events, query=query))
        )

    async def _api_history(self, request: web.Request) -> web.Response:
        return web.json_response(self.history.to_json())

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `live` with the fragment whenever it changed, checked every
        stream_interval_s and at once on news; a comment line when it had not changed."""
        task = asyncio.current_task()
        assert task is not None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        self._streams.add(task)
        try:
            await response.prepare(request)
            await response.write(f"retry: {_STREAM_RETRY_MS}\n\n".encode())
            sent: str | None = None
            while not self._stopping.is_set():
                if request.transport is None or request.transport.is_closing():
                    break  # the browser went away between two writes
                news = self._news  # taken before rendering: news during it is not missed
                fragment = await self._live_fragment()
                if fragment != sent:
                    await response.write(server_sent_event("live", fragment))
                    sent = fragment
                else:
                    await response.write(b": unchanged\n\n")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.stream_interval_s):
                        await news.wait()
        except ConnectionResetError:
            pass  # the browser went away (tab closed, page reloaded) during a write
        finally:
            self._streams.discard(task)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        body = render_metrics(await self.status_report())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _sync(self, request: web.Request) -> web.Response:
        if self.token is None:
            raise web.HTTPForbidden(
                text="POST /api/sync needs a token, and none is configured: set "
                "status.token_file to a file holding one"
            )
        if not self._bearer_ok(request):
            # Only the header counts here, never the page cookie: a form posted from another
            # site cannot set it.
            raise web.HTTPUnauthorized(
                text="POST /api/sync needs `Authorization: Bearer TOKEN` (status.token_file)",
                headers={"WWW-Authenticate": 'Bearer realm="appliance"'},
            )
        names = [engine.name for engine in self.engines]
        if not names:
            raise web.HTTPConflict(text="no destinations are configured under sync.destinations")
        wanted = request.query.get("destination")
        if wanted is not None and wanted not in names:
            raise web.HTTPBadRequest(
                text=f"no destination named {wanted!r}; configured: {', '.join(names)}"
            )
        started, running = [], []
        for engine in self.engines:
            if wanted not in (None, engine.name):
                continue
            task = self._syncs.get(engine.name)
            if task is not None and not task.done():
                running.append(engine.name)  # one drain per destination at a time
                continue
            self._syncs[engine.name] = asyncio.create_task(
                self._drain(engine), name=f"status:sync:{engine.name}"
            )
            started.append(engine.name)
        return web.json_response({"started": started, "already_running": running}, status=202)

    async def _drain(self, engine: SyncEngine) -> None:
        engine.wake.clear()  # the drain below is what the wake asked for
        try:
            async for line in drain_engines([engine], None):
                if line.get("done"):
                    log.info(
                        "sync requested on the status page finished",
                        extra={
                            "fields": {
                                "destination": engine.name,
                                "drained": line["drained"],
                                "reason": line["reason"],
                            }
                        },
                    )
        except Exception as exc:  # a programming error must not vanish into an unread task
            log.error(
                "sync requested on the status page failed",
                extra={"fields": {"destination": engine.name, "error": repr(exc)}},
            )

    async def _payload(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        if not _SHA256.fullmatch(sha256):
            raise web.HTTPBadRequest(text="a payload is named by its sha256: 64 lowercase hex")
        media_type = await self.journal.read(functools.partial(payload_media_type, sha256=sha256))
        if media_type not in SERVED_TYPES:
            raise web.HTTPNotFound(text=f"no image or clip payload {sha256}")
        try:
            path = self.store.path_for(sha256)
        except PayloadError:
            raise web.HTTPNotFound(text=f"no image or clip payload {sha256}") from None
        if not await asyncio.to_thread(path.is_file):  # evicted since the journal said present
            raise web.HTTPNotFound(text=f"no image or clip payload {sha256}")
        # Streamed from the file, never held whole. A browser plays a clip a range at a time
        # (the index first, then where the operator seeks): FileResponse answers `Range` with
        # 206 and Content-Range, one past the end with 416, and says Accept-Ranges: bytes.
        return web.FileResponse(path, headers={"Content-Type": media_type})

    async def _page(self, request: web.Request) -> web.Response:
        report = await self.status_report()
        events = await self.events(_PAGE_EVENTS)
        page = render_page(
            report, events, self.history, now=time.time(), token_configured=self.token is not None
        )
        return web.Response(text=page, content_type="text/html")

    async def _partial(self, request: web.Request) -> web.Response:
        return web.Response(text=await self._live_fragment(), content_type="text/html")

    async def _script(self, request: web.Request) -> web.Response:
        return web.Response(text=SCRIPT, content_type="text/javascript")

    async def _style(self, request: web.Request) -> web.Response:
        return web.Response(text=STYLE, content_type="text/css")
