"""Where fitted anomaly baselines live on the device: one file per version under
`<data_dir>/models/baselines/<source>/`, and a `current` file naming the one in use, so a restart
scores with the same baseline instead of fitting a new one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from inference.anomaly import Baseline, BaselineError
from sync.payloads import fsync_dir

log = logging.getLogger(__name__)

CURRENT = "current.json"


class BaselineStore:
    """Saves baselines atomically (a power cut leaves the old one or the new one, never half of
    either) and loads the current one per source."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> BaselineStore:
        return cls(data_dir / "models" / "baselines")

    def folder(self, source: str) -> Path:
        return self.root / source

    def save(self, source: str, baseline: Baseline, *, make_current: bool = True) -> Path:
        """Write `baseline` as `<version>.npz`; with `make_current`, scoring uses it from now on."""
        folder = self.folder(source)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{baseline.version}.npz"
        partial = folder / f".{baseline.version}.npz.partial"
        baseline.save(partial)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(path)
        if make_current:
            self._write_current(source, baseline.version)
        fsync_dir(folder)
        return path

    def _write_current(self, source: str, version: str) -> None:
        folder = self.folder(source)
        partial = folder / f".{CURRENT}.partial"
        with partial.open("w", encoding="utf-8") as handle:
            json.dump({"version": version}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(folder / CURRENT)

    def current_version(self, source: str) -> str | None:
        try:
            doc = json.loads((self.folder(source) / CURRENT).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("baseline of %s: unreadable %s (%s); fitting anew", source, CURRENT, exc)
            return None
        version = doc.get("version") if isinstance(doc, dict) else None
        return version if isinstance(version, str) else None

    def load_current(self, source: str) -> Baseline | None:
        """The baseline in use for `source`, or None (none yet, or its file is damaged: logged,
        and the caller fits a new one rather than scoring with a broken one)."""
        version = self.current_version(source)
        if version is None:
            return None
        path = self.folder(source) / f"{version}.npz"
        try:
            return Baseline.load(path)
        except (OSError, BaselineError) as exc:
            log.warning("baseline of %s: %s; fitting anew", source, exc)
            return None

    def versions(self, source: str) -> list[str]:
        """Every saved version of `source`, oldest first."""
        folder = self.folder(source)
        if not folder.is_dir():
            return []
        files = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        return [p.stem for p in files]
