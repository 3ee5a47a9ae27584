"""The reference upstream receiver of docs/sync-protocol.md: authenticated, idempotent batch and
resumable payload endpoints (aiohttp), backed by its own receiver.db and payload directory.

Layout under the data directory:

    receiver.db                               records, batches, payloads, per-appliance counters
    payloads/<appliance_id>/<sha256>          verified payloads (renamed into place, dir fsync'd)
    partial/<appliance_id>/<sha256>.part      uploads in progress (every chunk fsync'd); one
                                              untouched for `partial_ttl` is abandoned: deleted
    models/<sha256>                           published model packages (receiver/model_feed.py)

Every path is built only from identifiers that passed the protocol's strict patterns. SQLite is
touched by one thread only (a single-worker executor: the queue in front of it serialises
writes); file work runs in worker threads; the event loop never blocks on disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from config.names import NAME_PATTERN
from config.receiver import DEFAULT_MAX_INFLIGHT
from receiver.backend import DEFAULT_CONCURRENT_QUIET_S, RecordStore
from receiver.batches import IncomingBatch, decode_batch, read_batch_body, too_large
from receiver.fleet import add_fleet_routes
from receiver.metrics import ReceiverMetrics
from receiver.model_feed import add_model_routes
from receiver.objects import BucketSettings, DirectoryObjects, PayloadObjects, S3Objects
from receiver.postgres import PostgresStore, describe_dsn
from receiver.protocol import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_PARTIAL_TTL_S,
    READ_CHUNK,
    SHA256_RE,
    Handler,
    Refusal,
    client_certificate_required,
    follows_of,
    journal_of,
    json_errors,
    parse_admin_tokens_file,
    parse_batch_id,
    parse_listen,
    parse_tokens_file,
    uint_header,
    valid_appliance_id,
)
from receiver.reads import add_read_routes
from receiver.store import ReceiverStore

log = logging.getLogger(__name__)
_EXPIRY_INTERVAL_S = 3600.0
_UPLOAD_LOCK_STRIPES = 64


TOKENS_REFRESH_S = 5.0
"""How soon a token added or revoked in the store applies on every replica."""


def _token_digest(token: str) -> bytes:
    # Look tokens up by digest: the dict lookup then leaks nothing about a token's prefix.
    return hashlib.sha256(token.encode()).digest()


def concurrent_warning(appliance_id: str, journals: Sequence[str]) -> dict[str, Any]:
    """The warning every batch answer of an appliance id with concurrent journals carries."""
    return {
        "code": "concurrent_journals",
        "journals": list(journals),
        "detail": (
            f"appliance id {appliance_id} has {len(journals)} journals shipping at once "
            f"({', '.join(journals)}): two boxes share one id. Every record of each is kept; "
            "give each box its own appliance.id. The warning clears once only one of them "
            "has shipped under this id for the receiver's --concurrent-quiet"
        ),
    }


class _Receiver:
    """The handlers, with the state they share (store, tokens, limits, upload locks)."""

    def __init__(
        self,
        data_dir: Path,
        tokens: Mapping[str, str] | None,
        *,
        max_batch_bytes: int,
        max_chunk_bytes: int,
        partial_ttl: float = DEFAULT_PARTIAL_TTL_S,
        concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
        clock: Callable[[], float] | None = None,
        database: str | None = None,
        bucket: BucketSettings | None = None,
        max_connections: int = 10,
        store: RecordStore | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
    ) -> None:
        self.data_dir = data_dir
        self.max_inflight = max_inflight
        self._inflight = 0
        self.bucket = bucket
        self.max_connections = max_connections
        self.partial_ttl = partial_ttl
        self.concurrent_quiet = concurrent_quiet
        self.clock = clock
        self.database = database
        self.max_batch_bytes = max_batch_bytes
        self.max_chunk_bytes = max_chunk_bytes
        # No tokens file and no token ever kept in the store: every appliance is accepted.
        self._tokens_file = tokens is not None
        self._store_tokens_ever = False
        # Tokens kept in the store (`appliance receiver tokens`), read again every
        # TOKENS_REFRESH_S so one added or revoked through any replica applies on all of them.
        self._store_owners: dict[bytes, str] = {}
        self.store_admins: set[bytes] = set()
        self._owners: dict[bytes, str] = {}
        for appliance_id, token in (tokens or {}).items():
            if not valid_appliance_id(appliance_id):
                raise ValueError(f"tokens: {appliance_id!r} is not a valid appliance id")
            digest = _token_digest(token)
            if not token or digest in self._owners:
                raise ValueError(f"tokens: the token of {appliance_id!r} is empty or reused")
            self._owners[digest] = appliance_id
        # Striped: uploads of the same payload serialise, memory stays fixed however many there are.
        self._upload_locks = [asyncio.Lock() for _ in range(_UPLOAD_LOCK_STRIPES)]
        self._store: RecordStore | None = None
        self._given_store = store
        self._objects: PayloadObjects | None = None
        # This replica's traffic counters for /metrics (receiver/fleet.py serves them).
        self.metrics = ReceiverMetrics()

    @property
    def objects(self) -> PayloadObjects:
        if self._objects is None:
            raise RuntimeError("receiver objects are not open (the app has not started)")
        return self._objects

    @property
    def store(self) -> RecordStore:
        if self._store is None:
            raise RuntimeError("receiver store is not open (the app has not started)")
        return self._store

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # Payload bytes: a bucket every replica shares, or the data folder.
            objects: PayloadObjects = (
                DirectoryObjects(self.data_dir)
                if self.bucket is None
                else await S3Objects.open(self.bucket)
            )
            stack.push_async_callback(objects.close)
            if self._given_store is not None:  # a store made elsewhere (tests' in-memory fake)
                store: RecordStore = self._given_store
            elif self.database is not None:
                # A fleet's store: PostgreSQL, whose clock (not this replica's) stamps the rows.
                store = await PostgresStore.open(
                    self.database,
                    concurrent_quiet=self.concurrent_quiet,
                    clock=self.clock,
                    max_connections=self.max_connections,
                )
            else:
                store = await ReceiverStore.open(
                    self.data_dir,
                    concurrent_quiet=self.concurrent_quiet,
                    clock=self.clock or time.time,
                )
            stack.push_async_callback(store.close)
            self._objects, self._store = objects, store
            await self.refresh_tokens()
            if self.open_access:
                log.warning(
                    "no tokens file: accepting every appliance without a token (local tests only)"
                )
            loops = [
                asyncio.create_task(self._expire_partials_forever(), name="partial-expiry"),
                asyncio.create_task(self._refresh_tokens_forever(), name="tokens-refresh"),
            ]
            try:
                yield
            finally:
                for task in loops:
                    task.cancel()
                for task in loops:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _expire_partials_forever(self) -> None:
        while True:
            try:
                await self.expire_partials()
            except (OSError, Refusal) as exc:  # a full disk or a bucket down must not stop it
                log.error("partial upload expiry failed", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(min(_EXPIRY_INTERVAL_S, self.partial_ttl / 4))

    async def expire_partials(self, ahead_s: float = 0.0) -> int:
        """Delete partial uploads nobody has resumed within `partial_ttl`; how many went.
        `ahead_s` judges ages as if that much more time had passed (tests age uploads so)."""
        removed = await self.objects.expire(self.partial_ttl, ahead_s)
        for appliance_id, sha256, size in removed:
            log.info(
                "abandoned partial upload deleted",
                extra={"fields": {"appliance_id": appliance_id, "sha256": sha256, "bytes": size}},
            )
        return len(removed)

    # ------------------------------------------------------------------------- helpers

    @property
    def open_access(self) -> bool:
        """No tokens file, and no token ever kept in the store (a revoked last one does not
        open the receiver up)."""
        return not self._tokens_file and not self._store_tokens_ever

    async def refresh_tokens(self) -> None:
        """Read the store's tokens again."""
        entries = await self.store.tokens()
        self._store_tokens_ever = self._store_tokens_ever or bool(entries)
        active = [entry for entry in entries if entry.revoked_at is None]
        self._store_owners = {
            e.digest: e.appliance_id
            for e in active
            if e.role == "appliance" and e.appliance_id is not None
        }
        self.store_admins = {e.digest for e in active if e.role == "admin"}

    async def _refresh_tokens_forever(self) -> None:
        while True:
            await asyncio.sleep(TOKENS_REFRESH_S)
            try:
                await self.refresh_tokens()
            except (OSError, Refusal) as exc:  # the database away: keep the last known tokens
                log.warning("tokens not refreshed", extra={"fields": {"error": str(exc)}})

    def authorize(self, request: web.Request) -> str:
        """The path's appliance id: 401 before 400 before 403, so strangers learn nothing."""
        owner: str | None = None
        if not self.open_access:
            scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Refusal(
                    401,
                    "missing token",
                    "send Authorization: Bearer TOKEN",
                    {"WWW-Authenticate": "Bearer"},
                )
            owner = self.appliance_of_token(token)
            if owner is None:
                raise Refusal(
                    401,
                    "unknown token",
                    "the token is not in the receiver's tokens file nor among its tokens",
                    {"WWW-Authenticate": "Bearer"},
                )
        appliance_id = request.match_info["appliance_id"]
        if not valid_appliance_id(appliance_id):
            raise Refusal(400, "bad appliance id", f"APPLIANCE_ID must match {NAME_PATTERN}")
        if owner is not None and owner != appliance_id:
            raise Refusal(403, "wrong appliance", "the token belongs to another appliance")
        return appliance_id

    def appliance_of_token(self, token: str) -> str | None:
        """The appliance a bearer token belongs to, if any (tokens file, then the store)."""
        digest = _token_digest(token)
        return self._owners.get(digest) or self._store_owners.get(digest)

    def admitted(self, handler: Handler) -> Handler:
        """`handler` behind the receiver's door: past `max_inflight` batches and chunks being
        taken at once, the next is answered `503 receiver busy` before its body is read (the
        appliance sends it again), so memory stays bounded whoever comes back at once."""

        async def admit(request: web.Request) -> web.StreamResponse:
            if self._inflight >= self.max_inflight:
                raise Refusal(
                    503,
                    "receiver busy",
                    f"this receiver is taking {self._inflight} batches and payload chunks "
                    "already; nothing was stored, send again shortly",
                    {"Retry-After": "2"},
                )
            self._inflight += 1
            try:
                return await handler(request)
            finally:
                self._inflight -= 1

        return admit

    @staticmethod
    def sha256_of(request: web.Request) -> str:
        """The path's SHA256, checked (400 when it is not 64 lowercase hex digits)."""
        sha256 = request.match_info["sha256"]
        if not SHA256_RE.fullmatch(sha256):
            raise Refusal(400, "bad sha256", "SHA256 must be 64 lowercase hex digits")
        return sha256

    def _lock(self, appliance_id: str, sha256: str) -> asyncio.Lock:
        return self._upload_locks[hash((appliance_id, sha256)) % _UPLOAD_LOCK_STRIPES]

    async def _held(self, appliance_id: str, sha256: str) -> tuple[int, bool]:
        """(bytes held, complete?) of one payload."""
        return await self.objects.held(appliance_id, sha256)

    async def _index(self, appliance_id: str, sha256: str, size: int, journal_id: str) -> None:
        """Count a verified payload in the store's index (once: again is a no-op). Also asked
        whenever a complete payload is seen, so one whose row a crash or an unreachable
        database kept out after its rename is counted the next time anyone asks for it."""
        await self.store.record_payload(appliance_id, sha256, size, journal_id)

    @staticmethod
    def _complete_response(size: int) -> web.Response:
        return web.Response(
            status=204,
            headers={
                "Upload-Offset": str(size),
                "Upload-Complete": "1",
                "Cache-Control": "no-store",
            },
        )

    # ------------------------------------------------------------------------ handlers

    async def health(self, request: web.Request) -> web.Response:
        """`/v1/health`: the process answers (what a load balancer's check wants: a database
        outage must not take every replica out of its pool)."""
        return web.json_response({"status": "ok"})

    async def healthz(self, request: web.Request) -> web.Response:
        """`/healthz`: 200 when the store and the bytes answer, else 503 naming which does not
        (for monitoring; no token)."""
        reasons = []
        for name, part in (("database", self.store), ("objects", self.objects)):
            try:
                async with asyncio.timeout(5.0):
                    await part.ping()
            except Exception as exc:  # whatever keeps it from answering is the reason
                reasons.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        if reasons:
            return web.json_response({"status": "degraded", "reasons": reasons}, status=503)
        return web.json_response({"status": "ok"})

    async def put_batch(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        journal_id = journal_of(request)
        follows = follows_of(request, journal_id)
        batch_id = request.match_info["batch_id"]
        parsed = parse_batch_id(batch_id)
        if parsed is None:
            raise Refusal(
                400,
                "bad batch id",
                "BATCH_ID is PRIORITY-FIRST_SEQ-LAST_SEQ (alert|event|sample|telemetry, "
                "decimal seqs without leading zeros, FIRST_SEQ <= LAST_SEQ)",
            )
        priority, first_seq, last_seq = parsed
        body = await read_batch_body(request, self.max_batch_bytes)
        records = await asyncio.to_thread(
            decode_batch, body, appliance_id, priority, first_seq, last_seq, journal_id
        )
        del body
        batch = IncomingBatch(
            appliance_id, journal_id, batch_id, priority, first_seq, last_seq, records, follows
        )
        fields: dict[str, Any] = {
            "appliance_id": appliance_id,
            "journal_id": journal_id,
            "batch_id": batch_id,
        }
        try:
            result = await self.store.store_batch(batch)
        except Refusal as refusal:
            if refusal.status == 409:
                log.warning(
                    "batch refused: conflicting records",
                    extra={"fields": {**fields, **refusal.extra}},
                )
            raise
        fields.update(stored=result.stored, duplicates=result.duplicates)
        self.metrics.batch(result.stored, result.duplicates)
        log.info("batch stored", extra={"fields": fields})
        answer: dict[str, Any] = {
            "batch_id": batch_id,
            "journal_id": journal_id,
            "stored": result.stored,
            "duplicates": result.duplicates,
        }
        if result.concurrency_changed:
            if result.concurrent_journals:
                log.warning(
                    "concurrent journals under one appliance id",
                    extra={
                        "fields": {
                            "appliance_id": appliance_id,
                            "journals": result.concurrent_journals,
                        }
                    },
                )
            else:
                log.info(
                    "concurrent journals resolved", extra={"fields": {"appliance_id": appliance_id}}
                )
        if result.concurrent_journals:
            answer["warnings"] = [concurrent_warning(appliance_id, result.concurrent_journals)]
        return web.json_response(answer)

    async def head_payload(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        sha256 = self.sha256_of(request)
        journal_id = journal_of(request)
        held, complete = await self._held(appliance_id, sha256)
        if complete:
            await self._index(appliance_id, sha256, held, journal_id)
        # Content-Length: 0 so clients keep the connection: without it aiohttp cannot tell where
        # this bodiless answer ends and opens a new connection for every payload (a TLS handshake
        # per payload on a satellite link).
        headers = {"Upload-Offset": str(held), "Cache-Control": "no-store", "Content-Length": "0"}
        if complete:
            headers["Upload-Complete"] = "1"
            headers["Upload-Length"] = str(held)
        elif held == 0:
            return web.Response(status=404, headers=headers)
        return web.Response(status=200, headers=headers)

    async def patch_payload(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        sha256 = self.sha256_of(request)
        journal_id = journal_of(request)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise Refusal(
                415, "unsupported content-encoding", "payload chunks are sent as identity"
            )
        offset = uint_header(request, "Upload-Offset")
        length = uint_header(request, "Upload-Length")
        if offset > length:
            raise Refusal(400, "bad Upload-Offset", "Upload-Offset is past Upload-Length")
        if request.content_length is not None and request.content_length > self.max_chunk_bytes:
            raise too_large("chunk", self.max_chunk_bytes)

        # Cheap answers before reading up to a whole chunk; checked again under the lock.
        held, complete = await self._held(appliance_id, sha256)
        if complete:
            await self._index(appliance_id, sha256, held, journal_id)
            return self._complete_response(held)
        if offset != held:
            raise self._offset_conflict(offset, held)

        body = bytearray()
        async for piece in request.content.iter_chunked(READ_CHUNK):
            body += piece
            if len(body) > self.max_chunk_bytes:
                raise too_large("chunk", self.max_chunk_bytes)
        if offset + len(body) > length:
            raise Refusal(
                400, "chunk past Upload-Length", "Upload-Offset + body length > Upload-Length"
            )

        async with self._lock(appliance_id, sha256):
            held, complete = await self._held(appliance_id, sha256)
            if complete:
                await self._index(appliance_id, sha256, held, journal_id)
                return self._complete_response(held)
            if offset != held:
                raise self._offset_conflict(offset, held)
            self.metrics.payload_bytes.inc(len(body))
            if offset == 0 and body and len(body) == length:  # the whole payload at once
                new_offset = length
                verified = await self.objects.put_whole(appliance_id, sha256, bytes(body))
            else:
                new_offset = (
                    await self.objects.append(appliance_id, sha256, offset, bytes(body))
                    if body
                    else held
                )
                if new_offset < length:
                    return web.Response(
                        status=204,
                        headers={"Upload-Offset": str(new_offset), "Cache-Control": "no-store"},
                    )
                verified = await self.objects.finish(appliance_id, sha256)
        fields = {"appliance_id": appliance_id, "sha256": sha256, "size": new_offset}
        if not verified:
            log.warning(
                "payload sha256 mismatch; partial upload discarded", extra={"fields": fields}
            )
            raise Refusal(
                422,
                "sha256 mismatch",
                f"the {new_offset} bytes received do not hash to {sha256}; upload again from 0",
            )
        await self._index(appliance_id, sha256, new_offset, journal_id)
        log.info("payload complete", extra={"fields": fields})
        self.metrics.payloads.inc()
        return self._complete_response(new_offset)

    @staticmethod
    def _offset_conflict(offset: int, held: int) -> Refusal:
        return Refusal(
            409,
            "offset mismatch",
            f"Upload-Offset {offset} is not the {held} bytes the receiver holds; resume from {held}",
            {"Upload-Offset": str(held)},
        )

    async def summary(self, request: web.Request) -> web.Response:
        appliance_id = self.authorize(request)
        return web.json_response(await self.store.summary(appliance_id))


RECEIVER_KEY = web.AppKey("receiver", _Receiver)


def build_receiver_app(
    data_dir: Path,
    tokens: dict[str, str] | None,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    partial_ttl: float = DEFAULT_PARTIAL_TTL_S,
    require_client_certificate: bool = False,
    admin_tokens: Sequence[str] = (),
    concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
    clock: Callable[[], float] | None = None,
    database: str | None = None,
    bucket: BucketSettings | None = None,
    max_connections: int = 10,
    store: RecordStore | None = None,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
) -> web.Application:
    """The receiver as an aiohttp app; receiver.db opens on startup and closes on cleanup.

    `tokens` maps appliance id -> bearer token; None accepts every appliance without a token.
    `admin_tokens` may publish model packages (none: publishing is refused; receiver/model_feed.py).
    `require_client_certificate` answers 403 to a request whose TLS connection presented no
    client certificate (serve it with `server_tls_context(..., client_ca=...)`). Partial uploads
    untouched for `partial_ttl` seconds are deleted (checked at start, then hourly); the handlers'
    object is `app[RECEIVER_KEY]`. Journals of one appliance id shipping interleaved within
    `concurrent_quiet` seconds are flagged as concurrent (`clock` gives wall-clock seconds; by
    default the machine's, or PostgreSQL's). `database`: a PostgreSQL DSN for the records
    (receiver/postgres.py); None keeps them in DATA_DIR/receiver.db. `bucket`: an S3 bucket for
    payload bytes (receiver/objects.py); None keeps them under DATA_DIR. `store`: any other
    `RecordStore` (it is closed with the app). `max_inflight`: batches and payload chunks taken
    at once; the next is answered 503. Serve it with
    `serve_receiver()` (or an AppRunner with auto_decompress=False): the app inflates gzip
    bodies itself, under its own limits."""
    receiver = _Receiver(
        data_dir,
        tokens,
        max_batch_bytes=max_batch_bytes,
        max_chunk_bytes=max_chunk_bytes,
        partial_ttl=partial_ttl,
        concurrent_quiet=concurrent_quiet,
        clock=clock,
        database=database,
        bucket=bucket,
        max_connections=max_connections,
        store=store,
        max_inflight=max_inflight,
    )
    # Handlers stream bodies under their own limits; this caps anything that reads whole bodies.
    middlewares: list[Any] = [json_errors]
    if require_client_certificate:
        middlewares.append(client_certificate_required)
    app = web.Application(
        middlewares=middlewares, client_max_size=max(max_batch_bytes, max_chunk_bytes)
    )
    app[RECEIVER_KEY] = receiver
    app.cleanup_ctx.append(receiver.lifecycle)
    base = "/v1/appliances/{appliance_id}"
    app.router.add_get("/v1/health", receiver.health)
    app.router.add_get("/healthz", receiver.healthz)
    app.router.add_put(f"{base}/batches/{{batch_id}}", receiver.admitted(receiver.put_batch))
    app.router.add_route("HEAD", f"{base}/payloads/{{sha256}}", receiver.head_payload)
    app.router.add_patch(f"{base}/payloads/{{sha256}}", receiver.admitted(receiver.patch_payload))
    app.router.add_get(f"{base}/summary", receiver.summary, allow_head=False)
    feed = add_model_routes(app, receiver, admin_tokens)
    add_read_routes(app, receiver, feed.authorize_admin)
    add_fleet_routes(app, receiver, admin_tokens)
    return app


@contextlib.asynccontextmanager
async def serve_receiver(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[list[tuple[str, int]]]:
    """Serve `app` on host:port (0 picks a free port), over TLS when `ssl_context` is given;
    yields the bound (host, port) pairs."""
    runner = web.AppRunner(app, auto_decompress=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        yield [(str(address[0]), int(address[1])) for address in runner.addresses]
    finally:
        await runner.cleanup()


def server_tls_context(
    cert_file: Path, key_file: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """TLS for `appliance receiver`: its certificate chain (and key, unless in the same file);
    with `client_ca`, a certificate a client presents must be signed by it (CERT_OPTIONAL: the
    app's `require_client_certificate` answers a client without one with a clear 403). Raises
    OSError or ssl.SSLError naming what could not be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


async def run_receiver(
    listen: str,
    data_dir: Path,
    tokens_file: Path | None,
    *,
    partial_ttl: float = DEFAULT_PARTIAL_TTL_S,
    ssl_context: ssl.SSLContext | None = None,
    stop: asyncio.Event | None = None,
    admin_tokens_file: Path | None = None,
    concurrent_quiet: float = DEFAULT_CONCURRENT_QUIET_S,
    database: str | None = None,
    bucket: BucketSettings | None = None,
    max_connections: int = 10,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
) -> None:
    """`appliance receiver`: serve until `stop` is set or SIGTERM/SIGINT arrives. `database`:
    a PostgreSQL DSN for the records (None: DATA_DIR/receiver.db); `bucket`: where payload bytes
    go (None: DATA_DIR)."""
    host, port = parse_listen(listen)
    tokens = await asyncio.to_thread(parse_tokens_file, tokens_file) if tokens_file else None
    admin_tokens = (
        await asyncio.to_thread(parse_admin_tokens_file, admin_tokens_file)
        if admin_tokens_file
        else []
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        client_certificates = ssl_context is not None and ssl_context.verify_mode != ssl.CERT_NONE
        app = build_receiver_app(
            data_dir,
            tokens,
            partial_ttl=partial_ttl,
            require_client_certificate=client_certificates,
            admin_tokens=admin_tokens,
            concurrent_quiet=concurrent_quiet,
            database=database,
            bucket=bucket,
            max_connections=max_connections,
            max_inflight=max_inflight,
        )
        async with serve_receiver(app, host, port, ssl_context) as addresses:
            scheme = "https" if ssl_context is not None else "http"
            for bound_host, bound_port in addresses:
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                url = f"{scheme}://{shown}:{bound_port}"
                log.info(
                    "receiver listening",
                    extra={
                        "fields": {
                            "url": url,
                            "host": bound_host,
                            "port": bound_port,
                            "data_dir": str(data_dir),
                            "database": "receiver.db"
                            if database is None
                            else f"postgresql {describe_dsn(database)}",
                            "objects": "data folder"
                            if bucket is None
                            else f"s3 {bucket.endpoint_url}/{bucket.bucket}/{bucket.prefix}",
                            "appliances": None if tokens is None else len(tokens),
                            "publishing": bool(admin_tokens),
                            "client_certificates": client_certificates,
                        }
                    },
                )
                print(f"receiver listening on {url}", flush=True)
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("receiver stopped")
