"""Journal identities in the objects of the `directory` and `s3` destinations: two journals under
one appliance id (a replaced disk, two boxes given one config) never overwrite each other's
batches or payloads, their `journal.json` markers tell a replacement from two live boxes, and
legacy batches (journalled before identities) keep their old keys.

Real things only: a directory in tmp_path, and the SeaweedFS server of tests/test_s3.py."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest

from config.shipping import DirectoryDestination, S3Destination, SyncSection
from sync import Journal, NewRecord, PayloadRef, PayloadStore, Priority, StoredRecord
from sync.destination import Destination, RateLimiter, encode_batch
from sync.directory import DirectoryTarget
from sync.engine import SyncEngine
from sync.identity import valid_journal_id
from sync.journal_markers import COLLISION_QUIET_S
from sync.records import format_ts, parse_ts
from sync.s3 import S3Target
from sync.targets import make_target
from tests.seaweed import BUCKET, S3Server
from tests.test_s3 import s3_cfg

APPLIANCE = "same-01"
CHUNK = 64 * 1024
SHARED_BLOB = b"the same snapshot on both boxes " * 300


# ----------------------------------------------------------------------------- two boxes


@dataclass
class Box:
    """One appliance: its own data directory, journal and payload store, the shared id."""

    data_dir: Path
    journal: Journal
    store: PayloadStore
    blobs: dict[str, bytes] = field(default_factory=dict)
    appended: list[int] = field(default_factory=list)

    @property
    def journal_id(self) -> str:
        return self.journal.identity.journal_id

    async def fill(self, round_no: int, per_priority: int = 6) -> None:
        """Records of every priority, interleaved; some alerts and samples carry payloads, one
        of them the same bytes on both boxes (so the same sha256)."""
        for i in range(per_priority * 4):
            priority = Priority(1 + i % 4)
            refs: tuple[PayloadRef, ...] = ()
            if priority in (Priority.ALERT, Priority.SAMPLE) and i % 8 < 4:
                data = SHARED_BLOB if i == 0 else f"{self.data_dir.name} {round_no} {i} ".encode()
                ref = await self.store.put(data * (1 if i == 0 else 50))
                self.blobs[ref.sha256] = data * (1 if i == 0 else 50)
                refs = (ref,)
            body = {"box": self.data_dir.name, "round": round_no, "i": i}
            self.appended.append(
                await self.journal.append(
                    NewRecord("src", "reading", priority, body, payloads=refs)
                )
            )

    async def all_records(self) -> list[StoredRecord]:
        def read(reader: Any) -> list[StoredRecord]:
            return [
                record
                for priority in Priority
                for record in reader.records_after(priority, 0, limit=10**6, max_bytes=10**9)
            ]

        records: list[StoredRecord] = await self.journal.read(read)
        return records


@pytest.fixture
async def boxes(tmp_path: Path) -> AsyncIterator[tuple[Box, Box]]:
    opened: list[Box] = []
    try:
        for name in ("box-a", "box-b"):
            data_dir = tmp_path / name
            store = PayloadStore(data_dir / "payloads")
            journal = await Journal.open(data_dir, appliance_id=APPLIANCE, payloads=store)
            opened.append(Box(data_dir, journal, store))
        assert opened[0].journal_id != opened[1].journal_id
        assert all(valid_journal_id(box.journal_id) for box in opened)
        yield opened[0], opened[1]
    finally:
        for box in opened:
            await box.journal.close()


def sync_settings() -> SyncSection:
    return SyncSection.model_validate({"batch_records": 4, "chunk_size": "64KiB"})


# ----------------------------------------------------------------------------- destinations


class Site(Protocol):
    """One real destination as the tests look at it: objects by their key relative to the
    destination's root (directory: path under `path`; s3: key after `prefix`)."""

    kind: str

    @property
    def cfg(self) -> DirectoryDestination | S3Destination: ...

    def target(self, data_dir: Path, marker_refresh_s: float | None = None) -> Destination: ...
    async def objects(self) -> dict[str, bytes]: ...
    async def put(self, key: str, data: bytes) -> None: ...

    def batch_key(self, journal_id: str | None, priority: str, date: str, stem: str) -> str: ...
    def payload_key(self, journal_id: str | None, sha256: str) -> str: ...
    def marker_key(self, journal_id: str) -> str: ...
    def flag_key(self) -> str: ...


