"""The `directory` destination: a mounted USB disk or NAS share. Every file is written to a
temporary name, fsync'd and renamed, and a batch counts as delivered only once its manifest is
in place, so a disk pulled mid-write never leaves anything partial that looks complete.

Objects are named by appliance *and journal* (sync/identity.py), so two journals under one
appliance id (a replaced disk, a factory reset, two boxes given one config) never overwrite each
other. Each journal also keeps a small marker, `journal.json`, that says when it was first and
last seen; comparing the markers under one appliance id tells a journal that replaced another
(never a problem) from two that ship at the same time (two boxes share one id: a collision,
flagged in `concurrent-journals.json` and handed to the engine): sync/journal_markers.py."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from config.shipping import DirectoryDestination
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
    JournalMarker,
    MarkerClock,
    collision_for,
    flag_json,
    live_alongside,
    next_marker,
    parse_marker,
)
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
    """Layout under `path` (JOURNAL: the journal's id, sync/identity.py):

    records/APPLIANCE/JOURNAL/PRIORITY/FIRST-LAST.ndjson.gz    (the batch, gzip NDJSON)
    records/APPLIANCE/JOURNAL/PRIORITY/FIRST-LAST.manifest.json (written last: the batch is complete)
    records/APPLIANCE/JOURNAL/journal.json                     (the journal's marker)
    records/APPLIANCE/concurrent-journals.json                 (only while two journals are live)
    payloads/APPLIANCE/JOURNAL/AB/SHA256                       (renamed into place after its hash checks)

    Records journalled before journals had identities (legacy) keep the layout they always had,
    records/APPLIANCE/PRIORITY/... and payloads/APPLIANCE/AB/SHA256, so a batch resent after an
    upgrade lands on the file it landed on before.
    """

    dedups_records = False

    def __init__(
        self,
        cfg: DirectoryDestination,
        appliance_id: str,
        chunk_size: int,
        *,
        create: bool = False,
        collision_quiet_s: float = COLLISION_QUIET_S,
        marker_refresh_s: float = MARKER_REFRESH_S,
    ) -> None:
        self.cfg = cfg
        # Only a folder of our own (inside the data directory) is created; a USB mount point
        # that is missing means the disk is not there.
        self.create = create
        self.name = cfg.name
        self.root = cfg.path
        self.appliance_id = appliance_id
        self.chunk_size = chunk_size
        self.collision_quiet_s = collision_quiet_s
        self.collision: JournalCollision | None = None
        self._markers = MarkerClock(marker_refresh_s)

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

    # ------------------------------------------------------------------------- layout

    def appliance_folder(self, appliance_id: str | None = None) -> Path:
        return self.root / "records" / (appliance_id or self.appliance_id)

    def batch_folder(self, batch: Batch) -> Path:
        folder = self.appliance_folder(batch.appliance_id)
        if batch.journal_id is not None:
            folder = folder / batch.journal_id
        return folder / batch.priority.label

    def payload_path(self, sha256: str, journal_id: str | None = None) -> Path:
        folder = self.root / "payloads" / self.appliance_id
        if journal_id is not None:
            folder = folder / journal_id
        return folder / sha256[:2] / sha256

    def marker_path(self, journal_id: str, appliance_id: str | None = None) -> Path:
        return self.appliance_folder(appliance_id) / journal_id / MARKER_NAME

    def flag_path(self, appliance_id: str | None = None) -> Path:
        return self.appliance_folder(appliance_id) / FLAG_NAME

    # ------------------------------------------------------------------------- records

    async def send_batch(self, batch: Batch, limiter: RateLimiter) -> None:
        await limiter.consume(len(batch.body))
        try:
            await asyncio.to_thread(self._write_batch, batch)
        except OSError as exc:
            raise self._error(f"batch {batch.batch_id} not written", exc) from exc
        if batch.journal_id is not None and self._markers.due(batch.journal_id):
            try:
                await asyncio.to_thread(
                    self._keep_marker, batch.appliance_id, batch.journal_id, batch.follows
                )
            except OSError as exc:
                self._markers.failed(self.name, f"{exc.strerror} ({exc.filename})")

    def _write_batch(self, batch: Batch) -> None:
        if not self._usable():
            raise OSError(errno.ENOENT, "destination directory is not there", str(self.root))
        folder = self.batch_folder(batch)
        stem = f"{batch.first_seq:012d}-{batch.last_seq:012d}"
        stored = folder / f"{stem}.ndjson.gz"
        if (folder / f"{stem}.manifest.json").exists() and stored.exists():
            conflicts = conflicting_seqs(stored.read_bytes(), batch)
            if conflicts == []:
                return  # landed before a crash, never acknowledged: already complete here
            if conflicts:
                raise conflict_error(self.name, batch, str(stored), conflicts)
        _write_atomically(stored, batch.body)
        manifest: dict[str, object] = {
            "batch_id": batch.batch_id,
            "appliance_id": batch.appliance_id,
        }
        if batch.journal_id is not None:
            manifest["journal_id"] = batch.journal_id
        manifest |= {
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

    # ------------------------------------------------------------------------- markers

    def _keep_marker(self, appliance_id: str, journal_id: str, follows: str | None = None) -> None:
        """Write our journal's marker, then compare it with the other journals' markers under
        the same appliance id: set `collision` and the flag file, or clear both."""
        now = datetime.now(UTC)
        path = self.marker_path(journal_id, appliance_id)
        first_seen = self._markers.first_seen
        if first_seen is None:  # the first time in this process: keep what the disk says
            existing = _read_marker(path, journal_id)
            first_seen = None if existing is None else existing.first_seen
        ours = next_marker(appliance_id, journal_id, first_seen, now, follows)
        _write_atomically(path, ours.to_json())
        self._markers.first_seen = ours.first_seen

        others = []
        for entry in self.appliance_folder(appliance_id).iterdir():
            if entry.name != journal_id and valid_journal_id(entry.name) and entry.is_dir():
                marker = _read_marker(entry / MARKER_NAME, entry.name)
                if marker is not None:
                    others.append(marker)
        live = live_alongside(ours, others, now, self.collision_quiet_s)
        where = f"directory destination {self.name!r} ({self.root})"
        self.collision = collision_for(ours, live, where)
        flag = self.flag_path(appliance_id)
        if self.collision is not None:
            _write_atomically(flag, flag_json(ours, self.collision, now))
        elif flag.exists():
            flag.unlink(missing_ok=True)
            fsync_dir(flag.parent)
        self._markers.done()

    # ------------------------------------------------------------------------- payloads

    async def send_payload(
        self,
        sha256: str,
        size: int,
        media_type: str,
        path: Path,
        limiter: RateLimiter,
        journal_id: str | None = None,
    ) -> int:
        target = self.payload_path(sha256, journal_id)
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


def _read_marker(path: Path, journal_id: str) -> JournalMarker | None:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return parse_marker(data, journal_id)


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
