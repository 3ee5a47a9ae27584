"""Owns fetching model packages from upstream: listing what the receiver (or an S3 prefix) offers
this appliance or its group, and downloading each into DATA_DIR/models/incoming/SHA256.part,
resumed from the part's size with Range requests after a cut, checked against the listed sha256
and renamed to SHA256.tar when whole. Verifying and installing a package is the appliance's
(appliance/models/updates.py); this module moves bytes only.

S3 layout (under the destination's `prefix`; objects named by the sha256 of their bytes):

    models/appliances/APPLIANCE_ID/SHA256.tar   for one appliance
    models/groups/GROUP/SHA256.tar              for the appliances of a group
    models/all/SHA256.tar                       for every appliance
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from config.names import is_name, is_version
from config.shipping import HttpDestination, S3Destination
from sync.destination import DestinationError, RateLimiter
from sync.errors import SyncError
from sync.http_client import HttpTarget
from sync.payloads import fsync_dir
from sync.s3 import S3Target

log = logging.getLogger(__name__)

INCOMING_DIR = "incoming"
PART_SUFFIX = ".part"
PACKAGE_SUFFIX = ".tar"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# A listing is a few hundred bytes per package; more than this is not a listing.
MAX_LISTING_BYTES = 4 * 1024 * 1024
MAX_PACKAGE_BYTES = 64 * 1024**3
_READ_CHUNK = 64 * 1024
_WRITE_CHUNK = 1024 * 1024
_SYNC_EVERY = 8 * 1024 * 1024
# Attempts in a row that add no byte before a download gives up for this round (an attempt that
# makes progress never counts: a flaky link that moves forward keeps going).
ATTEMPTS_WITHOUT_PROGRESS = 3
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 2.0


class PullError(SyncError):
    """A listing or download that did not complete. `cause` says which:

    - `link` (retryable): the link failed or the upstream answered 5xx; a download keeps its part
      and resumes from it.
    - `no_space` (retryable): the download would leave less than the storage floor free.
    - `refused`: the upstream answered 4xx (bad token, unknown appliance); fix the config.
    - `gone`: the package is no longer offered (404).
    - `bad_listing`: the listing is not what docs/sync-protocol.md describes.
    - `sha_mismatch`: the whole download does not hash to the listed sha256, or is not the listed
      size; the part was discarded.
    """

    def __init__(self, source: str, message: str, *, cause: str, retryable: bool) -> None:
        self.source = source
        self.cause = cause
        self.retryable = retryable
        super().__init__(f"model source {source!r}: {message}")


@dataclass(frozen=True, slots=True)
class OfferedPackage:
    """One package an upstream offers this appliance. `name` and `version` are what the listing
    says (unverified; S3 listings have none); `locator` is where to fetch it (the S3 key)."""

    source: str
    sha256: str
    size: int
    name: str | None = None
    version: str | None = None
    published_at: str | None = None
    locator: str = ""

    @property
    def label(self) -> str:
        if self.name is not None and self.version is not None:
            return f"{self.name} {self.version}"
        return f"package {self.sha256[:12]}"


class ModelSource(Protocol):
    """An upstream that offers model packages. Entered once; methods raise PullError."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def reachable(self) -> bool:
        """A cheap probe; False while the link is down."""
        ...

    async def offered(self) -> list[OfferedPackage]:
        """Every package addressed to this appliance, its group or everyone."""
        ...

    async def append_to(self, package: OfferedPackage, part: Path, limiter: RateLimiter) -> None:
        """Fetch the package's bytes from the part's current size on and append them to the
        part; what arrived before a failure stays appended."""
        ...


# ------------------------------------------------------------------------------------ writing


class PartWriter:
    """Appends to a `.part` file off the event loop (1 MiB at a time, fsync'd every 8 MiB and at
    the end), never past `limit` bytes: more than the listed size is a mismatch, not a download.
    """

    def __init__(self, source: str, part: Path, limit: int, *, restart: bool = False) -> None:
        self.source = source
        self.part = part
        self.limit = limit
        self.restart = restart
        self._handle: IO[bytes] | None = None
        self._pending = bytearray()
        self._size = 0
        self._unsynced = 0

    def _open(self) -> int:
        self._handle = self.part.open("wb" if self.restart else "ab")
        return self._handle.seek(0, os.SEEK_END)

    def _write(self, data: bytes, sync: bool) -> None:
        assert self._handle is not None
        self._handle.write(data)
        if sync:
            self._handle.flush()
            os.fsync(self._handle.fileno())

    async def __aenter__(self) -> PartWriter:
        self._size = await asyncio.to_thread(self._open)
        return self

    async def add(self, chunk: bytes) -> None:
        if self._size + len(self._pending) + len(chunk) > self.limit:
            raise PullError(
                self.source,
                f"{self.part.name}: the upstream sent more than the listed {self.limit} bytes",
                cause="sha_mismatch",
                retryable=False,
            )
        self._pending += chunk
        if len(self._pending) >= _WRITE_CHUNK:
            await self._flush()

    async def _flush(self, *, sync: bool = False) -> None:
        data, self._pending = bytes(self._pending), bytearray()
        self._unsynced += len(data)
        sync = sync or self._unsynced >= _SYNC_EVERY
        await asyncio.to_thread(self._write, data, sync)
        self._size += len(data)
        if sync:
            self._unsynced = 0

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            # What arrived before a cut is kept: the next attempt resumes after it. (On
            # cancellation the unwritten tail is dropped; the part stays a prefix.)
            if not isinstance(exc, asyncio.CancelledError) and self._handle is not None:
                await self._flush(sync=True)
        finally:
            if self._handle is not None:
                self._handle.close()


