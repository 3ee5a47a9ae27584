"""The `s3` destination: batches and payloads as objects in an S3-compatible bucket (AWS S3,
MinIO, SeaweedFS, ...), with large payloads sent as multipart uploads that resume after a cut.

Layout under `prefix` in `bucket`::

    APPLIANCE/records/PRIORITY/YYYY-MM-DD/FIRST-LAST.ndjson.gz   (the batch, gzip NDJSON)
    APPLIANCE/payloads/AB/SHA256                                 (metadata sha256=SHA256)

The date of a batch is the UTC date of its first record's timestamp (read from the batch body),
not the date of sending: a resend of the same batch lands on the same key and overwrites it.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from config.models import S3Destination
from sync.destination import Batch, DestinationError, RateLimiter

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

# S3 refuses parts under 5 MiB (except the last one of an upload).
MIN_PART_SIZE = 5 * 1024 * 1024

_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "NoSuchUpload"}
)


def batch_date(batch: Batch) -> str:
    """UTC date (YYYY-MM-DD) of the batch's first record; stable for the batch's identity."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(batch.body)) as handle:
            first = json.loads(handle.readline())
        ts = datetime.fromisoformat(str(first["ts"]))
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return "undated"
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).date().isoformat()


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


class S3Target:
    """One bucket. Opened with `async with` (reads the key files, opens the client); every
    method raises DestinationError."""

    dedups_records = False  # objects are named by the batch's bounds

    def __init__(self, cfg: S3Destination, appliance_id: str, chunk_size: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.appliance_id = appliance_id
        self.chunk_size = chunk_size
        self.part_size = max(chunk_size, MIN_PART_SIZE)
        self.bucket = cfg.bucket
        self._client: S3Client | None = None
        self._client_cm: Any = None

    # ------------------------------------------------------------------------- lifecycle

    def _read_secret(self, path: Path, what: str) -> str:
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise DestinationError(
                self.name, f"cannot read {what} {path}: {exc.strerror}", retryable=False
            ) from exc
        if not value:
            raise DestinationError(self.name, f"{what} {path} is empty", retryable=False)
        return value

    async def __aenter__(self) -> S3Target:
        access_key = await asyncio.to_thread(
            self._read_secret, self.cfg.access_key_file, "access_key_file"
        )
        secret_key = await asyncio.to_thread(
            self._read_secret, self.cfg.secret_key_file, "secret_key_file"
        )
        config = AioConfig(
            connect_timeout=self.cfg.timeout,
            read_timeout=self.cfg.timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # Checksums only where S3 requires them: not every S3-compatible server knows the
            # newer CRC headers, and the payload's sha256 is checked separately.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client_cm = get_session().create_client(
            "s3",
            endpoint_url=self.cfg.endpoint_url,
            region_name=self.cfg.region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self._client = await self._client_cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client_cm is not None:
            cm, self._client_cm, self._client = self._client_cm, None, None
            await cm.__aexit__(None, None, None)

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "S3Target used outside `async with`"
        return self._client

    # ------------------------------------------------------------------------- errors

    def _error(self, what: str, exc: Exception) -> DestinationError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            message = str(error.get("Message", "")) or code
            if code in _CREDENTIAL_CODES or status in (401, 403):
                return DestinationError(
                    self.name,
                    f"{what}: credentials refused by {self.cfg.endpoint_url} ({code or status}: "
                    f"{message}); check access_key_file {self.cfg.access_key_file} and "
                    f"secret_key_file {self.cfg.secret_key_file}, and the key's rights on "
                    f"bucket {self.bucket!r}",
                    retryable=False,
                )
            if code == "NoSuchBucket":
                return DestinationError(
                    self.name, f"{what}: bucket {self.bucket!r} does not exist", retryable=False
                )
            retryable = status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
            return DestinationError(
                self.name, f"{what}: {code or status}: {message}", retryable=retryable
            )
        # Connection refused/reset, timeouts, DNS: the link, not the request.
        return DestinationError(self.name, f"{what}: {exc or type(exc).__name__}", retryable=True)

    # ------------------------------------------------------------------------- probes

    async def reachable(self) -> bool:
        """The bucket answers HEAD. A refusal (bad keys, no bucket) counts as reachable, so the
        next send reports the clear, permanent error instead of the link looking down forever."""
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            return 400 <= status < 500
        except (BotoCoreError, OSError, TimeoutError):
            return False
        return True

    # ------------------------------------------------------------------------- records

    def batch_key(self, batch: Batch) -> str:
        return (
            f"{self.cfg.prefix}{batch.appliance_id}/records/{batch.priority.label}/"
            f"{batch_date(batch)}/{batch.first_seq:012d}-{batch.last_seq:012d}.ndjson.gz"
        )

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        await limiter.consume(len(batch.body))
        try:
            await self.client.put_object(
                Bucket=self.bucket,
                Key=self.batch_key(batch),
                Body=batch.body,
                ContentType="application/x-ndjson",
                ContentEncoding="gzip",
                Metadata={
                    "batch-id": batch.batch_id,
                    "records": str(batch.records),
                    "first-seq": str(batch.first_seq),
                    "last-seq": str(batch.last_seq),
                },
            )
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise self._error(f"batch {batch.batch_id} not stored", exc) from exc

    # ------------------------------------------------------------------------- payloads

    def payload_key(self, sha256: str) -> str:
        return f"{self.cfg.prefix}{self.appliance_id}/payloads/{sha256[:2]}/{sha256}"

    async def _stored_size(self, key: str, sha256: str) -> int | None:
        """Size of the complete object at `key` if it holds this payload, else None."""
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status == 404:
                return None
            raise
        stored_sha = head.get("Metadata", {}).get("sha256")
        if stored_sha is not None and stored_sha != sha256:
            return None
        return int(head["ContentLength"])

    async def send_payload(
        self, sha256: str, size: int, media_type: str, path: Path, limiter: RateLimiter
    ) -> int:
        key = self.payload_key(sha256)
        what = f"payload {sha256[:12]}"
        try:
            if await self._stored_size(key, sha256) == size:
                return 0
            if size <= self.part_size:
                data = await asyncio.to_thread(path.read_bytes)
                if len(data) != size:
                    raise DestinationError(
                        self.name, f"{what}: local file is not {size} bytes", retryable=False
                    )
                await limiter.consume(len(data))
                await self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=media_type,
                    Metadata={"sha256": sha256},
                )
                sent = len(data)
            else:
                sent = await self._multipart(key, sha256, size, media_type, path, limiter)
            stored = await self._stored_size(key, sha256)
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise self._error(f"{what} not stored", exc) from exc
        if stored != size:
            raise DestinationError(
                self.name, f"{what}: stored object is {stored} bytes, not {size}", retryable=True
            )
        return sent

    async def _open_upload(self, key: str, sha256: str, media_type: str) -> str:
        """The id of an unfinished upload for `key` (the newest), or of a new one."""
        uploads: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key}
        while True:
            listing = await self.client.list_multipart_uploads(**kwargs)
            for upload in listing.get("Uploads", []):
                if upload.get("Key") == key and "UploadId" in upload:
                    initiated = upload.get("Initiated")
                    uploads.append((initiated.isoformat() if initiated else "", upload["UploadId"]))
            if not listing.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = listing.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = listing.get("NextUploadIdMarker", "")
        if uploads:
            return max(uploads)[1]
        created = await self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=media_type, Metadata={"sha256": sha256}
        )
        return created["UploadId"]

    async def _finished_parts(self, key: str, upload_id: str) -> dict[int, tuple[int, str]]:
        """Part number -> (size, ETag) of the parts the server already holds."""
        parts: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            listing = await self.client.list_parts(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
            )
            for part in listing.get("Parts", []):
                if "PartNumber" in part and "ETag" in part:
                    parts[part["PartNumber"]] = (int(part.get("Size", -1)), part["ETag"])
            if not listing.get("IsTruncated"):
                return parts
            marker = int(listing.get("NextPartNumberMarker", 0))

    async def _multipart(
        self, key: str, sha256: str, size: int, media_type: str, path: Path, limiter: RateLimiter
    ) -> int:
        upload_id = await self._open_upload(key, sha256, media_type)
        try:
            done = await self._finished_parts(key, upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            upload_id = await self._open_upload(key, sha256, media_type)
            done = {}
        count = -(-size // self.part_size)
        completed: list[CompletedPartTypeDef] = []
        sent = 0
        for number in range(1, count + 1):
            offset = (number - 1) * self.part_size
            length = min(self.part_size, size - offset)
            have = done.get(number)
            if have is not None and have[0] == length:
                completed.append({"PartNumber": number, "ETag": have[1]})
                continue
            data = await asyncio.to_thread(_read_range, path, offset, length)
            if len(data) != length:
                raise DestinationError(
                    self.name,
                    f"payload {sha256[:12]}: local file shorter than {size} bytes",
                    retryable=False,
                )
            await limiter.consume(length)
            answer = await self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
            completed.append({"PartNumber": number, "ETag": answer["ETag"]})
            sent += length
        await self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": completed},
        )
        return sent