class DirectorySite:
    kind = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cfg = DirectoryDestination.model_validate(
            {"name": "usb", "type": "directory", "path": str(root)}
        )

    def target(self, data_dir: Path, marker_refresh_s: float | None = None) -> Destination:
        if marker_refresh_s is None:  # as the daemon builds it
            return make_target(self.cfg, APPLIANCE, data_dir, CHUNK)
        return DirectoryTarget(self.cfg, APPLIANCE, CHUNK, marker_refresh_s=marker_refresh_s)

    async def objects(self) -> dict[str, bytes]:
        return {
            path.relative_to(self.root).as_posix(): path.read_bytes()
            for path in sorted(self.root.rglob("*"))
            if path.is_file()
        }

    async def put(self, key: str, data: bytes) -> None:
        (self.root / key).parent.mkdir(parents=True, exist_ok=True)
        (self.root / key).write_bytes(data)

    def batch_key(self, journal_id: str | None, priority: str, date: str, stem: str) -> str:
        journal = "" if journal_id is None else f"{journal_id}/"
        return f"records/{APPLIANCE}/{journal}{priority}/{stem}.ndjson.gz"

    def payload_key(self, journal_id: str | None, sha256: str) -> str:
        journal = "" if journal_id is None else f"{journal_id}/"
        return f"payloads/{APPLIANCE}/{journal}{sha256[:2]}/{sha256}"

    def marker_key(self, journal_id: str) -> str:
        return f"records/{APPLIANCE}/{journal_id}/journal.json"

    def flag_key(self) -> str:
        return f"records/{APPLIANCE}/concurrent-journals.json"


class S3Site:
    kind = "s3"

    def __init__(self, server: S3Server, prefix: str, reader: S3Target) -> None:
        self.cfg = s3_cfg(server, prefix)
        self.prefix = prefix
        self.reader = reader

    def target(self, data_dir: Path, marker_refresh_s: float | None = None) -> Destination:
        if marker_refresh_s is None:  # as the daemon builds it
            return make_target(self.cfg, APPLIANCE, data_dir, CHUNK)
        return S3Target(self.cfg, APPLIANCE, CHUNK, marker_refresh_s=marker_refresh_s)

    async def objects(self) -> dict[str, bytes]:
        client = self.reader.client
        found: dict[str, bytes] = {}
        kwargs: dict[str, Any] = {"Bucket": BUCKET, "Prefix": self.prefix}
        while True:
            listing = await client.list_objects_v2(**kwargs)
            for item in listing.get("Contents", []):
                answer = await client.get_object(Bucket=BUCKET, Key=item["Key"])
                async with answer["Body"] as body:
                    found[item["Key"][len(self.prefix) :]] = await body.read()
            token = listing.get("NextContinuationToken")
            if not listing.get("IsTruncated") or not token:
                return found
            kwargs["ContinuationToken"] = token

    async def metadata(self, key: str) -> dict[str, str]:
        head = await self.reader.client.head_object(Bucket=BUCKET, Key=self.prefix + key)
        return dict(head.get("Metadata", {}))

    async def put(self, key: str, data: bytes) -> None:
        await self.reader.client.put_object(Bucket=BUCKET, Key=self.prefix + key, Body=data)

    def batch_key(self, journal_id: str | None, priority: str, date: str, stem: str) -> str:
        journal = "" if journal_id is None else f"{journal_id}/"
        return f"{APPLIANCE}/{journal}records/{priority}/{date}/{stem}.ndjson.gz"

    def payload_key(self, journal_id: str | None, sha256: str) -> str:
        journal = "" if journal_id is None else f"{journal_id}/"
        return f"{APPLIANCE}/{journal}payloads/{sha256[:2]}/{sha256}"

    def marker_key(self, journal_id: str) -> str:
        return f"{APPLIANCE}/{journal_id}/journal.json"

    def flag_key(self) -> str:
        return f"{APPLIANCE}/concurrent-journals.json"


