"""Payload bytes in a shared bucket (receiver/objects.py, S3Objects) on real servers: SeaweedFS
for the bucket, PostgreSQL for the index, several receiver replicas. An upload started through
one replica resumes through another with no chunk sent twice, a payload appears only verified,
abandoned uploads expire, and a bucket that stops answering is a retryable 503."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.cli import main as cli_main
from receiver import build_receiver_app, serve_receiver
from receiver.objects import PART_BYTES, BucketSettings, BucketUnavailable, S3Objects
from receiver.protocol import Refusal
from tests.faultproxy import FaultProxy
from tests.helpers import ROOT, log_events, receiver_process, wrong_clock_env
from tests.seaweed import BUCKET, S3Server
from tests.test_receiver import TOKENS, Client, ndjson, record


def bucket_settings(
    server: S3Server, prefix: str, endpoint_url: str | None = None
) -> BucketSettings:
    return BucketSettings(
        endpoint_url=endpoint_url or server.endpoint_url,
        bucket=BUCKET,
        access_key_file=server.access_key_file,
        secret_key_file=server.secret_key_file,
        prefix=prefix,
        timeout_s=5.0,
    )


@pytest.fixture
def prefix() -> str:
    return f"receiver-{uuid.uuid4().hex[:8]}/"


@contextlib.asynccontextmanager
async def replica(
    data_dir: Path,
    dsn: str,
    bucket: BucketSettings,
    *,
    max_chunk_bytes: int = 4096,
) -> AsyncIterator[Client]:
    app = build_receiver_app(
        data_dir, TOKENS, database=dsn, bucket=bucket, max_chunk_bytes=max_chunk_bytes
    )
    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        aiohttp.ClientSession() as session,
    ):
        host, port = addresses[0]
        yield Client(f"http://{host}:{port}", session, data_dir, dsn)


def files_named(folder: Path, part: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and part in p.name]


async def bucket_keys(objects: S3Objects, prefix: str) -> list[str]:
    keys: list[str] = []
    paginator = objects.client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)


async def read_back(bucket: BucketSettings, digest: str) -> bytes:
    """The payload `digest` of ship-1 as the bucket holds it."""
    objects = await S3Objects.open(bucket)
    try:
        return await object_bytes(objects, f"{bucket.prefix}payloads/ship-1/{digest}")
    finally:
        await objects.close()


async def object_bytes(objects: S3Objects, key: str) -> bytes:
    answer = await objects.client.get_object(Bucket=BUCKET, Key=key)
    async with answer["Body"] as body:
        data: bytes = await body.read()
    return data


async def test_an_upload_moves_between_replicas_chunk_by_chunk(
    tmp_path: Path, s3_server: S3Server, postgres_dsn: str, prefix: str
) -> None:
    data = os.urandom(10_000)
    digest = hashlib.sha256(data).hexdigest()
    bucket = bucket_settings(s3_server, prefix)
    async with (
        replica(tmp_path / "a", postgres_dsn, bucket) as a,
        replica(tmp_path / "b", postgres_dsn, bucket) as b,
        replica(tmp_path / "c", postgres_dsn, bucket) as c,
    ):
        assert (await a.head(digest)).status == 404
        status, headers, _ = await a.patch(digest, data[:4000], 0, len(data))
        assert (status, headers["Upload-Offset"]) == (204, "4000")
        # The link drops; the appliance's next connection lands on another replica, which
        # knows the offset from the bucket.
        head = await b.head(digest)
        assert (head.status, head.headers["Upload-Offset"]) == (200, "4000")
        status, headers, _ = await b.patch(digest, data[4000:8000], 4000, len(data))
        assert (status, headers["Upload-Offset"]) == (204, "8000")
        # A chunk sent again to a replica that is behind the bucket is answered with the
        # offset the bucket holds (409), not stored twice.
        status, _, body = await c.patch(digest, data[:4000], 0, len(data))
        assert status == 409 and body["error"] == "offset mismatch"
        status, headers, _ = await c.patch(digest, data[8000:], 8000, len(data))
        assert (status, headers["Upload-Complete"]) == (204, "1")
        head = await a.head(digest)
        assert (head.status, head.headers["Upload-Complete"]) == (200, "1")
        summary = await b.summary()
    assert (summary["payloads"], summary["payload_bytes"]) == (1, len(data))
    objects = await S3Objects.open(bucket)
    try:
        # The payload, verified, and nothing of the upload left; nothing on the replicas' disks.
        assert await bucket_keys(objects, prefix) == [f"{prefix}payloads/ship-1/{digest}"]
        assert await object_bytes(objects, f"{prefix}payloads/ship-1/{digest}") == data
    finally:
        await objects.close()
    assert not await asyncio.to_thread(files_named, tmp_path, digest)


async def test_a_large_payload_is_assembled_in_parts_and_a_wrong_hash_leaves_nothing(
    tmp_path: Path, s3_server: S3Server, postgres_dsn: str, prefix: str
) -> None:
    data = os.urandom(PART_BYTES * 2 + 12345)
    digest = hashlib.sha256(data).hexdigest()
    chunk = 1024 * 1024  # aiohttp's client warns about larger bodies sent from bytes
    bucket = bucket_settings(s3_server, prefix)
    async with replica(tmp_path / "a", postgres_dsn, bucket, max_chunk_bytes=chunk) as a:
        for offset in range(0, len(data), chunk):
            status, headers, body = await a.patch(
                digest, data[offset : offset + chunk], offset, len(data)
            )
            assert status == 204, body
        assert headers["Upload-Complete"] == "1"
        wrong = hashlib.sha256(b"not these bytes").hexdigest()
        status, _, body = await a.patch(wrong, data[:100], 0, 100)
        assert status == 422 and body["error"] == "sha256 mismatch"
        assert (await a.head(wrong)).status == 404
    objects = await S3Objects.open(bucket)
    try:
        assert await bucket_keys(objects, prefix) == [f"{prefix}payloads/ship-1/{digest}"]
        assert await object_bytes(objects, f"{prefix}payloads/ship-1/{digest}") == data
    finally:
        await objects.close()


async def test_a_payload_sent_whole_goes_to_the_bucket_once(
    tmp_path: Path, s3_server: S3Server, postgres_dsn: str, prefix: str
) -> None:
    """A snapshot that fits one chunk is hashed on the receiver and written once to its final
    key: its bytes cross to the bucket once, not as a chunk, then read back, then a part."""
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    async with FaultProxy("127.0.0.1", port) as proxy:
        bucket = bucket_settings(s3_server, prefix, endpoint_url=f"http://127.0.0.1:{proxy.port}")
        async with replica(tmp_path / "a", postgres_dsn, bucket, max_chunk_bytes=512 * 1024) as a:
            before = proxy.stats
            status, headers, body = await a.patch(digest, data, 0, len(data))
            assert (status, headers["Upload-Complete"]) == (204, "1"), body
            after = proxy.stats
            assert after.bytes_upstream - before.bytes_upstream < 1.2 * len(data)
            assert after.bytes_downstream - before.bytes_downstream < 0.2 * len(data)
            assert (await a.summary())["payloads"] == 1
    objects = await S3Objects.open(bucket_settings(s3_server, prefix))
    try:
        assert await bucket_keys(objects, prefix) == [f"{prefix}payloads/ship-1/{digest}"]
        assert await object_bytes(objects, f"{prefix}payloads/ship-1/{digest}") == data
    finally:
        await objects.close()


async def test_abandoned_uploads_in_the_bucket_expire(s3_server: S3Server, prefix: str) -> None:
    objects = await S3Objects.open(bucket_settings(s3_server, prefix))
    try:
        digest = hashlib.sha256(b"whatever").hexdigest()
        assert await objects.append("ship-1", digest, 0, b"half of it") == 10
        assert await objects.held("ship-1", digest) == (10, False)
        assert await objects.expire(3600.0, ahead_s=60) == []
        assert await objects.expire(3600.0, ahead_s=7200) == [("ship-1", digest, 10)]
        assert await objects.held("ship-1", digest) == (0, False)
    finally:
        await objects.close()


_WRONG_CLOCK_EXPIRY = """
import asyncio, json, sys
from pathlib import Path
from typing import Any
from receiver.objects import BucketSettings, BucketUnavailable, S3Objects

