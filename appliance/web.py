"""The local web status page and its HTTP API (aiohttp): the page, `/healthz`, `/api/status`,
`/api/events`, `/metrics`, `POST /api/sync` and image payloads, with the token rules and the
security headers every response carries. Contract: docs/status-api.md."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.control import drain_engines
from appliance.health import HealthMonitor
from appliance.status import collect_status
from config import ApplianceConfig, ConfigError, StatusSection
from config.units import format_duration, format_size
from sync import Journal, JournalReader, PayloadStore, Priority, StorageFull
from sync.engine import SyncEngine
from sync.errors import PayloadError

log = logging.getLogger(__name__)

# A source failed or reconnecting for longer than this makes /healthz answer 503; shorter
# outages (a broker restart, a camera's reopen) are normal and only show on the page.
SOURCE_GRACE_S = 15.0
_WATCH_INTERVAL_S = 1.0
# Journal figures (the same queries as `appliance status`) are shared by requests for this long,
# so several open pages polling every few seconds cost one set of reads, not one each.
_FIGURES_TTL_S = 2.0
EVENTS_DEFAULT, EVENTS_MAX = 50, 500
_PAGE_EVENTS = 20
MIN_TOKEN_CHARS = 16
COOKIE_NAME = "appliance_status"
# Raster formats only: an SVG is a document that can carry script.
SERVED_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BAD_SOURCE_STATES = ("failed", "reconnecting")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
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


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`. A host name other than `localhost` may
    resolve to anything, so it counts as reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def recent_events(reader: JournalReader, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` alert and event records, newest first, each payload with its media
    type and, for a stored raster image, the URL the page shows it at."""
    records = reader.recent((Priority.ALERT, Priority.EVENT), limit)
    known = reader.payload_info(sorted({sha for r in records for sha in r.payloads}))
    events = []
    for record in records:
        refs = []
        for sha in record.payloads:
            size, media_type, state = known.get(sha, (0, "", "gone"))
            image = state == "present" and media_type in SERVED_IMAGE_TYPES
            refs.append(
                {
                    "sha256": sha,
                    "size": size,
                    "media_type": media_type or None,
                    "state": state,
                    "url": f"/payloads/{sha}" if image else None,
                }
            )
        events.append(
            {
                "seq": record.seq,
                "ts": record.ts,
                "source": record.source,
                "kind": record.kind,
                "priority": record.priority.label,
                "model": record.model,
                "body": record.body,
                "payloads": refs,
            }
        )
    return events


def payload_media_type(reader: JournalReader, sha256: str) -> str | None:
    """The media type of a payload whose file is present, or None."""
    size_type_state = reader.payload_info([sha256]).get(sha256)
    if size_type_state is None or size_type_state[2] != "present":
        return None
    return size_type_state[1]


# ------------------------------------------------------------------------------------- metrics