def part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_WRITE_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _complete(part: Path, final: Path) -> None:
    part.replace(final)
    fsync_dir(final.parent)


@dataclass(frozen=True, slots=True)
class Download:
    """A whole, sha256-checked package file, and how many bytes this call fetched for it."""

    path: Path
    fetched: int


async def download(
    source: ModelSource,
    package: OfferedPackage,
    incoming: Path,
    limiter: RateLimiter,
    *,
    min_free: int = 0,
) -> Download:
    """Fetch `package` into `incoming/SHA256.tar`: resumed from `SHA256.part` when one is there,
    retried at once while attempts make progress, checked against the listed sha256 and size.
    A mismatch discards the part (PullError `sha_mismatch`); a link that stays cut raises a
    retryable PullError and keeps the part for the next round."""
    final = incoming / f"{package.sha256}{PACKAGE_SUFFIX}"
    if await asyncio.to_thread(final.is_file):
        return Download(final, 0)  # complete from an earlier round, not imported yet
    part = incoming / f"{package.sha256}{PART_SUFFIX}"
    await asyncio.to_thread(incoming.mkdir, parents=True, exist_ok=True)
    have = await asyncio.to_thread(part_size, part)
    if have > package.size:  # not a prefix of this package (a crash mid-write): start over
        await asyncio.to_thread(part.unlink)
        have = 0
    await _check_space(source.name, incoming, package.size - have, min_free)
    started, fails = have, 0
    while have < package.size:
        try:
            await source.append_to(package, part, limiter)
        except PullError as exc:
            if exc.cause == "sha_mismatch":
                await asyncio.to_thread(part.unlink, missing_ok=True)
            if not exc.retryable:
                raise
            error: PullError | None = exc
        else:
            error = None
        now = await asyncio.to_thread(part_size, part)
        if now > have:
            have, fails = now, 0
            continue
        fails += 1
        if fails >= ATTEMPTS_WITHOUT_PROGRESS:
            raise error or PullError(
                source.name,
                f"{package.label}: the upstream ended the download at {have} of "
                f"{package.size} bytes, {fails} times",
                cause="link",
                retryable=True,
            )
        pause = min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** (fails - 1))
        await asyncio.sleep(pause * random.uniform(0.5, 1.0))
    fetched = max(0, have - started)
    digest = await asyncio.to_thread(file_sha256, part)
    if have != package.size or digest != package.sha256:
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise PullError(
            source.name,
            f"{package.label}: the download ({have} bytes) hashes to {digest}, not the listed "
            f"{package.sha256} ({package.size} bytes): altered upstream or in transit; discarded",
            cause="sha_mismatch",
            retryable=False,
        )
    await asyncio.to_thread(_complete, part, final)
    return Download(final, fetched)


async def _check_space(source: str, folder: Path, needed: int, min_free: int) -> None:
    free = (await asyncio.to_thread(shutil.disk_usage, folder)).free
    if free - needed < min_free:
        raise PullError(
            source,
            f"not enough disk space for {needed} more bytes (free {free}, floor {min_free})",
            cause="no_space",
            retryable=True,
        )


