"""The `http` destination: the client side of docs/sync-protocol.md (batches by identity,
resumable payload uploads, bearer token, HTTPS with a configurable CA bundle and an optional
client certificate). tenacity retries a single request briefly; the engine owns the longer
backoff."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from config.shipping import HttpDestination
from sync.destination import Batch, DestinationError, JournalCollision, RateLimiter

_REQUEST_ATTEMPTS = 3


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, DestinationError) and exc.retryable


class HttpTarget:
    """One receiver. Opened with `async with`; every method raises DestinationError."""

    dedups_records = True  # the receiver keeps each (appliance, journal, seq) once

    def __init__(self, cfg: HttpDestination, appliance_id: str, chunk_size: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.appliance_id = appliance_id
        self.chunk_size = chunk_size
        self.base = cfg.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self.collision: JournalCollision | None = None

    async def __aenter__(self) -> HttpTarget:
        if self.cfg.token_file is not None:
            try:
                text = await asyncio.to_thread(self.cfg.token_file.read_text)
            except OSError as exc:
                raise DestinationError(
                    self.name,
                    f"cannot read token_file {self.cfg.token_file}: {exc.strerror}",
                    retryable=False,
                ) from exc
            self._token = text.strip()
        ssl_context = await asyncio.to_thread(self._tls_context)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=4),
        )
        return self

    def _tls_context(self) -> ssl.SSLContext | bool:
        """The CA bundle and client certificate from config; unreadable files are permanent."""
        if self.cfg.ca_file is None and self.cfg.client_cert is None:
            return True  # aiohttp's default: system CAs
        what = f"ca_file {self.cfg.ca_file}"
        try:
            context = ssl.create_default_context(
                cafile=None if self.cfg.ca_file is None else str(self.cfg.ca_file)
            )
            if self.cfg.client_cert is not None:
                what = f"client_cert {self.cfg.client_cert}"
                context.load_cert_chain(self.cfg.client_cert, self.cfg.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise DestinationError(
                self.name, f"cannot use {what}: {exc.strerror or exc}", retryable=False
            ) from exc
        return context

    def _tls_error(self, exc: aiohttp.ClientError) -> DestinationError | None:
        """A TLS failure that retrying cannot fix, as a permanent error saying what to check."""
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return DestinationError(
                self.name,
                f"the receiver's certificate is not trusted ({exc.certificate_error}); "
                "check ca_file and the url's host name",
                retryable=False,
            )
        if isinstance(exc, aiohttp.ClientSSLError):
            return DestinationError(
                self.name,
                f"TLS handshake refused ({exc}); check client_cert/client_key and ca_file",
                retryable=False,
            )
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, suffix: str) -> str:
        return f"{self.base}/v1/appliances/{self.appliance_id}/{suffix}"

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        headers.update(extra or {})
        return headers

    async def _request(
        self, method: str, url: str, **kwargs: Any
    ) -> tuple[int, CIMultiDict[str], bytes]:
        """One request with brief retries on connection errors and 5xx; 4xx is final."""
        assert self._session is not None, "HttpTarget used outside `async with`"
        session = self._session

        async def once() -> tuple[int, CIMultiDict[str], bytes]:
            try:
                async with session.request(method, url, **kwargs) as response:
                    body = await response.read()
                    # Header names are case-insensitive: a load balancer (HAProxy, and any
                    # HTTP/2 hop) hands them on in lower case.
                    status, headers = response.status, CIMultiDict(response.headers)
            except aiohttp.ClientError as exc:
                raise self._tls_error(exc) or DestinationError(
                    self.name, f"{method} failed: {exc or type(exc).__name__}", retryable=True
                ) from exc
            except TimeoutError as exc:
                raise DestinationError(
                    self.name, f"{method} failed: {exc or type(exc).__name__}", retryable=True
                ) from exc
            if status >= 500:
                raise DestinationError(self.name, f"{method} answered {status}", retryable=True)
            return status, headers, body

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(_REQUEST_ATTEMPTS),
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
            retry=retry_if_exception(_transient),
            reraise=True,
        ):
            with attempt:
                return await once()
        raise AssertionError("unreachable")

    def _refused(self, what: str, status: int, body: bytes) -> DestinationError:
        detail = body.decode(errors="replace")[:300]
        try:
            answer = json.loads(body)
            # The receiver's own words, whole: a 409 names the conflicting seqs and what to do.
            detail = f"{answer['error']}: {answer['detail']}"
        except (ValueError, TypeError, KeyError):
            pass
        hint = {401: " (check token_file)", 403: " (token of another appliance)"}.get(status, "")
        if b"client certificate" in body:
            hint = " (check client_cert/client_key)"
        return DestinationError(
            self.name, f"{what} refused with {status}{hint}: {detail}", retryable=False
        )

    async def reachable(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.base}/v1/health") as response:
                if 400 <= response.status < 500:  # it answers, and says we are doing it wrong
                    raise self._refused("health check", response.status, await response.read())
                return response.status == 200
        except aiohttp.ClientError as exc:
            tls_error = self._tls_error(exc)
            if tls_error is not None:
                raise tls_error from exc  # reachable, but never usable as configured
            return False
        except TimeoutError:
            return False

    @staticmethod
    def _journal_header(journal_id: str | None, follows: str | None = None) -> dict[str, str]:
        # None: records journalled before identities, shipped exactly as they were then.
        headers = {} if journal_id is None else {"Journal-Id": journal_id}
        if journal_id is not None and follows is not None:
            headers["Journal-Follows"] = follows
        return headers

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        await limiter.consume(len(batch.body))
        status, _, body = await self._request(
            "PUT",
            self._url(f"batches/{batch.batch_id}"),
            data=batch.body,
            headers=self._headers(
                {
                    "Content-Encoding": "gzip",
                    "Content-Type": "application/x-ndjson",
                    **self._journal_header(batch.journal_id, batch.follows),
                }
            ),
        )
        if status != 200:
            raise self._refused(f"batch {batch.batch_id}", status, body)
        self._read_warnings(body)

    def _read_warnings(self, body: bytes) -> None:
        """The receiver's answer to a stored batch says whether this appliance id has other
        journals shipping at the same time (two boxes, one id)."""
        try:
            answer = json.loads(body)
        except ValueError:
            return
        warnings = answer.get("warnings") if isinstance(answer, dict) else None
        for warning in warnings if isinstance(warnings, list) else []:
            if isinstance(warning, dict) and warning.get("code") == "concurrent_journals":
                journals = warning.get("journals")
                self.collision = JournalCollision(
                    journals=tuple(str(j) for j in journals) if isinstance(journals, list) else (),
                    detail=str(warning.get("detail", "")),
                )
                return
        self.collision = None

    async def _offset(self, sha256: str, journal_id: str | None) -> tuple[int, bool]:
        status, headers, body = await self._request(
            "HEAD",
            self._url(f"payloads/{sha256}"),
            headers=self._headers(self._journal_header(journal_id)),
        )
        if status == 404:
            return 0, False
        if status != 200:
            raise self._refused(f"payload {sha256[:12]}", status, body)
        return int(headers.get("Upload-Offset", "0")), headers.get("Upload-Complete") == "1"

    async def send_payload(
        self,
        sha256: str,
        size: int,
        media_type: str,
        path: Path,
        limiter: RateLimiter,
        journal_id: str | None = None,
    ) -> int:
        offset, complete = await self._offset(sha256, journal_id)
        sent = 0
        while not complete:
            chunk = await asyncio.to_thread(_read_chunk, path, offset, self.chunk_size)
            if not chunk and offset < size:
                raise DestinationError(
                    self.name, f"payload {sha256[:12]} is shorter than recorded", retryable=False
                )
            await limiter.consume(len(chunk))
            status, headers, body = await self._request(
                "PATCH",
                self._url(f"payloads/{sha256}"),
                data=chunk,
                headers=self._headers(
                    {
                        "Upload-Offset": str(offset),
                        "Upload-Length": str(size),
                        "Content-Type": "application/offset+octet-stream",
                        **self._journal_header(journal_id),
                    }
                ),
            )
            if status == 409:  # the receiver holds a different offset: continue from there
                held = headers.get("Upload-Offset")
                if held is None or not held.isdigit() or int(held) == offset:
                    # Never loop on an answer that does not move the upload on.
                    raise DestinationError(
                        self.name,
                        f"payload {sha256[:12]}: 409 at offset {offset} without a new "
                        f"Upload-Offset ({held!r})",
                        retryable=True,
                    )
                offset = int(held)
                continue
            if status not in (200, 204):
                raise self._refused(f"payload {sha256[:12]}", status, body)
            sent += len(chunk)
            offset = int(headers.get("Upload-Offset", offset + len(chunk)))
            complete = headers.get("Upload-Complete") == "1" or (offset >= size and not chunk)
        return sent


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)