class _ReportCollector(Collector):
    """Turns one /api/status report into Prometheus metric families."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report

    def collect(self) -> Iterable[Metric]:
        report = self.report
        records = GaugeMetricFamily(
            "appliance_records_total",
            "Records in the journal now, by priority and kind (falls when records are evicted).",
            labels=["priority", "kind"],
        )
        for entry in report["records"]["by_priority_and_kind"]:
            records.add_metric([entry["priority"], entry["kind"]], entry["records"])
        yield records
        backlog_records = GaugeMetricFamily(
            "appliance_sync_backlog_records",
            "Records not yet acknowledged by a destination.",
            labels=["destination", "priority"],
        )
        backlog_bytes = GaugeMetricFamily(
            "appliance_sync_backlog_bytes",
            "Estimated bytes of records not yet acknowledged by a destination.",
            labels=["destination", "priority"],
        )
        reachable = GaugeMetricFamily(
            "appliance_sync_reachable",
            "1 when the destination answered its last probe, 0 when not (absent: unknown).",
            labels=["destination"],
        )
        for name, dest in report["destinations"].items():
            for priority, figures in dest["backlog"].items():
                backlog_records.add_metric([name, priority], figures["records"])
                backlog_bytes.add_metric([name, priority], figures["bytes"])
            if dest["reachable"] is not None:
                reachable.add_metric([name], 1.0 if dest["reachable"] else 0.0)
        yield backlog_records
        yield backlog_bytes
        yield reachable
        yield GaugeMetricFamily(
            "appliance_sync_oldest_unsynced_seconds",
            "Age of the oldest record some destination has not acknowledged (0: none).",
            value=report["oldest_unsynced_age_s"] or 0.0,
        )
        evictions = CounterMetricFamily(
            "appliance_evictions",
            "Records evicted by retention, by priority and reason.",
            labels=["priority", "reason"],
        )
        for entry in report["evictions"]:
            evictions.add_metric([entry["priority"], entry["reason"]], entry["records"])
        yield evictions
        drops = CounterMetricFamily(
            "appliance_drops",
            "Records refused before reaching the journal (full disk, shedding), by reason.",
            labels=["priority", "reason"],
        )
        for entry in report["drops"]:
            drops.add_metric([entry["priority"], entry["reason"]], entry["records"])
        yield drops
        quality = CounterMetricFamily(
            "appliance_data_quality",
            "Bad input counted per source and reason (NaN, malformed, out of range, ...).",
            labels=["source", "reason"],
        )
        for entry in report["data_quality"]:
            quality.add_metric([entry["source"], entry["reason"]], entry["count"])
        yield quality
        up = GaugeMetricFamily(
            "appliance_source_up", "1 when the source is running, else 0.", labels=["source"]
        )
        reconnects = CounterMetricFamily(
            "appliance_source_reconnects",
            "Successful reconnects of a source since the daemon started.",
            labels=["source"],
        )
        for name, source in report["daemon"]["sources"].items():
            up.add_metric([name], 1.0 if source["state"] == "running" else 0.0)
            reconnects.add_metric([name], source["reconnects"])
        yield up
        yield reconnects
        disk = report["disk"]
        yield GaugeMetricFamily(
            "appliance_disk_used_bytes",
            "Bytes the journal and payloads use (what the disk budget counts).",
            value=disk["used_bytes"],
        )
        yield GaugeMetricFamily(
            "appliance_disk_budget_bytes", "storage.disk_budget.", value=disk["budget_bytes"]
        )
        yield GaugeMetricFamily(
            "appliance_uptime_seconds",
            "Seconds since the daemon started.",
            value=report["uptime_s"],
        )
        yield GaugeMetricFamily(
            "appliance_healthy", "1 when /healthz answers 200, else 0.", value=report["healthy"]
        )
        info = GaugeMetricFamily(
            "appliance_info",
            "The appliance's identity; always 1.",
            labels=["version", "appliance_id"],
        )
        info.add_metric([report["version"], report["appliance_id"]], 1.0)
        yield info


def render_metrics(report: dict[str, Any]) -> bytes:
    """Prometheus text for one report, from a registry of its own (never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReportCollector(report))
    return generate_latest(registry)


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
        grace_s: float = SOURCE_GRACE_S,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.store = store
        self.monitor = monitor
        self.engines = engines
        self.token = token
        self.host, self.port = split_listen(cfg.status.listen)
        # Beyond loopback every route needs the token, not only POST /api/sync.
        self.protected = not is_loopback(self.host)
        self.grace_s = grace_s
        self.url: str | None = None
        self._camera_names = {camera.name for camera in cfg.cameras}
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._syncs: dict[str, asyncio.Task[None]] = {}
        self._bad_since: dict[str, float] = {}
        self._windows: dict[str, deque[tuple[float, int]]] = {}
        self._figures: tuple[float, dict[str, Any]] | None = None
        self._figures_lock = asyncio.Lock()
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
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/api/sync", self._sync)
        app.router.add_get("/payloads/{sha256}", self._payload)
        return app

    async def __aenter__(self) -> StatusServer:
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
        self._watcher = asyncio.create_task(self._watch(), name="status:watch")
        log.info(
            "status page listening",
            extra={"fields": {"url": self.url, "token_required_everywhere": self.protected}},
        )
        with contextlib.suppress(StorageFull):  # the URL is also in the log and in /api/status
            await self.journal.set_meta({"status_url": self.url})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tasks = [t for t in (self._watcher, *self._syncs.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if not self.journal.closed:
            with contextlib.suppress(StorageFull):
                await self.journal.set_meta({"status_url": ""})

    # ------------------------------------------------------------------------------ health

    async def _watch(self) -> None:
        while True:
            self._observe()
            await asyncio.sleep(_WATCH_INTERVAL_S)

    def _observe(self) -> None:
        """Note since when each source has been down and each camera not running, and keep the
        last few window counts for a rate."""
        now = time.monotonic()
        bad: set[str] = set()
        for name, health in self.monitor.sources.items():
            state = health.state
            if name in self._camera_names:
                if state != "running":
                    bad.add(f"camera_not_running:{name}")
            elif state in _BAD_SOURCE_STATES:
                bad.add(f"source_{state}:{name}")
            counts = self._windows.setdefault(name, deque(maxlen=6))
            counts.append((now, int(health.windows)))
        for reason in bad:
            self._bad_since.setdefault(reason, now)
        for reason in set(self._bad_since) - bad:
            del self._bad_since[reason]

    def reasons(self) -> list[str]:
        """Why the appliance is degraded: the monitor's reasons, and sources down (cameras not
        running) for longer than the grace period. Empty when healthy."""
        self._observe()
        now = time.monotonic()
        late = [r for r, since in sorted(self._bad_since.items()) if now - since >= self.grace_s]
        return [*self.monitor.reasons(), *late]

    def _window_rate(self, name: str) -> float | None:
        counts = self._windows.get(name)
        if not counts or len(counts) < 2:
            return None
        (t0, w0), (t1, w1) = counts[0], counts[-1]
        return round((w1 - w0) / (t1 - t0), 2) if t1 > t0 else None

    # ----------------------------------------------------------------------------- reports

    async def _journal_figures(self) -> dict[str, Any]:
        async with self._figures_lock:
            if self._figures is not None and time.monotonic() - self._figures[0] < _FIGURES_TTL_S:
                return self._figures[1]
            figures = await asyncio.to_thread(collect_status, self.cfg)
            self._figures = (time.monotonic(), figures)
            return figures

    async def status_report(self) -> dict[str, Any]:
        """`appliance status --json`'s figures with the live snapshot in place of the heartbeat."""
        figures = await self._journal_figures()
        snapshot = self.monitor.snapshot()
        reasons = self.reasons()
        for name, source in snapshot["sources"].items():
            source["windows_per_s"] = self._window_rate(name)
        destinations: dict[str, Any] = {}
        for name, dest in figures["destinations"].items():
            live = snapshot["destinations"].get(name, {})
            merged = {**dest, **{k: live[k] for k in _LIVE_DESTINATION_KEYS if k in live}}
            pending = merged["backlog_bytes"] + merged["payload_bytes_waiting"]
            rate = merged.get("rate_bytes_per_s") or 0.0
            merged["eta_s"] = 0.0 if pending == 0 else (round(pending / rate, 1) if rate else None)
            destinations[name] = merged
        return {
            **figures,
            "state": "degraded" if reasons else "ok",
            "reasons": reasons,
            "healthy": not reasons,
            "version": snapshot["version"],
            "uptime_s": snapshot["uptime_s"],
            "status_url": self.url,
            "daemon": {**snapshot, "running": True, "state": snapshot["state"]},
            "destinations": destinations,
        }

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
        text = request.query.get("limit")
        limit = EVENTS_DEFAULT
        if text is not None:
            if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= EVENTS_MAX:
                raise web.HTTPBadRequest(
                    text=f"limit must be a whole number from 1 to {EVENTS_MAX}, not {text!r}"
                )
            limit = int(text)
        return web.json_response({"events": await self.events(limit)})

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

    async def _payload(self, request: web.Request) -> web.Response:
        sha256 = request.match_info["sha256"]
        if not _SHA256.fullmatch(sha256):
            raise web.HTTPBadRequest(text="a payload is named by its sha256: 64 lowercase hex")
        media_type = await self.journal.read(functools.partial(payload_media_type, sha256=sha256))
        if media_type not in SERVED_IMAGE_TYPES:
            raise web.HTTPNotFound(text=f"no image payload {sha256}")
        try:
            data = await asyncio.to_thread(self.store.read, sha256)
        except PayloadError:
            raise web.HTTPNotFound(text=f"no image payload {sha256}") from None
        return web.Response(body=data, content_type=media_type)

    async def _page(self, request: web.Request) -> web.Response:
        report = await self.status_report()
        events = await self.events(_PAGE_EVENTS)
        return web.Response(text=render_page(report, events), content_type="text/html")

    async def _partial(self, request: web.Request) -> web.Response:
        report = await self.status_report()
        events = await self.events(_PAGE_EVENTS)
        return web.Response(text=render_live(report, events), content_type="text/html")

    async def _script(self, request: web.Request) -> web.Response:
        return web.Response(text=_SCRIPT, content_type="text/javascript")

    async def _style(self, request: web.Request) -> web.Response:
        return web.Response(text=_STYLE, content_type="text/css")


_LIVE_DESTINATION_KEYS = (
    "reachable",
    "draining",
    "last_success",
    "last_error",
    "rate_bytes_per_s",
    "payload_bytes_today",
    "records_sent",
    "bytes_sent",
)


# ------------------------------------------------------------------------------------ the page


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{format_duration(seconds)} ago"


def _table(head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{cells}</tr>{body}</table></div>'


def _state(state: Any) -> str:
    good = state in ("ok", "running", "finished", "scoring", "yes")
    return f'<span class="{"good" if good else "bad"}">{_e(state)}</span>'


def render_live(report: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """The part of the page the script refreshes: every figure, escaped."""
    daemon = report["daemon"]
    parts = [
        f"<p>{_state(report['state'])} "
        + (_e(", ".join(report["reasons"])) if report["reasons"] else "")
        + f" &middot; up {_e(format_duration(report['uptime_s']))} &middot; pid {_e(daemon['pid'])}</p>"
    ]
    sources = [
        [
            _e(name),
            _state(s["state"]),
            _e(s["windows"]),
            _e(s.get("windows_per_s")),
            _e(_age(s["last_reading_age_s"])),
            _e(s["reconnects"]),
            _e(s["bad_values"]),
            _e((s.get("anomaly") or {}).get("state")),
            _e(s["error"] or ""),
        ]
        for name, s in daemon["sources"].items()
        if name not in daemon["cameras"]
    ]
    parts.append("<h2>Sources</h2>")
    parts.append(
        _table(
            [
                "source",
                "state",
                "windows",
                "per s",
                "last reading",
                "reconnects",
                "bad values",
                "anomaly",
                "error",
            ],
            sources,
            "no sources",
        )
    )
    cameras = []
    for name, cam in daemon["cameras"].items():
        latency = cam.get("latency_ms") or {}
        pipeline = cam.get("pipeline") or {}
        cameras.append(
            [
                _e(name),
                _state(cam.get("state")),
                _e(f"{cam.get('fps', 0.0):.1f}"),
                _e(_age(cam.get("last_frame_age_s"))),
                _e(cam.get("reconnects")),
                _e(cam.get("frames_dropped")),
                _e(cam.get("model")),
                _e(f"{latency.get('p50') or 0:.0f} / {latency.get('p95') or 0:.0f} ms"),
                _e(pipeline.get("skipped_motion")),
            ]
        )
    parts.append("<h2>Cameras</h2>")
    parts.append(
        _table(
            [
                "camera",
                "state",
                "fps",
                "last frame",
                "reconnects",
                "drops",
                "model",
                "p50 / p95",
                "motion skipped",
            ],
            cameras,
            "no cameras",
        )
    )
    disk = report["disk"]
    parts.append("<h2>Journal</h2>")
    parts.append(
        f"<p>{_e(report['records']['total'])} records; disk {_e(format_size(disk['used_bytes']))} "
        f"of {_e(format_size(disk['budget_bytes']))} budget; file system free "
        f"{_e(format_size(disk['fs_free_bytes']))}; oldest unsynced "
        f"{_e(_age(report['oldest_unsynced_age_s']))}</p>"
    )
    parts.append(
        _table(
            ["priority", "records", "unsynced"],
            [
                [_e(p), _e(n), _e(report["unsynced"][p]["records"])]
                for p, n in report["records"]["by_priority"].items()
            ],
            "no records",
        )
    )
    parts.append(
        _table(
            ["evicted", "reason", "records"],
            [[_e(x["priority"]), _e(x["reason"]), _e(x["records"])] for x in report["evictions"]],
            "no evictions",
        )
    )
    parts.append(
        _table(
            ["dropped", "reason", "records"],
            [[_e(x["priority"]), _e(x["reason"]), _e(x["records"])] for x in report["drops"]],
            "no drops",
        )
    )
    parts.append(
        _table(
            ["data quality", "reason", "count"],
            [[_e(x["source"]), _e(x["reason"]), _e(x["count"])] for x in report["data_quality"]],
            "no bad data counted",
        )
    )
    parts.append("<h2>Destinations</h2>")
    destinations = []
    for name, d in report["destinations"].items():
        backlog = ", ".join(
            f"{p} {b['records']} ({format_size(b['bytes'])})" for p, b in d["backlog"].items()
        )
        budget = d["daily_payload_budget"]
        today = format_size(d.get("payload_bytes_today") or 0)
        destinations.append(
            [
                _e(name),
                _state({True: "yes", False: "no", None: "unknown"}[d["reachable"]]),
                _e(backlog),
                _e(d["payloads_waiting"]),
                _e(d["last_success"]),
                _e(today if not budget else f"{today} of {format_size(budget)}"),
                _e(None if d["eta_s"] is None else format_duration(d["eta_s"])),
                _e(d["last_error"] or ""),
            ]
        )
    parts.append(
        _table(
            [
                "destination",
                "reachable",
                "backlog",
                "payloads",
                "last success",
                "today",
                "ETA",
                "last error",
            ],
            destinations,
            "no destinations configured",
        )
    )
    parts.append("<h2>Recent events and alerts</h2>")
    rows = []
    for event in events:
        summary = json.dumps(event["body"], separators=(",", ":"))
        images = "".join(
            f'<img src="{_e(p["url"])}" alt="snapshot" loading="lazy">'
            for p in event["payloads"]
            if p["url"]
        )
        rows.append(
            [
                _e(event["ts"]),
                _e(event["priority"]),
                _e(event["source"]),
                _e(event["kind"]),
                f"<code>{_e(summary[:200])}</code>{images}",
            ]
        )
    parts.append(_table(["time", "priority", "source", "kind", "what"], rows, "no events yet"))
    return "\n".join(parts)


def render_page(report: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """The whole page: no build step, one stylesheet and one script from this server."""
    options = "".join(
        f'<option value="{_e(name)}">{_e(name)}</option>' for name in report["destinations"]
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(report["appliance_id"])} status</title>
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header><h1>{_e(report["appliance_id"])}</h1><p class="muted">version {_e(report["version"])}</p></header>
<main id="live">
{render_live(report, events)}
</main>
<section>
<h2>Sync now</h2>
<form id="sync-form">
<label>token <input name="token" type="password" autocomplete="current-password" required></label>
<label>destination <select name="destination"><option value="">all</option>{options}</select></label>
<button type="submit">Sync now</button>
</form>
<p id="sync-result" class="muted"></p>
<noscript><p>The page refreshes and "Sync now" need JavaScript; /api/status works without.</p></noscript>
</section>
</body>
</html>
"""


_SCRIPT = """"use strict";
(function () {
  const live = document.getElementById("live");
  async function refresh() {
    try {
      const response = await fetch("/partial", { cache: "no-store", credentials: "same-origin" });
      if (response.ok) {
        live.innerHTML = await response.text();
        live.classList.remove("stale");
      } else {
        live.classList.add("stale");
      }
    } catch (error) {
      live.classList.add("stale");
    }
  }
  setInterval(refresh, 3000);
  const form = document.getElementById("sync-form");
  const result = document.getElementById("sync-result");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const destination = form.elements.destination.value;
    const url = "/api/sync" + (destination ? "?destination=" + encodeURIComponent(destination) : "");
    result.textContent = "asking...";
    try {
      const response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { Authorization: "Bearer " + form.elements.token.value },
      });
      const text = await response.text();
      result.textContent = response.status === 202 ? "sync started" : "refused (" + response.status + "): " + text;
    } catch (error) {
      result.textContent = "failed: " + error;
    }
  });
})();
"""

_STYLE = """body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 0.5rem 1rem;
  max-width: 70rem; line-height: 1.4; }
h1 { font-size: 1.4rem; margin-bottom: 0; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 0.4rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; margin-bottom: 0.5rem; }
th, td { text-align: left; padding: 0.2rem 0.5rem; border-bottom: 1px solid #ddd;
  vertical-align: top; }
code { font-size: 0.8rem; word-break: break-all; }
img { display: block; max-width: 10rem; margin-top: 0.3rem; }
.good { color: #176f2c; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.muted { color: #666; }
.stale { opacity: 0.5; }
form { display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: center; }
input, select, button { font-size: 1rem; padding: 0.3rem; }
@media (max-width: 40rem) { th, td { padding: 0.2rem; font-size: 0.8rem; } }
"""
