"""Owns model packages on the reference receiver: publishing one for appliances or groups (an
admin action), listing what is addressed to an appliance or its group, and downloading it with
HTTP Range so a cut download resumes; and the publisher's client (`appliance receiver publish`).

Layout under the receiver's data directory:

    models/<sha256>              published packages, named by the sha256 of their bytes
    models/.incoming/<id>.part   publishes being received (what a crash leaves is removed at start)

plus the `model_packages` table of receiver.db (one row per name and version).

The receiver holds no trusted keys and verifies nothing about a package but its size and sha256:
it reads `manifest.json` only to check that the package is the name and version of the URL and
to warn when it is published to appliances its own targets leave out. Appliances verify the
signature, the files and the addressing themselves before they install anything.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import tarfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn, Protocol

import aiohttp
from aiohttp import web

from config.names import NAME_PATTERN, NAME_RE, VERSION_RE
from receiver.backend import PublishedPackage, RecordStore
from receiver.objects import DirectoryObjects, PayloadObjects
from receiver.protocol import MODELS_DIR, Refusal, byte_range, valid_appliance_id

log = logging.getLogger(__name__)

INCOMING_DIR = ".incoming"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1024 * 1024
# The package format allows 16 files of up to 4 GiB; a real model package is far smaller.
DEFAULT_MAX_PACKAGE_BYTES = 4 * 1024**3
READ_CHUNK = 64 * 1024
_SPOOL_CHUNK = 1024 * 1024
_SEND_CHUNK = 256 * 1024


# ---------------------------------------------------------------------------- package identity


@dataclass(frozen=True, slots=True)
class PackageIdentity:
    """What a package's (unverified) manifest says it is: never trusted for security."""

    name: str
    version: str
    targets: tuple[str, ...]


def read_package_identity(path: Path) -> PackageIdentity:
    """Name, version and targets from the first member of a package file, without verifying
    anything. Raises ValueError saying why it is not a model package."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            first = archive.next()
            if first is None or first.name != MANIFEST or not first.isreg():
                raise ValueError(f"its first member is not {MANIFEST}")
            if first.size > MAX_MANIFEST_BYTES:
                raise ValueError(f"{MANIFEST} is over {MAX_MANIFEST_BYTES} bytes")
            handle = archive.extractfile(first)
            assert handle is not None  # a regular member, checked above
            data = handle.read()
    except (tarfile.TarError, EOFError) as exc:
        raise ValueError(f"not a tar archive ({exc})") from None
    try:
        doc = json.loads(data)
    except ValueError:
        raise ValueError(f"{MANIFEST} is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{MANIFEST} is not a JSON object")
    name, version, targets = doc.get("name"), doc.get("version"), doc.get("targets", [])
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"{MANIFEST} has no valid name")
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ValueError(f"{MANIFEST} has no valid version")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{MANIFEST}: targets is not a list of strings")
    return PackageIdentity(name, version, tuple(targets))


def audience_warnings(
    identity: PackageIdentity, appliances: Sequence[str], groups: Sequence[str]
) -> list[str]:
    """Where a publish reaches appliances the package's own targets leave out: they would
    download it only to refuse it."""
    if not identity.targets:
        return []
    targets = set(identity.targets)
    named = ", ".join(identity.targets)
    if not appliances and not groups:
        return [
            f"published to every appliance, but the package is only for {named}: the others "
            "will download it and refuse it"
        ]
    warnings = [
        f"appliance {a} is not among the package's targets ({named}): it accepts the package "
        "only if its group is"
        for a in appliances
        if a not in targets
    ]
    warnings += [
        f"group {g} is not among the package's targets ({named}): its appliances will refuse it"
        for g in groups
        if f"group:{g}" not in targets
    ]
    return warnings


# ----------------------------------------------------------------------------- published rows


# ------------------------------------------------------------------------------- the handlers


class ApplianceAuthority(Protocol):
    """What the model routes need of the receiver (receiver/app.py `_Receiver`)."""

    data_dir: Path

    @property
    def store(self) -> RecordStore: ...

    @property
    def objects(self) -> PayloadObjects: ...

    def authorize(self, request: web.Request) -> str: ...

    def sha256_of(self, request: web.Request) -> str: ...

    def appliance_of_token(self, token: str) -> str | None: ...

    store_admins: set[bytes]
    """Digests of the admin tokens kept in the store, read again every few seconds."""


def _digest(token: str) -> bytes:
    # Looked up by digest, like appliance tokens: a set lookup then leaks nothing of a prefix.
    return hashlib.sha256(token.encode()).digest()


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class _Spool:
    """A publish being received: written and hashed on a worker thread, 1 MiB at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._digest = hashlib.sha256()
        self._handle: IO[bytes] | None = None

    def _write(self, data: bytes | bytearray) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("xb")
        self._digest.update(data)
        self._handle.write(data)

    async def write(self, data: bytes | bytearray) -> None:
        await asyncio.to_thread(self._write, data)
        self.size += len(data)

    def _finish(self) -> str:
        if self._handle is None:
            self._write(b"")
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return self._digest.hexdigest()

    async def finish(self) -> str:
        """Flush and fsync; the sha256 of everything written."""
        return await asyncio.to_thread(self._finish)

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self.path.unlink(missing_ok=True)


