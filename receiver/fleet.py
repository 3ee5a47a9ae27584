"""Owns the receiver's fleet view: `GET /v1/fleet` and `GET /v1/fleet/ID` (JSON), the
server-rendered pages `/fleet` and `/fleet/ID` with the payload bytes they show, and `/metrics`;
the admin-token rules they share (a bearer header, or `?token=` once in a browser and then an
HttpOnly cookie) and their security headers. The HTML is receiver/fleet_page.py's; the figures
come from the store (`RecordStore.fleet`, `recent_records`), so every replica shows the same.
Contract: docs/fleet.md ("Fleet view")."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from config.names import NAME_PATTERN
from receiver.backend import (
    FleetFigures,
    FleetRow,
    RecentRecords,
    RecordStore,
    ShoreRecord,
    format_ts,
    parse_ts,
    payload_refs,
)
from receiver.fleet_page import STYLE, render_appliance, render_fleet, render_refusal
from receiver.metrics import ReceiverMetrics
from receiver.objects import PayloadObjects
from receiver.protocol import SHA256_RE, Refusal, byte_range, valid_appliance_id

COOKIE_NAME = "receiver_fleet"
RECENT_DEFAULT, RECENT_MAX = 20, 200
# The whole fleet's figures are shared by requests for this long: several open pages and a
# Prometheus scrape every few seconds cost one set of queries, not one each.
FLEET_TTL_S = 2.0
_SNIFF_BYTES = 16
_SNIFFED_MAX = 4096

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Shown in the page (images and clips); anything else is offered as a download.
INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "video/mp4"})


class FleetAuthority(Protocol):
    """What the fleet view needs of the receiver (receiver/app.py `_Receiver`)."""

    @property
    def store(self) -> RecordStore: ...

    @property
    def objects(self) -> PayloadObjects: ...

    def appliance_of_token(self, token: str) -> str | None: ...

    store_admins: set[bytes]
    """Digests of the admin tokens kept in the store, read again every few seconds."""

    metrics: ReceiverMetrics


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def cookie_value(digest: bytes) -> str:
    # Derived from the token's digest (all the store keeps), never the token: a leaked cookie
    # opens the pages but is no bearer token, and revoking the token ends its cookie.
    return hmac.new(digest, b"receiver fleet view cookie", hashlib.sha256).hexdigest()


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def sniff_media_type(head: bytes) -> str:
    """A payload's media type from its first bytes (the receiver is not told it): the formats
    appliances journal, else application/octet-stream."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if head.startswith(b"PK\x03\x04"):
        return "application/zip"  # numpy's .npz: sampled sensor windows
    return "application/octet-stream"


# ----------------------------------------------------------------------------- the figures


def _age(now_s: float, ts: str | None) -> float | None:
    if ts is None:
        return None
    try:
        return round(max(0.0, now_s - parse_ts(ts)), 1)
    except ValueError:
        return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def active_models(health: dict[str, Any]) -> list[str]:
    """`NAME@VERSION` of every detector a camera runs and every model package's active
    version, as the health record reported them."""
    found: set[str] = set()
    cameras = health.get("cameras")
    if isinstance(cameras, dict):
        found.update(
            c["model"] for c in cameras.values() if isinstance(c, dict) and _text(c.get("model"))
        )
    models = health.get("models")
    packages = models.get("packages") if isinstance(models, dict) else None
    if isinstance(packages, dict):
        for name, entry in packages.items():
            active = entry.get("active") if isinstance(entry, dict) else None
            if isinstance(active, str):
                found.add(f"{name}@{active}")
    return sorted(found)


