"""Builds the destination for one `sync.destinations` entry (not entered: the caller owns it)."""

from __future__ import annotations

from pathlib import Path

from config.shipping import DirectoryDestination, HttpDestination, S3Destination
from sync.destination import Destination
from sync.directory import DirectoryTarget
from sync.http_client import HttpTarget
from sync.s3 import S3Target


def make_target(
    cfg: HttpDestination | DirectoryDestination | S3Destination,
    appliance_id: str,
    data_dir: Path,
    chunk_size: int,
) -> Destination:
    if isinstance(cfg, DirectoryDestination):
        if not cfg.path.is_absolute():
            # Relative to the data directory, so a profile can ship "next door" wherever
            # --data-dir points (the demo profile does).
            cfg = cfg.model_copy(update={"path": data_dir / cfg.path})
            return DirectoryTarget(cfg, appliance_id, chunk_size, create=True)
        return DirectoryTarget(cfg, appliance_id, chunk_size)
    if isinstance(cfg, S3Destination):
        return S3Target(cfg, appliance_id, chunk_size)
    return HttpTarget(cfg, appliance_id, chunk_size)
