"""The receiver's payload files: partial uploads appended and fsync'd chunk by chunk, verified
by sha256 and renamed into place, and abandoned partials found and removed."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from receiver.protocol import PARTIAL_DIR, SHA256_RE, valid_appliance_id
from sync.payloads import fsync_dir

_HASH_CHUNK = 1024 * 1024


def ensure_dir(path: Path) -> None:
    """mkdir, durable: a new directory's entry is fsync'd in its parent."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    fsync_dir(path.parent)


def upload_state(final: Path, partial: Path) -> tuple[int, bool]:
    """(bytes held, complete?): a file in payloads/ is complete, since only verified ones get there."""
    try:
        return final.stat().st_size, True
    except FileNotFoundError:
        pass
    try:
        return partial.stat().st_size, False
    except FileNotFoundError:
        return 0, False


def append_chunk(partial: Path, data: bytes | bytearray) -> int:
    """Append, flush and fsync `data`; the new size of the partial file."""
    ensure_dir(partial.parent)
    created = not partial.exists()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if created:
        fsync_dir(partial.parent)
    return size


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def abandoned_partials(data_dir: Path, ttl_s: float, now: float) -> list[tuple[str, str]]:
    """(appliance_id, sha256) of partial uploads last written more than `ttl_s` before `now`."""
    found: list[tuple[str, str]] = []
    root = data_dir / PARTIAL_DIR
    if not root.is_dir():
        return found
    for appliance_dir in root.iterdir():
        if not (appliance_dir.is_dir() and valid_appliance_id(appliance_dir.name)):
            continue
        for part in appliance_dir.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if SHA256_RE.fullmatch(part.stem) and now - part.stat().st_mtime > ttl_s:
                    found.append((appliance_dir.name, part.stem))
    return found


def remove_if_stale(partial: Path, ttl_s: float, now: float) -> int:
    """Delete `partial` if it is still stale (re-checked under the upload lock); its size, or 0."""
    try:
        stat = partial.stat()
    except FileNotFoundError:
        return 0
    if now - stat.st_mtime <= ttl_s:
        return 0  # an upload resumed since the scan
    partial.unlink()
    fsync_dir(partial.parent)
    return stat.st_size


def complete_upload(partial: Path, final: Path, sha256: str) -> bool:
    """Verify the partial file; move it into place (True) or discard it (False)."""
    if _file_sha256(partial) != sha256:
        partial.unlink()
        fsync_dir(partial.parent)
        return False
    ensure_dir(final.parent)
    partial.replace(final)
    fsync_dir(final.parent)
    fsync_dir(partial.parent)
    return True