def backlog_of(health: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Per destination what the appliance had not shipped (None: its health records do not
    say; an appliance of a version before they did)."""
    backlog = health.get("backlog")
    if not isinstance(backlog, dict):
        return None
    return {
        str(name): {
            "records": _int(d.get("records")),
            "bytes": _int(d.get("bytes")),
            "payloads": _int(d.get("payloads")),
            "payload_bytes": _int(d.get("payload_bytes")),
            "oldest": _text(d.get("oldest")),
        }
        for name, d in sorted(backlog.items())
        if isinstance(d, dict)
    }


def appliance_summary(row: FleetRow, now_s: float) -> dict[str, Any]:
    """One appliance in `GET /v1/fleet` (docs/fleet.md)."""
    health = row.health or {}
    reasons = health.get("reasons")
    backlog = backlog_of(health)
    state = _text(health.get("state")) if row.health is not None else None
    return {
        "appliance_id": row.appliance_id,
        "first_seen": row.first_seen,
        "last_seen": row.last_seen,
        "last_seen_age_s": _age(now_s, row.last_seen),
        "state": state or "unknown",
        "reasons": [r for r in reasons if isinstance(r, str)] if isinstance(reasons, list) else [],
        "health_ts": row.health_ts,
        "health_age_s": _age(now_s, row.health_ts),
        "version": _text(health.get("version")),
        "mode": _text(health.get("mode")),
        "models": active_models(health),
        "backlog": backlog,
        "backlog_records": None if backlog is None else sum(d["records"] for d in backlog.values()),
        "backlog_bytes": None
        if backlog is None
        else sum(d["bytes"] + d["payload_bytes"] for d in backlog.values()),
        "today": {
            "records": row.records_today,
            "payloads": row.payloads_today,
            "payload_bytes": row.payload_bytes_today,
        },
        "alerts_24h": row.alerts_24h,
        "totals": {
            "records": row.records,
            "payloads": row.payloads,
            "payload_bytes": row.payload_bytes,
        },
    }


# ------------------------------------------------------------------------------- the view


class FleetView:
    """The fleet routes of one receiver app."""

    def __init__(self, receiver: FleetAuthority, admin_tokens: Sequence[str]) -> None:
        self.receiver = receiver
        self._admins = {_digest(token) for token in admin_tokens}
        self._fleet: tuple[float, FleetFigures] | None = None
        self._fleet_lock = asyncio.Lock()
        # Payloads are content-addressed: a sha256's media type never changes.
        self._sniffed: dict[tuple[str, str], str] = {}

    # -- who may look -----------------------------------------------------------------------

    def _admin_digests(self) -> set[bytes]:
        admins = self._admins | self.receiver.store_admins
        if not admins:
            raise Refusal(
                403,
                "fleet view disabled",
                "this receiver has no admin tokens; start it with --admin-tokens FILE or add "
                "one with `appliance receiver tokens add --admin`",
            )
        return admins

    def _check_token(self, token: str, admins: set[bytes]) -> bytes:
        digest = _digest(token)
        if digest in admins:
            return digest
        if self.receiver.appliance_of_token(token) is not None:
            raise Refusal(
                403,
                "not an admin token",
                "this is an appliance's token; the fleet view needs an admin token",
            )
        raise Refusal(
            401,
            "unknown admin token",
            "the token is not among the receiver's admin tokens",
            {"WWW-Authenticate": "Bearer"},
        )

    def authorize_api(self, request: web.Request) -> None:
        """`Authorization: Bearer ADMIN_TOKEN`: 401 without one or with an unknown one, 403
        with an appliance's."""
        admins = self._admin_digests()
        token = _bearer(request)
        if token is None:
            raise Refusal(
                401,
                "missing token",
                "send Authorization: Bearer ADMIN_TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
        self._check_token(token, admins)

    def authorize_page(self, request: web.Request) -> bytes | None:
        """A bearer header or the page cookie; else `?token=` (then the digest it opens, for
        the cookie). The same 401/403 as the API otherwise."""
        admins = self._admin_digests()
        token = _bearer(request)
        if token is not None:
            self._check_token(token, admins)
            return None
        cookie = request.cookies.get(COOKIE_NAME)
        if cookie is not None and any(hmac.compare_digest(cookie, cookie_value(d)) for d in admins):
            return None
        given = request.query.get("token")
        if given is None:
            raise Refusal(
                401,
                "missing token",
                "open /fleet?token=ADMIN_TOKEN once in this browser (the address bar drops it "
                "and a cookie keeps you signed in), or send Authorization: Bearer ADMIN_TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
        return self._check_token(given, admins)

    # -- figures ----------------------------------------------------------------------------

    async def fleet(self) -> FleetFigures:
        async with self._fleet_lock:
            if self._fleet is not None and time.monotonic() - self._fleet[0] < FLEET_TTL_S:
                return self._fleet[1]
            figures = await self.receiver.store.fleet()
            self._fleet = (time.monotonic(), figures)
            return figures

    async def _one(self, request: web.Request) -> tuple[str, dict[str, Any], float]:
        appliance_id = request.match_info["appliance_id"]
        if not valid_appliance_id(appliance_id):
            raise Refusal(400, "bad appliance id", f"APPLIANCE_ID must match {NAME_PATTERN}")
        figures = await self.receiver.store.fleet(appliance_id)
        if not figures.rows:
            raise Refusal(
                404,
                "unknown appliance",
                f"no appliance {appliance_id} has shipped anything to this receiver",
            )
        return appliance_id, appliance_summary(figures.rows[0], figures.now_s), figures.now_s

    @staticmethod
    def _limit(request: web.Request) -> int:
        text = request.query.get("limit")
        if text is None:
            return RECENT_DEFAULT
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= RECENT_MAX:
            raise Refusal(400, "bad limit", f"limit must be a whole number from 1 to {RECENT_MAX}")
        return int(text)

    async def _media_type(self, appliance_id: str, sha256: str) -> str | None:
        """The payload's media type from its first bytes; None when its bytes are not here."""
        known = self._sniffed.get((appliance_id, sha256))
        if known is not None:
            return known
        head = b""
        async for block in self.receiver.objects.read_payload(
            appliance_id, sha256, 0, _SNIFF_BYTES
        ):
            head += block
        if not head:
            return None
        media_type = sniff_media_type(head)
        if len(self._sniffed) >= _SNIFFED_MAX:
            self._sniffed.clear()
        self._sniffed[(appliance_id, sha256)] = media_type
        return media_type

    async def recent(self, appliance_id: str, limit: int) -> dict[str, list[dict[str, Any]]]:
        """The appliance's newest alerts and records with payloads, each payload with its size,
        whether the receiver holds it, its media type and the page's URL for its bytes."""
        recent: RecentRecords = await self.receiver.store.recent_records(appliance_id, limit)
        held = recent.payloads
        shas = sorted({s for r in [*recent.alerts, *recent.media] for s in payload_refs(r.line)})
        kinds = await asyncio.gather(
            *(self._media_type(appliance_id, s) for s in shas if s in held)
        )
        media_types = dict(zip([s for s in shas if s in held], kinds, strict=True))

        def shown(record: ShoreRecord) -> dict[str, Any]:
            try:
                value = json.loads(record.line)
            except ValueError:
                value = {}
            fields = value if isinstance(value, dict) else {}
            return {
                "journal_id": record.journal_id,
                "seq": record.seq,
                "ts": fields.get("ts"),
                "received_at": record.received_at,
                "source": fields.get("source"),
                "kind": fields.get("kind"),
                "priority": fields.get("priority"),
                "model": fields.get("model"),
                "body": fields.get("body"),
                "payloads": [
                    {
                        "sha256": sha,
                        "size": held.get(sha),
                        "stored": media_types.get(sha) is not None,
                        "media_type": media_types.get(sha),
                        "url": f"/fleet/{appliance_id}/payloads/{sha}"
                        if media_types.get(sha) is not None
                        else None,
                    }
                    for sha in payload_refs(record.line)
                ],
            }

        return {
            "alerts": [shown(r) for r in recent.alerts],
            "media": [shown(r) for r in recent.media],
        }

    # -- JSON -------------------------------------------------------------------------------

    async def api_fleet(self, request: web.Request) -> web.Response:
        """GET /v1/fleet: every appliance, by id."""
        self.authorize_api(request)
        figures = await self.fleet()
        return web.json_response(
            {
                "generated_at": _iso(figures.now_s),
                "appliances": [appliance_summary(r, figures.now_s) for r in figures.rows],
            },
            headers={"Cache-Control": "no-store"},
        )

    async def api_appliance(self, request: web.Request) -> web.Response:
        """GET /v1/fleet/{appliance_id}?limit=N: one appliance with its recent records."""
        self.authorize_api(request)
        limit = self._limit(request)
        appliance_id, summary, now_s = await self._one(request)
        answer = {"generated_at": _iso(now_s), **summary, **await self.recent(appliance_id, limit)}
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics (admin token): this replica's counters and the fleet's gauges."""
        self.authorize_api(request)
        body = self.receiver.metrics.render(await self.fleet())
        return web.Response(
            body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
        )

    # -- pages ------------------------------------------------------------------------------

    async def page_fleet(self, request: web.Request) -> web.StreamResponse:
        """GET /fleet: every appliance, one row each."""

        async def render() -> str:
            figures = await self.fleet()
            rows = [appliance_summary(r, figures.now_s) for r in figures.rows]
            return render_fleet(rows, _iso(figures.now_s))

        return await self._page(request, render)

    async def page_appliance(self, request: web.Request) -> web.StreamResponse:
        """GET /fleet/{appliance_id}: one appliance, its alerts, snapshots and clips."""

        async def render() -> str:
            limit = self._limit(request)
            appliance_id, summary, now_s = await self._one(request)
            recent = await self.recent(appliance_id, limit)
            return render_appliance(summary, recent["alerts"], recent["media"], _iso(now_s))

        return await self._page(request, render)

    async def _page(
        self, request: web.Request, render: Callable[[], Awaitable[str]]
    ) -> web.StreamResponse:
        try:
            opened_by = self.authorize_page(request)
            if opened_by is not None:
                # Drop the token from the address bar (and history) once the cookie is set.
                response: web.StreamResponse = web.Response(
                    status=303, headers={"Location": request.path, **SECURITY_HEADERS}
                )
                response.set_cookie(
                    COOKIE_NAME,
                    cookie_value(opened_by),
                    httponly=True,
                    samesite="Strict",
                    path="/fleet",
                    secure=request.secure,
                )
                return response
            text = await render()
        except Refusal as refusal:
            return web.Response(
                text=render_refusal(refusal.status, refusal.error, refusal.detail),
                status=refusal.status,
                content_type="text/html",
                headers={**refusal.headers, **SECURITY_HEADERS, "Cache-Control": "no-store"},
            )
        return web.Response(
            text=text,
            content_type="text/html",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
        )

    async def style(self, request: web.Request) -> web.Response:
        return web.Response(
            text=STYLE,
            content_type="text/css",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    async def payload(self, request: web.Request) -> web.StreamResponse:
        """GET /fleet/{appliance_id}/payloads/{sha256}: a payload of that appliance, whole or
        a `Range: bytes=N-M` of it; images and MP4 clips inline, anything else a download."""
        self.authorize_page(request)
        appliance_id = request.match_info["appliance_id"]
        sha256 = request.match_info["sha256"]
        if not valid_appliance_id(appliance_id) or not SHA256_RE.fullmatch(sha256):
            raise Refusal(400, "bad path", "expected /fleet/APPLIANCE_ID/payloads/SHA256")
        size = await self.receiver.store.payload_size(appliance_id, sha256)
        media_type = None if size is None else await self._media_type(appliance_id, sha256)
        if size is None or media_type is None:
            raise Refusal(
                404, "unknown payload", f"appliance {appliance_id} has no payload {sha256} here"
            )
        start, end, status = byte_range(request, size, "payload")
        headers = {
            **SECURITY_HEADERS,
            "Content-Type": media_type
            if media_type in INLINE_TYPES
            else "application/octet-stream",
            "Content-Length": str(end - start),
            "Accept-Ranges": "bytes",
            # Content-addressed: these bytes never change under this name.
            "Cache-Control": "private, max-age=31536000, immutable",
        }
        if media_type not in INLINE_TYPES:
            headers["Content-Disposition"] = f'attachment; filename="{sha256[:16]}.bin"'
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        async for block in self.receiver.objects.read_payload(appliance_id, sha256, start, end):
            await response.write(block)
        await response.write_eof()
        return response


def _iso(seconds: float) -> str:
    return format_ts(seconds)


def add_fleet_routes(
    app: web.Application, receiver: FleetAuthority, admin_tokens: Sequence[str]
) -> FleetView:
    """Register the fleet view and `/metrics` (docs/fleet.md, Fleet view) on `app`, and the
    middleware that counts refusals for `/metrics`."""
    view = FleetView(receiver, admin_tokens)
    app.middlewares.append(receiver.metrics.middleware())
    app.router.add_get("/v1/fleet", view.api_fleet, allow_head=False)
    app.router.add_get("/v1/fleet/{appliance_id}", view.api_appliance, allow_head=False)
    app.router.add_get("/metrics", view.metrics, allow_head=False)
    app.router.add_get("/fleet.css", view.style, allow_head=False)
    app.router.add_get("/fleet", view.page_fleet, allow_head=False)
    app.router.add_get("/fleet/{appliance_id}", view.page_appliance, allow_head=False)
    app.router.add_get("/fleet/{appliance_id}/payloads/{sha256}", view.payload, allow_head=False)
    return view


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "COOKIE_NAME",
    "FleetView",
    "add_fleet_routes",
    "appliance_summary",
    "sniff_media_type",
]