async def main() -> None:
    endpoint, bucket, access, secret, prefix = sys.argv[1:6]
    settings = BucketSettings(
        endpoint_url=endpoint, bucket=bucket, access_key_file=Path(access),
        secret_key_file=Path(secret), prefix=prefix,
    )
    try:
        objects = await S3Objects.open(settings)
    except BucketUnavailable as exc:
        print(json.dumps({"refused": str(exc)}))
        return
    try:
        print(json.dumps({"expired": await objects.expire(300.0)}))
    finally:
        await objects.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("offset", ["+10m", "+2d"])
async def test_a_replica_whose_clock_is_wrong_expires_nothing_early(
    s3_server: S3Server, prefix: str, offset: str
) -> None:
    """An upload taken a moment ago by one replica is judged by the bucket's clock on another
    whose clock runs ahead: not abandoned. A clock too far off for S3's signatures cannot use
    the bucket at all, and the receiver says that is why."""
    objects = await S3Objects.open(bucket_settings(s3_server, prefix))
    try:
        digest = hashlib.sha256(b"in progress").hexdigest()
        assert await objects.append("ship-1", digest, 0, b"in prog") == 7
        args = [
            s3_server.endpoint_url,
            BUCKET,
            str(s3_server.access_key_file),
            str(s3_server.secret_key_file),
            prefix,
        ]
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _WRONG_CLOCK_EXPIRY, *args],
            env=wrong_clock_env(offset),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        if offset == "+10m":
            # Its own clock says the chunk is 10 minutes old, past the 5 minute expiry.
            assert answer == {"expired": []}
        else:
            assert "clock is 48.0 hours ahead of the bucket's" in answer["refused"]
            assert "NTP" in answer["refused"]
        assert await objects.held("ship-1", digest) == (7, False)
    finally:
        await objects.close()


