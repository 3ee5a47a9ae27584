"""The content-addressed payload store: files named by sha256, written temp -> fsync -> rename."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from sync.errors import PayloadError, StorageFull
from sync.records import PayloadRef

# fullmatch only: `$` would also accept a trailing newline.
_SHA256 = re.compile(r"[0-9a-f]{64}")


def fsync_dir(path: Path) -> None:
    """Make a rename or create in `path` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PayloadStore:
    """Payload files under `root/ab/abcdef...`; a name is the sha256 of the content, so a file is
    either complete and correct or absent (temp files live in `root/tmp` until renamed)."""

    def __init__(self, root: Path, *, on_disk_full: Callable[[], None] | None = None) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.on_disk_full = on_disk_full
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        # The only way a path is built from a name: a strict hex check keeps requests
        # (later: the status page) from ever reaching outside the store.
        if not _SHA256.fullmatch(sha256):
            raise PayloadError(f"not a sha256 payload name: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put_bytes(self, data: bytes, media_type: str = "application/octet-stream") -> PayloadRef:
        """Store `data` durably and return its reference. Blocking: call off the event loop."""
        sha256 = hashlib.sha256(data).hexdigest()
        final = self.path_for(sha256)
        if final.exists() and final.stat().st_size == len(data):
            return PayloadRef(sha256, len(data), media_type)
        temp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with temp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                # The new shard's own entry must be durable too, or the file goes with it.
                fsync_dir(self.root)
            temp.replace(final)
            fsync_dir(final.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                if self.on_disk_full is not None:
                    self.on_disk_full()
                raise StorageFull(None) from exc
            raise PayloadError(f"cannot store payload {sha256[:12]}: {exc.strerror}") from exc
        return PayloadRef(sha256, len(data), media_type)

    async def put(self, data: bytes, media_type: str = "application/octet-stream") -> PayloadRef:
        return await asyncio.to_thread(self.put_bytes, data, media_type)

    def read(self, sha256: str) -> bytes:
        try:
            return self.path_for(sha256).read_bytes()
        except OSError as exc:
            raise PayloadError(f"cannot read payload {sha256[:12]}: {exc.strerror}") from exc

    def delete(self, sha256: str) -> int:
        """Remove a payload file; return the bytes freed (0 if it was already gone)."""
        path = self.path_for(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def files(self) -> Iterator[tuple[str, int]]:
        """Every stored payload as (sha256, size on disk)."""
        for shard in self.root.iterdir():
            if shard.name == "tmp" or not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if entry.is_file() and _SHA256.fullmatch(entry.name):
                    yield entry.name, entry.stat().st_size

    def stray_files(self) -> Iterator[Path]:
        """Files in the store that are not payloads (left-over temp files, foreign names)."""
        yield from (path for path in self.tmp.iterdir() if path.is_file())
        for shard in self.root.iterdir():
            if shard.is_file():
                yield shard  # nothing belongs directly in the store's root
            if shard.name == "tmp" or not shard.is_dir():
                continue
            for path in shard.iterdir():
                if not _SHA256.fullmatch(path.name):
                    yield path

    def total_bytes(self) -> int:
        return sum(size for _, size in self.files())