class ModelFeed:
    """The model package routes of one receiver app."""

    def __init__(
        self,
        receiver: ApplianceAuthority,
        admin_tokens: Sequence[str],
        *,
        max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES,
    ) -> None:
        for token in admin_tokens:
            if receiver.appliance_of_token(token) is not None:
                raise ValueError("an admin token is also an appliance's token; use another one")
        self.receiver = receiver
        self.root = receiver.data_dir / MODELS_DIR
        self.max_package_bytes = max_package_bytes
        self._admins = {_digest(token) for token in admin_tokens}
        # Publishes are rare admin actions: one at a time keeps check, install and row in step.
        self._publishing = asyncio.Lock()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(self._prepare_dirs)
        yield

    def _prepare_dirs(self) -> None:
        shutil.rmtree(self.root / INCOMING_DIR, ignore_errors=True)  # publishes a crash cut off
        (self.root / INCOMING_DIR).mkdir(parents=True, exist_ok=True)

    # -- checks ---------------------------------------------------------------------------------

    def authorize_admin(self, request: web.Request, action: str = "publishing") -> None:
        """401 without an admin token; 403 "ACTION disabled" when the receiver has none at all."""
        if not self._admins and not self.receiver.store_admins:
            raise Refusal(
                403,
                f"{action} disabled",
                "this receiver has no admin tokens; start it with --admin-tokens FILE or add "
                "one with `appliance receiver tokens add --admin`",
            )
        token = _bearer(request)
        if token is None:
            raise Refusal(
                401,
                "missing token",
                "send Authorization: Bearer ADMIN_TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
        digest = _digest(token)
        if digest not in self._admins and digest not in self.receiver.store_admins:
            raise Refusal(
                401,
                "unknown admin token",
                "the token is not among the receiver's admin tokens",
                {"WWW-Authenticate": "Bearer"},
            )

    @staticmethod
    def _group(request: web.Request) -> str | None:
        groups = request.query.getall("group", [])
        if len(groups) > 1:
            raise Refusal(400, "bad group", "an appliance has one group: send ?group=G once")
        if groups and not NAME_RE.fullmatch(groups[0]):
            raise Refusal(400, "bad group", f"GROUP must match {NAME_PATTERN}")
        return groups[0] if groups else None

    @staticmethod
    def _targets(request: web.Request) -> tuple[tuple[str, ...], tuple[str, ...]]:
        unknown = sorted(set(request.query) - {"appliance", "group"})
        if unknown:
            raise Refusal(
                400, "bad query", f"unknown parameter {unknown[0]!r}: use appliance= and group="
            )
        appliances = request.query.getall("appliance", [])
        groups = request.query.getall("group", [])
        for appliance_id in appliances:
            if not valid_appliance_id(appliance_id):
                raise Refusal(400, "bad appliance id", f"{appliance_id!r} is not an appliance id")
        for group in groups:
            if not NAME_RE.fullmatch(group):
                raise Refusal(400, "bad group", f"{group!r} is not a group name")
        return tuple(sorted(set(appliances))), tuple(sorted(set(groups)))

    # -- publisher ------------------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        """PUT /v1/models/{name}/{version}?appliance=ID&group=G: the package file as the body."""
        self.authorize_admin(request)
        name, version = request.match_info["name"], request.match_info["version"]
        if not NAME_RE.fullmatch(name) or not VERSION_RE.fullmatch(version):
            raise Refusal(400, "bad name or version", "NAME and VERSION as in the package format")
        appliances, groups = self._targets(request)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise Refusal(415, "unsupported content-encoding", "send the package file as is")
        if request.content_length is not None and request.content_length > self.max_package_bytes:
            raise too_large(self.max_package_bytes)
        async with self._publishing:
            spool = _Spool(self.root / INCOMING_DIR / f"{uuid.uuid4().hex}.part")
            try:
                sha256 = await self._receive(request, spool)
                try:
                    identity = await asyncio.to_thread(read_package_identity, spool.path)
                except ValueError as exc:
                    raise Refusal(422, "not a model package", str(exc)) from None
                if (identity.name, identity.version) != (name, version):
                    raise Refusal(
                        422,
                        "wrong name or version",
                        f"the package is {identity.name} {identity.version}, not {name} {version}",
                    )
                store = self.receiver.store
                existing = await store.package_by_version(name, version)
                if existing is not None and existing.sha256 != sha256:
                    raise Refusal(
                        409,
                        "version exists",
                        f"{name} {version} is already published with other contents (sha256 "
                        f"{existing.sha256}); a version is never replaced: publish a new one",
                    )
                await self.receiver.objects.put_package(sha256, spool.path)
                candidate = PublishedPackage(
                    name, version, sha256, spool.size, appliances, groups, _now()
                )
                stored = await store.save_package(candidate)
            finally:
                await asyncio.to_thread(spool.discard)
        warnings = audience_warnings(identity, appliances, groups)
        log.info(
            "model package published",
            extra={"fields": {**stored.as_dict(), "republished": existing is not None}},
        )
        answer = {**stored.as_dict(), "republished": existing is not None, "warnings": warnings}
        return web.json_response(answer, status=200 if existing is not None else 201)

    async def _receive(self, request: web.Request, spool: _Spool) -> str:
        pending = bytearray()
        async for piece in request.content.iter_chunked(READ_CHUNK):
            pending += piece
            if spool.size + len(pending) > self.max_package_bytes:
                raise too_large(self.max_package_bytes)
            if len(pending) >= _SPOOL_CHUNK:
                await spool.write(pending)
                pending = bytearray()
        if pending:
            await spool.write(pending)
        return await spool.finish()

    async def published(self, request: web.Request) -> web.Response:
        """GET /v1/models: every published package with its targets (admin)."""
        self.authorize_admin(request)
        packages = await self.receiver.store.packages()
        return web.json_response({"packages": [p.as_dict() for p in packages]})

    # -- appliances -----------------------------------------------------------------------------

    async def offered(self, request: web.Request) -> web.Response:
        """GET /v1/appliances/{id}/models?group=G: what is addressed to it, oldest first."""
        appliance_id = self.receiver.authorize(request)
        group = self._group(request)
        packages = await self.receiver.store.packages()
        mine = [p.listing() for p in packages if p.addressed_to(appliance_id, group)]
        return web.json_response({"packages": mine}, headers={"Cache-Control": "no-store"})

    async def download(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/appliances/{id}/models/{sha256}?group=G, with Range: bytes=N- to resume."""
        appliance_id = self.receiver.authorize(request)
        sha256 = self.receiver.sha256_of(request)
        group = self._group(request)
        package = await self.receiver.store.package_by_sha256(sha256)
        if package is None or not package.addressed_to(appliance_id, group):
            # The same answer whether it does not exist or is someone else's.
            raise Refusal(
                404, "unknown package", f"no package {sha256} is published for {appliance_id}"
            )
        objects = self.receiver.objects
        if isinstance(objects, DirectoryObjects):
            path = objects.package_path(sha256)
            if not await asyncio.to_thread(path.is_file):
                self._missing(sha256, str(path))
            return web.FileResponse(
                path, chunk_size=_SEND_CHUNK, headers={"Content-Type": "application/x-tar"}
            )
        size = await objects.package_size(sha256)
        if size is None:
            self._missing(sha256, sha256)
        return await self._stream(request, objects, sha256, size)

    @staticmethod
    def _missing(sha256: str, where: str) -> NoReturn:
        log.error("published model package file missing", extra={"fields": {"path": where}})
        raise Refusal(404, "unknown package", f"package {sha256} is missing on the receiver")

    @staticmethod
    async def _stream(
        request: web.Request, objects: PayloadObjects, sha256: str, size: int
    ) -> web.StreamResponse:
        """A package out of the bucket: whole, or from `Range: bytes=N-` / `bytes=N-M` (how an
        appliance resumes a cut download)."""
        start, end, status = byte_range(request, size, "package")
        headers = {
            "Content-Type": "application/x-tar",
            "Content-Length": str(end - start),
            "Accept-Ranges": "bytes",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        async for block in objects.read_package(sha256, start, end):
            await response.write(block)
        await response.write_eof()
        return response


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def too_large(limit: int) -> Refusal:
    return Refusal(413, "package too large", f"a package may be at most {limit} bytes")


def add_model_routes(
    app: web.Application,
    receiver: ApplianceAuthority,
    admin_tokens: Sequence[str],
    *,
    max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES,
) -> ModelFeed:
    """Register the model package routes (docs/sync-protocol.md, Model packages) on `app`."""
    feed = ModelFeed(receiver, admin_tokens, max_package_bytes=max_package_bytes)
    app.cleanup_ctx.append(feed.lifecycle)
    app.router.add_get("/v1/models", feed.published, allow_head=False)
    app.router.add_put("/v1/models/{name}/{version}", feed.publish)
    base = "/v1/appliances/{appliance_id}/models"
    app.router.add_get(base, feed.offered, allow_head=False)
    app.router.add_get(f"{base}/{{sha256}}", feed.download, allow_head=False)
    return feed


# ------------------------------------------------------------------------ the publisher's client


class PublishError(Exception):
    """A publish that did not happen: the message says why (one line, for the CLI)."""


async def publish_package(
    url: str,
    admin_token: str,
    package: Path,
    *,
    appliances: Sequence[str] = (),
    groups: Sequence[str] = (),
    ca_file: Path | None = None,
    read_timeout: float = 60.0,
) -> dict[str, Any]:
    """Upload `package` to the receiver at `url` for these appliances and groups (none: every
    appliance); the receiver's answer (`warnings` included). `read_timeout` bounds each wait for
    the receiver, not the whole upload."""
    if not re.match(r"^https?://[^\s/]+", url):
        raise PublishError(f"--url must be http://HOST:PORT or https://..., not {url!r}")
    try:
        identity = await asyncio.to_thread(read_package_identity, package)
    except OSError as exc:
        raise PublishError(f"{package}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise PublishError(f"{package}: not a model package: {exc}") from None
    for appliance_id in appliances:
        if not valid_appliance_id(appliance_id):
            raise PublishError(f"--appliance {appliance_id!r} is not an appliance id")
    for group in groups:
        if not NAME_RE.fullmatch(group):
            raise PublishError(f"--group {group!r} is not a group name")
    query = [("appliance", a) for a in appliances] + [("group", g) for g in groups]
    target = f"{url.rstrip('/')}/v1/models/{identity.name}/{identity.version}"
    tls: ssl.SSLContext | bool = True
    if ca_file is not None:
        try:
            tls = await asyncio.to_thread(ssl.create_default_context, cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise PublishError(f"--ca-file {ca_file}: {exc}") from None
    limits = aiohttp.ClientTimeout(total=None, sock_connect=read_timeout, sock_read=read_timeout)
    handle = await asyncio.to_thread(package.open, "rb")
    try:
        async with (
            aiohttp.ClientSession(timeout=limits, connector=aiohttp.TCPConnector(ssl=tls)) as s,
            s.put(
                target,
                params=query,
                data=handle,
                headers={
                    "Authorization": f"Bearer {admin_token}",
                    "Content-Type": "application/x-tar",
                },
            ) as response,
        ):
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PublishError(f"cannot publish to {url}: {exc or type(exc).__name__}") from None
    finally:
        handle.close()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status not in (200, 201) or not isinstance(answer, dict):
        detail = body.decode(errors="replace")[:300]
        if isinstance(answer, dict) and "error" in answer:
            detail = f"{answer['error']}: {answer.get('detail', '')}"
        raise PublishError(f"the receiver refused the package ({status}): {detail}")
    return answer


__all__ = [
    "DEFAULT_MAX_PACKAGE_BYTES",
    "MODELS_DIR",
    "ModelFeed",
    "PackageIdentity",
    "PublishError",
    "PublishedPackage",
    "add_model_routes",
    "audience_warnings",
    "publish_package",
    "read_package_identity",
]