async def test_a_chunk_cut_on_its_way_to_the_bucket_is_not_counted(
    s3_server: S3Server, prefix: str
) -> None:
    """A chunk write the bucket lost midway is a retryable 503, and whatever the store kept of
    it is not counted as held: the appliance sends it again and the payload completes."""
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    async with FaultProxy("127.0.0.1", port) as proxy:
        settings = bucket_settings(s3_server, prefix, endpoint_url=f"http://127.0.0.1:{proxy.port}")
        objects = await S3Objects.open(settings)
        try:
            assert await objects.append("ship-1", digest, 0, data[:100_000]) == 100_000
            proxy.cut_after(150_000, "upstream", once=False)  # every try cut midway
            with pytest.raises(Refusal) as refused:
                await objects.append("ship-1", digest, 100_000, data[100_000:])
            assert refused.value.status == 503
            proxy.clear()
            assert await objects.held("ship-1", digest) == (100_000, False)
            assert await objects.append("ship-1", digest, 100_000, data[100_000:]) == 300_000
            assert await objects.finish("ship-1", digest) is True
            assert await objects.held("ship-1", digest) == (300_000, True)
            assert await bucket_keys(objects, f"{prefix}partial/") == []
        finally:
            await objects.close()


async def test_replicas_finishing_one_upload_at_once_all_see_it_complete(
    s3_server: S3Server, prefix: str
) -> None:
    """The appliance's last chunk retried through another replica while the first is still
    finishing: neither may call the payload damaged because the other deleted chunks under it."""
    settings = bucket_settings(s3_server, prefix)
    replicas = [await S3Objects.open(settings) for _ in range(3)]
    try:
        for n in range(3):
            data = os.urandom(40_000 + n * 1000)
            digest = hashlib.sha256(data).hexdigest()
            for offset in range(0, len(data), 8192):
                await replicas[0].append("ship-1", digest, offset, data[offset : offset + 8192])
            verdicts = await asyncio.gather(
                *(one.finish("ship-1", digest) for one in replicas), return_exceptions=True
            )
            # Complete, or "send again later" (503): never "damaged, start from 0".
            for verdict in verdicts:
                assert verdict is True or (
                    isinstance(verdict, Refusal) and verdict.status == 503
                ), verdict
            assert await replicas[0].held("ship-1", digest) == (len(data), True)
            assert await object_bytes(replicas[0], f"{prefix}payloads/ship-1/{digest}") == data
    finally:
        for one in replicas:
            await one.close()


