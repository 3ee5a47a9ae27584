"""Tests of the receiver package against docs/sync-protocol.md: a real server on 127.0.0.1 port 0, a real
receiver.db in tmp_path, real HTTP from aiohttp.ClientSession."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from yarl import URL

from appliance.cli import main as cli_main
from receiver import (
    PARTIAL_DIR,
    PAYLOADS_DIR,
    RECEIVER_DB,
    RECEIVER_KEY,
    build_receiver_app,
    parse_listen,
    parse_tokens_file,
    run_receiver,
    serve_receiver,
)
from tests.helpers import ROOT, cli_env, log_events, receiver_process, wait_until

TOKENS = {"ship-1": "token-one", "ship-2": "token-two"}
MAX_BATCH = 32 * 1024
MAX_CHUNK = 4 * 1024
SUMMARY_FIELDS = {
    "records",
    "max_seq",
    "duplicates_ignored",
    "payloads",
    "payload_bytes",
    "batches",
    "journals",
    "concurrent_journals",
}


def record(
    seq: int, priority: str = "event", appliance_id: str = "ship-1", **extra: Any
) -> dict[str, Any]:
    """A record as `appliance export` writes it."""
    fields: dict[str, Any] = {
        "seq": seq,
        "appliance_id": appliance_id,
        "boot_id": "b0",
        "ts": f"2026-11-01T06:00:{seq % 60:02d}.000000Z",
        "mono_ns": seq * 1000,
        "source": "gearbox",
        "kind": "reading",
        "priority": priority,
        "model": None,
        "body": {"v": seq / 2},
        "payloads": [],
    }
    fields.update(extra)
    return fields


def ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def bearer(appliance_id: str = "ship-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[appliance_id]}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Client:
    """A running receiver and a session to talk to it."""

    base: str
    session: aiohttp.ClientSession
    data_dir: Path
    database: str | None = None  # the PostgreSQL store's DSN; None: receiver.db

    def url(self, path: str) -> URL:
        # encoded=True: send `..`, `%2e%2e` and `%2F` as written, not normalised by the client.
        return URL(self.base + path, encoded=True)

    async def put_batch(
        self,
        batch_id: str,
        body: bytes,
        *,
        appliance_id: str = "ship-1",
        encoding: str | None = "gzip",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(bearer(appliance_id) if headers is None else headers)
        sent["Content-Type"] = "application/x-ndjson"
        if encoding == "gzip":
            body = gzip.compress(body)
        if encoding is not None:
            sent["Content-Encoding"] = encoding
        async with self.session.put(
            self.url(f"/v1/appliances/{appliance_id}/batches/{batch_id}"), data=body, headers=sent
        ) as response:
            return response.status, await response.json()

    async def head(self, digest: str, appliance_id: str = "ship-1") -> aiohttp.ClientResponse:
        async with self.session.head(
            self.url(f"/v1/appliances/{appliance_id}/payloads/{digest}"),
            headers=bearer(appliance_id),
        ) as response:
            return response

    async def patch(
        self, digest: str, chunk: bytes, offset: int, length: int, appliance_id: str = "ship-1"
    ) -> tuple[int, dict[str, str], Any]:
        headers = {
            **bearer(appliance_id),
            "Upload-Offset": str(offset),
            "Upload-Length": str(length),
            "Content-Type": "application/offset+octet-stream",
        }
        async with self.session.patch(
            self.url(f"/v1/appliances/{appliance_id}/payloads/{digest}"),
            data=chunk,
            headers=headers,
        ) as response:
            body = await response.json() if response.status >= 400 else None
            return response.status, dict(response.headers), body

    async def summary(self, appliance_id: str = "ship-1") -> dict[str, Any]:
        async with self.session.get(
            self.url(f"/v1/appliances/{appliance_id}/summary"), headers=bearer(appliance_id)
        ) as response:
            assert response.status == 200
            result: dict[str, Any] = await response.json()
            return result


@contextlib.asynccontextmanager
async def running(
    data_dir: Path,
    tokens: dict[str, str] | None = TOKENS,
    *,
    database: str | None = None,
    clock: Callable[[], float] | None = None,
    concurrent_quiet: float = 86400.0,
) -> AsyncIterator[Client]:
    app = build_receiver_app(
        data_dir,
        tokens,
        max_batch_bytes=MAX_BATCH,
        max_chunk_bytes=MAX_CHUNK,
        database=database,
        clock=clock,
        concurrent_quiet=concurrent_quiet,
    )
    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        aiohttp.ClientSession() as session,
    ):
        host, port = addresses[0]
        assert port != 0
        yield Client(f"http://{host}:{port}", session, data_dir, database)


@pytest.fixture
async def client(data_dir: Path, database: str | None) -> AsyncIterator[Client]:
    async with running(data_dir, database=database) as started:
        yield started


async def stored_records(client: Client, appliance_id: str = "ship-1") -> list[tuple[Any, ...]]:
    """(seq, priority, kind, ts, line) of every record stored for `appliance_id`, by seq, from
    whichever store the receiver runs on."""
    if client.database is None:
        return db_rows(
            client.data_dir,
            "SELECT seq, priority, kind, ts, line FROM records WHERE appliance_id = ? "
            "ORDER BY seq, journal_id",
            appliance_id,
        )
    conn = await asyncpg.connect(client.database)
    try:
        rows = await conn.fetch(
            "SELECT seq, priority, kind, ts, COALESCE(line, record::text) AS line "
            "FROM receiver.records WHERE appliance_id = $1 ORDER BY seq, journal_id",
            appliance_id,
        )
    finally:
        await conn.close()
    return [tuple(row) for row in rows]


def db_rows(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(data_dir / RECEIVER_DB)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def assert_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert set(body) == {"error", "detail"} and body["error"] and body["detail"]


# ------------------------------------------------------------------------------- health


async def test_health_needs_no_token(client: Client) -> None:
    async with client.session.get(client.url("/v1/health")) as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_healthz_reports_the_store_and_the_payload_folder(client: Client) -> None:
    async with client.session.get(client.url("/healthz")) as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})


async def test_unknown_routes_and_methods_answer_json(client: Client) -> None:
    async with client.session.get(client.url("/v1/nothing")) as response:
        assert_error(response.status, await response.json(), 404)
    async with client.session.get(
        client.url("/v1/appliances/ship-1/batches/event-1-2"), headers=bearer()
    ) as response:
        assert_error(response.status, await response.json(), 405)
        assert "PUT" in response.headers["Allow"]


# ------------------------------------------------------------------------------- batches


async def test_batch_stored_once_and_resend_counted_as_duplicates(client: Client) -> None:
    records = [record(seq) for seq in range(1, 6)]
    assert await client.put_batch("event-1-5", ndjson(records)) == (
        200,
        {"batch_id": "event-1-5", "journal_id": "legacy", "stored": 5, "duplicates": 0},
    )
    assert await client.put_batch("event-1-5", ndjson(records)) == (
        200,
        {"batch_id": "event-1-5", "journal_id": "legacy", "stored": 0, "duplicates": 5},
    )
    summary = await client.summary()
    assert set(summary) == SUMMARY_FIELDS
    journals = summary.pop("journals")
    assert summary == {
        "records": 5,
        "max_seq": 5,
        "duplicates_ignored": 5,
        "payloads": 0,
        "payload_bytes": 0,
        "batches": 1,
        "concurrent_journals": [],
    }
    # Sent without a Journal-Id: the appliance's legacy journal.
    assert [(j["journal_id"], j["records"], j["max_seq"]) for j in journals] == [("legacy", 5, 5)]
    rows = await stored_records(client)
    assert [row[0] for row in rows] == [1, 2, 3, 4, 5]
    # The record is kept whole (receiver.db: the raw line verbatim; PostgreSQL: as jsonb), next
    # to the columns it is queried by.
    assert [json.loads(row[4]) for row in rows] == records
    if client.database is None:
        assert [row[4] for row in rows] == ndjson(records).decode().splitlines()
        assert db_rows(client.data_dir, "PRAGMA journal_mode") == [("wal",)]
    assert rows[0][1:4] == ("event", "reading", records[0]["ts"])


async def test_overlapping_batches_store_each_record_once(client: Client) -> None:
    first = [record(seq) for seq in range(1, 6)]
    second = [record(seq) for seq in range(3, 9)]
    assert (await client.put_batch("event-1-5", ndjson(first), encoding="identity"))[1][
        "stored"
    ] == 5
    status, body = await client.put_batch("event-3-8", ndjson(second), encoding=None)
    assert (status, body) == (
        200,
        {"batch_id": "event-3-8", "journal_id": "legacy", "stored": 3, "duplicates": 3},
    )
    summary = await client.summary()
    assert (summary["records"], summary["max_seq"], summary["duplicates_ignored"]) == (8, 8, 3)
    assert summary["batches"] == 2
    # Seqs are journal-wide, so a batch of one priority has gaps; other appliances are apart.
    other = [record(seq, priority="alert", appliance_id="ship-2") for seq in (4, 9)]
    status, body = await client.put_batch("alert-4-9", ndjson(other), appliance_id="ship-2")
    assert (status, body["stored"]) == (200, 2)
    assert (await client.summary())["records"] == 8
    assert (await client.summary("ship-2"))["max_seq"] == 9


async def test_summary_of_an_unknown_appliance_is_empty(client: Client) -> None:
    assert await client.summary("ship-2") == {
        "records": 0,
        "max_seq": None,
        "duplicates_ignored": 0,
        "payloads": 0,
        "payload_bytes": 0,
        "batches": 0,
        "journals": [],
        "concurrent_journals": [],
    }


async def test_multi_member_gzip_is_one_body(client: Client) -> None:
    body = gzip.compress(ndjson([record(1)])) + gzip.compress(ndjson([record(2)]))
    status, result = await client.put_batch(
        "event-1-2", body, encoding=None, headers={**bearer(), "Content-Encoding": "gzip"}
    )
    assert (status, result["stored"]) == (200, 2)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": "Basic token-one"}, 401),
        ({"Authorization": "Bearer token-two"}, 403),
    ],
)
async def test_tokens_are_checked_on_every_appliance_route(
    client: Client, headers: dict[str, str], expected: int
) -> None:
    digest = sha(b"x")
    status, body = await client.put_batch("event-1-1", ndjson([record(1)]), headers=headers)
    assert_error(status, body, expected)
    requests = [
        client.session.get(client.url("/v1/appliances/ship-1/summary"), headers=headers),
        client.session.patch(
            client.url(f"/v1/appliances/ship-1/payloads/{digest}"),
            data=b"x",
            headers={**headers, "Upload-Offset": "0", "Upload-Length": "1"},
        ),
    ]
    for request in requests:
        async with request as response:
            assert_error(response.status, await response.json(), expected)
    async with client.session.head(
        client.url(f"/v1/appliances/ship-1/payloads/{digest}"), headers=headers
    ) as response:
        assert response.status == expected
    assert (await client.summary())["records"] == 0


async def test_without_tokens_file_any_appliance_is_accepted(data_dir: Path) -> None:
    async with running(data_dir, tokens=None) as client:
        status, body = await client.put_batch("event-1-1", ndjson([record(1)]), headers={})
        assert (status, body["stored"]) == (200, 1)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"seq": 1, "appliance_id": "ship-1"\n', "bad json"),
        (b"\xff\xfe not utf-8\n", "bad json"),
        (ndjson([record(1)]).replace(b'"v":0.5', b'"v":NaN'), "bad json"),
    ],
)
async def test_malformed_json_is_400(client: Client, body: bytes, error: str) -> None:
    status, result = await client.put_batch("event-1-1", body)
    assert_error(status, result, 400)
    assert result["error"] == error


@pytest.mark.parametrize(
    "body",
    [b"this is not gzip", gzip.compress(ndjson([record(1)]))[:-12], b""],
    ids=["garbage", "truncated", "empty"],
)
async def test_bad_gzip_is_400(client: Client, body: bytes) -> None:
    status, result = await client.put_batch(
        "event-1-1", body, encoding=None, headers={**bearer(), "Content-Encoding": "gzip"}
    )
    assert_error(status, result, 400)
    assert result["error"] == "bad gzip"


async def test_past_max_inflight_the_next_batch_is_a_retryable_503(data_dir: Path) -> None:
    """One batch whose body is still arriving holds the only slot: the next is refused at once
    with `503 receiver busy` (nothing read, nothing stored), and taken once the slot is free."""
    app = build_receiver_app(data_dir, TOKENS, max_inflight=1)
    release = asyncio.Event()
    body = ndjson([record(1), record(2)])

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:10]
        await release.wait()
        yield body[10:]

    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        aiohttp.ClientSession() as session,
    ):
        base = f"http://127.0.0.1:{addresses[0][1]}/v1/appliances/ship-1/batches"
        headers = {**bearer(), "Content-Type": "application/x-ndjson"}
        held = asyncio.create_task(
            session.put(f"{base}/event-1-2", data=slow_body(), headers=headers)
        )
        receiver = app[RECEIVER_KEY]
        await wait_until(lambda: receiver._inflight == 1, "the first batch to be taken")
        async with session.put(
            f"{base}/event-3-3", data=ndjson([record(3)]), headers=headers
        ) as busy:
            assert busy.status == 503 and busy.headers["Retry-After"] == "2"
            assert (await busy.json())["error"] == "receiver busy"
        release.set()
        async with await held as answer:
            assert answer.status == 200 and (await answer.json())["stored"] == 2
        async with session.put(
            f"{base}/event-3-3", data=ndjson([record(3)]), headers=headers
        ) as again:
            assert again.status == 200 and (await again.json())["stored"] == 1
        assert receiver._inflight == 0


async def test_body_over_the_limits_is_413(client: Client) -> None:
    big = ndjson([record(seq, body={"pad": "x" * 100}) for seq in range(1, 400)])
    assert len(big) > MAX_BATCH
    status, result = await client.put_batch("event-1-399", big, encoding="identity")
    assert_error(status, result, 413)

    # Inflates past 4x the limit from a tiny body: refused before it is all inflated.
    bomb = gzip.compress(b"\n" * (MAX_BATCH * 64))
    assert len(bomb) < MAX_BATCH
    status, result = await client.put_batch(
        "event-1-1", bomb, encoding=None, headers={**bearer(), "Content-Encoding": "gzip"}
    )
    assert_error(status, result, 413)
    assert "decompressed" in result["detail"]

    # Chunked transfer: no Content-Length to refuse on, the stream is counted instead.
    async def stream() -> AsyncIterator[bytes]:
        for _ in range(MAX_BATCH // 1024 + 2):
            yield b" " * 1024

    async with client.session.put(
        client.url("/v1/appliances/ship-1/batches/event-1-1"),
        data=stream(),
        headers={**bearer(), "Content-Encoding": "identity"},
    ) as response:
        assert_error(response.status, await response.json(), 413)
    assert (await client.summary())["records"] == 0


@pytest.mark.parametrize("encoding", ["br", "deflate", "compress"])
async def test_other_content_encodings_are_415(client: Client, encoding: str) -> None:
    status, result = await client.put_batch("event-1-1", ndjson([record(1)]), encoding=encoding)
    assert_error(status, result, 415)


@pytest.mark.parametrize(
    ("records", "error"),
    [
        ([record(1), record(2, appliance_id="ship-2")], "wrong appliance_id"),
        ([record(1), record(2, priority="alert")], "wrong priority"),
        ([record(1), record(6)], "seq outside batch"),
        ([record(0)], "seq outside batch"),
        ([{**record(1), "seq": "1"}], "bad record"),
        ([record(1, kind=None)], "bad record"),
        ([[1, 2]], "bad record"),
        ([], "empty batch"),
    ],
)
async def test_records_that_do_not_belong_to_the_batch_are_422(
    client: Client, records: list[Any], error: str
) -> None:
    status, result = await client.put_batch("event-1-5", ndjson(records))
    assert_error(status, result, 422)
    assert result["error"] == error
    # All or nothing: the valid first record was not stored either.
    assert (await client.summary())["records"] == 0


GOOD_SHA = sha(b"payload")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/appliances/../summary",
        "/v1/appliances/%2e%2e/summary",
        "/v1/appliances/%2E%2E/batches/event-1-1",
        "/v1/appliances/a%2Fb/summary",
        "/v1/appliances/a/b/summary",
        "/v1/appliances/ship-1%0A/summary",
        "/v1/appliances/-ship/summary",
        "/v1/appliances/" + "a" * 65 + "/summary",
        "/v1/appliances/ship-1/batches/..",
        "/v1/appliances/ship-1/batches/%2e%2e",
        "/v1/appliances/ship-1/batches/event-5-1",
        "/v1/appliances/ship-1/batches/urgent-1-2",
        "/v1/appliances/ship-1/batches/event-01-2",
        "/v1/appliances/ship-1/batches/event-1",
        "/v1/appliances/ship-1/batches/event-1-99999999999999999999",
        "/v1/appliances/ship-1/batches/event-1-2%0A",
        "/v1/appliances/ship-1/batches/a%2F..%2Fb",
        f"/v1/appliances/ship-1/payloads/{GOOD_SHA.upper()}",
        f"/v1/appliances/ship-1/payloads/{GOOD_SHA[:63]}",
        f"/v1/appliances/ship-1/payloads/{GOOD_SHA}0",
        "/v1/appliances/ship-1/payloads/..",
        "/v1/appliances/ship-1/payloads/%2e%2e%2F%2e%2e%2Freceiver.db",
        f"/v1/appliances/ship-1/payloads/{'g' * 64}",
    ],
)
async def test_bad_identifiers_are_400_before_storage(client: Client, path: str) -> None:
    method = "PUT" if "/batches/" in path else "PATCH" if "/payloads/" in path else "GET"
    # Open mode, so nothing but the identifier check stands between the path and storage.
    async with running(client.data_dir / "open", tokens=None) as open_client:
        for target in (client, open_client):
            async with target.session.request(
                method,
                target.url(path),
                data=gzip.compress(ndjson([record(1)])),
                headers={
                    **bearer(),
                    "Content-Encoding": "gzip" if method == "PUT" else "identity",
                    "Upload-Offset": "0",
                    "Upload-Length": "1",
                },
            ) as response:
                assert_error(response.status, await response.json(), 400)
        stored = {p.relative_to(open_client.data_dir) for p in open_client.data_dir.rglob("*")}
    assert {
        p for p in stored if p.is_relative_to(PAYLOADS_DIR) or p.is_relative_to(PARTIAL_DIR)
    } == {
        Path(PAYLOADS_DIR),
        Path(PARTIAL_DIR),
    }
    assert db_rows(client.data_dir / "open", "SELECT COUNT(*) FROM appliances") == [(0,)]


# ------------------------------------------------------------------------------ payloads


async def test_resumable_upload_in_three_chunks(client: Client) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: three chunks of at most MAX_CHUNK
    digest = sha(data)
    chunks = [data[:MAX_CHUNK], data[MAX_CHUNK : 2 * MAX_CHUNK], data[2 * MAX_CHUNK :]]

    head = await client.head(digest)
    assert head.status == 404
    assert head.headers["Upload-Offset"] == "0"

    status, headers, _ = await client.patch(digest, chunks[0], 0, len(data))
    assert (status, headers["Upload-Offset"]) == (204, str(MAX_CHUNK))
    assert "Upload-Complete" not in headers
    head = await client.head(digest)
    assert (head.status, head.headers["Upload-Offset"]) == (200, str(MAX_CHUNK))
    assert "Upload-Complete" not in head.headers

    # A resend of the first chunk (its answer was lost): 409 with the offset to resume from.
    status, headers, body = await client.patch(digest, chunks[0], 0, len(data))
    assert_error(status, body, 409)
    assert headers["Upload-Offset"] == str(MAX_CHUNK)

    status, headers, _ = await client.patch(digest, chunks[1], MAX_CHUNK, len(data))
    assert (status, headers["Upload-Offset"]) == (204, str(2 * MAX_CHUNK))
    assert (await client.head(digest)).headers["Upload-Offset"] == str(2 * MAX_CHUNK)

    status, headers, _ = await client.patch(digest, chunks[2], 2 * MAX_CHUNK, len(data))
    assert (status, headers["Upload-Offset"], headers["Upload-Complete"]) == (
        204,
        str(len(data)),
        "1",
    )
    head = await client.head(digest)
    assert (head.status, head.headers["Upload-Offset"], head.headers["Upload-Complete"]) == (
        200,
        str(len(data)),
        "1",
    )
    stored = client.data_dir / PAYLOADS_DIR / "ship-1" / digest
    assert stored.read_bytes() == data
    assert not (client.data_dir / PARTIAL_DIR / "ship-1" / f"{digest}.part").exists()

    # Complete already: any further PATCH is acknowledged without touching the file.
    status, headers, _ = await client.patch(digest, chunks[0], 0, len(data))
    assert (status, headers["Upload-Complete"]) == (204, "1")
    summary = await client.summary()
    assert (summary["payloads"], summary["payload_bytes"]) == (1, len(data))
    # Payloads are kept per appliance: ship-2 holds nothing of it.
    assert (await client.head(digest, appliance_id="ship-2")).status == 404


async def test_head_answers_keep_the_connection_open(data_dir: Path) -> None:
    # A HEAD per payload must not cost a new connection (a TLS handshake on a slow link).
    opened = 0

    async def count(*_: object) -> None:
        nonlocal opened
        opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(count)
    app = build_receiver_app(data_dir, TOKENS)
    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        aiohttp.ClientSession(trace_configs=[trace]) as session,
    ):
        client = Client(f"http://127.0.0.1:{addresses[0][1]}", session, data_dir)
        data = b"partly there" * 100
        assert (await client.patch(sha(data), data[:MAX_CHUNK], 0, len(data)))[0] == 204
        for digest in (sha(data), sha(b"nothing"), sha(data)):
            response = await client.head(digest)
            assert response.headers["Content-Length"] == "0"
    assert opened == 1


async def test_empty_payload_completes(client: Client) -> None:
    digest = sha(b"")
    status, headers, _ = await client.patch(digest, b"", 0, 0)
    assert (status, headers["Upload-Complete"]) == (204, "1")
    head = await client.head(digest)
    assert (head.status, head.headers["Upload-Offset"], head.headers["Upload-Complete"]) == (
        200,
        "0",
        "1",
    )


async def test_sha256_mismatch_discards_the_partial_upload(client: Client) -> None:
    data = b"a" * 3000
    digest = sha(b"something else")
    assert (await client.patch(digest, data[:2000], 0, len(data)))[0] == 204
    status, _, body = await client.patch(digest, data[2000:], 2000, len(data))
    assert_error(status, body, 422)
    assert (await client.head(digest)).status == 404
    assert not (client.data_dir / PARTIAL_DIR / "ship-1" / f"{digest}.part").exists()
    assert not (client.data_dir / PAYLOADS_DIR / "ship-1" / digest).exists()
    assert (await client.summary())["payloads"] == 0


async def test_patch_refusals(client: Client) -> None:
    digest = sha(b"x" * (MAX_CHUNK + 1))
    status, _, body = await client.patch(digest, b"x" * (MAX_CHUNK + 1), 0, MAX_CHUNK + 1)
    assert_error(status, body, 413)
    status, _, body = await client.patch(digest, b"x" * 10, 0, 5)
    assert_error(status, body, 400)
    async with client.session.patch(
        client.url(f"/v1/appliances/ship-1/payloads/{digest}"),
        data=b"x",
        headers={**bearer(), "Upload-Offset": "-1", "Upload-Length": "1"},
    ) as response:
        assert_error(response.status, await response.json(), 400)
    async with client.session.patch(
        client.url(f"/v1/appliances/ship-1/payloads/{digest}"),
        data=gzip.compress(b"x"),
        headers={
            **bearer(),
            "Upload-Offset": "0",
            "Upload-Length": "1",
            "Content-Encoding": "gzip",
        },
    ) as response:
        assert_error(response.status, await response.json(), 415)
    assert (await client.head(digest)).status == 404


async def test_concurrent_patches_at_one_offset_append_once(client: Client) -> None:
    data = b"0123456789" * 300
    digest = sha(data)
    results = await asyncio.gather(
        *(client.patch(digest, data[:1000], 0, len(data)) for _ in range(4))
    )
    assert sorted(status for status, _, _ in results) == [204, 409, 409, 409]
    assert (await client.head(digest)).headers["Upload-Offset"] == "1000"


# ------------------------------------------------------------------------------- restarts


async def test_restarted_receiver_keeps_records_counters_and_partial_uploads(
    data_dir: Path,
) -> None:
    records = [record(seq, priority="alert") for seq in range(10, 20)]
    data = b"resumable " * 1000
    digest = sha(data)
    async with running(data_dir) as client:
        assert (await client.put_batch("alert-10-19", ndjson(records)))[0] == 200
        assert (await client.put_batch("alert-10-19", ndjson(records[:3])))[1]["duplicates"] == 3
        assert (await client.patch(digest, data[:MAX_CHUNK], 0, len(data)))[0] == 204
        before = await client.summary()

    async with running(data_dir) as client:
        assert await client.summary() == before
        head = await client.head(digest)
        assert (head.status, head.headers["Upload-Offset"]) == (200, str(MAX_CHUNK))
        offset = MAX_CHUNK
        while offset < len(data):
            status, headers, _ = await client.patch(
                digest, data[offset : offset + MAX_CHUNK], offset, len(data)
            )
            assert status == 204
            offset = int(headers["Upload-Offset"])
        assert headers["Upload-Complete"] == "1"
        status, body = await client.put_batch("alert-10-19", ndjson(records))
        assert (status, body["stored"], body["duplicates"]) == (200, 0, 10)
        after = await client.summary()
        (journal_before,), (journal_after,) = before.pop("journals"), after.pop("journals")
        assert after == {
            **before,
            "duplicates_ignored": 13,
            "payloads": 1,
            "payload_bytes": len(data),
        }
        assert journal_after["records"] == journal_before["records"] == 10
        assert journal_after["first_seen"] == journal_before["first_seen"]
        assert journal_after["last_seen"] > journal_before["last_seen"]
    assert (data_dir / PAYLOADS_DIR / "ship-1" / digest).read_bytes() == data


async def test_payload_renamed_before_a_crash_is_counted_at_start(data_dir: Path) -> None:
    # A crash between the rename into payloads/ and its row: the file is verified (only verified
    # files are renamed there), so the next start counts it.
    async with running(data_dir):
        pass
    data = b"verified before the crash"
    (data_dir / PAYLOADS_DIR / "ship-1").mkdir()
    (data_dir / PAYLOADS_DIR / "ship-1" / sha(data)).write_bytes(data)
    async with running(data_dir) as client:
        summary = await client.summary()
        assert (summary["payloads"], summary["payload_bytes"]) == (1, len(data))
        assert (await client.head(sha(data))).headers["Upload-Complete"] == "1"


async def test_abandoned_partial_uploads_expire_and_resumed_ones_stay(data_dir: Path) -> None:
    old, fresh = b"abandoned " * 500, b"still coming " * 500
    async with running(data_dir) as client:
        for data in (old, fresh):
            assert (await client.patch(sha(data), data[:MAX_CHUNK], 0, len(data)))[0] == 204
    partial = data_dir / PARTIAL_DIR / "ship-1"
    forty_days_ago = time.time() - 40 * 86400
    os.utime(partial / f"{sha(old)}.part", (forty_days_ago, forty_days_ago))
    (partial / "not-a-sha256.part").write_bytes(b"left alone")  # not ours to judge

    app = build_receiver_app(data_dir, TOKENS, partial_ttl=30 * 86400)
    async with serve_receiver(app, "127.0.0.1", 0), aiohttp.ClientSession():
        # Checked at start: the 40-day-old partial is gone, the recent one is kept.
        for _ in range(200):
            if not (partial / f"{sha(old)}.part").exists():
                break
            await asyncio.sleep(0.05)
        assert not (partial / f"{sha(old)}.part").exists()
        assert (partial / f"{sha(fresh)}.part").stat().st_size == MAX_CHUNK
        assert (partial / "not-a-sha256.part").exists()
        # A resume after expiry starts over from offset 0, as the protocol allows.
        receiver = app[RECEIVER_KEY]
        assert await receiver.expire_partials(ahead_s=29 * 86400) == 0
        assert await receiver.expire_partials(ahead_s=31 * 86400) == 1
        assert not (partial / f"{sha(fresh)}.part").exists()


# ------------------------------------------------------------------- tokens, listen, CLI


def test_tokens_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# appliance token\n\nship-1 token-one\n   \n  # indented comment\nship-2\ttoken-two  \n"
    )
    assert parse_tokens_file(path) == TOKENS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ship-1 token-one\n# ok\nship-2\n", ":3: expected 'APPLIANCE_ID TOKEN'"),
        ("ship-1 token-one extra\n", ":1: expected"),
        ("../etc token\n", ":1: '../etc' is not a valid appliance id"),
        ("ship-1 a\nship-1 b\n", ":2: appliance 'ship-1' is listed twice"),
        ("ship-1 same\nship-2 same\n", ":2: appliance 'ship-2' reuses the token"),
    ],
)
def test_malformed_tokens_file_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        parse_tokens_file(path)
    assert str(path) in str(info.value)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    for bad in ("8443", ":8443", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="--listen"):
            parse_listen(bad)


@pytest.fixture
def receiver_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="receiver")
    yield caplog


async def test_run_receiver_logs_its_port_and_stops(
    tmp_path: Path, receiver_logs: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ship-1 token-one\n")
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_receiver("127.0.0.1:0", tmp_path / "data", tokens, stop=stop), name="receiver"
    )
    port = 0
    for _ in range(200):
        listening = [r for r in receiver_logs.records if r.getMessage() == "receiver listening"]
        if listening:
            port = getattr(listening[0], "fields")["port"]  # noqa: B009
            break
        await asyncio.sleep(0.01)
    assert port > 0
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v1/health") as response,
    ):
        assert response.status == 200
    stop.set()
    await asyncio.wait_for(task, 10)
    assert (tmp_path / "data" / RECEIVER_DB).exists()


def test_cli_receiver_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["receiver", "--listen", "nowhere", "--data", str(tmp_path)]) == 2
    assert "--listen" in capsys.readouterr().err
    tokens = tmp_path / "tokens"
    tokens.write_text("ship-1\n")
    args = ["receiver", "--listen", "127.0.0.1:0", "--data", str(tmp_path), "--tokens", str(tokens)]
    assert cli_main(args) == 2
    assert f"{tokens}:1" in capsys.readouterr().err
    assert cli_main([*args[:-1], str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    for ttl in ("soon", "10m"):
        assert (
            cli_main(["receiver", "--listen", "127.0.0.1:0", "--data", "x", "--partial-ttl", ttl])
            == 2
        )
        assert "--partial-ttl" in capsys.readouterr().err


def test_cli_receiver_serves_until_sigterm(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ship-1 token-one\n")
    args = ["--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"), "--tokens", str(tokens)]
    with (
        receiver_process(args, tmp_path) as (url, log),
        urllib.request.urlopen(f"{url}/v1/health", timeout=5) as response,
    ):
        assert json.loads(response.read()) == {"status": "ok"}
    messages = [event["msg"] for event in log_events(log)]
    assert "receiver listening" in messages and messages[-1] == "receiver stopped"


# ------------------------------------------------------------------------------ journals

JOURNAL_A = "a" * 32
JOURNAL_B = "b" * 32


def journal_headers(journal_id: str, appliance_id: str = "ship-1", **extra: str) -> dict[str, str]:
    return {**bearer(appliance_id), "Journal-Id": journal_id, **extra}


def journal_record(seq: int, journal_id: str, **extra: Any) -> dict[str, Any]:
    return record(seq, journal_id=journal_id, **extra)


async def test_a_conflicting_batch_is_refused_whole_with_409(client: Client) -> None:
    first = [journal_record(seq, JOURNAL_A) for seq in (1, 2, 3)]
    status, _ = await client.put_batch(
        "event-1-3", ndjson(first), headers=journal_headers(JOURNAL_A)
    )
    assert status == 200
    # Seq 2 again with other content, seq 4 new: nothing of it may be stored.
    second = [journal_record(2, JOURNAL_A, body={"other": True}), journal_record(4, JOURNAL_A)]
    status, body = await client.put_batch(
        "event-2-4", ndjson(second), headers=journal_headers(JOURNAL_A)
    )
    assert status == 409, body
    assert body["error"] == "conflicting records"
    assert (body["conflicting_seqs"], body["conflicts"]) == ([2], 1)
    assert "seqs 2 of journal " + JOURNAL_A in body["detail"]
    summary = await client.summary()
    assert (summary["records"], summary["max_seq"]) == (3, 3)
    assert summary["journals"][0]["conflicts_refused"] == 1
    assert [row[0] for row in await stored_records(client)] == [1, 2, 3]
    # The same seqs in another journal of the same appliance are simply another epoch.
    other = [journal_record(seq, JOURNAL_B) for seq in (2, 4)]
    status, body = await client.put_batch(
        "event-2-4", ndjson(other), headers=journal_headers(JOURNAL_B)
    )
    assert (status, body["stored"], body["journal_id"]) == (200, 2, JOURNAL_B)


async def test_journal_headers_and_lines_must_agree(client: Client) -> None:
    line = ndjson([journal_record(1, JOURNAL_A)])
    status, body = await client.put_batch(
        "event-1-1", line, headers=journal_headers("NOT-A-JOURNAL")
    )
    assert_error(status, body, 400)
    status, body = await client.put_batch("event-1-1", line, headers=journal_headers(JOURNAL_B))
    assert_error(status, body, 422)
    assert body["error"] == "wrong journal_id"
    status, body = await client.put_batch("event-1-1", line)  # no header: a legacy batch
    assert_error(status, body, 422)
    status, body = await client.put_batch(
        "event-1-1", line, headers=journal_headers(JOURNAL_A, **{"Journal-Follows": JOURNAL_A})
    )
    assert_error(status, body, 400)
    assert await stored_records(client) == []


async def test_concurrent_journals_flag_and_clear(data_dir: Path, database: str | None) -> None:
    now = [1_000_000.0]
    async with running(
        data_dir, database=database, clock=lambda: now[0], concurrent_quiet=3600.0
    ) as client:

        async def ship(journal_id: str, seq: int, **headers: str) -> dict[str, Any]:
            now[0] += 60
            status, body = await client.put_batch(
                f"event-{seq}-{seq}",
                ndjson([journal_record(seq, journal_id)]),
                headers=journal_headers(journal_id, **headers),
            )
            assert status == 200, body
            result: dict[str, Any] = body
            return result

        # A replaced disk: A stops, then B starts. Epochs, never a collision.
        assert "warnings" not in await ship(JOURNAL_A, 1)
        assert "warnings" not in await ship(JOURNAL_A, 2)
        assert "warnings" not in await ship(JOURNAL_B, 1)
        assert "warnings" not in await ship(JOURNAL_B, 2)
        assert (await client.summary())["concurrent_journals"] == []
        # A ships again after B appeared: two boxes under one id, told to both.
        answer = await ship(JOURNAL_A, 3)
        [warning] = answer["warnings"]
        assert warning["code"] == "concurrent_journals"
        assert warning["journals"] == [JOURNAL_A, JOURNAL_B]
        assert (await ship(JOURNAL_B, 3))["warnings"] == [warning]
        assert (await client.summary())["concurrent_journals"] == [JOURNAL_A, JOURNAL_B]
        # A is switched off; once it has been quiet for an hour, B ships without the warning.
        now[0] += 3600
        assert "warnings" not in await ship(JOURNAL_B, 4)
        assert (await client.summary())["concurrent_journals"] == []
        # A journal that follows another (a fork after a restore) is one box's history.
        journal_c = "c" * 32
        await ship(JOURNAL_B, 5)
        await ship(journal_c, 6, **{"Journal-Follows": JOURNAL_B})
        assert "warnings" not in await ship(JOURNAL_B, 5)
        assert "warnings" not in await ship(journal_c, 7, **{"Journal-Follows": JOURNAL_B})
        journals = {j["journal_id"]: j for j in (await client.summary())["journals"]}
        assert journals[journal_c]["follows"] == JOURNAL_B


# ------------------------------------------------------------------------------ tokens


async def test_tokens_kept_in_the_store_are_added_used_and_revoked(
    data_dir: Path, database: str | None, tmp_path: Path
) -> None:
    where = ["receiver", "--data", str(data_dir)]
    if database is not None:
        (tmp_path / "database").write_text(database + "\n")
        where += ["--database-file", str(tmp_path / "database")]

    def cli(*args: str) -> tuple[int, str, str]:
        done = subprocess.run(
            [sys.executable, "-m", "appliance", *where, "tokens", *args],
            capture_output=True,
            text=True,
            env=cli_env(),
            cwd=ROOT,
            timeout=60,
        )
        return done.returncode, done.stdout, done.stderr

    code, token, err = await asyncio.to_thread(cli, "add", "ship-1", "--label", "bridge PC")
    assert code == 0, err
    token = token.strip()
    assert len(token) >= 40 and token not in err and "only time it is shown" in err
    code, admin, _ = await asyncio.to_thread(cli, "add", "--admin")
    assert code == 0
    assert (await asyncio.to_thread(cli, "add"))[0] == 2  # neither an appliance nor --admin
    # No tokens file, but tokens in the store: the receiver is not open to everyone.
    async with running(data_dir, None, database=database) as client:
        body = ndjson([record(1)])
        status, _ = await client.put_batch("event-1-1", body, headers={})
        assert status == 401
        mine = {"Authorization": f"Bearer {token}"}
        assert (await client.put_batch("event-1-1", body, headers=mine))[0] == 200
        other = ndjson([record(1, appliance_id="ship-2")])
        status, _ = await client.put_batch("event-1-1", other, appliance_id="ship-2", headers=mine)
        assert status == 403
        async with client.session.get(
            client.url("/v1/models"), headers={"Authorization": f"Bearer {admin.strip()}"}
        ) as response:
            assert response.status == 200
        # Revoked through the command (any replica's store): refused within seconds.
        code, out, err = await asyncio.to_thread(cli, "revoke", "ship-1")
        assert (code, out.strip()) == (
            0,
            "1 token(s) revoked; running receivers refuse them within 5 s",
        ), err
        assert (await asyncio.to_thread(cli, "revoke", "ship-1"))[0] == 1  # nothing left to revoke
        deadline = time.monotonic() + 30
        while (await client.put_batch("event-2-2", ndjson([record(2)]), headers=mine))[0] != 401:
            assert time.monotonic() < deadline, "the revoked token is still accepted"
            await asyncio.sleep(0.2)
    code, listing, _ = await asyncio.to_thread(cli, "list")
    lines = listing.splitlines()
    assert code == 0 and len(lines) == 2
    assert "ship-1" in lines[0] and "revoked" in lines[0] and "bridge PC" in lines[0]
    assert "admin" in lines[1] and "active" in lines[1]
    assert token not in listing
