"""Tests of sync.payloads: content addressing, durability by temp + rename, dedup, safe names."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from sync import PayloadError, PayloadStore


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_put_stores_content_under_its_sha256(payload_store: PayloadStore) -> None:
    data = b"\xff\xd8 a jpeg snapshot \x00" * 100
    ref = await payload_store.put(data, "image/jpeg")
    sha = hashlib.sha256(data).hexdigest()
    assert (ref.sha256, ref.size, ref.media_type) == (sha, len(data), "image/jpeg")
    path = payload_store.root / sha[:2] / sha
    assert payload_store.path_for(sha) == path
    assert path.read_bytes() == data
    assert payload_store.read(sha) == data
    assert all_files(payload_store.root) == [path]  # nothing left in tmp/
    assert list(payload_store.tmp.iterdir()) == []


async def test_identical_content_is_stored_once(payload_store: PayloadStore) -> None:
    data = b"the same clip"
    first = await payload_store.put(data)
    second = await payload_store.put(data, "video/mp4")
    concurrent = await asyncio.gather(*(payload_store.put(data) for _ in range(20)))
    assert {r.sha256 for r in (first, second, *concurrent)} == {first.sha256}
    assert second.media_type == "video/mp4"
    assert all_files(payload_store.root) == [payload_store.path_for(first.sha256)]
    other = await payload_store.put(b"another clip")
    assert other.sha256 != first.sha256
    assert len(all_files(payload_store.root)) == 2
    assert payload_store.total_bytes() == len(data) + len(b"another clip")
    assert sorted(payload_store.files()) == sorted(
        [(first.sha256, len(data)), (other.sha256, len(b"another clip"))]
    )


async def test_put_repairs_a_truncated_file(payload_store: PayloadStore) -> None:
    data = b"0123456789" * 50
    ref = await payload_store.put(data)
    path = payload_store.path_for(ref.sha256)
    path.write_bytes(data[:10])
    assert await payload_store.put(data) == ref
    assert path.read_bytes() == data


def test_put_bytes_of_empty_content(payload_store: PayloadStore) -> None:
    ref = payload_store.put_bytes(b"")
    assert ref.sha256 == hashlib.sha256(b"").hexdigest()
    assert ref.size == 0
    assert payload_store.read(ref.sha256) == b""


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../../etc/passwd",
        "../" + "a" * 61,
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "g" * 64,
        "/" + "a" * 63,
        "a" * 62 + "/.",
        "a" * 64 + "\n",
        "a" * 64 + "/../x",
        "..",
    ],
)
def test_path_for_rejects_names_that_are_not_a_sha256(
    payload_store: PayloadStore, name: str
) -> None:
    with pytest.raises(PayloadError):
        payload_store.path_for(name)
    with pytest.raises(PayloadError):
        payload_store.read(name)
    with pytest.raises(PayloadError):
        payload_store.delete(name)


def test_path_for_stays_inside_the_store(payload_store: PayloadStore) -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    path = payload_store.path_for(sha)
    assert path.resolve().is_relative_to(payload_store.root.resolve())
    assert path.parent.name == sha[:2]


def test_read_and_delete_of_a_missing_payload(payload_store: PayloadStore) -> None:
    sha = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(PayloadError):
        payload_store.read(sha)
    assert payload_store.delete(sha) == 0
    ref = payload_store.put_bytes(b"stored")
    assert payload_store.delete(ref.sha256) == len(b"stored")
    assert not payload_store.path_for(ref.sha256).exists()
    assert payload_store.delete(ref.sha256) == 0


def test_stray_files_are_temp_files_and_foreign_names(payload_store: PayloadStore) -> None:
    ref = payload_store.put_bytes(b"real payload")
    leftover = payload_store.tmp / "abc.part"
    leftover.write_bytes(b"half written")
    foreign = payload_store.path_for(ref.sha256).parent / "notes.txt"
    foreign.write_text("not a payload")
    assert sorted(payload_store.stray_files()) == sorted([leftover, foreign])
    assert list(payload_store.files()) == [(ref.sha256, len(b"real payload"))]


def test_failed_write_leaves_no_temp_file(payload_store: PayloadStore) -> None:
    data = b"cannot land"
    sha = hashlib.sha256(data).hexdigest()
    # The shard cannot be created: a plain file holds its name.
    (payload_store.root / sha[:2]).write_bytes(b"in the way")
    with pytest.raises(PayloadError):
        payload_store.put_bytes(data)
    assert list(payload_store.tmp.iterdir()) == []
