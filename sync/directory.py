"""The `directory` destination: a mounted USB disk or NAS share. Every file is written to a
temporary name, fsync'd and renamed, and a batch counts as delivered only once its manifest is
in place, so a disk pulled mid-write never leaves anything partial that looks complete."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
from pathlib import Path

from config.models import DirectoryDestination
from sync.destination import Batch, DestinationError, RateLimiter
from sync.payloads import fsync_dir


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    with temp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(target)
    fsync_dir(target.parent)


class DirectoryTarget:
    """Layout under `path`:

    records/APPLIANCE/PRIORITY/FIRST-LAST.ndjson.gz   (the batch, gzip NDJSON)
    records/APPLIANCE/PRIORITY/FIRST-LAST.manifest.json (written last: the batch is complete)
    payloads/APPLIANCE/AB/SHA256                      (renamed into place after its hash checks)
    """

    dedups_records = False

    def __init__(
        self, cfg: DirectoryDestination, appliance_id: str, chunk_size: int, *, create: bool = False
    ) -> None:
        self.cfg = cfg
        # Only a folder of our own (inside the data directory) is created; a USB mount point
        # that is missing means the disk is not there.
        self.create = create
        self.name = cfg.name
        self.root = cfg.path
        self.appliance_id = appliance_id
        self.chunk_size = chunk_size

    async def __aenter__(self) -> DirectoryTarget:
        if self.create:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def _usable(self) -> bool:
        if not self.root.is_dir():
            return False
        if self.cfg.require_mount and not os.path.ismount(self.root):
            return False
        return os.access(self.root, os.W_OK)

    async def reachable(self) -> bool:
        return await asyncio.to_thread(self._usable)

    def _error(self, what: str, exc: OSError) -> DestinationError:
        # A pulled disk, a full disk, a share gone away: all worth trying again later.
        retryable = exc.errno != errno.EACCES
        return DestinationError(
            self.name, f"{what}: {exc.strerror} ({exc.filename})", retryable=retryable
        )

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        await limiter.consume(len(batch.body))
        try:
            await asyncio.to_thread(self._write_batch, batch)
        except OSError as exc:
            raise self._error(f"batch {batch.batch_id} not written", exc) from exc

    def _write_batch(self, batch: Batch) -> None:
        if not self._usable():
            raise OSError(errno.ENOENT, "destination directory is not there", str(self.root))
        folder = self.root / "records" / batch.appliance_id / batch.priority.label
        stem = f"{batch.first_seq:012d}-{batch.last_seq:012d}"
        _write_atomically(folder / f"{stem}.ndjson.gz", batch.body)
        manifest = {
            "batch_id": batch.batch_id,
            "appliance_id": batch.appliance_id,
            "priority": batch.priority.label,
            "first_seq": batch.first_seq,
            "last_seq": batch.last_seq,
            "records": batch.records,
            "file": f"{stem}.ndjson.gz",
            "bytes": len(batch.body),
            "sha256": hashlib.sha256(batch.body).hexdigest(),
            "payloads": list(batch.payloads),
        }
        _write_atomically(folder / f"{stem}.manifest.json", json.dumps(manifest, indent=1).encode())

    async def send_payload(
        self, sha256: str, size: int, media_type: str, path: Path, limiter: RateLimiter
    ) -> int:
        target = self.root / "payloads" / self.appliance_id / sha256[:2] / sha256
        partial = target.with_name(f".{sha256}.part")
        sent = 0
        try:
            if not await asyncio.to_thread(self._usable):
                raise OSError(errno.ENOENT, "destination directory is not there", str(self.root))
            if await asyncio.to_thread(lambda: target.exists() and target.stat().st_size == size):
                return 0
            await asyncio.to_thread(partial.parent.mkdir, parents=True, exist_ok=True)
            offset = await asyncio.to_thread(
                lambda: partial.stat().st_size if partial.exists() else 0
            )
            if offset > size:
                offset = 0
            while offset < size:
                chunk = await asyncio.to_thread(_read_chunk, path, offset, self.chunk_size)
                if not chunk:
                    raise OSError(errno.EIO, "payload shorter than recorded", str(path))
                await limiter.consume(len(chunk))
                await asyncio.to_thread(_append_chunk, partial, offset, chunk)
                offset += len(chunk)
                sent += len(chunk)
            await asyncio.to_thread(self._finish_payload, partial, target, sha256)
        except OSError as exc:
            raise self._error(f"payload {sha256[:12]} not written", exc) from exc
        return sent

    @staticmethod
    def _finish_payload(partial: Path, target: Path, sha256: str) -> None:
        digest = hashlib.sha256()
        with partial.open("rb") as handle:
            for block in iter(lambda: handle.read(1024 * 1024), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)  # start over next time rather than ship a bad file
            raise OSError(errno.EIO, "copied payload does not match its sha256", str(partial))
        partial.replace(target)
        fsync_dir(target.parent)


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def _append_chunk(partial: Path, offset: int, chunk: bytes) -> None:
    with partial.open("r+b" if partial.exists() else "wb") as handle:
        handle.truncate(offset)
        handle.seek(offset)
        handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