def parse_listing(source: str, body: bytes) -> list[OfferedPackage]:
    """The receiver's `{"packages": [...]}` as OfferedPackages; anything malformed is a
    PullError naming the entry and field."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise PullError(
            source, "the model listing is not JSON", cause="bad_listing", retryable=False
        ) from None
    entries = doc.get("packages") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise PullError(
            source, "the model listing has no `packages` list", cause="bad_listing", retryable=False
        )
    offered = []
    for index, entry in enumerate(entries):
        problem = _listing_problem(entry)
        if problem is not None:
            raise PullError(
                source,
                f"model listing entry {index}: {problem}",
                cause="bad_listing",
                retryable=False,
            )
        published = entry.get("published_at")
        offered.append(
            OfferedPackage(
                source=source,
                sha256=entry["sha256"],
                size=entry["size"],
                name=entry["name"],
                version=entry["version"],
                published_at=published if isinstance(published, str) else None,
            )
        )
    return offered


def _listing_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    sha256, size = entry.get("sha256"), entry.get("size")
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        return "sha256 is not 64 lowercase hex digits"
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_PACKAGE_BYTES:
        return f"size {size!r} is not a package size"
    name, version = entry.get("name"), entry.get("version")
    if not isinstance(name, str) or not is_name(name):
        return f"name {name!r} is not a package name"
    if not isinstance(version, str) or not is_version(version):
        return f"version {version!r} is not a package version"
    return None


# ---------------------------------------------------------------------------------------- http


def _content_range_start(value: str | None) -> tuple[int, int | None] | None:
    """(start, total) of `bytes START-END/TOTAL`; None when it is not that."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if match is None:
        return None
    total = None if match[3] == "*" else int(match[3])
    return int(match[1]), total


class HttpModelSource(HttpTarget):
    """Model packages from the reference receiver (docs/sync-protocol.md, Model packages). An
    HttpTarget for its token, TLS settings, error mapping and brief per-request retries; its own
    session, so downloads never wait behind the engine's uploads."""

    def __init__(self, cfg: HttpDestination, appliance_id: str, group: str | None) -> None:
        super().__init__(cfg, appliance_id, chunk_size=_READ_CHUNK)
        self.group = group

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        return self

    def _query(self) -> dict[str, str]:
        return {"group": self.group} if self.group else {}

    async def offered(self) -> list[OfferedPackage]:
        try:
            status, _, body = await self._request(
                "GET", self._url("models"), params=self._query(), headers=self._headers()
            )
        except DestinationError as exc:
            raise PullError(
                self.name,
                str(exc),
                cause="link" if exc.retryable else "refused",
                retryable=exc.retryable,
            ) from exc
        if status != 200:
            raise PullError(
                self.name,
                str(self._refused("model listing", status, body)),
                cause="refused",
                retryable=False,
            )
        if len(body) > MAX_LISTING_BYTES:
            raise PullError(
                self.name, "the model listing is too large", cause="bad_listing", retryable=False
            )
        return parse_listing(self.name, body)

    async def append_to(self, package: OfferedPackage, part: Path, limiter: RateLimiter) -> None:
        assert self._session is not None, "HttpModelSource used outside `async with`"
        offset = await asyncio.to_thread(part_size, part)
        headers = self._headers({"Range": f"bytes={offset}-"} if offset else None)
        # Per read, not in total: a large package over a slow link takes longer than any total.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.timeout, sock_read=self.cfg.timeout
        )
        what = f"{package.label} download"
        try:
            async with self._session.get(
                self._url(f"models/{package.sha256}"),
                params=self._query(),
                headers=headers,
                timeout=timeout,
            ) as response:
                restart = self._check_answer(response, offset, package, what)
                if restart is None:
                    await response.read()
                    return
                async with PartWriter(self.name, part, package.size, restart=restart) as writer:
                    async for chunk in response.content.iter_chunked(_READ_CHUNK):
                        await limiter.consume(len(chunk))
                        await writer.add(chunk)
        except aiohttp.ClientError as exc:
            tls_error = self._tls_error(exc)
            if tls_error is not None:
                raise PullError(
                    self.name, str(tls_error), cause="refused", retryable=False
                ) from exc
            raise PullError(
                self.name, f"{what} cut: {exc or type(exc).__name__}", cause="link", retryable=True
            ) from exc
        except TimeoutError as exc:
            raise PullError(self.name, f"{what} timed out", cause="link", retryable=True) from exc

    def _check_answer(
        self, response: aiohttp.ClientResponse, offset: int, package: OfferedPackage, what: str
    ) -> bool | None:
        """Whether to write from 0 (True) or append (False); None: nothing to write now."""
        status = response.status
        if status == 206:
            found = _content_range_start(response.headers.get("Content-Range"))
            if found is None or found[0] != offset:
                raise PullError(
                    self.name,
                    f"{what}: asked for bytes from {offset}, the answer starts elsewhere",
                    cause="link",
                    retryable=True,
                )
            if found[1] is not None and found[1] != package.size:
                raise PullError(
                    self.name,
                    f"{what}: the upstream holds {found[1]} bytes, the listing said {package.size}",
                    cause="sha_mismatch",
                    retryable=False,
                )
            return False
        if status == 200:
            return True  # the whole file (the upstream ignored the Range): start over
        if status == 416:
            # The part is at least as long as what the upstream holds: it is not this package.
            raise PullError(
                self.name,
                f"{what}: the upstream holds fewer than the {offset} bytes already fetched",
                cause="sha_mismatch",
                retryable=False,
            )
        if status == 404:
            raise PullError(self.name, f"{what}: no longer offered", cause="gone", retryable=False)
        if status >= 500:
            raise PullError(self.name, f"{what}: answered {status}", cause="link", retryable=True)
        raise PullError(self.name, f"{what}: answered {status}", cause="refused", retryable=False)