async def test_a_finish_that_loses_the_race_to_another_replica_is_not_a_mismatch(
    s3_server: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst moment: replica B has checked the payload is not complete yet, then replica A
    completes it and deletes its chunks before B lists them. B reads no bytes that hash to the
    payload, and must say complete (A's object), not "damaged, upload again from 0"."""
    settings = bucket_settings(s3_server, prefix)
    a, b = await S3Objects.open(settings), await S3Objects.open(settings)
    try:
        data = os.urandom(30_000)
        digest = hashlib.sha256(data).hexdigest()
        for offset in range(0, len(data), 8192):
            await a.append("ship-1", digest, offset, data[offset : offset + 8192])
        listed_by_b = b._chunks

        async def a_finishes_first(appliance_id: str, sha256: str) -> Any:
            assert await a.finish(appliance_id, sha256) is True
            return await listed_by_b(appliance_id, sha256)

        monkeypatch.setattr(b, "_chunks", a_finishes_first)
        assert await b.finish("ship-1", digest) is True
        assert await object_bytes(a, f"{prefix}payloads/ship-1/{digest}") == data
    finally:
        await a.close()
        await b.close()


async def test_a_bucket_that_stops_answering_is_a_retryable_503(
    tmp_path: Path, s3_server: S3Server, postgres_dsn: str, prefix: str
) -> None:
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    data = b"clip bytes " * 300
    digest = hashlib.sha256(data).hexdigest()
    async with FaultProxy("127.0.0.1", port) as proxy:
        bucket = bucket_settings(s3_server, prefix, endpoint_url=f"http://127.0.0.1:{proxy.port}")
        async with replica(tmp_path / "a", postgres_dsn, bucket) as a:
            status, _, _ = await a.patch(digest, data[:1500], 0, len(data))
            assert status == 204
            proxy.refuse(True)
            proxy.cut_all()
            status, headers, body = await a.patch(digest, data[1500:], 1500, len(data))
            assert status == 503, body
            assert (body["error"], headers["Retry-After"]) == ("object store unavailable", "5")
            async with a.session.get(a.url("/healthz")) as response:
                health = await response.json()
                assert response.status == 503
                assert [r.split(":")[0] for r in health["reasons"]] == ["objects"]
            # Records do not need the bucket.
            status, answer = await a.put_batch("event-1-1", ndjson([record(1)]))
            assert (status, answer["stored"]) == (200, 1)
            proxy.clear()
            status, headers, _ = await a.patch(digest, data[1500:], 1500, len(data))
            assert (status, headers["Upload-Complete"]) == (204, "1")


async def test_a_bucket_the_keys_cannot_use_stops_the_start(
    tmp_path: Path, s3_server: S3Server, prefix: str
) -> None:
    wrong = tmp_path / "secret"
    wrong.write_text("not-the-secret\n")
    settings = BucketSettings(
        endpoint_url=s3_server.endpoint_url,
        bucket=BUCKET,
        access_key_file=s3_server.access_key_file,
        secret_key_file=wrong,
        prefix=prefix,
    )
    with pytest.raises(BucketUnavailable, match=f"bucket '{BUCKET}'"):
        await S3Objects.open(settings)
    missing = BucketSettings(
        endpoint_url=s3_server.endpoint_url,
        bucket="no-such-bucket",
        access_key_file=s3_server.access_key_file,
        secret_key_file=s3_server.secret_key_file,
    )
    with pytest.raises(BucketUnavailable, match="no-such-bucket"):
        await S3Objects.open(missing)


def test_the_receiver_serves_from_its_config_file_on_postgres_and_a_bucket(
    tmp_path: Path,
    s3_server: S3Server,
    postgres_dsn: str,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database = tmp_path / "database"
    database.write_text(postgres_dsn + "\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("ship-1 token-one\n")
    config = tmp_path / "receiver.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
data: {tmp_path / "data"}
tokens_file: {tokens}
store:
  type: postgres
  database_file: {database}
objects:
  type: s3
  endpoint_url: {s3_server.endpoint_url}
  bucket: {BUCKET}
  prefix: {prefix}
  access_key_file: {s3_server.access_key_file}
  secret_key_file: {s3_server.secret_key_file}
partial_ttl: 7d
"""
    )
    assert cli_main(["receiver", "config", "check", str(config)]) == 0
    assert "store postgres, objects s3" in capsys.readouterr().out
    assert cli_main(["receiver", "config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"listen", "data", "store", "objects"} <= set(schema["properties"])
    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text().replace("  type: s3", "  type: s4"))
    assert cli_main(["receiver", "config", "check", str(broken)]) == 2
    assert f"{broken}:" in capsys.readouterr().err
    assert cli_main(["receiver", "-c", str(config), "--listen", "127.0.0.1:0"]) == 2
    assert "leave out --listen" in capsys.readouterr().err

    data = b"snapshot " * 500
    digest = hashlib.sha256(data).hexdigest()
    with receiver_process(["-c", str(config)], tmp_path) as (url, log):
        auth = {"Authorization": "Bearer token-one"}
        request = urllib.request.Request(
            f"{url}/v1/appliances/ship-1/payloads/{digest}",
            data=data,
            method="PATCH",
            headers={
                **auth,
                "Upload-Offset": "0",
                "Upload-Length": str(len(data)),
                "Content-Type": "application/offset+octet-stream",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Upload-Complete"] == "1"
    listening = next(e for e in log_events(log) if e["msg"] == "receiver listening")
    assert listening["database"].startswith("postgresql 127.0.0.1:")
    assert listening["objects"] == f"s3 {s3_server.endpoint_url}/{BUCKET}/{prefix}"
    assert asyncio.run(read_back(bucket_settings(s3_server, prefix), digest)) == data
