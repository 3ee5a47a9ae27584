"""Owns where the receiver keeps bytes: payloads and published model packages, in
`DirectoryObjects` (files under the receiver's data folder, the default) or `S3Objects` (an
S3-compatible bucket that every replica shares, `PREFIXpayloads/`, `PREFIXmodels/`).
Both hold an upload in progress so that any replica can resume it with at most one chunk sent
again, and both make a payload visible only once its bytes hash to its sha256.

In a bucket an upload in progress is one object per chunk, named by the byte range it holds
(`PREFIXpartial/APPLIANCE/SHA256/OFFSET-END`): the offset is what the bucket holds, not a file on
one replica. Finishing streams the chunks through sha256 into a multipart upload of the final
object (`PREFIXpayloads/APPLIANCE/SHA256`), then deletes them. An unreachable bucket answers a
retryable 503: nothing was lost, the appliance sends again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from receiver.protocol import MODELS_DIR, PARTIAL_DIR, PAYLOADS_DIR, Refusal
from receiver.uploads import (
    abandoned_partials,
    append_chunk,
    complete_upload,
    ensure_dir,
    remove_if_stale,
    upload_state,
)
from sync.payloads import fsync_dir

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)

# Parts of the final object's multipart upload: S3 wants at least 5 MiB but for the last one.
PART_BYTES = 8 * 1024 * 1024
_READ = 256 * 1024  # what a package download sends at a time
_CHUNK_KEY = re.compile(r"(\d{16})-(\d{16})")


class PayloadObjects(Protocol):
    """Payload bytes, complete or in progress, of every appliance."""

    async def held(self, appliance_id: str, sha256: str) -> tuple[int, bool]:
        """(bytes held, complete?) of one payload."""
        ...

    async def append(self, appliance_id: str, sha256: str, offset: int, data: bytes) -> int:
        """Keep `data` at `offset` (what `held` says is there); the new offset. Durable when
        this returns."""
        ...

    async def finish(self, appliance_id: str, sha256: str) -> bool:
        """Make the held bytes the payload when they hash to `sha256` (True); otherwise discard
        them (False: the appliance uploads again from 0)."""
        ...

    async def put_whole(self, appliance_id: str, sha256: str, data: bytes) -> bool:
        """Keep a payload that arrived whole in one request (nothing held of it before): True
        when `data` hashes to `sha256` and is kept, False when it does not (nothing kept)."""
        ...

    async def expire(self, ttl_s: float, ahead_s: float = 0.0) -> list[tuple[str, str, int]]:
        """Delete uploads in progress untouched for `ttl_s` (as if `ahead_s` more seconds had
        passed); (appliance, sha256, bytes) of each."""
        ...

    async def put_package(self, sha256: str, spooled: Path) -> None:
        """Keep a published model package (verified, in a local spool file) under its sha256,
        where every replica finds it."""
        ...

    async def package_size(self, sha256: str) -> int | None:
        """Bytes of a published package; None when it is not kept."""
        ...

    def read_package(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes `start` to `end` (exclusive) of a published package."""
        ...

    def read_payload(
        self, appliance_id: str, sha256: str, start: int, end: int
    ) -> AsyncIterator[bytes]:
        """Bytes `start` to `end` (exclusive) of a complete payload (the fleet view's images
        and clips); nothing when it is not held."""
        ...

    async def ping(self) -> None:
        """Raise when the bytes cannot be reached now (for `/healthz`)."""
        ...

    async def close(self) -> None: ...