# ------------------------------------------------------------------------------------------ s3


class S3ModelSource(S3Target):
    """Model packages from an S3 bucket (layout in the module docstring). An S3Target for its
    credentials, client settings and error mapping."""

    def __init__(self, cfg: S3Destination, appliance_id: str, group: str | None) -> None:
        super().__init__(cfg, appliance_id, chunk_size=_READ_CHUNK)
        self.group = group
        base = f"{cfg.prefix}models/"
        self.prefixes = [f"{base}appliances/{appliance_id}/", f"{base}all/"]
        if group:
            self.prefixes.insert(1, f"{base}groups/{group}/")

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        return self

    def _pull_error(self, what: str, exc: Exception) -> PullError:
        mapped = self._error(what, exc)
        cause = "link" if mapped.retryable else "refused"
        return PullError(self.name, str(mapped), cause=cause, retryable=mapped.retryable)

    async def offered(self) -> list[OfferedPackage]:
        found: dict[str, OfferedPackage] = {}
        ignored = 0
        for prefix in self.prefixes:
            try:
                async for item in self._objects(prefix):
                    key, size = str(item.get("Key", "")), int(item.get("Size", 0))
                    stem = key[len(prefix) :].removesuffix(PACKAGE_SUFFIX)
                    if not key.endswith(PACKAGE_SUFFIX) or not SHA256_RE.fullmatch(stem):
                        ignored += 1
                        continue
                    if not 0 < size <= MAX_PACKAGE_BYTES or stem in found:
                        continue
                    modified = item.get("LastModified")
                    found[stem] = OfferedPackage(
                        source=self.name,
                        sha256=stem,
                        size=size,
                        published_at=None if modified is None else modified.isoformat(),
                        locator=key,
                    )
            except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
                raise self._pull_error(f"listing {prefix}", exc) from exc
        if ignored:
            log.info(
                "objects under the model prefixes that are not SHA256.tar ignored",
                extra={"fields": {"source": self.name, "ignored": ignored}},
            )
        return list(found.values())

    async def _objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:
            listing = await self.client.list_objects_v2(**kwargs)
            for item in listing.get("Contents", []):
                yield dict(item)
            token = listing.get("NextContinuationToken")
            if not listing.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    async def append_to(self, package: OfferedPackage, part: Path, limiter: RateLimiter) -> None:
        offset = await asyncio.to_thread(part_size, part)
        what = f"{package.label} download"
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": package.locator}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            answer = await self.client.get_object(**kwargs)
            restart = False
            if offset:
                found = _content_range_start(answer.get("ContentRange"))
                if found is None or found[0] != offset:
                    restart = True  # not the range asked for: take the whole object from 0
            async with (
                answer["Body"] as body,
                PartWriter(self.name, part, package.size, restart=restart) as writer,
            ):
                async for chunk in body.iter_chunks(_READ_CHUNK):
                    await limiter.consume(len(chunk))
                    await writer.add(chunk)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404"):
                raise PullError(
                    self.name, f"{what}: no longer offered", cause="gone", retryable=False
                ) from exc
            if code == "InvalidRange":
                raise PullError(
                    self.name,
                    f"{what}: the object holds fewer than the {offset} bytes already fetched",
                    cause="sha_mismatch",
                    retryable=False,
                ) from exc
            raise self._pull_error(what, exc) from exc
        except (BotoCoreError, OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise PullError(
                self.name, f"{what} cut: {exc or type(exc).__name__}", cause="link", retryable=True
            ) from exc


def make_model_source(
    cfg: HttpDestination | S3Destination, appliance_id: str, group: str | None
) -> ModelSource:
    """The model source for one `models: true` destination (not entered: the caller owns it)."""
    if isinstance(cfg, S3Destination):
        return S3ModelSource(cfg, appliance_id, group)
    return HttpModelSource(cfg, appliance_id, group)


__all__ = [
    "ATTEMPTS_WITHOUT_PROGRESS",
    "INCOMING_DIR",
    "Download",
    "HttpModelSource",
    "ModelSource",
    "OfferedPackage",
    "PullError",
    "S3ModelSource",
    "download",
    "make_model_source",
    "parse_listing",
]
