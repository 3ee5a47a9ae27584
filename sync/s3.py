"""The `s3` destination: batches and payloads as objects in an S3-compatible bucket (AWS S3,
MinIO, SeaweedFS, ...), with large payloads sent as multipart uploads that resume after a cut.

Layout under `prefix` in `bucket` (JOURNAL: the journal's id, sync/identity.py)::

    APPLIANCE/JOURNAL/records/PRIORITY/YYYY-MM-DD/FIRST-LAST.ndjson.gz  (the batch, gzip NDJSON)
    APPLIANCE/JOURNAL/payloads/AB/SHA256                                (metadata sha256=SHA256)
    APPLIANCE/JOURNAL/journal.json                                      (the journal's marker)
    APPLIANCE/concurrent-journals.json                  (only while two journals are live)

The date of a batch is the UTC date of its first record's timestamp (read from the batch body),
not the date of sending: a resend of the same batch lands on the same key and overwrites it.
Records journalled before journals had identities (legacy) keep the keys they always had,
APPLIANCE/records/... and APPLIANCE/payloads/..., so a batch resent after an upgrade lands on
the object it landed on before.

Two journals under one appliance id (a replaced disk, or two boxes given one config) never
share a key; their `journal.json` markers tell one from the other (see sync/directory.py, whose
rules this destination shares).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from config.shipping import S3Destination
from sync.destination import (
    Batch,
    DestinationError,
    JournalCollision,
    RateLimiter,
    conflict_error,
    conflicting_seqs,
)
from sync.identity import valid_journal_id
from sync.journal_markers import (
    COLLISION_QUIET_S,
    FLAG_NAME,
    MARKER_NAME,
    MARKER_REFRESH_S,
    MarkerClock,
    collision_for,
    flag_json,
    live_alongside,
    markers_from,
    next_marker,
    parse_marker,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

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

    def __init__(
        self,
        cfg: S3Destination,
        appliance_id: str,
        chunk_size: int,
        *,
        collision_quiet_s: float = COLLISION_QUIET_S,
        marker_refresh_s: float = MARKER_REFRESH_S,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.appliance_id = appliance_id
        self.chunk_size = chunk_size
        self.part_size = max(chunk_size, MIN_PART_SIZE)
        self.bucket = cfg.bucket
        self.collision_quiet_s = collision_quiet_s
        self.collision: JournalCollision | None = None
        self._warned_unreadable = False
        self._markers = MarkerClock(marker_refresh_s)
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

    def appliance_prefix(self, appliance_id: str | None = None) -> str:
        return f"{self.cfg.prefix}{appliance_id or self.appliance_id}/"

    def journal_prefix(self, journal_id: str | None, appliance_id: str | None = None) -> str:
        """Where a journal's objects go; a legacy one's (None) straight under the appliance."""
        base = self.appliance_prefix(appliance_id)
        return base if journal_id is None else f"{base}{journal_id}/"

    def batch_key(self, batch: Batch) -> str:
        return (
            f"{self.journal_prefix(batch.journal_id, batch.appliance_id)}records/"
            f"{batch.priority.label}/{batch_date(batch)}/"
            f"{batch.first_seq:012d}-{batch.last_seq:012d}.ndjson.gz"
        )

    def marker_key(self, journal_id: str, appliance_id: str | None = None) -> str:
        return f"{self.journal_prefix(journal_id, appliance_id)}{MARKER_NAME}"

    def flag_key(self, appliance_id: str | None = None) -> str:
        return f"{self.appliance_prefix(appliance_id)}{FLAG_NAME}"

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        await limiter.consume(len(batch.body))
        metadata = {
            "batch-id": batch.batch_id,
            "records": str(batch.records),
            "first-seq": str(batch.first_seq),
            "last-seq": str(batch.last_seq),
        }
        if batch.journal_id is not None:
            metadata["journal-id"] = batch.journal_id
        key = self.batch_key(batch)
        try:
            # Never overwrite other records under the same name (a reused seq); a resend of what
            # landed before a crash is already complete. One small GET, only when it exists.
            stored = await self._stored_batch(key)
            conflicts = None if stored is None else conflicting_seqs(stored, batch)
            if conflicts:
                raise conflict_error(self.name, batch, f"s3://{self.bucket}/{key}", conflicts)
            if conflicts is None:
                await self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=batch.body,
                    ContentType="application/x-ndjson",
                    ContentEncoding="gzip",
                    Metadata=metadata,
                )
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise self._error(f"batch {batch.batch_id} not stored", exc) from exc
        if batch.journal_id is not None and self._markers.due(batch.journal_id):
            try:
                await self._keep_marker(batch.appliance_id, batch.journal_id, batch.follows)
            except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
                # Markers only warn: a key allowed to write batches but not to list the bucket
                # still delivers everything.
                self._markers.failed(self.name, str(self._error("journal marker", exc)))

    # ------------------------------------------------------------------------- markers

    async def _stored_batch(self, key: str) -> bytes | None:
        """What the bucket holds under a batch's name, or None. A key allowed to write but not
        to read (a common least-privilege policy) cannot check: it writes as before, and says
        so once."""
        try:
            return await self._get_or_none(key)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status != 403:
                raise
            if not self._warned_unreadable:
                self._warned_unreadable = True
                log.warning(
                    "s3 key may not read batches back: a reused seq would overwrite unseen",
                    extra={"fields": {"destination": self.name, "bucket": self.bucket}},
                )
            return None

    async def _get_or_none(self, key: str) -> bytes | None:
        try:
            answer = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with answer["Body"] as body:
                return await body.read()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in ("NoSuchKey", "404") or status == 404:
                return None
            raise

    async def _keep_marker(
        self, appliance_id: str, journal_id: str, follows: str | None = None
    ) -> None:
        """Write our journal's marker, then compare it with the other journals' markers under
        the same appliance id: set `collision` and the flag object, or clear both."""
        now = datetime.now(UTC)
        key = self.marker_key(journal_id, appliance_id)
        first_seen = self._markers.first_seen
        if first_seen is None:  # the first time in this process: keep what the bucket says
            data = await self._get_or_none(key)
            existing = None if data is None else parse_marker(data, journal_id)
            first_seen = None if existing is None else existing.first_seen
        ours = next_marker(appliance_id, journal_id, first_seen, now, follows)
        await self.client.put_object(
            Bucket=self.bucket, Key=key, Body=ours.to_json(), ContentType="application/json"
        )
        self._markers.first_seen = ours.first_seen

        base = self.appliance_prefix(appliance_id)
        journals: list[str] = []
        flag_there = False
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base, "Delimiter": "/"}
        while True:
            listing = await self.client.list_objects_v2(**kwargs)
            for common in listing.get("CommonPrefixes", []):
                name = str(common.get("Prefix", ""))[len(base) :].rstrip("/")
                if name != journal_id and valid_journal_id(name):
                    journals.append(name)
            flag_there = flag_there or any(
                item.get("Key") == self.flag_key(appliance_id)
                for item in listing.get("Contents", [])
            )
            token = listing.get("NextContinuationToken")
            if not listing.get("IsTruncated") or not token:
                break
            kwargs["ContinuationToken"] = token
        found = {
            other: await self._get_or_none(self.marker_key(other, appliance_id))
            for other in journals
        }
        live = live_alongside(ours, markers_from(found, journal_id), now, self.collision_quiet_s)
        where = f"s3 destination {self.name!r} (s3://{self.bucket}/{base})"
        self.collision = collision_for(ours, live, where)
        if self.collision is not None:
            await self.client.put_object(
                Bucket=self.bucket,
                Key=self.flag_key(appliance_id),
                Body=flag_json(ours, self.collision, now),
                ContentType="application/json",
            )
        elif flag_there:
            await self.client.delete_object(Bucket=self.bucket, Key=self.flag_key(appliance_id))
        self._markers.done()

    # ------------------------------------------------------------------------- payloads

    def payload_key(self, sha256: str, journal_id: str | None = None) -> str:
        return f"{self.journal_prefix(journal_id)}payloads/{sha256[:2]}/{sha256}"

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
        self,
        sha256: str,
        size: int,
        media_type: str,
        path: Path,
        limiter: RateLimiter,
        journal_id: str | None = None,
    ) -> int:
        key = self.payload_key(sha256, journal_id)
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