class DirectoryObjects:
    """Payloads as files under the data folder: `payloads/APPLIANCE/SHA256` and, in progress,
    `partial/APPLIANCE/SHA256.part` (appended and fsync'd chunk by chunk)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        for name in (PAYLOADS_DIR, PARTIAL_DIR):
            ensure_dir(data_dir / name)

    def final_path(self, appliance_id: str, sha256: str) -> Path:
        return self.data_dir / PAYLOADS_DIR / appliance_id / sha256

    def partial_path(self, appliance_id: str, sha256: str) -> Path:
        return self.data_dir / PARTIAL_DIR / appliance_id / f"{sha256}.part"

    async def held(self, appliance_id: str, sha256: str) -> tuple[int, bool]:
        return await asyncio.to_thread(
            upload_state,
            self.final_path(appliance_id, sha256),
            self.partial_path(appliance_id, sha256),
        )

    async def append(self, appliance_id: str, sha256: str, offset: int, data: bytes) -> int:
        return await asyncio.to_thread(append_chunk, self.partial_path(appliance_id, sha256), data)

    async def finish(self, appliance_id: str, sha256: str) -> bool:
        partial = self.partial_path(appliance_id, sha256)
        if not partial.exists():  # an empty payload: nothing was appended
            await asyncio.to_thread(append_chunk, partial, b"")
        return await asyncio.to_thread(
            complete_upload, partial, self.final_path(appliance_id, sha256), sha256
        )

    async def put_whole(self, appliance_id: str, sha256: str, data: bytes) -> bool:
        await self.append(appliance_id, sha256, 0, data)
        return await self.finish(appliance_id, sha256)

    async def expire(self, ttl_s: float, ahead_s: float = 0.0) -> list[tuple[str, str, int]]:
        now = time.time() + ahead_s
        removed: list[tuple[str, str, int]] = []
        stale = await asyncio.to_thread(abandoned_partials, self.data_dir, ttl_s, now)
        for appliance_id, sha256 in stale:
            size = await asyncio.to_thread(
                remove_if_stale, self.partial_path(appliance_id, sha256), ttl_s, now
            )
            if size:
                removed.append((appliance_id, sha256, size))
        return removed

    def package_path(self, sha256: str) -> Path:
        return self.data_dir / MODELS_DIR / sha256

    async def put_package(self, sha256: str, spooled: Path) -> None:
        await asyncio.to_thread(_install, spooled, self.package_path(sha256))

    async def package_size(self, sha256: str) -> int | None:
        try:
            return (await asyncio.to_thread(self.package_path(sha256).stat)).st_size
        except FileNotFoundError:
            return None

    async def read_package(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        path = self.package_path(sha256)
        offset = start
        while offset < end:
            block = await asyncio.to_thread(_read_range, path, offset, min(_READ, end - offset))
            if not block:
                return
            offset += len(block)
            yield block

    async def read_payload(
        self, appliance_id: str, sha256: str, start: int, end: int
    ) -> AsyncIterator[bytes]:
        path = self.final_path(appliance_id, sha256)
        offset = start
        while offset < end:
            try:
                block = await asyncio.to_thread(_read_range, path, offset, min(_READ, end - offset))
            except FileNotFoundError:
                return
            if not block:
                return
            offset += len(block)
            yield block

    async def ping(self) -> None:
        root = self.data_dir / PAYLOADS_DIR
        if not await asyncio.to_thread(os.access, root, os.W_OK):
            raise OSError(f"{root} is not writable")

    async def close(self) -> None:
        return None


def _install(spooled: Path, final: Path) -> None:
    """Rename the received file into place (over an older copy of the same bytes, which may be
    damaged) and make the rename durable."""
    final.parent.mkdir(parents=True, exist_ok=True)
    spooled.replace(final)
    fsync_dir(final.parent)


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@dataclass(frozen=True, slots=True)
class BucketSettings:
    """Where S3Objects keep payloads: the bucket, its endpoint and the key files."""

    endpoint_url: str
    bucket: str
    access_key_file: Path
    secret_key_file: Path
    prefix: str = ""
    region: str = "us-east-1"
    timeout_s: float = 30.0


class BucketUnavailable(RuntimeError):
    """The bucket cannot be used when the receiver starts (exit 1, the message says why)."""


def _read_key(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BucketUnavailable(f"cannot read the bucket's {what} {path}: {exc}") from None
    if not value:
        raise BucketUnavailable(f"the bucket's {what} {path} is empty")
    return value


class S3Objects:
    """Payloads in an S3-compatible bucket, shared by every receiver replica. Open with
    `S3Objects.open(settings)`: it checks the bucket answers with these keys."""

    def __init__(self, settings: BucketSettings, client: S3Client, client_cm: Any) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = client
        self._client_cm = client_cm

    @classmethod
    async def open(cls, settings: BucketSettings) -> S3Objects:
        access_key = await asyncio.to_thread(_read_key, settings.access_key_file, "access key")
        secret_key = await asyncio.to_thread(_read_key, settings.secret_key_file, "secret key")
        config = AioConfig(
            connect_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client_cm = get_session().create_client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        client: S3Client = await client_cm.__aenter__()
        try:
            await client.head_bucket(Bucket=settings.bucket)
        except (ClientError, BotoCoreError, OSError) as exc:
            await client_cm.__aexit__(None, None, None)
            raise BucketUnavailable(
                f"cannot use bucket {settings.bucket!r} at {settings.endpoint_url}: {exc}"
                f"{clock_skew_note(exc)}"
            ) from exc
        return cls(settings, client, client_cm)

    async def ping(self) -> None:
        await self.client.head_bucket(Bucket=self.bucket)

    async def close(self) -> None:
        if self._client_cm is not None:
            cm, self._client_cm = self._client_cm, None
            await cm.__aexit__(None, None, None)

    # -- keys ------------------------------------------------------------------------------

    def final_key(self, appliance_id: str, sha256: str) -> str:
        return f"{self.settings.prefix}{PAYLOADS_DIR}/{appliance_id}/{sha256}"

    def partial_prefix(self, appliance_id: str | None = None, sha256: str | None = None) -> str:
        key = f"{self.settings.prefix}{PARTIAL_DIR}/"
        if appliance_id is not None:
            key += f"{appliance_id}/"
            if sha256 is not None:
                key += f"{sha256}/"
        return key

    def chunk_key(self, appliance_id: str, sha256: str, start: int, end: int) -> str:
        return f"{self.partial_prefix(appliance_id, sha256)}{start:016d}-{end:016d}"

    # -- errors ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _available(self, what: str) -> AsyncIterator[None]:
        """Whatever the bucket answers wrong (down, refusing the keys, slow) is a retryable
        503: the appliance keeps the payload and sends it again."""
        try:
            yield
        except Refusal:
            raise
        except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
            log.warning(
                "receiver bucket unavailable",
                extra={
                    "fields": {
                        "bucket": self.bucket,
                        "action": what,
                        "error": f"{exc}{clock_skew_note(exc)}",
                    }
                },
            )
            raise Refusal(
                503,
                "object store unavailable",
                f"the receiver's bucket did not answer ({what}); nothing was lost, send again "
                "later",
                {"Retry-After": "5"},
            ) from exc

    # -- the chunks of an upload in progress -----------------------------------------------

    async def _chunks(self, appliance_id: str, sha256: str) -> list[tuple[int, int, str, float]]:
        """(start, end, key, last modified) of every whole chunk object held, by start. A chunk
        object shorter or longer than its name says (a store that kept a write cut off midway)
        is not counted: the appliance sends those bytes again."""
        found: list[tuple[int, int, str, float]] = []
        prefix = self.partial_prefix(appliance_id, sha256)
        for key, size, modified in await self._listing(prefix):
            match = _CHUNK_KEY.fullmatch(key[len(prefix) :])
            if match and size == int(match[2]) - int(match[1]):
                found.append((int(match[1]), int(match[2]), key, modified))
        return sorted(found)

    async def _listing(self, prefix: str) -> list[tuple[str, int, float]]:
        """(key, size, last modified) of every object under `prefix`."""
        listed: list[tuple[str, int, float]] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                listed.append((item["Key"], int(item["Size"]), item["LastModified"].timestamp()))
        return listed

    @staticmethod
    def _chain(chunks: list[tuple[int, int, str, float]]) -> list[tuple[int, int, str, float]]:
        """The chunks that hold bytes 0.. without a gap (a chunk sent twice by two replicas is
        the same bytes under the same key; one left over from a cut upload is skipped)."""
        chain: list[tuple[int, int, str, float]] = []
        offset = 0
        for chunk in chunks:
            start, end = chunk[0], chunk[1]
            if start == offset and end > start:
                chain.append(chunk)
                offset = end
        return chain

    async def held(self, appliance_id: str, sha256: str) -> tuple[int, bool]:
        async with self._available("look up a payload"):
            try:
                head = await self.client.head_object(
                    Bucket=self.bucket, Key=self.final_key(appliance_id, sha256)
                )
                return int(head["ContentLength"]), True
            except ClientError as exc:
                if _status(exc) != 404:
                    raise
            chain = self._chain(await self._chunks(appliance_id, sha256))
            return (chain[-1][1] if chain else 0), False

    async def append(self, appliance_id: str, sha256: str, offset: int, data: bytes) -> int:
        if not data:
            return offset
        end = offset + len(data)
        async with self._available("store a chunk"):
            # Content-MD5: the store refuses a body that arrives damaged or cut short.
            await self.client.put_object(
                Bucket=self.bucket,
                Key=self.chunk_key(appliance_id, sha256, offset, end),
                Body=data,
                ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
            )
        return end

    async def put_whole(self, appliance_id: str, sha256: str, data: bytes) -> bool:
        """One PUT of the final object, hashed here first: a payload that fits one chunk (most
        snapshots) costs one request, not the chunk's write, read back and multipart copy."""
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if digest != sha256:
            return False
        async with self._available("keep a payload"):
            await self.client.put_object(
                Bucket=self.bucket,
                Key=self.final_key(appliance_id, sha256),
                Body=data,
                ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
            )
        return True

    async def finish(self, appliance_id: str, sha256: str) -> bool:
        key = self.final_key(appliance_id, sha256)
        try:
            return await self._finish(appliance_id, sha256, key)
        except Refusal as refusal:
            # Another replica finished it meanwhile (and deleted the chunks under this one).
            if refusal.status == 503 and (await self.held(appliance_id, sha256))[1]:
                return True
            raise

    async def _finish(self, appliance_id: str, sha256: str, key: str) -> bool:
        async with self._available("complete a payload"):
            if (await self.held(appliance_id, sha256))[1]:
                return True  # finished by another replica
            chunks = await self._chunks(appliance_id, sha256)
            chain = self._chain(chunks)
            digest = hashlib.sha256()
            upload = await self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
            upload_id = upload["UploadId"]
            parts: list[dict[str, Any]] = []
            buffer = bytearray()
            try:
                for start, end, chunk_key, _ in chain:
                    answer = await self.client.get_object(Bucket=self.bucket, Key=chunk_key)
                    async with answer["Body"] as body:
                        data = await body.read()
                    if len(data) != end - start:  # the bucket's answer, not the upload, is short
                        raise OSError(
                            f"chunk {chunk_key} read back as {len(data)} of {end - start} bytes"
                        )
                    digest.update(data)
                    buffer += data
                    if len(buffer) >= PART_BYTES:
                        parts.append(await self._part(key, upload_id, len(parts) + 1, buffer))
                        buffer = bytearray()
                verified = digest.hexdigest() == sha256
                if verified and (buffer or not parts):
                    parts.append(await self._part(key, upload_id, len(parts) + 1, buffer))
            except BaseException:
                with contextlib.suppress(ClientError, BotoCoreError, OSError):
                    await self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                raise
            if verified:
                await self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                )
            else:
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
                # Only bytes that stood still are judged: another replica finishing the same
                # payload (the appliance's retry of its last chunk) deletes the chunks as it
                # goes, and what was read then is not what the appliance sent.
                if (await self.held(appliance_id, sha256))[1]:
                    return True
                if [c[2] for c in await self._chunks(appliance_id, sha256)] != [
                    c[2] for c in chunks
                ]:
                    raise OSError("the upload's chunks changed while they were being verified")
            prefix = self.partial_prefix(appliance_id, sha256)
            await self._delete([chunk_key for chunk_key, _, _ in await self._listing(prefix)])
        return verified

    async def _part(self, key: str, upload_id: str, number: int, data: bytearray) -> dict[str, Any]:
        answer = await self.client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(data)
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    async def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            if batch:
                await self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )

    # -- published model packages ------------------------------------------------------------

    def package_key(self, sha256: str) -> str:
        return f"{self.settings.prefix}{MODELS_DIR}/{sha256}"

    async def put_package(self, sha256: str, spooled: Path) -> None:
        key = self.package_key(sha256)
        async with self._available("keep a model package"):
            size = (await asyncio.to_thread(spooled.stat)).st_size
            if size <= PART_BYTES:
                data = await asyncio.to_thread(spooled.read_bytes)
                await self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
                return
            upload = await self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
            upload_id = upload["UploadId"]
            parts: list[dict[str, Any]] = []
            try:
                for offset in range(0, size, PART_BYTES):
                    block = await asyncio.to_thread(_read_range, spooled, offset, PART_BYTES)
                    parts.append(await self._part(key, upload_id, len(parts) + 1, bytearray(block)))
                await self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                )
            except BaseException:
                with contextlib.suppress(ClientError, BotoCoreError, OSError):
                    await self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                raise

    async def package_size(self, sha256: str) -> int | None:
        async with self._available("look up a model package"):
            try:
                head = await self.client.head_object(
                    Bucket=self.bucket, Key=self.package_key(sha256)
                )
            except ClientError as exc:
                if _status(exc) == 404:
                    return None
                raise
            return int(head["ContentLength"])

    async def read_package(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        if start >= end:
            return
        async with self._available("read a model package"):
            answer = await self.client.get_object(
                Bucket=self.bucket, Key=self.package_key(sha256), Range=f"bytes={start}-{end - 1}"
            )
            async with answer["Body"] as body:
                while block := await body.read(_READ):
                    yield block

    async def read_payload(
        self, appliance_id: str, sha256: str, start: int, end: int
    ) -> AsyncIterator[bytes]:
        if start >= end:
            return
        async with self._available("read a payload"):
            try:
                answer = await self.client.get_object(
                    Bucket=self.bucket,
                    Key=self.final_key(appliance_id, sha256),
                    Range=f"bytes={start}-{end - 1}",
                )
            except ClientError as exc:
                if _status(exc) in (404, 416):
                    return
                raise
            async with answer["Body"] as body:
                while block := await body.read(_READ):
                    yield block

    async def expire(self, ttl_s: float, ahead_s: float = 0.0) -> list[tuple[str, str, int]]:
        """Uploads in progress whose newest chunk is older than `ttl_s`. Ages are measured on
        the bucket's clock (its `Date`), not this replica's: a replica whose clock runs days
        ahead must not delete uploads other replicas are still taking."""
        uploads: dict[tuple[str, str], list[tuple[str, int, float]]] = {}
        prefix = self.partial_prefix()
        now = time.time() + ahead_s
        async with self._available("expire uploads"):
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                now = (_bucket_time(page) or time.time()) + ahead_s
                for item in page.get("Contents", []):
                    parts = item["Key"][len(prefix) :].split("/")
                    if len(parts) != 3:
                        continue
                    appliance_id, sha256, _ = parts
                    uploads.setdefault((appliance_id, sha256), []).append(
                        (item["Key"], int(item["Size"]), item["LastModified"].timestamp())
                    )
            removed: list[tuple[str, str, int]] = []
            for (appliance_id, sha256), chunks in sorted(uploads.items()):
                if now - max(modified for _, _, modified in chunks) <= ttl_s:
                    continue
                await self._delete([key for key, _, _ in chunks])
                removed.append((appliance_id, sha256, sum(size for _, size, _ in chunks)))
        return removed


def _bucket_time(response: Mapping[str, Any]) -> float | None:
    """The bucket's clock: the `Date` header of its answer (None when it sent none)."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not isinstance(date, str):
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None


# S3 refuses a request signed this far from its own clock (AWS: 15 minutes; others alike).
_SIGNING_SKEW_S = 900.0


def clock_skew_note(exc: BaseException) -> str:
    """Why a bucket refuses keys that are right: this machine's clock is too far from the
    bucket's for request signatures (what a 403 then means); empty when that is not it."""
    if not isinstance(exc, ClientError) or _status(exc) != 403:
        return ""
    bucket_now = _bucket_time(exc.response)
    if bucket_now is None:
        return ""
    skew = time.time() - bucket_now
    if abs(skew) < _SIGNING_SKEW_S:
        return ""
    way = "ahead of" if skew > 0 else "behind"
    amount = (
        f"{abs(skew) / 3600:.1f} hours" if abs(skew) >= 3600 else f"{abs(skew) / 60:.0f} minutes"
    )
    return (
        f" (this machine's clock is {amount} {way} the bucket's, and S3 refuses requests "
        "signed more than 15 minutes off: set the clock right, e.g. with NTP)"
    )


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


__all__ = [
    "PART_BYTES",
    "BucketSettings",
    "BucketUnavailable",
    "DirectoryObjects",
    "PayloadObjects",
    "S3Objects",
]