@pytest.fixture(params=["directory", "s3"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Site]:
    if request.param == "directory":
        root = tmp_path / "usb"
        root.mkdir()
        yield DirectorySite(root)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    prefix = f"{request.node.name}/".replace("[", "-").replace("]", "")
    async with S3Target(s3_cfg(server, prefix), "reader", CHUNK) as reader:
        yield S3Site(server, prefix, reader)


@dataclass
class Shipper:
    box: Box
    target: Destination
    engine: SyncEngine


async def shippers(
    stack: AsyncExitStack, site: Site, boxes: tuple[Box, ...], marker_refresh_s: float | None = None
) -> list[Shipper]:
    out = []
    for box in boxes:
        target = await stack.enter_async_context(site.target(box.data_dir, marker_refresh_s))
        engine = SyncEngine(box.journal, box.store, target, site.cfg, sync_settings())
        out.append(Shipper(box, target, engine))
    return out


def shipped_lines(objects: dict[str, bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, data in objects.items():
        if key.endswith(".ndjson.gz"):
            for line in gzip.decompress(data).splitlines():
                yield key, json.loads(line)


def marker(objects: dict[str, bytes], site: Site, journal_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(objects[site.marker_key(journal_id)])
    return doc


# ----------------------------------------------------------------------------- the tests


async def test_two_live_journals_under_one_id_keep_every_record_and_see_each_other(
    site: Site, boxes: tuple[Box, Box]
) -> None:
    a, b = boxes
    async with AsyncExitStack() as stack:
        # Markers refreshed on every batch: two boxes shipping side by side for minutes.
        ships = await shippers(stack, site, boxes, marker_refresh_s=0.0)
        for round_no in range(2):
            for ship in ships:
                await ship.box.fill(round_no)
                assert await ship.engine.drain() is True
        collisions = [ship.target.collision for ship in ships]
    objects = await site.objects()

    # Both journals handed out the same seqs: only the journal in the key keeps them apart.
    assert set(a.appended) & set(b.appended)
    seen: Counter[tuple[str, int]] = Counter()
    shipped: dict[tuple[str, int], dict[str, Any]] = {}
    for key, record in shipped_lines(objects):
        # The batch's journal is in its key (the lines are records as the journal holds them).
        journal_id = next(part for part in key.split("/") if valid_journal_id(part))
        assert record["appliance_id"] == APPLIANCE
        assert f"{APPLIANCE}/{journal_id}/" in key, key
        seen[(journal_id, int(record["seq"]))] += 1
        shipped[(journal_id, int(record["seq"]))] = record
    assert all(count == 1 for count in seen.values()), "a record was stored twice"
    journalled = set()
    for box in boxes:
        expected = {(box.journal_id, seq) for seq in box.appended}
        assert expected <= set(seen), f"records of {box.data_dir.name} missing or overwritten"
        for stored in await box.all_records():
            journalled.add((box.journal_id, stored.seq))
            if (box.journal_id, stored.seq) in expected:
                assert shipped[(box.journal_id, stored.seq)]["body"] == stored.body
    assert set(seen) <= journalled

    # Payloads under each journal, the shared one twice (one copy per journal).
    for box in boxes:
        for sha256, data in box.blobs.items():
            assert objects[site.payload_key(box.journal_id, sha256)] == data
    shared = hashlib.sha256(SHARED_BLOB).hexdigest()
    assert all(site.payload_key(box.journal_id, shared) in objects for box in boxes)
    # Every object is the flag or lies under one of the journals: nothing in the legacy layout.
    for key in objects:
        assert key == site.flag_key() or any(
            f"{APPLIANCE}/{box.journal_id}/" in key for box in boxes
        ), key

    # Manifests (directory) and object metadata (s3) name the journal.
    for key in objects:
        if key.endswith(".manifest.json"):
            manifest = json.loads(objects[key])
            assert key.split("/")[2] == manifest["journal_id"]
            data = objects[key.rsplit("/", 1)[0] + "/" + manifest["file"]]
            assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
        elif key.endswith(".ndjson.gz") and isinstance(site, S3Site):
            assert (await site.metadata(key))["journal-id"] == key.split("/")[1]

    # Each journal's marker, and each box warned of the other.
    both = tuple(sorted([a.journal_id, b.journal_id]))
    for box in boxes:
        doc = marker(objects, site, box.journal_id)
        assert doc["appliance_id"] == APPLIANCE and doc["journal_id"] == box.journal_id
        assert doc["first_seen"].endswith("Z") and doc["first_seen"] <= doc["last_seen"]
    for collision in collisions:
        assert collision is not None
        assert collision.journals == both
        assert APPLIANCE in collision.detail and "appliance.id" in collision.detail
        assert f"2 live journals at {site.kind}" in collision.detail
    flag = json.loads(objects[site.flag_key()])
    assert flag["appliance_id"] == APPLIANCE
    assert tuple(flag["journals"]) == both
    assert flag["detected_by"] in both
    assert flag["detected_at"].endswith("Z") and "appliance.id" in flag["detail"]


async def test_a_journal_that_replaced_another_is_no_collision(
    site: Site, boxes: tuple[Box, Box]
) -> None:
    """A replaced disk: the old journal shipped and stopped before the new one appeared."""
    old, new = boxes
    async with AsyncExitStack() as stack:
        (first,) = await shippers(stack, site, (old,), marker_refresh_s=0.0)
        await old.fill(0)
        assert await first.engine.drain() is True
        assert first.target.collision is None
    # Some junk beside the journals is ignored: a corrupt marker, a folder that is no journal.
    await site.put(site.marker_key("f" * 32), b"{not json")
    await site.put(site.marker_key("not-a-journal"), json.dumps({"journal_id": "x"}).encode())

    async with AsyncExitStack() as stack:
        (second,) = await shippers(stack, site, (new,), marker_refresh_s=0.0)
        for round_no in range(2):
            await new.fill(round_no)
            assert await second.engine.drain() is True
            assert second.target.collision is None
    objects = await site.objects()
    assert site.flag_key() not in objects
    old_marker, new_marker = (
        marker(objects, site, old.journal_id),
        marker(objects, site, new.journal_id),
    )
    assert old_marker["last_seen"] < new_marker["first_seen"]

    # The old disk comes back for a moment, long enough to ship: now both are live.
    async with AsyncExitStack() as stack:
        (again,) = await shippers(stack, site, (old,), marker_refresh_s=0.0)
        await old.fill(1)
        assert await again.engine.drain() is True
        assert again.target.collision is not None
        # Its marker kept the first sighting of the first process.
        assert (
            marker(await site.objects(), site, old.journal_id)["first_seen"]
            == (old_marker["first_seen"])
        )
    assert site.flag_key() in await site.objects()

    # ...and goes away again: once it has been quiet for COLLISION_QUIET_S, the next refresh of
    # the new journal clears the warning and removes the flag.
    quiet = datetime.now(UTC) - timedelta(seconds=COLLISION_QUIET_S + 60)
    doc = marker(await site.objects(), site, old.journal_id)
    doc["last_seen"] = format_ts(quiet)
    doc["first_seen"] = format_ts(min(parse_ts(doc["first_seen"]), quiet))
    await site.put(site.marker_key(old.journal_id), json.dumps(doc).encode())
    async with AsyncExitStack() as stack:
        (second,) = await shippers(stack, site, (new,), marker_refresh_s=0.0)
        await new.fill(2)
        assert await second.engine.drain() is True
        assert second.target.collision is None
    assert site.flag_key() not in await site.objects()


async def test_markers_are_refreshed_at_most_once_a_minute(
    site: Site, boxes: tuple[Box, Box]
) -> None:
    """As the daemon builds the destination (make_target, default refresh): the marker is
    written with the first batch, not rewritten by every batch after it."""
    box = boxes[0]
    async with AsyncExitStack() as stack:
        (ship,) = await shippers(stack, site, (box,))
        await box.fill(0)
        assert await ship.engine.drain() is True
        written = marker(await site.objects(), site, box.journal_id)
        await box.fill(1)
        assert await ship.engine.drain() is True
        assert marker(await site.objects(), site, box.journal_id) == written
        assert ship.target.collision is None


async def test_a_legacy_batch_keeps_its_old_key(site: Site, boxes: tuple[Box, Box]) -> None:
    box = boxes[0]
    await box.fill(0, per_priority=3)
    records = await box.journal.read(
        lambda r: r.records_after(Priority.ALERT, 0, limit=10, max_bytes=10**6)
    )
    legacy = encode_batch(APPLIANCE, Priority.ALERT, records, journal_id=None)
    current = encode_batch(APPLIANCE, Priority.ALERT, records, journal_id=box.journal_id)
    sha256 = next(iter(box.blobs))
    path = box.store.path_for(sha256)
    size = len(box.blobs[sha256])
    stem = f"{legacy.first_seq:012d}-{legacy.last_seq:012d}"
    date = records[0].ts[:10]
    async with site.target(box.data_dir) as target:
        await target.send_batch(legacy, RateLimiter(None))
        await target.send_payload(sha256, size, "image/jpeg", path, RateLimiter(None), None)
        objects = await site.objects()
        assert target.collision is None
        assert not any(key.endswith("journal.json") for key in objects)  # no marker for legacy
        assert objects[site.batch_key(None, "alert", date, stem)] == legacy.body
        assert objects[site.payload_key(None, sha256)] == box.blobs[sha256]
        assert "journal_id" not in json.loads(gzip.decompress(legacy.body).splitlines()[0])
        if isinstance(site, DirectorySite):
            manifest = json.loads(objects[f"records/{APPLIANCE}/alert/{stem}.manifest.json"])
            assert "journal_id" not in manifest
            assert manifest["file"] == f"{stem}.ndjson.gz"
        else:
            assert isinstance(site, S3Site)
            key = site.batch_key(None, "alert", date, stem)
            assert "journal-id" not in await site.metadata(key)

        # The same bounds from the journal's own identity land beside it, not on it.
        await target.send_batch(current, RateLimiter(None))
        await target.send_payload(
            sha256, size, "image/jpeg", path, RateLimiter(None), box.journal_id
        )
        objects = await site.objects()
        assert objects[site.batch_key(None, "alert", date, stem)] == legacy.body
        assert objects[site.batch_key(box.journal_id, "alert", date, stem)] == current.body
        assert objects[site.payload_key(box.journal_id, sha256)] == box.blobs[sha256]
        assert site.marker_key(box.journal_id) in objects


async def test_a_marker_that_cannot_be_written_never_fails_a_batch(
    boxes: tuple[Box, Box], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Markers only warn: a marker the disk refuses (here a folder where the file belongs) is
    logged, and the records still ship."""
    box = boxes[0]
    site = DirectorySite(tmp_path / "usb")
    site.root.mkdir()
    (site.root / site.marker_key(box.journal_id) / "in-the-way").mkdir(parents=True)
    async with AsyncExitStack() as stack:
        (ship,) = await shippers(stack, site, (box,), marker_refresh_s=0.0)
        await box.fill(0)
        assert await ship.engine.drain() is True
        assert ship.target.collision is None
    shipped = {int(record["seq"]) for _, record in shipped_lines(await site.objects())}
    assert set(box.appended) <= shipped
    assert "journal marker not kept up to date" in caplog.text
